"""Replay: each pair's effect carried through the rest of a recorded run.

Two users: `smda benchmark-lds --replay` (lab/replay.py: a whole demo run, stepped again from its trainer) and
the callback's `SMDAConfig(replay_last_steps=K)` (the last K steps of the user's own run, recorded while it
trains and replayed after the last step: `Steps` takes the recorded batches and lrs, from the state the model
and optimizer are put in before the first of them).

The in-run credit is local: it credits a pair with the change its own step makes. Retraining without the
pair also changes every later step, which answers that change. The replay measures that answer after
the fact, by reverse mode through the recorded training run (in the spirit of REPLAY / MAGIC, arXiv
2504.16430; our own derivation, written for the one-pair-per-step runs of the demo):

- the state after optimizer step t is S_t = (θ_{t+1}, m_t, v_t): weights, Adam's first and second moments;
- removing the pair of step t (its step skipped, the rest kept in order) perturbs S_t by the exact finite
  difference δ_t = S_{t-1} − S_t; the rest of the run carries δ_t to the end, and the probe quantity f
  moves by ≈ A_t · δ_t, where A_t = ∂f(θ_T)/∂S_t is the adjoint of the state;
- one reverse pass gives every A_t: A_{t-1} = J_tᵀ A_t, J_t being the Jacobian of step t. Adam's moments
  and update are elementwise, the gradient clipping's global norm is a rank-one term, and the gradient's
  dependence on θ is one Hessian-vector product of pair t's loss (double backward).

States are recomputed from checkpoints kept on disk every `outer` steps (default: `every`); a block of `outer`
steps is recomputed once more to leave checkpoints every `every` steps, from which each inner block is recomputed
into memory. So memory holds `every + 1` states, disk about n/outer + outer/every of them, and the forward steps
run twice (`outer == every`) or three times (a longer run on the same disk). The reverse pass saves its adjoints
at block starts and resumes from them. Exact for torch AdamW (fused or not, decoupled weight decay, no amsgrad)
with a recorded lr per step and clipping by global norm; any other optimizer is refused with the fix. The
prediction is first order in δ_t: a removal set's predicted change is the sum of its pairs'.

`second_moment="fixed"` linearises another model of the run: Adam's second moment v_t is the recorded one, a fixed
per-step preconditioner that no perturbation moves (no adjoint of v, and δ_t's v part dropped). It is exact for that
model, not for the run, and tells whether a blow-up of the exact linearisation comes through the 1/√v path.
Both record per step the norm of each part of the adjoint and each part's share of the removal effect, which show
where a linearisation blows up.

`layers=K` linearises the run in its last K transformer blocks only (`kept_blocks`: those blocks and the parameters
outside every block except the input and output embeddings, e.g. the final norm; K < 0: the first |K| blocks alone):
a removal's change to the other parameters is dropped, and so are the Jacobian's blocks that couple them (the other
parameters follow the recorded run; the clipping's norm moves only through the kept parameters' gradient). Exact for
that model of the run, not for the run; the reverse pass's double backward then stops at the first kept block, and the
adjoints hold the kept parameters only.
"""

from __future__ import annotations

import logging
import math
import re
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import SECOND_MOMENTS
from .params import inner_optimizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayVariant:
    """Which model of the recorded run the reverse pass linearises (the module's docstring). The default is the run
    itself, what the callback's `replay_last_steps` replays; the others are lab variants (`smda benchmark-lds
    --replay-second-moment/--replay-no-curvature/--replay-eps/--replay-layers`), each exact for its own model."""

    second_moment: str = "exact"
    """"exact": Adam's second moment answers each removal as in the run; "fixed": it is the recorded one at every step."""
    curvature: bool = True
    """False: every step's gradient is the recorded one, not a function of θ (no Hessian-vector products)."""
    reverse_eps: float = 0.0
    """> 0: the reverse pass linearises AdamW with ε = max(ε, reverse_eps) (the steps are taken as trained): damped."""
    layers: int = 0
    """≠ 0: only the last `layers` transformer blocks and the final norm are linearised (< 0: the first |layers| blocks
    alone; `kept_blocks`); the other parameters follow the recorded run."""

    def __post_init__(self) -> None:
        if self.second_moment not in SECOND_MOMENTS:
            raise ValueError(f"replay: second_moment={self.second_moment!r}; choose one of {', '.join(SECOND_MOMENTS)}.")
        if not (math.isfinite(self.reverse_eps) and self.reverse_eps >= 0):
            raise ValueError(f"replay: reverse_eps={self.reverse_eps}; give ε ≥ 0 (0: the exact replay).")
        if isinstance(self.layers, bool) or not isinstance(self.layers, int):
            raise ValueError(f"replay: layers={self.layers!r}; give a whole number of transformer blocks (0: every parameter).")

    def __str__(self) -> str:
        return (f"second moment {self.second_moment}, curvature {self.curvature}, reverse ε {self.reverse_eps:g}, "
                f"layers {self.layers}")

    @property
    def fixed_v(self) -> bool:
        return self.second_moment == "fixed"

    @classmethod
    def of_record(cls, record: dict[str, Any]) -> "ReplayVariant":
        """The variant a replay result or resume file was written by (records older than a field read its default)."""
        return cls(**{k: record.get(k, v) for k, v in asdict(cls()).items()})


EXACT = ReplayVariant()

Objective = Callable[[Any], Any]
"""Model -> a scalar tensor, or an iterable of scalar tensors whose sum is the objective (one backward each,
so that a probe set's graphs are never held at once); gradients are taken for the trainable parameters."""


@dataclass(frozen=True)
class Segment:
    """The early pairs' removals taken exactly for a stretch of the run, then carried to its end to first order.

    The replay is first order in each removal. Early in a run (Adam's second moment holds a few gradients, the lr still
    climbs) a pair's effect is not linear (docs/validation.md §9, "Linear in a pair's weight?") and the replay's error
    sits there ("Every pair left out"). For each pair before step `below` (default: the warm-up, the steps whose lr is
    below the run's peak), the retrain without it is taken step by step up to step E (its later pairs one place
    earlier, as a retrain runs them), and the difference of that state from the run's at E is carried to the end by the
    adjoint A_E, plus the rate shift of the steps from E on (`shift_effect`): A_E · (S'_E − S_E) + Σ_{t≥E} shift_t.
    E = the step after the pair gives the replay's own effect back; E = the run's end is the retrain itself: there the
    objective is evaluated, f(θ'_T) − f(θ_T), with no first order left. Costs Σ_s (E − s − 1) plain steps (one forward
    and backward each) and, per E before the end, one state and its adjoints on disk."""

    until: tuple[int, ...]
    """The steps E at which the exact stretch ends (each read as its own reader)."""
    below: int | None = None
    """The pairs of local steps 0..below − 1 are taken exactly; None: the warm-up (`warmup_steps`)."""

    def __post_init__(self) -> None:
        if not self.until or min(self.until) < 2:
            raise ValueError(f"replay: exact segments until steps {list(self.until)}: give steps ≥ 2 (the step after the "
                             "last pair taken exactly).")
        if self.below is not None and not 0 < self.below < min(self.until):
            raise ValueError(f"replay: exact segments for the pairs below step {self.below} until step {min(self.until)}: "
                             "choose 0 < below < until (the stretch must end after the pairs it takes exactly).")


