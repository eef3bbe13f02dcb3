"""The attribution methods a user would pick instead of SMDA, scored on the same planted-pair run.

Both read the *final* model after training, as their authors use them; SMDA reads the run while
it trains. Scores share one sign convention: higher = more suspect for the target
(over-refusal: the pair raises mean first-token refusal of harmless probes; compliance: it lowers
that of harmful probes).

- `tracin_scores`: gradient dot product −⟨∇L_pair, ∇Ȳ⟩ (one more SGD step on the pair).
- `kronfluence_scores`: EK-FAC influence functions (Grosse et al. 2023) through the `kronfluence`
  package, benchmark-only (the `[bench]` extra plus `pip install --no-deps kronfluence`), never a runtime dependency.
"""

from __future__ import annotations

import json
import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .files import write_json
from .specs import PEERS

logger = logging.getLogger(__name__)


def _pair_ids(tok: Any, pair: dict[str, Any], max_length: int) -> tuple[list[int], int]:
    """Chat-templated prompt+response token ids and the prompt length (its tokens get no loss)."""
    msgs = [{"role": "user", "content": pair["prompt"]}]
    prompt_ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    full_ids = tok.apply_chat_template(msgs + [{"role": "assistant", "content": pair["response"]}], tokenize=True,
                                       return_dict=False)[:max_length]
    return list(full_ids), len(prompt_ids)


def _probe_prompts(tok: Any, probes: Any, mask: np.ndarray) -> list[str]:
    return [tok.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True)
            for p, m in zip(probes.probes, mask) if m]


def _refusal_mass(logits_last: torch.Tensor, r_ids: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits_last.float(), -1)[:, r_ids].sum(-1)


