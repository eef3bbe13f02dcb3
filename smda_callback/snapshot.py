"""One no-grad forward over the probes → X (pooled SAE latents) and Y (refusal)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .config import SMDAConfig
from .probes import ProbeSet, TokenizedProbes
from .refusal import build_scorer
from .sae import HookPoint

UserScorer = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Snapshot:
    X: np.ndarray  # [P, k] float64, selected features
    Y: np.ndarray  # [P] float64
    Z: np.ndarray | None = None  # [P, d_sae] all latents (baseline only, for feature selection)
    fve: float | None = None  # SAE's fraction of variance explained on the pooled positions (full passes, this rank)

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.X).all() and np.isfinite(self.Y).all())


class _Captured(Exception):
    pass


class Snapshotter:
    """Owns the probe tokens, the SAE, the hook and the scorer; `take(model)` runs one pass.

    Probes are sorted by length and left-padded so the last position of every row
    is the assistant's first position. Under torch.distributed every rank runs its
    share of the probes and the results are gathered, so all ranks see the same X, Y.
    """

    def __init__(self, probes: ProbeSet, tokenizer: Any, sae: Any, hook: HookPoint, config: SMDAConfig,
                 scorer: UserScorer | None = None, max_length: int | None = None) -> None:
        self.probes = probes
        self.tok = tokenizer
        self.sae = sae
        self.hook = hook
        self.cfg = config
        self.user_scorer = scorer
        self.seconds = 0.0
        self.scorer = None if scorer is not None else build_scorer(tokenizer, config)
        self.tp: TokenizedProbes = probes.tokenize(tokenizer, max_length)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.features: np.ndarray | None = None
        self._fidx: tuple[Any, torch.Tensor] | None = None
        self._fve: torch.Tensor | None = None
        self._fve_sum: torch.Tensor | None = None

    # ------------------------------------------------------------------ encode
    def encode(self, h: torch.Tensor, full: bool = False) -> torch.Tensor:
        """SAE latents for rows of h [N, d]; only the selected ones unless `full`."""
        W = self.sae.W_enc
        h = h.to(device=W.device, dtype=W.dtype)
        if self.cfg.encode == "dense":
            b = self.sae.b_enc
            if not full:
                idx = self._feature_index(W.device)
                W, b = W[:, idx], b[idx]
            return torch.relu(h @ W + b)
        z = self.sae.encode(h)
        return z if full else z[:, self._feature_index(z.device)]

    @torch.no_grad()
    def pool(self, rows: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """Each training row's prompt activations [n, d] → its mean selected-latent code (float64, host)."""
        return [self.encode(h, full=False).mean(0).double().cpu().numpy() for h in rows]

    def _feature_index(self, device: torch.device) -> torch.Tensor:
        """The selected latents as an index tensor on `device`, built once per feature set."""
        key = (id(self.features), str(device))
        if self._fidx is None or self._fidx[0] != key:
            self._fidx = (key, torch.as_tensor(np.asarray(self.features), dtype=torch.long, device=device))
        return self._fidx[1]

    def place(self, model: Any) -> None:
        """Move the SAE to the model's device once, in `config.sae_dtype` (fp32 by default)."""
        dev = model_device(model)
        dtype = getattr(torch, self.cfg.sae_dtype)
        W = self.sae.W_enc
        if W.device != dev or W.dtype != dtype:
            self.sae.to(device=dev, dtype=dtype)
            self._fidx = None

    def _pool(self, h: torch.Tensor, rows: Sequence[int], pads: Sequence[int], full: bool) -> torch.Tensor:
        """Pool per probe; content positions exclude attention-sink outliers (norm ≫ median)."""
        cfg = self.cfg
        out = []
        for b, (i, pad) in enumerate(zip(rows, pads)):
            if cfg.pooling == "last":
                pos = torch.tensor([h.shape[1] - 1], device=h.device)
            elif cfg.pooling == "eot":
                pos = torch.tensor([self.tp.eot[i] + pad], device=h.device)
            else:
                s, e = self.tp.content[i]
                pos = torch.arange(s + pad, e + pad, device=h.device)
                norms = h[b, pos].norm(dim=-1)
                keep = norms <= cfg.outlier_norm_ratio * norms.median()
                pos = pos[keep] if keep.any() else pos
            z = self.encode(h[b, pos], full)
            if full and self._fve is not None and self.cfg.encode == "sae":
                x = h[b, pos].to(z.dtype)
                err = x - self.sae.decode(z)
                self._fve += torch.stack([(err * err).sum(), (x * x).sum(), torch.tensor(float(len(x)), device=x.device)]).double()
                self._fve_sum = x.double().sum(0) + (0.0 if self._fve_sum is None else self._fve_sum)
            out.append(z.mean(0) if cfg.pooling == "mean" else z.max(0).values)
        return torch.stack(out)

    # ------------------------------------------------------------------ forward
    def _common_prefix(self, indices: Sequence[int]) -> int:
        """Tokens shared by every probe (system prompt + user header), computed once per pass."""
        if not self.cfg.share_prefix or self.user_scorer is not None or len(indices) < 2:
            return 0
        seqs = [self.tp.input_ids[i] for i in indices]
        n = min(min(len(s) for s in seqs), min(self.tp.content[i][0] for i in indices))
        c = 0
        while c < n and all(s[c] == seqs[0][c] for s in seqs):
            c += 1
        return c if c >= 4 else 0

    def left_padded(self, seqs: Sequence[Sequence[int]], device: Any, prefix: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Token rows left-padded to one length, so that every row's last position is its own: ids [B, T], the
        attention mask [B, prefix + T] (the first `prefix` columns a cached prefix every row shares), the position
        ids of the T new positions, and each row's pad count. Built on the host in one go, then one copy each to
        `device`."""
        T = max(len(s) for s in seqs)
        pads = [T - len(s) for s in seqs]
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long, device="cpu")
        mask = torch.zeros((len(seqs), prefix + T), dtype=torch.long, device="cpu")
        mask[:, :prefix] = 1
        for r, (s, p) in enumerate(zip(seqs, pads)):
            ids[r, p:] = torch.tensor(s, dtype=torch.long, device="cpu")
            mask[r, prefix + p:] = 1
        ids, mask = ids.to(device), mask.to(device)
        return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)[:, prefix:], pads

    @torch.no_grad()
    def _run(self, model: Any, indices: Sequence[int], full: bool) -> tuple[np.ndarray, np.ndarray]:
        order = sorted(indices, key=lambda i: len(self.tp.input_ids[i]))
        Xs, Ys, done = [], [], []
        captured: dict[str, torch.Tensor] = {}
        C = self._common_prefix(order)
        dev = model_device(model)
        prefix_cache = None
        if C:
            first = torch.tensor([self.tp.input_ids[order[0]][:C]], device=dev)
            prefix_cache = model(input_ids=first, use_cache=True, logits_to_keep=1).past_key_values
        handle = self.hook.register(model, lambda h: captured.__setitem__("h", h))
        try:
            bs = self.cfg.probe_batch_size
            for start in range(0, len(order), bs):
                rows = order[start : start + bs]
                ids, mask, pos, pads = self.left_padded([self.tp.input_ids[i][C:] for i in rows], dev, C)
                T = ids.shape[1]
                kw: dict[str, Any] = dict(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
                if C:
                    cache = copy.deepcopy(prefix_cache)
                    cache.batch_repeat_interleave(len(rows))
                    kw.update(past_key_values=cache, cache_position=torch.arange(C, C + T, device=dev))
                if self.user_scorer is not None:
                    model(**kw, use_cache=False)
                    h = captured["h"]
                    y = self.user_scorer(model, ids, mask)
                else:
                    out = model(**kw, use_cache=self.scorer.needs_cache or bool(C))
                    h = captured["h"]  # read before the scorer's continuation forward overwrites it
                    y = self.scorer.score(model, out.logits[:, -1, :], out.past_key_values, mask)
                Xs.append(self._pool(h, rows, [p - C for p in pads], full).double())
                Ys.append(torch.as_tensor(y, dtype=torch.float64, device=dev).reshape(-1))
                done.extend(rows)
        finally:
            handle.remove()
        X = torch.cat(Xs).cpu().numpy()  # one transfer per pass
        Y = torch.cat(Ys).cpu().numpy()
        back = np.argsort(np.asarray(done))
        return X[back], Y[back]

    def take(self, model: Any, full: bool = False) -> Snapshot:
        """X, Y for all probes (gathered across ranks). `full` also returns all latents."""
        if not full and self.features is None:
            raise RuntimeError("Snapshotter.features is unset: take a full snapshot and select features first.")
        t0 = time.perf_counter()
        self.place(model)
        was_training = model.training
        model.eval()
        # Accelerate wraps `model.forward` in an autocast context for bf16/fp16 training (TRL's
        # SFTConfig defaults to bf16). Probe in the weights' own dtype instead: bf16 rounding of
        # activations would swamp one step's ΔX, and CPU autocast is ~5x slower (measured).
        wrapped = model.__dict__.get("forward")
        original = getattr(model, "_original_forward", None)
        if wrapped is not None and original is not None:
            model.forward = original
        try:
            with torch.random.fork_rng(devices=[]):
                rank, world = rank_world()
                mine = list(range(rank, len(self.probes), world))
                # equal shard sizes → the same number of forwards on every rank (ZeRO-3/FSDP
                # all-gather parameters inside each forward; unequal counts would hang)
                per_rank = -(-len(self.probes) // world)
                padded = mine + [mine[-1] if mine else 0] * (per_rank - len(mine))
                if full:
                    self._fve, self._fve_sum = torch.zeros(3, dtype=torch.float64, device=model_device(model)), None
                Xm, Ym = self._run(model, padded, full)
                Xm, Ym = Xm[: len(mine)], Ym[: len(mine)]
                if world > 1:
                    Xm, Ym = _gather(mine, Xm, Ym, len(self.probes))
        finally:
            model.train(was_training)
            if wrapped is not None and original is not None:
                model.forward = wrapped
            self.seconds = time.perf_counter() - t0  # the last pass's wall time (the step record's seconds_probe)
        if full:
            Z = Xm
            X = Z[:, self.features] if self.features is not None else Z
            return Snapshot(X=X, Y=Ym, Z=Z, fve=self._take_fve())
        return Snapshot(X=Xm, Y=Ym)


    def _take_fve(self) -> float | None:
        """1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over the pooled positions of the last full pass (one transfer)."""
        if self._fve is None or self._fve_sum is None:
            return None
        sse, ssq, n = self._fve.cpu().tolist()
        mean_sq = float((self._fve_sum.cpu() ** 2).sum()) / max(n, 1.0)
        self._fve, self._fve_sum = None, None
        total = ssq - mean_sq
        return float(1.0 - sse / total) if total > 0 else None


def model_device(model: Any) -> torch.device:
    """Where the model's (first) parameters live: the device every tensor of a probe pass is made on."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_lists(*lists: list[Any]) -> tuple[list[Any], ...]:
    """Each list concatenated over ranks in rank order (the lists unchanged in one process)."""
    world = rank_world()[1]
    if world == 1:
        return lists
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, lists)
    return tuple([x for p in parts for x in p[k]] for k in range(len(lists)))


def _gather(mine: list[int], X: np.ndarray, Y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, (mine, X, Y))
    Xa = np.zeros((n, X.shape[1]))
    Ya = np.zeros(n)
    for idx, Xp, Yp in parts:
        Xa[idx] = Xp
        Ya[idx] = Yp
    return Xa, Ya