def warmup_steps(lrs: Sequence[float]) -> int:
    """How many steps the run takes before its lr first reaches its peak (0 for a run without warm-up)."""
    peak = max(lrs, default=0.0)
    return next((t for t, lr in enumerate(lrs) if lr >= peak * (1 - 1e-9)), len(lrs))


def loss_is_scaled_for_ga(trainer: Any, num_items_in_batch: Any) -> bool:
    """Whether `trainer.training_step` takes `compute_loss`'s value as already scaled for gradient accumulation, or
    divides it by the step's number of micro-batches: the Trainer's own rule (its `loss_is_scaled_for_ga` where a
    trainer sets it, else scaled when the loss was normalised by `num_items_in_batch` or by `compute_loss_func`)."""
    own = getattr(trainer, "loss_is_scaled_for_ga", None)
    if own is not None:
        return bool(own)
    return bool((getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                or getattr(trainer, "compute_loss_func", None) is not None)


def _check_optimizer(opt: Any) -> list[dict[str, Any]]:
    name = type(opt).__name__
    if name not in ("AdamW", "Adam"):
        raise ValueError(f"replay: the run's optimizer is {name}; the replay models torch AdamW/Adam only. "
                         "Train the replayed run with optim='adamw_torch' or 'adamw_torch_fused'.")
    if len({g.get("initial_lr", g["lr"]) for g in opt.param_groups}) > 1:
        raise ValueError("replay: the optimizer's parameter groups have different learning rates; the replay records "
                         "one lr per step. Train the replayed run with one learning rate for every group.")
    groups = []
    for g in opt.param_groups:
        if g.get("amsgrad") or g.get("maximize"):
            raise ValueError("replay: amsgrad/maximize AdamW is not modelled; train the replayed run without them.")
        if name == "Adam" and g.get("weight_decay", 0.0):
            raise ValueError("replay: Adam with L2 weight decay is not modelled; use AdamW (decoupled decay).")
        groups.append({"betas": g["betas"], "eps": g["eps"], "wd": g.get("weight_decay", 0.0), "params": g["params"]})
    return groups


class State:
    """θ, m, v of every trainable parameter, as detached copies on the parameters' device."""

    def __init__(self, theta: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor], step: int) -> None:
        self.theta, self.m, self.v, self.step = theta, m, v, step

    @classmethod
    def read(cls, params: Sequence[torch.Tensor], opt: Any, step: int, into: "State | None" = None,
             copy: bool = True) -> "State":
        """The state as the parameters and optimizer hold it: fresh copies, or copied into `into`'s tensors (no new
        memory: a fresh 1.6 GB state of the 135M model costs ~1 s of page faults on the 2-core machine), or
        (`copy=False`) the live tensors themselves, to be saved at once."""
        def st(p: torch.Tensor, key: str) -> torch.Tensor:
            s = opt.state.get(p, {})
            return s[key].detach() if key in s else torch.zeros_like(p, memory_format=torch.preserve_format)

        live = cls([p.detach() for p in params], [st(p, "exp_avg") for p in params], [st(p, "exp_avg_sq") for p in params], step)
        if not copy:
            return live
        if into is None:
            return cls(*([x.clone() for x in xs] for xs in (live.theta, live.m, live.v)), step)
        return live.copy_to(into)

    def copy_to(self, into: "State") -> "State":
        """This state's values in `into`'s tensors (no new memory); returns `into`."""
        with torch.no_grad():
            for dst, src in zip((into.theta, into.m, into.v), (self.theta, self.m, self.v)):
                for d, x in zip(dst, src):
                    d.copy_(x)
        into.step = self.step
        return into

    def write(self, params: Sequence[torch.Tensor], opt: Any, weights_only: bool = False) -> None:
        """Into the model's parameters and (unless `weights_only`) the optimizer's moments and step count."""
        with torch.no_grad():
            for p, th, m, v in zip(params, self.theta, self.m, self.v):
                p.copy_(th)
                if weights_only:
                    continue
                if self.step == 0:
                    opt.state.pop(p, None)
                    continue
                s = opt.state[p]
                if "exp_avg" not in s:
                    s["exp_avg"], s["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                    # fused and capturable Adam keep the step count on the parameter's device, the others on the host
                    on_dev = opt.defaults.get("fused") or opt.defaults.get("capturable")
                    s["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if on_dev else "cpu")
                s["exp_avg"].copy_(m)
                s["exp_avg_sq"].copy_(v)
                s["step"].fill_(float(self.step))

    def save(self, path: Path) -> None:
        _save({"theta": self.theta, "m": self.m, "v": self.v, "step": self.step}, path)

    @classmethod
    def load(cls, path: Path, into: "State | None" = None, mmap: bool = False) -> "State":
        """From `save`'s file: fresh tensors (`mmap`: read-only views of the file, paged in as they are read), or
        copied into `into`'s (read through a memory map, no new memory)."""
        if into is None:
            d = torch.load(path, weights_only=True, mmap=mmap)
            return cls(d["theta"], d["m"], d["v"], int(d["step"]))
        d = torch.load(path, weights_only=True, mmap=True)
        return cls(d["theta"], d["m"], d["v"], int(d["step"])).copy_to(into)


_CHUNK = 1 << 16
"""Elements per slice of the float64 sums below: a slice's float64 copies stay in cache, where whole-tensor copies
cost a pass over memory each (one dot of 81M float32 weights: 1.07 s whole, 0.07 s sliced, measured on the 2-core
machine; a replayed step of the 135M model 7 % faster, benchmarks/bench_replay.py)."""


def _slices(*tensors: torch.Tensor) -> Any:
    """Aligned flat slices of equally shaped tensors, `_CHUNK` elements at a time."""
    flat = [x.reshape(-1) for x in tensors]
    for i in range(0, flat[0].numel(), _CHUNK):
        yield [x[i:i + _CHUNK] for x in flat]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], minus: Sequence[torch.Tensor] | None = None) -> float:
    """Σ a·b (or Σ a·(b − minus)) over lists of tensors, in float64 slice by slice; the sum stays on the tensors'
    device until the end (one synchronisation per call, not per slice)."""
    total = None
    for i, (x, y) in enumerate(zip(a, b)):
        for sl in _slices(x, y) if minus is None else _slices(x, y, minus[i]):
            d = torch.dot(sl[0].double(), sl[1].double() if minus is None else sl[1].double() - sl[2].double())
            total = d if total is None else total + d
    return 0.0 if total is None else float(total)


def _parts(out: Any) -> Any:
    """An objective's value as its parts (`Objective`: one scalar tensor, or an iterable of them)."""
    return [out] if torch.is_tensor(out) else out


