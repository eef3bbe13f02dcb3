"""The torch side of credit: the newest gradient's part of an update, row slopes inside a step.

These functions touch parameters and optimizer state; the engine (`engine.py`) is pure numpy.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .engine import OptimizerKernel

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- torch side: the newest gradient's part
def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Accelerate's wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def trainable_params(optimizer: Any) -> list[torch.nn.Parameter]:
    return [p for g in inner_optimizer(optimizer).param_groups for p in g["params"] if p.requires_grad]


def is_sharded(param: torch.Tensor) -> bool:
    """A parameter this rank holds only a shard of: FSDP2 (DTensor), FSDP1 (flat parameter), DeepSpeed ZeRO-3."""
    return (type(param).__name__ in ("DTensor", "FlatParameter") or bool(getattr(param, "_is_sharded", False))
            or hasattr(param, "ds_numel"))


def sharding_check(optimizer: Any, measure: str) -> str | None:
    """Under sharded parameters: refuse the ghost pass (it sets θ_{t−1} + u on full parameters), and say that the
    split inside a step is off (its forwards per row would differ between ranks and stall the shards' collectives)."""
    if optimizer is None or not any(is_sharded(p) for p in trainable_params(optimizer)):
        return None
    if measure == "ghost":
        raise ValueError("smda: credit_measure='ghost' needs full parameters, but this run shards them (FSDP / ZeRO-3). "
                         "Use credit_measure='deconvolve' (the default).")
    return ("the parameters are sharded (FSDP / ZeRO-3): the split inside a step by each row's loss slope is off, so a "
            "step's change is shared equally among its pairs (credit through the optimizer's memory is kept)")


def optimizer_step_count(optimizer: Any) -> int | None:
    """The optimizer's own step counter after its step (Adam keeps one; SGD does not)."""
    opt = inner_optimizer(optimizer)
    for p in trainable_params(optimizer):
        st = opt.state.get(p, {})
        if "step" in st:
            return int(float(st["step"]))
    return None


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors are widened to fp32 for the arithmetic; fp32/fp64 keep their dtype."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


CHUNK = 1 << 22
"""Elements per slice when the newest update is computed (16 MiB of fp32 temporaries at a time)."""


class NewestUpdate:
    """The part of optimizer step t's update that is the newest gradient's: −D_t·c(t, t)·g_t per trainable
    parameter, read after `optimizer.step()` and before `zero_grad()` (p.grad is the clipped gradient the optimizer
    used). Weight decay and the momentum carry are left out.

    Computed parameter by parameter each time it is iterated (from p.grad and the optimizer's state, which do not
    change until `zero_grad()`, so every pass gives the same tensors bitwise), never held whole: the in-step split and
    the ghost pass then hold one copy of the trainable weights fewer (on a 1B full fine-tune, 2.3 GiB of bf16)."""

    def __init__(self, optimizer: Any, kernel: OptimizerKernel, t: int) -> None:
        self.opt, self.kernel, self.t = inner_optimizer(optimizer), kernel, t
        if kernel.kind == "adam":
            for group in self.opt.param_groups:
                for p in group["params"]:
                    if p.requires_grad and p.grad is not None and "exp_avg_sq" not in self.opt.state[p]:
                        raise ValueError(
                            f"{type(self.opt).__name__} keeps no torch `exp_avg_sq` state (quantised or fused elsewhere), so "
                            "the newest gradient's own part cannot be read: use credit_measure='deconvolve' and "
                            "one pair per step (per_device_train_batch_size=1, no accumulation) with this optimizer.")

    @torch.no_grad()
    def __iter__(self) -> Iterator[torch.Tensor]:
        for group in self.opt.param_groups:
            c = self.kernel.coef(self.t, self.t, float(group["lr"]))
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    yield torch.zeros_like(p)
                    continue
                out = torch.empty(p.shape, dtype=p.dtype, device=p.device)  # contiguous: its flat view is in element order
                st = self.opt.state[p] if self.kernel.kind == "adam" else None
                v = None if st is None else st["max_exp_avg_sq"] if group.get("amsgrad") else st["exp_avg_sq"]
                bias = None if st is None else 1.0 - group["betas"][1] ** int(float(st["step"]))
                # in slices of at most CHUNK elements, widened to fp32 there: the temporaries stay a slice's size
                flat, g_flat = out.view(-1), p.grad.detach().reshape(-1)
                v_flat = None if v is None else v.reshape(-1)
                for a in range(0, flat.numel(), CHUNK):
                    piece = _wide(g_flat[a:a + CHUNK]).mul(-c)
                    if v_flat is not None:
                        piece.div_(_wide(v_flat[a:a + CHUNK]).div(bias).sqrt_().add_(group["eps"]))
                    flat[a:a + CHUNK] = piece
                yield out


def newest_update(optimizer: Any, kernel: OptimizerKernel, t: int) -> list[torch.Tensor]:
    """`NewestUpdate` held whole: one tensor per trainable parameter."""
    return list(NewestUpdate(optimizer, kernel, t))


RowLoss = Callable[[], torch.Tensor]


@torch.no_grad()
def row_slopes(params: Sequence[torch.Tensor], base: Sequence[torch.Tensor], direction: Iterable[torch.Tensor],
               row_losses: RowLoss, rel: float = 1e-3) -> np.ndarray:
    """Each row's first-order contribution to a step's new-gradient update u: ∂L_i(θ_{t−1} + εu)/∂ε,
    by a central difference (the step of ε moves θ by `rel`·‖θ‖). `row_losses()` returns the rows'
    summed token losses at the current parameters. Parameters are restored bitwise afterwards.
    Shares are the slopes normalised over all rows of the step (`shares_from_slopes`), which may
    span ranks."""
    saved = [p.detach().clone() for p in params]
    norm_u = math.sqrt(sum(_norm(d) ** 2 for d in direction))
    norm_b = math.sqrt(sum(_norm(b) ** 2 for b in base))
    eps = rel * norm_b / norm_u if norm_u > 0 else 0.0
    try:
        losses = []
        for sign in (1.0, -1.0):
            for p, b, d in zip(params, base, direction):
                p.copy_(b).add_(d, alpha=sign * eps)  # in place: no temporary the size of a parameter
            losses.append(row_losses().double().cpu().numpy())
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
    return (losses[0] - losses[1]) / (2 * eps) if eps > 0 else np.zeros(len(losses[0]))


def _norm(x: torch.Tensor) -> float:
    """The 2-norm, accumulated in fp32 (fp64 for fp64 tensors) without a widened copy."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))


def causal_lm_row_losses(model: Any, batches: Sequence[dict[str, torch.Tensor]], rows_per_forward: int = 1,
                         narrow_head: bool = True) -> RowLoss:
    """Per-row summed cross-entropy over label tokens (the training loss up to its common normaliser). One-row
    batches (the callback's captured rows) are stacked `rows_per_forward` at a time, right-padded (attention mask 0,
    labels -100): at batch 8, one forward per sign instead of 8 (the callback passes the training's micro-batch size,
    so no forward holds more rows than training did). The same losses up to float rounding; 1: one forward per row.

    The output head runs at the label positions only (`label_logits`): the prompt and padding positions, which carry
    no loss, never get full-vocabulary logits (`narrow_head=False`: at every position, as a plain forward does;
    `benchmarks/bench_split_memory.py --head N` compares the two)."""

    def fn() -> torch.Tensor:
        was = model.training
        model.eval()
        out = []
        try:
            dev = next(model.parameters()).device
            for b in _stacked(batches, max(1, int(rows_per_forward))):
                b = {k: v.to(dev) for k, v in b.items()}
                lab = b["labels"][:, 1:]
                has = lab != -100
                logits = label_logits(model, b, has, narrow=narrow_head)
                tok = torch.nn.functional.cross_entropy(logits.float(), lab[has], reduction="none")
                rows = torch.zeros(lab.shape[0], dtype=tok.dtype, device=tok.device)
                out.append(rows.index_add_(0, has.nonzero()[:, 0], tok))
        finally:
            model.train(was)
        return torch.cat(out)

    return fn


_NARROW_FAILED: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def label_logits(model: Any, batch: dict[str, torch.Tensor], has: torch.Tensor, narrow: bool = True) -> torch.Tensor:
    """Logits of a causal LM at the positions that predict a label (`has`: labels[:, 1:] != -100), as one
    (n_labels, vocab) tensor in row-major order. With `narrow`, from one forward whose output head sees those
    positions' hidden states only (a pre-hook on `get_output_embeddings()`): the head's full-vocabulary product and the
    float copy of the logits shrink by the share of prompt and padding tokens. A model with no such head, or whose
    forward does not take the narrowed states, gets every position's logits (tried once per model and remembered;
    where the hook left the head's call alone, the logits of that forward are used, not computed again)."""

    def every_position() -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][has]

    get = getattr(model, "get_output_embeddings", None)
    head = get() if narrow and callable(get) and model not in _NARROW_FAILED else None
    if not isinstance(head, torch.nn.Module):
        return every_position()
    keep = torch.zeros(batch["input_ids"].shape, dtype=torch.bool, device=has.device)
    keep[:, :-1] = has
    n = int(has.sum())

    def narrowed(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        h = args[0] if args else None
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or not h.is_floating_point() or h.shape[:2] != keep.shape:
            return None  # not the (batch, length, hidden) states this hook expects: leave the call as it is
        return (h[keep],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(narrowed)
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    except torch.OutOfMemoryError:  # the model's, not the narrowing's: every position would need more
        raise
    except (RuntimeError, ValueError, IndexError) as e:  # a forward that reshapes the head's output by position
        logits = None
        _not_narrowed(model, f"{type(e).__name__}: {e}")
    finally:
        handle.remove()
    if logits is None:  # after the hook is gone
        return every_position()
    if logits.numel() != n * logits.shape[-1]:  # the hook left the call alone: (batch, length, vocab) logits
        _not_narrowed(model, f"logits of shape {tuple(logits.shape)} for {n} label positions")
        return logits[:, :-1][has]
    return logits.reshape(n, logits.shape[-1])


def _not_narrowed(model: Any, why: str) -> None:
    _NARROW_FAILED[model] = why
    log.debug("credit split: %s's output head is not narrowed to label positions (%s); logits at every position",
              type(model).__name__, why)


def _stacked(batches: Sequence[dict[str, torch.Tensor]], k: int) -> list[dict[str, torch.Tensor]]:
    """One-row batches stacked k at a time (right-padded); batches of several rows are kept as they are."""
    out: list[dict[str, torch.Tensor]] = []
    group: list[dict[str, torch.Tensor]] = []

    def flush() -> None:
        if not group:
            return
        if len(group) == 1:
            out.append(group[0])
        else:
            width = max(int(b["input_ids"].shape[1]) for b in group)
            pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
            out.append({key: torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=fill)
                                        for b in group]) for key, fill in pad.items()})
        group.clear()

    for b in batches:
        if b["input_ids"].shape[0] != 1 or set(b) != {"input_ids", "attention_mask", "labels"}:
            flush()
            out.append(b)
            continue
        group.append(b)
        if len(group) == k:
            flush()
    flush()
    return out