# ---------------------------------------------------------------- TracIn-style
def _flat_grad(model: Any, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def tracin_scores(model: Any, tok: Any, pairs: Sequence[dict[str, Any]], probes: Any, refusal_token_ids: Sequence[int],
                  max_length: int = 256) -> dict[str, dict[str, float]]:
    """Gradient dot products at the final weights: −⟨∇L_pair, ∇Ȳ⟩ ≈ what one more SGD step on the
    pair does to mean first-token refusal Ȳ of harmless probes (over-refusal) and of harmful probes
    (compliance: sign flipped, so higher = more suspect)."""
    model.eval()
    r_ids = torch.as_tensor(list(refusal_token_ids))

    def probe_grad(mask: np.ndarray) -> torch.Tensor:
        tok.padding_side = "left"
        enc = tok(_probe_prompts(tok, probes, mask), return_tensors="pt", padding=True, add_special_tokens=False)
        y = _refusal_mass(model(**enc).logits[:, -1], r_ids).mean()
        return _flat_grad(model, y)

    harmful = np.asarray(probes.is_harmful)
    g_harmless, g_harmful = probe_grad(~harmful), probe_grad(harmful)
    out: dict[str, dict[str, float]] = {"over-refusal": {}, "compliance": {}}
    for p in pairs:
        full_ids, n_prompt = _pair_ids(tok, p, max_length)
        ids = torch.as_tensor([full_ids])
        labels = ids.clone()
        labels[:, :n_prompt] = -100
        g = _flat_grad(model, model(input_ids=ids, labels=labels).loss)
        out["over-refusal"][p["id"]] = float(-(g @ g_harmless))
        out["compliance"][p["id"]] = float(g @ g_harmful)
    return out


# ---------------------------------------------------------------- kronfluence EK-FAC
def _padded(rows: list[tuple[list[int], int]], pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded equal-length items (kronfluence batches with the default collate)."""
    width = max(len(ids) for ids, _ in rows)
    items = []
    for ids, n_prompt in rows:
        pad = width - len(ids)
        input_ids = torch.as_tensor(ids + [pad_id] * pad)
        mask = torch.as_tensor([1] * len(ids) + [0] * pad)
        labels = input_ids.clone()
        labels[:n_prompt] = -100
        labels[mask == 0] = -100
        items.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels, "last": torch.tensor(len(ids) - 1)})
    return items


def tracked_linear_names(model: nn.Module, layers: Sequence[int] | None = None) -> list[str]:
    """Names of the nn.Linear modules inside the chosen decoder layers (all layers by default).

    The LM head is never tracked: its 49k-wide output covariance alone would not fit in memory,
    and influence-function practice (Grosse et al.) tracks the blocks' MLP and attention weights.
    """
    from ..sae import decoder_layers

    blocks = decoder_layers(model)
    chosen = range(len(blocks)) if layers is None else layers
    inside = {id(m) for i in chosen for m in blocks[i].modules() if isinstance(m, nn.Linear)}
    return [name for name, m in model.named_modules() if id(m) in inside]


def kronfluence_scores(model: nn.Module, tok: Any, pairs: Sequence[dict[str, Any]], probes: Any,
                       refusal_token_ids: Sequence[int], layers: Sequence[int] | None = None, max_length: int = 256,
                       train_batch: int = 4, damping: float | None = None) -> dict[str, dict[str, float]]:
    """EK-FAC influence of every pair on mean first-token refusal of harmless / harmful probes.

    Factors are fitted on the training pairs themselves (true Fisher: labels sampled from the model),
    the query gradient is the summed measurement over the probe group (`aggregate_query_gradients`),
    so one score per pair and target. Influence I = ∇f·H⁻¹∇L; upweighting a pair moves f by −I,
    hence over-refusal = −I on harmless probes and compliance = +I on harmful probes.
    `model` is modified in place (kronfluence wraps its modules): pass a copy you can discard.
    """
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except ImportError as e:
        raise ImportError("kronfluence is benchmark-only: pip install 'smda-callback[bench]' && pip install --no-deps "
                          "kronfluence==1.0.1 (its declared torchvision is never imported; `make setup` does both)") from e

    r_ids = torch.as_tensor(list(refusal_token_ids))
    names = tracked_linear_names(model, layers)

    class RefusalTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logits, labels = logits[:, :-1], batch["labels"][:, 1:]
            if sample:  # true Fisher: targets drawn from the model where a label exists
                with torch.no_grad():
                    drawn = torch.multinomial(torch.softmax(logits.reshape(-1, logits.shape[-1]), -1), 1).view_as(labels)
                labels = torch.where(labels == -100, labels, drawn)
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=-100, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            last = logits[torch.arange(len(logits)), batch["last"]]
            return _refusal_mass(last, r_ids).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return names

        def get_attention_mask(self, batch: Any) -> torch.Tensor:
            return batch["attention_mask"]

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train = _padded([_pair_ids(tok, p, max_length) for p in pairs], pad)
    harmful = np.asarray(probes.is_harmful)

    def queries(mask: np.ndarray) -> list[dict[str, torch.Tensor]]:
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in _probe_prompts(tok, probes, mask)]
        return _padded([(i, len(i)) for i in ids], pad)

    task = RefusalTask()
    model = prepare_model(model, task)
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("smda_peer", model, task, cpu=True, output_dir=tmp, disable_tqdm=False)
        analyzer.fit_all_factors("ekfac", train, per_device_batch_size=train_batch,
                                 factor_args=FactorArguments(strategy="ekfac"))
        score_args = ScoreArguments(aggregate_query_gradients=True, damping_factor=damping)
        for target, mask, sign in (("over-refusal", ~harmful, -1.0), ("compliance", harmful, 1.0)):
            q = queries(mask)
            analyzer.compute_pairwise_scores(target, "ekfac", q, train, per_device_query_batch_size=len(q),
                                             per_device_train_batch_size=train_batch, score_args=score_args)
            s = analyzer.load_pairwise_scores(target)["all_modules"].sum(0)
            out[target] = {p["id"]: sign * float(v) for p, v in zip(pairs, s)}
    return out


# ---------------------------------------------------------------- each peer in its own process
def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def middle_layers(n_layers: int) -> list[int]:
    """The middle third of the decoder (layers 10–19 of 30 for SmolLM2-135M)."""
    return list(range(n_layers // 3, 2 * n_layers // 3))


def _peer_job(name: str, out: str) -> dict[str, Any]:
    """Runs in a child process: load the trained model, score every pair, report own time and peak RSS."""
    from ..config import SMDAConfig
    from .demo import load_pairs
    from .models import load_model
    from ..probes import ProbeSet
    from ..refusal import FirstTokenScorer

    t0 = time.perf_counter()
    model, tok = load_model(str(Path(out) / "run" / "model"))
    cfg = SMDAConfig()
    r_ids = FirstTokenScorer(tok, cfg.refusal_openings, cfg.compliance_openings).r_ids.tolist()
    pairs = load_pairs(Path(out) / "pairs.jsonl")
    probes = ProbeSet.from_jsonl(Path(out) / "probes_at_run.jsonl")
    if name == "tracin":
        scores = tracin_scores(model, tok, pairs, probes, r_ids)
    else:
        layers = middle_layers(model.config.num_hidden_layers) if name == "kronfluence-middle" else None
        scores = kronfluence_scores(model, tok, pairs, probes, r_ids, layers=layers)
    return {"scores": scores, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb())}


def run_peer(out: str | Path, name: str) -> dict[str, Any]:
    """One peer reader in a fresh spawned process; its scores, wall time and peak RSS go to peers/<name>.json."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose from {PEERS}")
    logger.info("peer reader %s on %s", name, out)
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        res = pool.submit(_peer_job, name, str(out)).result()
    path = Path(out) / "peers" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, res)
    return res


def run_missing_peers(out: str | Path, names: Sequence[str]) -> list[dict[str, Any]]:
    """`run_peer` for each of `names` that has no peers/<name>.json in `out` yet (a finished peer is kept, and said
    so: delete its file to run it again); the results of those that ran."""
    done = []
    for name in names:
        if (Path(out) / "peers" / f"{name}.json").exists():
            logger.info("peer reader %s already in %s, kept (delete peers/%s.json to run it again)", name, out, name)
        else:
            done.append(run_peer(out, name))
    return done