def _grad_of(obj: Objective, model: Any, params: Sequence[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = obj(model)
    total, acc = 0.0, [torch.zeros_like(p) for p in params]
    for part in _parts(out):
        grads = torch.autograd.grad(part, list(params), allow_unused=True)
        total += float(part.detach())
        for a, g in zip(acc, grads):
            if g is not None:
                a += g
    return total, acc


_BLOCK = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
"""A transformer block's index in a parameter name (Llama/Qwen/Mistral/Gemma `model.layers.N.`, GPT-2 `transformer.h.N.`,
PEFT adapters inside them)."""


def kept_blocks(model: Any, names: Sequence[str], params: Sequence[torch.Tensor], k: int) -> list[int]:
    """Indices into `params` of what a replay restricted to some transformer blocks linearises. `k` > 0: the last `k`
    blocks and the trainable parameters outside every block that are neither the input nor the output embedding (the
    final norm); `k` < 0: the first |k| blocks alone; `k` = 0: every parameter. Refuses a `k` the model cannot give,
    with the fix."""
    if k == 0:
        return list(range(len(params)))
    at = [int(m.group(1)) if (m := _BLOCK.search(n)) else None for n in names]
    blocks = sorted({i for i in at if i is not None})
    if not blocks or abs(k) > len(blocks):
        raise ValueError(f"replay: layers={k}, but the trainable parameters are in {len(blocks)} transformer blocks "
                         f"(named like 'model.layers.N.'); give 1..{len(blocks)} (the last ones), -1..-{len(blocks)} "
                         "(the first ones) or 0 (every parameter)." if blocks else
                         f"replay: layers={k}, but no trainable parameter is named as a transformer block's "
                         "('model.layers.N.', 'transformer.h.N.'); replay every parameter (layers=0).")
    if k < 0:
        first = set(blocks[:-k])
        return [j for j, i in enumerate(at) if i in first]
    keep = set(blocks[-k:])
    emb = {id(model.get_input_embeddings().weight)}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        emb.add(id(out.weight))
    return [j for j, (i, p) in enumerate(zip(at, params)) if i in keep or (i is None and id(p) not in emb)]


class Steps:
    """Steps [start, start + len(batches)) of a recorded run, taken again: its loss, clipping and optimizer on its
    batches in order. Local step t is the run's step start + t (Adam's bias correction counts start + t + 1).

    A step's batch is one dict of tensors, or a list of them: the micro-batches of a step with gradient accumulation,
    backpropagated one after the other as the Trainer does. A micro-batch may carry "num_items_in_batch" (what the
    Trainer passed to the model's forward: the step's label tokens, over all its micro-batches): its loss is then the
    token cross-entropy summed over its labels and divided by that count (the Trainer's accumulation for models that
    take loss kwargs); without it, each micro-batch's mean loss is divided by the number of micro-batches. A micro-batch
    may also carry "loss_divisor", what the Trainer divided that loss by afterwards (1 where it counts the loss as
    scaled for accumulation, the number of micro-batches where not: `Trainer.loss_is_scaled_for_ga`); without it, 1
    with "num_items_in_batch" and the number of micro-batches without.

    `loss(model, batch)`: the training loss as the Trainer computes it (`trainer.compute_loss`); `lrs`: each step's
    lr, or empty to read them from the optimizer as the steps are taken (stepping `sched` after each, as the Trainer
    does); `prev_lr`: the lr of step start − 1 (a step run one place earlier takes it); `clip`: max_grad_norm.
    """

    def __init__(self, model: Any, optimizer: Any, batches: Sequence[dict[str, Any] | Sequence[dict[str, Any]]],
                 loss: Callable[..., Any], clip: float, lrs: Sequence[float] = (), start: int = 0,
                 prev_lr: float | None = None, sched: Any = None) -> None:
        self.model, self.opt, self.sched = model, inner_optimizer(optimizer), sched
        self.model.train()
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.batches = [[b] if isinstance(b, dict) else list(b) for b in batches]
        self._loss = loss
        groups = _check_optimizer(self.opt)
        group_of = {id(p): g for g in groups for p in g["params"]}
        missing = [n for n, p in named if id(p) not in group_of]
        if missing:
            raise ValueError(f"replay: {len(missing)} trainable parameters are not in the optimizer (e.g. {missing[0]}); "
                             "freeze them (requires_grad=False) or give them to the optimizer.")
        self.hp = [group_of[id(p)] for p in self.params]
        self.clip = float(clip or 0.0)
        self.sel = list(range(len(self.params)))
        """Indices of the parameters the reverse pass linearises (`restrict`); the steps themselves train them all."""
        self.left_out: list[torch.Tensor] = []
        """The trainable parameters it does not linearise (`restrict`): no graph is built through them."""
        self.lrs: list[float] = list(lrs)
        self.norms: list[float] = []
        self.start, self.prev_lr = int(start), prev_lr
        if self.start > 0 and prev_lr is None:
            raise ValueError("replay: steps from the middle of a run need the lr of the step before (prev_lr).")

    def tail(self, s: int) -> "Steps":
        """The steps from local step s on, as their own run (the optimizer and schedule shared; take steps 0..s−1
        first, so that the weights, moments and schedule are where step s starts)."""
        return Steps(self.model, self.opt, self.batches[s:], self._loss, self.clip, self.lrs[s:], self.start + s,
                     self.lrs[s - 1] if s > 0 else self.prev_lr, self.sched)

    def __len__(self) -> int:
        return len(self.batches)

    def restrict(self, layers: int) -> "Steps":
        """The reverse pass linearises the last `layers` transformer blocks only (the first |layers| if negative;
        `kept_blocks`; 0: everything)."""
        self.sel = kept_blocks(self.model, self.names, self.params, layers)
        kept = set(self.sel)
        self.left_out = [p for j, p in enumerate(self.params) if j not in kept]
        return self

    def kept(self, st: State) -> State:
        """The state's part that the reverse pass linearises (the same tensors, no copy)."""
        if not self.left_out:
            return st
        return State(*([xs[i] for i in self.sel] if xs else [] for xs in (st.theta, st.m, st.v)), st.step)

    def _micro(self, t: int) -> list[tuple[dict[str, Any], Any, int]]:
        """Step t's micro-batches: (inputs, the Trainer's num_items_in_batch or None, what the loss is divided by after)."""
        mbs = self.batches[t]
        out = []
        for mb in mbs:
            mb = dict(mb)
            n = mb.pop("num_items_in_batch", None)
            k = mb.pop("loss_divisor", None)
            out.append((mb, n, int(k) if k is not None else 1 if n is not None else len(mbs)))
        return out

    def loss(self, t: int) -> torch.Tensor:
        """Step t's training loss, as the Trainer backpropagates it (summed over its micro-batches)."""
        return sum(self._micro_loss(mb, n, k) for mb, n, k in self._micro(t))

    def _micro_loss(self, mb: dict[str, Any], n: Any, k: int) -> torch.Tensor:
        return (self._loss(self.model, mb) if n is None else self._loss(self.model, mb, num_items_in_batch=n)) / k

    def train_grad(self, t: int, create_graph: bool = True, params: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Step t's gradient as training computes it, as a differentiable expression of the weights (of `params`, by
        default every trainable parameter).

        The loss is written with plain ops (TRL's fused head has no double backward): the mean token
        cross-entropy over the batch's label tokens. An nn.Embedding with `padding_idx` gives that row no
        gradient from the input side, so the training gradient is not the loss's true gradient; the lookup is
        written out and that part subtracted here, because torch's double backward of the embedding keeps it
        (measured on a tiny Llama: ⟨Jᵀv, w⟩ by double backward −103 against −130 and −98 by finite
        differences of the training gradient, which is not symmetric).
        """
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        params = self.params if params is None else list(params)
        emb = self.model.get_input_embeddings()
        pad = emb.padding_idx  # (only where the embedding trains: adapters leave it frozen)
        trains_emb = pad is not None and any(p is emb.weight for p in params)
        loss, xs = None, []
        for batch, n, k in self._micro(t):
            labels, ids = batch.pop("labels"), batch.pop("input_ids")
            x = F.embedding(ids, emb.weight)
            with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels have no double backward
                logits = self.model(inputs_embeds=x, **batch, use_cache=False).logits[:, :-1]
            tgt = labels[:, 1:]
            mask = tgt != -100
            lp = F.log_softmax(logits, dim=-1).gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            part = -(lp * mask).sum() / ((mask.sum().clamp(min=1) if n is None else n) * k)
            loss = part if loss is None else loss + part
            if trains_emb and bool((ids == pad).any()):
                xs.append((x, ids))
        grads = torch.autograd.grad(loss, [*params, *(x for x, _ in xs)], create_graph=create_graph, allow_unused=True)
        g = [torch.zeros_like(p) if q is None else q for p, q in zip(params, grads)]
        if xs:
            i = next(k for k, p in enumerate(params) if p is emb.weight)
            row = sum(gx[ids == pad].sum(0) for gx, (_, ids) in zip(grads[len(params):], xs))
            onehot = torch.zeros(emb.weight.shape[0], 1, dtype=row.dtype, device=row.device)
            onehot[pad] = 1
            g[i] = g[i] - onehot * row.unsqueeze(0)
        return g

    def step(self, t: int, batch: int | None = None) -> None:
        """Step t as the Trainer takes it (its lr read from the schedule the first time, then reused). `batch`: step
        t's lr on the batch of local step `batch` instead (Adam's count is the optimizer's own): a retrain without
        an earlier pair takes pair t + 1 at place t. Only a step already taken once can be taken so."""
        fresh = t == len(self.lrs) and batch is None
        if fresh:
            self.lrs.append(float(self.opt.param_groups[0]["lr"]))
        elif t >= len(self.lrs):
            raise ValueError(f"replay: step {t} taken before step {len(self.lrs)}; take the steps in order the first time.")
        self.opt.zero_grad(set_to_none=True)
        for mb, n, k in self._micro(t if batch is None else batch):  # one backward per micro-batch, as the Trainer accumulates
            self._micro_loss(mb, n, k).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip)) if self.clip > 0 else _norm(grads)
        if t == len(self.norms) and batch is None:
            self.norms.append(norm)
        for g in self.opt.param_groups:
            g["lr"] = self.lrs[t]
        self.opt.step()
        if fresh and self.sched is not None:
            self.sched.step()

    def state(self, t: int, into: State | None = None, copy: bool = True) -> State:
        """The state before local step t (weights and moments as they are now; `State.read`)."""
        return State.read(self.params, self.opt, self.start + t, into, copy)

    def load(self, st: State, weights_only: bool = False) -> None:
        st.write(self.params, self.opt, weights_only)

    def vjp(self, t: int, post: State, adjoints: dict[str, dict[str, list[torch.Tensor]]],
            variant: ReplayVariant = EXACT) -> None:
        """Adjoints of the state after step t -> adjoints of the state before it, in place (weights at θ_t loaded),
        for the model of the run `variant` names: with `fixed_v` the adjoints carry no "v"; without `curvature` step
        t's gradient is the recorded one (no Hessian-vector product); with `reverse_eps` the step's Jacobian is
        AdamW's with ε = max(ε, reverse_eps), so a coordinate whose √v̂ is far below it no longer multiplies its
        adjoint by lr/ε. The adjoints hold the parameters `self.sel` (`restrict`, which `variant.layers` set), in that
        order; `post` is the whole state."""
        fixed_v, curvature, reverse_eps = variant.fixed_v, variant.curvature, variant.reverse_eps
        sel, params = self.sel, [self.params[i] for i in self.sel]
        whole = not self.left_out
        self.model.zero_grad(set_to_none=True)
        for p in self.left_out:  # no graph through the parameters left out: the double backward stops at the first kept block
            p.requires_grad_(False)
        try:
            g = self.train_grad(t, create_graph=curvature, params=params)
        finally:
            for p in self.left_out:
                p.requires_grad_(True)
        gd = [x.detach() for x in g]
        norm = _norm(gd) if whole else self.norms[t]  # restricted: the step's whole norm, as recorded
        coef = min(1.0, self.clip / (norm + 1e-6)) if self.clip > 0 else 1.0
        lr, k = self.lrs[t], self.start + t + 1
        a_g_all: dict[str, list[torch.Tensor]] = {name: [] for name in adjoints}
        # θ' = θ(1 − lr·wd) − (lr/bc1)·m'/D,  m' = β1 m + (1−β1) gc,  v' = β2 v + (1−β2) gc²,  D = √v'/bc2 + ε:
        # one parameter at a time, the step's own factors once for all objectives, the adjoints updated in place
        with torch.no_grad():
            for j, i in enumerate(sel):
                (b1, b2), eps, wd = self.hp[i]["betas"], max(self.hp[i]["eps"], reverse_eps), self.hp[i]["wd"]
                bc1, bc2s = 1 - b1 ** k, math.sqrt(1 - b2 ** k)
                sq = post.v[i].sqrt()
                D = sq / bc2s + eps
                dm = (lr / bc1) / D  # ∂θ'/∂m' = −dm
                dv = gg = None
                if not fixed_v:  # ∂θ'/∂v' = (lr/bc1)·m'/(2·bc2·√v'·D²), 0 where v' = 0
                    dv = torch.where(sq > 0, dm * post.m[i] / (D * 2 * bc2s * sq.clamp_min(1e-30)), torch.zeros_like(sq))
                    gg = (2 * (1 - b2) * coef) * gd[j]  # ∂v'/∂gc
                del sq, D
                for name, A in adjoints.items():
                    am = A["m"][j].addcmul_(A["theta"][j], dm, value=-1)
                    a_gc = am * (1 - b1)
                    if dv is not None:
                        av = A["v"][j].addcmul_(A["theta"][j], dv)
                        a_gc.addcmul_(gg, av)
                        av.mul_(b2)
                    am.mul_(b1)
                    if wd:
                        A["theta"][j].mul_(1 - lr * wd)
                    a_g_all[name].append(a_gc)
                del dm, dv, gg
        for name, a_gc in a_g_all.items():
            if coef < 1.0:  # gc = clip·g/(|g| + 1e-6): the clipping's rank-one term
                proj = _dot(gd, a_gc) / (norm * (norm + 1e-6))
                for a, x in zip(a_gc, gd):
                    a.sub_(proj * x).mul_(coef)
        if not curvature:
            return
        names = list(adjoints)
        for j, name in enumerate(names):  # θ's own path: one Hessian-vector product of pair t's loss (double backward)
            hv = torch.autograd.grad(g, params, grad_outputs=a_g_all[name], retain_graph=j < len(names) - 1, allow_unused=True)
            for a, h in zip(adjoints[name]["theta"], hv):
                if h is not None:
                    a.add_(h.detach())


def shift_effect(run: Steps, t: int, pre: State, post: State, A: dict[str, list[torch.Tensor]]) -> float:
    """First-order change of the objective when step t runs one place earlier in the order, as it does once any
    earlier pair is dropped in place: Adam's bias correction counts t instead of t + 1 and the lr is the
    schedule's previous one. A finite difference of step t's update (moments unchanged), carried by A. A, `pre` and
    `post` hold the parameters `run.sel` (`Steps.kept`), as `effect_parts` takes them."""
    k = run.start + t + 1
    if k == 1:
        return 0.0
    lr0, lr1 = run.lrs[t], run.lrs[t - 1] if t > 0 else run.prev_lr
    total = None
    for i, a in enumerate(A["theta"]):
        (b1, b2), eps, wd = (hp := run.hp[run.sel[i]])["betas"], hp["eps"], hp["wd"]
        for a_, th, m, v in _slices(a, pre.theta[i], post.m[i], post.v[i]):  # slice by slice, as _dot
            sq = v.sqrt()

            def update(lr: float, kk: int) -> torch.Tensor:
                return -th * (lr * wd) - (lr / (1 - b1 ** kk)) * m / (sq / math.sqrt(1 - b2 ** kk) + eps)

            d = torch.dot(a_.double(), (update(lr1, k - 1) - update(lr0, k)).double())
            total = d if total is None else total + d
    return 0.0 if total is None else float(total)


def effect_parts(pre: State, post: State, A: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """The removal effect's part through each piece of the state the adjoint `A` carries (θ, m, and v unless fixed)."""
    return {key: _dot(A[key], getattr(pre, key), minus=getattr(post, key)) for key in ("theta", "m", "v") if key in A}


def removal_effect(pre: State, post: State, A: dict[str, list[torch.Tensor]]) -> float:
    """First-order change of the objective when step t is skipped: A_t · (S_{t-1} − S_t)."""
    return sum(effect_parts(pre, post, A).values())


def _norm(x: Sequence[torch.Tensor]) -> float:
    return math.sqrt(_dot(x, x))


def checkpoint_plan(n: int, state_bytes: int, every: int, outer: int | None = None) -> dict[str, int]:
    """What a replay of `n` steps holds: states in memory and checkpoint files on disk at most, and their bytes.
    Refuses spacings that cannot work, with the fix."""
    outer = every if outer is None else outer
    if every < 1 or outer < 1:
        raise ValueError(f"replay: checkpoint spacing must be ≥ 1 (got every={every}, outer={outer}).")
    if outer % every:
        raise ValueError(f"replay: the disk spacing (outer {outer}: --replay-outer, SMDAConfig.replay_outer) must be a "
                         f"multiple of the memory spacing (every {every}: --replay-every, SMDAConfig.replay_every); "
                         f"e.g. outer {every * max(1, round(outer / every))}.")
    # outer checkpoints, the end, and the inner ones of the one block being recomputed (a block is at most n steps long)
    files = -(-n // outer) + 1 + (-(-min(outer, n) // every) - 1 if outer > every else 0)
    return {"every": every, "outer": outer, "states_in_memory": every + 1, "files_on_disk": files,
            "disk_bytes": files * state_bytes, "memory_bytes": (every + 1) * state_bytes}


def replay_steps(run: Steps, objectives: dict[str, Objective], workdir: str | Path, every: int = 4,
                 progress: Callable[[str], None] | None = None, outer: int | None = None,
                 resume_every: int = 16, variant: ReplayVariant = EXACT, segment: Segment | None = None) -> dict[str, Any]:
    """Every step's predicted effect of its removal on each objective at the end of `run`'s steps, taken from the
    weights and moments the model and optimizer hold now. Per-step lists are indexed by local step (global step =
    "first_step" + index).

    Returns {"removal_effect": {name: [per step]} (the pair dropped in place: its step skipped and every later
    step moved one place earlier, as a retrain without it runs), "weight_zero_effect" (its step skipped, the
    later steps' counts and lrs kept), "final": {name: f(θ_T)}, "lr", "grad_norm", "clipped", "recompute_gap",
    "seconds", the fields of `variant`, and per step "adjoint_norm" {name: {part: [|A_t| of θ, m, v]}} and
    "effect_parts" {name: {part: [its share of the weight-zero effect]}}}. `variant`: the model of the run that is
    linearised (`ReplayVariant`; default the run itself). Without curvature the adjoint of θ reaches earlier steps only
    through weight decay and the moments (one plain backward per step); with `layers` ≠ 0 the adjoints hold the kept
    blocks' parameters only. `segment`: the early pairs also read with their removal taken exactly up to each of its
    steps (`Segment`), under "segments": {"below", "by_until": [{"until": E, "removal_effect": {name: [per step]}}],
    "steps", "seconds"} (from step `below` on, the replay's own in-place effects). `workdir` holds the checkpoints (3 copies of the weights each) and is
    removed at the end; the model and optimizer are left at the recomputed final state. The reverse pass saves its adjoints and
    results there at an outer block's start at least `resume_every` steps after the last save; a replay stopped
    after that (killed, out of time) resumes from it when called again with the same `workdir` and spacings.
    """
    run.restrict(variant.layers)
    # activation checkpointing recomputes the forward in backward, outside the double backward's attention kernel:
    # off for the replay (the same values, more memory), then on again in exactly the layers that had it
    checkpointed = [m for m in run.model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in checkpointed:
        m.gradient_checkpointing = False
    try:
        return _replay_steps(run, objectives, workdir, every, progress, outer, resume_every, variant, segment)
    finally:
        for m in checkpointed:
            m.gradient_checkpointing = True


def _replay_steps(run: Steps, objectives: dict[str, Objective], workdir: str | Path, every: int,
                  progress: Callable[[str], None] | None, outer: int | None, resume_every: int,
                  variant: ReplayVariant, segment: Segment | None = None) -> dict[str, Any]:
    parts = ("theta", "m") if variant.fixed_v else ("theta", "m", "v")
    layers = variant.layers
    say = progress or logger.info
    t0 = time.perf_counter()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    n = len(run)
    if n < 1:
        raise ValueError("replay: no steps to replay.")
    if segment is not None and max(segment.until) > n:
        raise ValueError(f"replay: exact segments until step {max(segment.until)} of a {n}-step run; choose steps ≤ {n}.")
    state_bytes = 3 * sum(p.numel() * p.element_size() for p in run.params)
    plan = checkpoint_plan(n, state_bytes, every, outer)
    outer = plan["outer"]
    # the reverse pass is resumable: after every outer block its adjoints and results are written here
    resume_file = work / "resume.pt"
    r = torch.load(resume_file, weights_only=True) if resume_file.exists() else None
    if r is not None and "adj_norms" not in r:
        raise ValueError(f"replay: {resume_file} was written by an older replay (no per-step diagnostics); remove {work} "
                         "to start this one afresh.")
    if r is not None and ((r["n"], r["every"], r["outer"], sorted(r["final"]), r.get("start", 0), ReplayVariant.of_record(r))
                          != (n, every, outer, sorted(objectives), run.start, variant)):
        raise ValueError(f"replay: {resume_file} is of another replay ({r['n']} steps from {r.get('start', 0)}, every {r['every']}, outer "
                         f"{r['outer']}, objectives {sorted(r['final'])}, {ReplayVariant.of_record(r)}); "
                         f"remove {work} to start this one afresh.")
    kept = [run.params[i] for i in run.sel]
    # the checkpoints, and the adjoints' resume file (and its next copy) where the run is long enough to write one
    adj_bytes = len(objectives) * len(parts) * sum(p.numel() * p.element_size() for p in kept)
    need = plan["disk_bytes"] + (2 * adj_bytes if n - outer >= resume_every else 0)
    if segment is not None:  # per end of an exact stretch before the run's end: the run's state there and its adjoints
        need += len(set(segment.until) - {n}) * (state_bytes + adj_bytes)
    free = shutil.disk_usage(work).free
    if r is None and need > free:
        raise ValueError(
            f"replay: {n} steps with a checkpoint every {outer} steps need ≈ {need / 2**30:.1f} GiB on disk "
            f"under {work} ({plan['files_on_disk']} states of {state_bytes / 2**30:.2f} GiB"
            f"{' and the adjoints' if need > plan['disk_bytes'] else ''}), "
            f"{free / 2**30:.1f} GiB are free. Space the disk checkpoints further apart (--replay-outer / "
            f"SMDAConfig.replay_outer, a multiple of the memory spacing; the forward steps then run three times instead "
            f"of twice), replay fewer steps, or free disk.")
    say(f"replay: {n} steps, {plan['states_in_memory']} states in memory ({plan['memory_bytes'] / 2**30:.1f} GiB), "
        f"≤ {plan['files_on_disk']} checkpoints on disk ({plan['disk_bytes'] / 2**30:.1f} GiB)")
    if layers:
        say(f"replay: linearising the {'last' if layers > 0 else 'first'} {abs(layers)} transformer blocks: "
            f"{sum(p.numel() for p in kept):,} of "
            f"{sum(p.numel() for p in run.params):,} trainable parameters")
    if r is None:
        for t in range(n):  # 1. the run as trained, a checkpoint every `outer` steps
            if t % outer == 0:
                run.state(t, copy=False).save(work / f"s{t:05d}.pt")
            run.step(t)
            if (t + 1) % 16 == 0:
                say(f"replay: forward step {t + 1}/{n}")
        run.state(n, copy=False).save(work / "end.pt")
        final, adj = {}, {}
        for name, obj in objectives.items():
            final[name], gT = _grad_of(obj, run.model, kept)
            adj[name] = {"theta": gT, **{key: [torch.zeros_like(p) for p in kept] for key in parts[1:]}}
        effect: dict[str, list[float]] = {name: [0.0] * n for name in objectives}
        shift: dict[str, list[float]] = {name: [0.0] * n for name in objectives}
        norms = {name: {key: [0.0] * n for key in parts} for name in objectives}
        shares = {name: {key: [0.0] * n for key in parts} for name in objectives}
        gap, below, spent = float("nan"), n, 0.0
        say(f"replay: objectives at the end {final}; reverse pass over {n} steps")
    else:
        run.lrs[:], run.norms[:] = r["lrs"], r["norms"]
        final, adj, effect, shift, norms, shares = r["final"], r["adj"], r["effect"], r["shift"], r["adj_norms"], r["shares"]
        gap, below, spent = r["gap"], r["below"], r["seconds"]
        say(f"replay: resumed from {resume_file}: the reverse pass continues below step {below} of {n}")
        del r

    def save_resume(below: int) -> None:
        tmp = resume_file.with_suffix(".tmp")
        torch.save({"n": n, "every": every, "outer": outer, "lrs": run.lrs, "norms": run.norms, "final": final,
                    "adj": adj, "effect": effect, "shift": shift, "adj_norms": norms, "shares": shares, "gap": gap, "below": below,
                    "start": run.start, **asdict(variant), "seconds": spent + time.perf_counter() - t0}, tmp)
        tmp.replace(resume_file)

    saved = [below]

    def blocks():  # lazily: an outer block's inner checkpoints are written once the later block's are gone
        for S in reversed(range(0, n, outer)):
            E = min(S + outer, n)
            if E > below:
                continue  # done before a resume
            if E < below and saved[0] - E >= resume_every:
                save_resume(E)  # every step from E on is done: a stop from here on resumes at this block
                saved[0] = E
                for k in range(E, n, outer):  # the finished blocks' own checkpoints are no longer needed
                    (work / f"s{k:05d}.pt").unlink(missing_ok=True)
            if outer > every:  # recompute the outer block once more, leaving its inner checkpoints on disk
                run.load(State.load(work / f"s{S:05d}.pt"))
                for t in range(S, E):
                    if t > S and (t - S) % every == 0:
                        run.state(t, copy=False).save(work / f"s{t:05d}.pt")
                    run.step(t)
            yield from reversed(range(S, E, every))

    pool: list[State] = []  # the block's states, in the same memory block after block

    def held(i: int) -> State | None:
        return pool[i] if i < len(pool) else None

    for s in blocks():  # 2. reverse, block by block, each block recomputed from its checkpoint into memory
        e = min(s + every, n)
        states = [State.load(work / f"s{s:05d}.pt", into=held(0))]
        run.load(states[0])
        for t in range(s, e):
            run.step(t)
            states.append(run.state(t + 1, into=held(t + 1 - s)))
        pool[:len(states)] = states
        if e == n:
            end = State.load(work / "end.pt")
            gap = max(float((a - b).abs().max()) for a, b in zip(states[-1].theta, end.theta))
            del end
        for t in range(e - 1, s - 1, -1):
            pre, post = states[t - s], states[t - s + 1]
            pre_k, post_k = run.kept(pre), run.kept(post)  # the parts the adjoints hold, once for every objective
            for name, A in adj.items():
                for key, x in effect_parts(pre_k, post_k, A).items():
                    shares[name][key][t] = x
                    norms[name][key][t] = _norm(A[key])
                effect[name][t] = sum(shares[name][key][t] for key in parts)
                shift[name][t] = shift_effect(run, t, pre_k, post_k, A)
            if segment is not None and t + 1 in segment.until and t + 1 < n:  # a stretch ends here: S_E, A_E for `_segments`
                post.save(work / f"seg{t + 1:05d}_state.pt")
                _save(adj, work / f"seg{t + 1:05d}_adjoint.pt")
            run.load(pre, weights_only=True)  # the Jacobian needs θ_t; the moments come from `post`
            run.vjp(t, post, adj, variant)
        if s % outer:  # an outer checkpoint stays until the resume file has moved past its block
            (work / f"s{s:05d}.pt").unlink(missing_ok=True)
        say(f"replay: reverse pass at step {s}/{n} ({time.perf_counter() - t0:.0f} s so far)")
    pool.clear()
    states = []  # the last block's states freed (pool and states held the same ones) before the exact stretches
    # a pair dropped in place also moves every later step one place earlier
    in_place = {name: [effect[name][t] + sum(shift[name][t + 1:]) for t in range(n)] for name in objectives}
    segments = _segments(run, work, segment, shift, in_place, say, objectives, final) if segment is not None else None
    run.load(State.load(work / "end.pt"))
    shutil.rmtree(work, ignore_errors=True)
    return {"removal_effect": in_place, "weight_zero_effect": effect, "final": final, "lr": run.lrs, "grad_norm": run.norms,
            "clipped": [bool(run.clip > 0 and x > run.clip) for x in run.norms], "recompute_gap": gap,
            "checkpoints": plan, **asdict(variant), "linearised_parameters": sum(p.numel() for p in kept),
            "first_step": run.start, "adjoint_norm": norms, "effect_parts": shares,
            **({"segments": segments} if segments is not None else {}),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "seconds": round(spent + time.perf_counter() - t0, 1)}


def _save(obj: Any, path: Path) -> None:
    """torch.save without the zip records' CRC-32, which took 4.6 of 5 s per 1.6 GB state on the 2-core machine (a
    checkpoint lives minutes, on a local disk; torch's process-wide option is put back as it was)."""
    crc = getattr(torch.serialization, "get_crc32_options", lambda: True)()
    setter = getattr(torch.serialization, "set_crc32_options", None)
    if setter is not None:
        setter(False)
    try:
        torch.save(obj, path)
    finally:
        if setter is not None:
            setter(crc)


def _segments(run: Steps, work: Path, segment: Segment, shift: dict[str, list[float]], in_place: dict[str, list[float]],
              say: Callable[[str], None], objectives: dict[str, Objective], final: dict[str, float]) -> dict[str, Any]:
    """The early pairs' removals taken exactly up to each end of `segment` (`Segment`), from the first checkpoint and
    the states and adjoints the reverse pass left at those ends; at the run's end, `objectives` evaluated against their
    values `final` there. The model and optimizer are left somewhere in the run."""
    t0 = time.perf_counter()
    n, ends = len(run), sorted(set(segment.until))
    below = warmup_steps(run.lrs) if segment.below is None else segment.below
    if not 0 < below < ends[0]:
        raise ValueError(f"replay: exact segments for the pairs below step {below} (the run's warm-up: its lr first "
                         f"reaches its peak there) until step {ends[0]}: give Segment.below (--replay-exact-below) "
                         f"between 1 and {ends[0] - 1}, or later ends.")
    steps = sum(ends[-1] - s - 1 for s in range(below)) + below  # the retrains' steps and the run's own before each
    say(f"replay: the first {below} pairs' removals taken exactly to step{'s' if len(ends) > 1 else ''} "
        f"{', '.join(map(str, ends))} ({steps} plain steps)")
    eff = {E: {name: list(v) for name, v in in_place.items()} for E in ends}  # from step `below` on: the replay's own
    run.load(State.load(work / f"s{0:05d}.pt"))
    pre = None
    for s in range(below):
        pre = run.state(s, into=pre)  # the run as trained, before step s
        for j in range(s + 1, ends[-1]):  # the retrain without pair s: pair j at place j − 1
            run.step(j - 1, batch=j)
            if j + 1 == n and n in ends:  # the retrain without pair s, whole: its objectives themselves
                with torch.no_grad():
                    for name, obj in objectives.items():
                        eff[n][name][s] = sum(float(x) for x in _parts(obj(run.model))) - final[name]
            elif j + 1 in ends:
                E = j + 1
                at = State.load(work / f"seg{E:05d}_state.pt", mmap=True)
                adj = torch.load(work / f"seg{E:05d}_adjoint.pt", weights_only=True, mmap=True)
                now, there = run.kept(run.state(E - 1, copy=False)), run.kept(at)
                for name, A in adj.items():
                    eff[E][name][s] = removal_effect(now, there, A) + sum(shift[name][E:])
                del at, adj
        run.load(pre)
        run.step(s)
        say(f"replay: pair {s + 1}/{below} taken exactly ({time.perf_counter() - t0:.0f} s)")
    return {"below": below, "steps": steps,
            "by_until": [{"until": E, "removal_effect": eff[E]} for E in ends],
            "seconds": round(time.perf_counter() - t0, 1)}


TRUST_FACTOR = 5.0
TRUST_WINDOW = 16


def replay_trusted_from(effects: list[float], factor: float = TRUST_FACTOR, window: int = TRUST_WINDOW) -> int:
    """The first step from which the replay's first-order effects are read as they are; before it they read 0.

    Carried back through many clipped AdamW steps, a linearisation can blow up while the run itself forgets: the
    replay's |effect| of one pair then jumps by an order of magnitude toward the start of the run (the 318-step demo
    run, docs/validation.md §9). The rule reads that off the replay's own output, no retrain (chosen on that run's
    whole replay, held on subsets it was not chosen on; the callback's replay.json records it as `trusted_from`, and
    `smda suspects --read replay` ranks only the steps from it on): the reference is the
    median |effect| over the second half of the run; the trusted span starts one step after the latest step of the
    first half whose rolling mean |effect| (over `window` steps) exceeds `factor` × the reference (0: no such step).
    The later pairs' larger effects (the end of a run matters most) never cut the span. Pairs before it are taken to
    have washed out by the end: score 0."""
    a = np.abs(np.asarray(effects, dtype=float))
    n = len(a)
    if n < 2 * window:
        return 0
    ref = float(np.median(a[n // 2:]))
    half = window // 2
    roll = np.asarray([a[max(0, t - half):t + half].mean() for t in range(n // 2)])
    bad = np.nonzero(roll > factor * ref)[0]
    return int(bad.max()) + 1 if len(bad) else 0


def probe_objective(snap: Any, indices: Sequence[int], batch: int = 8) -> Objective:
    """Mean refusal score of the probes `indices`, as the snapshot `snap` scores them: `batch` probes per forward
    (sorted by length, left-padded, masked and positioned as the snapshot pads them; the prefix scorer's trie
    continues from that forward's cache), one part per forward. The embedding lookup is written out, so that the
    gradient is the true one: an nn.Embedding with `padding_idx` drops that row's input-side gradient, and the chat
    template's end token is often the pad (a padded position is masked, so it adds nothing to any row's score)."""
    import torch.nn.functional as F

    idx = sorted(indices, key=lambda i: len(snap.tp.input_ids[i]))
    if not idx:
        raise ValueError("probe_objective: no probes selected")
    if batch < 1:
        raise ValueError(f"probe_objective: batch must be >= 1 (got {batch}).")
    cache = bool(getattr(snap.scorer, "needs_cache", False))

    def parts(model: Any) -> Any:
        emb = model.get_input_embeddings()
        dev = emb.weight.device
        was = model.training
        model.eval()  # as the snapshot measures it (in train mode gradient checkpointing turns the cache off)
        try:
            for s in range(0, len(idx), batch):
                ids, mask, pos, _ = snap.left_padded([snap.tp.input_ids[i] for i in idx[s:s + batch]], dev)
                out = model(inputs_embeds=F.embedding(ids, emb.weight), attention_mask=mask, position_ids=pos,
                            use_cache=cache, logits_to_keep=1)
                y = snap.scorer.score(model, out.logits[:, -1], out.past_key_values if cache else None, mask)
                yield y.sum() / len(idx)
        finally:
            model.train(was)

    return parts


def refusal_groups(probes: Any) -> dict[str, list[int]]:
    """The probe indices of the replay's two quantities, mean refusal on the harmful and on the harmless probes
    (a label with no probes is left out)."""
    harmful = np.asarray(probes.is_harmful, dtype=bool)
    groups = {"harmful": np.flatnonzero(harmful).tolist(), "harmless": np.flatnonzero(~harmful).tolist()}
    return {q: idx for q, idx in groups.items() if idx}


def refusal_objectives(snap: Any, groups: dict[str, list[int]]) -> dict[str, Objective]:
    """`probe_objective` of each of `refusal_groups`, scored as the snapshot `snap` scores them."""
    return {q: probe_objective(snap, idx) for q, idx in groups.items()}


class TailRecorder:
    """The callback's `SMDAConfig(replay_last_steps=K)`: the last K steps of the user's run, kept while it trains
    and replayed once after the last step.

    Kept: the weights and Adam moments before the first of them (one state file under `workdir`), each step's batch
    as the model's forward received it, its lr, and the lr of the step before. After training, `run` replays those
    steps (`replay_steps`) and puts the model and optimizer back as training left them, whatever happens.
    """

    def __init__(self, steps: int, workdir: str | Path, every: int = 2, outer: int = 16) -> None:
        self.k, self.work, self.every, self.outer = int(steps), Path(workdir), int(every), int(outer)
        self.start: int | None = None
        """The run's 0-based index of the first recorded step (global_step when it begins)."""
        self.batches: list[dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]] = []
        self.lrs: list[float] = []
        self.rows: list[list[str]] = []
        """Per recorded step, the content hashes of its training rows (the callback's pair capture)."""
        self.prev_lr: float | None = None
        self.recording = self.done = False
        self.broken: str | None = None
        self._forwards: list[dict[str, torch.Tensor]] = []
        self._items: list[Any] = []
        self._handle: Any = None
        self._trainer: Any = None
        self._wrapper: Any = None

    @staticmethod
    def check(k: int, args: Any, trainer: Any, optimizer: Any, world: int, every: int, outer: int) -> None:
        """Refuse, before any training, a run whose steps the replay cannot take again exactly, with the fix."""
        checkpoint_plan(max(k, 1), 0, every, outer)
        fix = "; or set SMDAConfig(replay_last_steps=0) to train without the replay"
        problems = []
        if trainer is None:
            problems.append("it needs the trainer's loss: call callback.bind(trainer) after building the trainer")
        elif getattr(trainer, "compute_loss_func", None) is not None:
            problems.append("the trainer has a custom compute_loss_func; the replay differentiates the mean token "
                            "cross-entropy of the labels, so train with the trainer's own loss")
        if world > 1:
            problems.append(f"the run has {world} processes; the replay steps one process's model, so train on one device")
        if getattr(args, "fp16", False):
            problems.append("fp16 mixed precision scales and skips steps; use bf16 or float32")
        if float(getattr(args, "label_smoothing_factor", 0.0) or 0.0) > 0:
            problems.append("label smoothing is not the loss the replay differentiates; set label_smoothing_factor=0")
        if getattr(args, "loss_type", None) not in (None, "nll"):
            problems.append(f"loss_type={args.loss_type!r}; the replay differentiates the plain token cross-entropy ('nll')")
        if optimizer is not None:
            try:
                _check_optimizer(inner_optimizer(optimizer))
            except ValueError as e:
                problems.append(str(e).removeprefix("replay: "))
        if problems:
            raise ValueError(f"SMDAConfig(replay_last_steps={k}): " + "; ".join(problems) + fix + ".")

    def plan(self, max_steps: int) -> int:
        """The first step to record, from the run's planned length."""
        self.start = max(0, int(max_steps) - self.k)
        return self.start

    def install(self, model: Any, trainer: Any = None) -> None:
        """Record the training forwards' inputs (a forward pre-hook on `model`) and, through `trainer.compute_loss`,
        the `num_items_in_batch` the Trainer gives each micro-batch's loss (TRL's SFTTrainer divides by it without
        passing it to the model, so the forward alone does not show it)."""
        self._handle = model.register_forward_pre_hook(self._forward, with_kwargs=True)
        if trainer is not None:
            own = trainer.compute_loss

            def compute_loss(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
                if self.recording and model.training and torch.is_grad_enabled():
                    n = kwargs.get("num_items_in_batch")
                    self._items.append((n, loss_is_scaled_for_ga(trainer, n)))
                return own(model, inputs, *args, **kwargs)

            trainer.compute_loss = self._wrapper = compute_loss
            self._trainer = trainer

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        tr, self._trainer = self._trainer, None
        if tr is not None and tr.__dict__.get("compute_loss") is self._wrapper:
            del tr.compute_loss  # the class's own method again (a wrapper put on top of ours since is left alone)

    def _forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not (self.recording and module.training and torch.is_grad_enabled()):
            return
        batch = {k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v) and k != "num_items_in_batch"}
        if args and torch.is_tensor(args[0]):
            batch.setdefault("input_ids", args[0].detach().clone())
        self._forwards.append(batch)

    def step_begin(self, global_step: int, model: Any, optimizer: Any) -> None:
        """A step begins (`global_step` steps done): at the tail's first step, keep the state before it on disk."""
        if self.start is None or self.broken or self.recording:
            return
        if global_step > self.start:
            self.broken = (f"the run resumed at step {global_step}, after the replay's first step {self.start}; "
                           "the state before it was not kept")
            logger.warning("smda: no replay after this run: %s", self.broken)
            return
        if global_step == self.start and self.start > 0 and self.prev_lr is None:
            self.broken = (f"the run resumed at step {global_step + 1}, the replay's first step, so the lr of the step "
                           "before it was not seen; resume from an earlier checkpoint or replay one step fewer")
            logger.warning("smda: no replay after this run: %s", self.broken)
            return
        if global_step == self.start:
            try:  # a full disk costs the replay, never the training
                self.work.mkdir(parents=True, exist_ok=True)
                params = [p for p in model.parameters() if p.requires_grad]
                State.read(params, inner_optimizer(optimizer), self.start, copy=False).save(self.work / "start.pt")
            except OSError as exc:
                self.broken = f"could not keep the state before step {self.start + 1} under {self.work} ({exc})"
                logger.error("smda: no replay after this run: %s; training continues.", self.broken)
                return
            self.recording = True

    def step_end(self, index: int, lr: float, rows: Sequence[str]) -> None:
        """Optimizer step `index` (0-based) is applied with `lr`; its training rows are `rows` (hashes)."""
        if self.start is not None and index == self.start - 1:
            self.prev_lr = lr
        if not self.recording or self.broken:
            self._forwards, self._items = [], []
            return
        with_labels = [b for b in self._forwards if "labels" in b]
        items, self._forwards, self._items = self._items, [], []
        if self._trainer is not None and len(items) != len(with_labels):
            self.broken = (f"step {index + 1} ran {len(with_labels)} training forwards with labels and {len(items)} "
                           "losses; the replay needs one forward per micro-batch")
            return
        for b, (n, scaled) in zip(with_labels, items):  # the Trainer's label count over the step's micro-batches, if any
            if n is not None:
                b["num_items_in_batch"] = torch.as_tensor(n).detach().clone()
            b["loss_divisor"] = 1 if scaled else len(with_labels)  # what training_step divided this loss by
        if not with_labels:
            self.broken = (f"step {index + 1} ran no training forward with labels; the replay needs the batches of every "
                           "step it replays")
            return
        self.batches.append(with_labels[0] if len(with_labels) == 1 else with_labels)  # micro-batches of accumulation
        self.lrs.append(float(lr))
        self.rows.append(list(rows))

    def run(self, model: Any, optimizer: Any, loss: Callable[[Any, dict], Any], clip: float,
            objectives: dict[str, Objective], progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Replay the recorded steps; the model and optimizer are put back as training left them (also on error).
        Returns `replay_steps`' result and "recompute_gap_to_run": max |θ_T recomputed − θ_T trained|."""
        self.recording, self.done = False, True
        self.remove()
        if self.broken or not self.batches:
            shutil.rmtree(self.work, ignore_errors=True)  # e.g. a start state left by a run killed after it
            raise ValueError(self.broken or "no step was recorded (the run ended before the replay's first step)")
        was_training = model.training
        run = Steps(model, optimizer, self.batches, loss, clip, self.lrs, self.start, self.prev_lr)
        end_path = self.work / "trained_end.pt"
        run.state(len(run), copy=False).save(end_path)  # on disk, not a second copy in memory
        end = None
        try:
            run.load(State.load(self.work / "start.pt"))  # the state before the first replayed step (no copy kept)
            res = replay_steps(run, objectives, self.work / "checkpoints", self.every, progress, self.outer)
            end = State.load(end_path)
            res["recompute_gap_to_run"] = max(float((p.detach() - q).abs().max()) for p, q in zip(run.params, end.theta))
            return res
        finally:
            run.load(end if end is not None else State.load(end_path))  # read from disk once either way
            model.train(was_training)
            model.zero_grad(set_to_none=True)
            shutil.rmtree(self.work, ignore_errors=True)