@torch.no_grad()
def with_decayed_weights(optimizer: Any, eps: float, fn: Callable[[], Any]) -> Any:
    """Run `fn` with the weight-decayed trainable parameters scaled by (1 − eps), then restore them bitwise:
    what one unit of decay does to the probes (groups with weight_decay 0, such as biases and norms, are left)."""
    params = [p for g in inner_optimizer(optimizer).param_groups if float(g.get("weight_decay", 0.0)) > 0
              for p in g["params"] if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    try:
        for p in params:
            p.mul_(1.0 - eps)
        return fn()
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)


@torch.no_grad()
def with_update_applied(params: Sequence[torch.Tensor], base: Sequence[torch.Tensor], update: Iterable[torch.Tensor],
                        fn: Callable[[], Any]) -> Any:
    """Run `fn` with the parameters set to θ_{t−1} + u (one gradient's part of the update alone, the ghost pass),
    then restore the trained parameters bitwise."""
    saved = [p.detach().clone() for p in params]
    try:
        for p, b, d in zip(params, base, update):
            p.copy_(b).add_(d)
        return fn()
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)


def measure_step(optimizer: Any, model: Any, kernel: Any, t: int, base: Sequence[torch.Tensor],
                 batches: Sequence[dict[str, torch.Tensor]] | None, ghost: Callable[[], Any] | None,
                 rows_per_forward: int = 1) -> tuple[np.ndarray | None, Any]:
    """After an optimizer step (θ_{t−1} kept in `base`): each row's loss slope along the newest gradient's part u
    of the update (when `batches` holds every row of the step, stacked `rows_per_forward` to a forward), and `ghost()`
    run at θ_{t−1} + u (when given). The parameters are restored bitwise after each."""
    params = trainable_params(optimizer)
    u = NewestUpdate(optimizer, kernel, t)  # computed again on each pass over it, never held whole
    slopes = row_slopes(params, base, u, causal_lm_row_losses(model, batches, rows_per_forward)) if batches else None
    measured = with_update_applied(params, base, u, ghost) if ghost is not None else None
    return slopes, measured
