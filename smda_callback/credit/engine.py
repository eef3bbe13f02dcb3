"""From optimizer steps to pairs: who caused each step's change of the policy.

A step's change Δβ_t is exact (attribution.py); *who caused it* depends on the optimizer.
The update of optimizer step t is a weighted sum of the gradients of the pairs trained so far,

    Δθ_t = −D_t Σ_{s≤t} c(t, s) g_s  (+ weight decay),

with c(t, s) known in closed form (the kernel below) and D_t the optimizer's per-coordinate
preconditioner (1/(√v̂_t+ε) for Adam, 1 for SGD). Assuming D and the probe Jacobian J change
little over the ~20 steps a pair's gradient stays in the momentum (the documented
approximation, see docs/credit.md), pair s contributes c(t, s)·γ_s to Δβ_t with γ_s = J D g_s
a per-pair vector. The engine keeps the γ_s of the pairs whose gradients are still in the
momentum ("live"), predicts what they carry into each new window, and learns the γ of the
window's new pairs from what the window measured:

* `deconvolve` (default, no extra cost): the new pairs get the window's change minus the carry;
  nothing is left over (residual 0), but everything the linear model misses lands on them;
* `ghost` (one extra probe pass per step): the new pair's own part of the update is applied
  alone and measured; what the carry prediction misses is an explicit residual.

Per-pair credits + residuals telescope to β_T − β_0 exactly under either. Inside a step with
several rows the new part is split by each row's first-order share (`row_slopes`; 1/n for `step`).
No Trainer types here: the callback feeds windows in, the engine hands credits out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- the optimizer's kernel
@dataclass(frozen=True)
class OptimizerKernel:
    """c(t, s): the weight of pair s's gradient in the update of optimizer step t (steps 1-based).

    kind: `step` (a step's change belongs to its own pairs), `sgd` (no momentum), `momentum`
    (torch SGD with momentum μ, dampening, Nesterov), `adam` (Adam/AdamW: EMA with β₁ and bias
    correction). Learning rates enter through `lr_t`; preconditioning is the documented approximation.

    Weight decay: `decoupled` (AdamW, and bitsandbytes' 8-bit/paged AdamW) shrinks θ by lr_t·wd each
    step outside the gradient; coupled (torch SGD/Adam `weight_decay`) adds wd·θ to the gradient, so it
    rides the momentum like a gradient. `decay_coef(t, lr_t)` is the factor of −θ in step t's update
    under the slow-θ approximation; its effect on the probes is measured once (`CreditEngine.decay`).
    """

    kind: str = "step"
    beta: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    optimizer: str = ""
    decoupled: bool = False

    def coef(self, t: int, s: int, lr_t: float) -> float:
        if s > t:
            return 0.0
        if self.kind in ("step", "sgd"):
            return (1.0 if self.kind == "step" else lr_t) if t == s else 0.0
        if self.kind == "adam":
            b = self.beta
            return lr_t * (1.0 - b) * b ** (t - s) / (1.0 - b**t)
        # torch SGD momentum: buf_1 = g_1, buf_t = μ·buf_{t-1} + (1 − dampening)·g_t
        first = 1.0 if s == 1 else 1.0 - self.dampening
        in_buf = first * self.beta ** (t - s)
        if not self.nesterov:
            return lr_t * in_buf
        return lr_t * (1.0 + self.beta * first) if t == s else lr_t * self.beta * in_buf

    def decay_coef(self, t: int, lr_t: float) -> float:
        """The factor of −θ_{t−1} in step t's update that weight decay contributes (θ taken as slowly changing).
        Decoupled: lr_t·wd. Coupled SGD: wd·Σ_s c(t, s). Coupled Adam is preconditioned like a gradient
        and is not modelled (0; `from_optimizer` warns)."""
        if self.weight_decay == 0.0 or self.kind == "step":
            return 0.0
        if self.decoupled:
            return lr_t * self.weight_decay
        if self.kind in ("sgd", "momentum"):
            return self.weight_decay * sum(self.coef(t, s, lr_t) for s in range(1, t + 1))
        return 0.0

    @property
    def has_memory(self) -> bool:
        """Does a gradient act beyond its own step?"""
        return self.kind in ("adam", "momentum") and self.beta > 0

    @classmethod
    def from_optimizer(cls, optimizer: Any) -> tuple["OptimizerKernel", str | None]:
        """Read type, betas/momentum and weight decay from the optimizer the Trainer built.
        Returns (kernel, warning); an unsupported optimizer gives the `step` kernel and a warning."""
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        name = type(opt).__name__
        groups = getattr(opt, "param_groups", None) or [{}]
        g = groups[0]
        bnb_adamw = type(opt).__module__.startswith("bitsandbytes") and name in BNB_ADAMW
        if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) or bnb_adamw:
            betas = {tuple(x.get("betas", (0.9, 0.999))) for x in groups}
            if len(betas) > 1:
                return cls(optimizer=name), f"{name} with different betas per parameter group is not modelled"
            decoupled = isinstance(opt, torch.optim.AdamW) or bnb_adamw or bool(g.get("decoupled_weight_decay", False))
            wd = _decay_of(groups)
            warning = None
            if wd is None:
                wd, warning = 0.0, (f"{name} has parameter groups with weight decay and without (the Trainer excludes biases "
                                    "and norms); decay is modelled for the decayed groups' share only approximately")
                wd = max(float(x.get("weight_decay", 0.0)) for x in groups)
            if wd and not decoupled:
                warning = (f"{name} with coupled weight_decay={wd} preconditions the decay like a gradient; its part of each "
                           "step is not modelled and lands on the step's pairs (use AdamW for decoupled decay)")
            return cls("adam", float(g["betas"][0]), weight_decay=float(wd), optimizer=name, decoupled=decoupled), warning
        if isinstance(opt, torch.optim.SGD):
            mu = float(g.get("momentum", 0.0))
            if len({float(x.get("momentum", 0.0)) for x in groups}) > 1:
                return cls(optimizer=name), "SGD with different momentum per parameter group is not modelled"
            kind = "momentum" if mu > 0 else "sgd"
            wd = _decay_of(groups)
            return cls(kind, mu, float(g.get("dampening", 0.0)), bool(g.get("nesterov", False)),
                       float(wd if wd is not None else max(float(x.get("weight_decay", 0.0)) for x in groups)), name), None
        return cls(optimizer=name), (f"credit='optimizer' models SGD (with or without momentum), Adam and AdamW; "
                                     f"{name} ({type(opt).__module__}) is not modelled, so it falls back to credit='step': "
                                     "each step's change goes to that step's pairs, split equally. What is lost: the part "
                                     "of a pair's gradient that momentum carries into later steps is credited to the "
                                     "later steps' pairs, the split inside a step by each row's loss slope is off, and "
                                     "credit_measure='ghost' is off")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "beta": self.beta, "dampening": self.dampening, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay, "optimizer": self.optimizer, "decoupled": self.decoupled}


def read_kernel(rule: str, optimizer: Any) -> tuple[OptimizerKernel, str | None]:
    """The kernel a run credits through (`SMDAConfig.credit`) and the one warning to log, if any."""
    if rule == "step":
        return OptimizerKernel(optimizer=type(getattr(optimizer, "optimizer", optimizer)).__name__), None
    if optimizer is None:
        return OptimizerKernel(), "the Trainer passed no optimizer to the callback; credit='optimizer' falls back to 'step'"
    return OptimizerKernel.from_optimizer(optimizer)


BNB_ADAMW = ("AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "AdamW32bit", "AdamW")
"""bitsandbytes optimizers that are AdamW for the kernel (β₁, bias correction, decoupled decay). Their quantised
state is not needed by `deconvolve`; `ghost` and the in-step split read exp_avg_sq and refuse them."""


def _decay_of(groups: Sequence[dict[str, Any]]) -> float | None:
    """The weight decay of the groups that have parameters with decay (None when groups differ beyond 0 / wd)."""
    vals = {float(x.get("weight_decay", 0.0)) for x in groups}
    nonzero = vals - {0.0}
    if len(nonzero) <= 1:
        return nonzero.pop() if nonzero else 0.0
    return None


# ---------------------------------------------------------------- what a window credits
@dataclass
class WindowCredit:
    """Credits handed out for one snapshot window (vectors in the engine's layout)."""

    own: dict[str, np.ndarray]
    """New pairs (this window's rows): their share of the window's change."""
    carried: dict[str, np.ndarray]
    """Earlier pairs: what their gradients, still in the momentum, did in this window."""
    residual: np.ndarray
    """What no pair is credited with (0 for `deconvolve`); credits + residual = the window's change."""
    projected: np.ndarray
    """The new pairs' whole effect, own window plus what the momentum will still carry (the alert reads this)."""


@dataclass
class _Live:
    hash: str
    step: int
    gamma: np.ndarray
    ref: float
    """c(t, s) at the first step where the gradient had weight: the scale its tail is pruned against."""


@dataclass
class CreditEngine:
    """Running per-pair credit under an optimizer kernel (sum of credits + residuals telescopes exactly)."""

    kernel: OptimizerKernel
    width: int
    measure: str = "deconvolve"
    tol: float = 1e-7
    """A pair leaves the live set once c(t, s)/c(s, s) < tol (its tail is then below float noise of γ)."""
    lrs: dict[int, float] = field(default_factory=dict)
    live: list[_Live] = field(default_factory=list)
    totals: dict[str, np.ndarray] = field(default_factory=dict)
    own_totals: dict[str, np.ndarray] = field(default_factory=dict)
    residual_total: np.ndarray | None = None
    decay: np.ndarray | None = None
    """κ: the probes' response to shrinking the trainable weights, d/dε of the layout vector at θ·(1−ε), measured
    once at baseline. Step t's decay part is decay_coef(t)·κ; it goes to the residual, never to a pair."""
    decay_total: np.ndarray | None = None
    pending: list[tuple[str, int, float]] = field(default_factory=list)
    """Rows whose gradient had no weight yet in their own window (lr 0 on the first warm-up step):
    they join the next window's new rows instead of being dropped."""

    def __post_init__(self) -> None:
        if self.measure not in ("deconvolve", "ghost"):
            raise ValueError(f"credit measure must be 'deconvolve' or 'ghost', got {self.measure!r}")
        if self.residual_total is None:
            self.residual_total = np.zeros(self.width)
        if self.decay_total is None:
            self.decay_total = np.zeros(self.width)

    def lr(self, step: int, lr: float) -> None:
        """Record the learning rate optimizer step `step` used."""
        self.lrs[int(step)] = float(lr)

    def _c(self, t: int, s: int) -> float:
        return self.kernel.coef(t, s, self.lrs.get(t, 1.0))

    def window(self, steps: Sequence[int], rows: Sequence[tuple[str, int, float]], delta: np.ndarray,
               measured_new: np.ndarray | None = None) -> WindowCredit:
        """Credit one snapshot window.

        steps: the optimizer steps inside the window; rows: (pair hash, its step, its share of that
        step's new gradient: shares of one step sum to 1); delta: the window's measured change;
        measured_new: (ghost) the measured effect of the new rows' part of the update alone.
        """
        delta = np.asarray(delta, np.float64)
        decay = np.zeros(self.width)
        if self.decay is not None and self.kernel.weight_decay:
            decay = sum(self.kernel.decay_coef(t, self.lrs.get(t, 0.0)) for t in steps) * np.asarray(self.decay, np.float64)
            delta = delta - decay
            self.decay_total = self.decay_total + decay
        carried: dict[str, np.ndarray] = {}
        carry = np.zeros(self.width)
        for lv in self.live:
            c = sum(self._c(t, lv.step) for t in steps)
            if c:
                v = c * lv.gamma
                carried[lv.hash] = carried.get(lv.hash, 0.0) + v
                carry += v
        rows = [*self.pending, *rows]
        mass = [share * sum(self._c(t, s) for t in steps if t >= s) for _, s, share in rows]
        total_mass = float(sum(mass))
        self.pending = [r for r, m in zip(rows, mass) if m == 0.0 and self.kernel.has_memory]
        if measured_new is None:
            new, residual = delta - carry, np.zeros(self.width)
        else:
            new = np.asarray(measured_new, np.float64)
            residual = delta - carry - new
        own: dict[str, np.ndarray] = {}
        projected = np.zeros(self.width)
        if rows and total_mass != 0.0:
            unit = new / total_mass
            for (h, s, share), m in zip(rows, mass):
                if m == 0.0:
                    continue
                own[h] = own.get(h, 0.0) + m * unit
                ref = max(abs(self._c(t, s)) for t in steps if t >= s)
                projected += share * self._future_mass(s, steps, ref) * unit
                if self.kernel.has_memory:
                    self.live.append(_Live(h, s, share * unit, ref))
        else:  # nothing new to credit (e.g. a window without captured rows): the change is unexplained
            residual = residual + new
        for h, v in carried.items():
            self.totals[h] = self.totals.get(h, 0.0) + v
        for h, v in own.items():
            self.totals[h] = self.totals.get(h, 0.0) + v
            self.own_totals[h] = self.own_totals.get(h, 0.0) + v
        residual = residual + decay
        self.residual_total = self.residual_total + residual
        self._prune(max(steps) if steps else 0)
        return WindowCredit(own, carried, residual, projected)

    def _future_mass(self, s: int, steps: Sequence[int], ref: float) -> float:
        """Σ_{t≥s} c(t, s): the window's own steps at their learning rates, later ones at the last one."""
        last = max(steps)
        mass = sum(self._c(t, s) for t in steps if t >= s)
        lr, t = self.lrs.get(last, 1.0), last + 1
        while self.kernel.has_memory:
            c = self.kernel.coef(t, s, lr)
            if abs(c) < self.tol * ref:
                break
            mass, t = mass + c, t + 1
        return mass

    def _prune(self, t: int) -> None:
        lr = self.lrs.get(t, 1.0)
        self.live = [lv for lv in self.live if abs(self.kernel.coef(t + 1, lv.step, lr)) >= self.tol * lv.ref]
        horizon = min([lv.step for lv in self.live], default=t)
        self.lrs = {k: v for k, v in self.lrs.items() if k >= horizon}

    # -------------------------------------------------------- checkpoint state (JSON + arrays, no pickle)
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"kernel": self.kernel.to_dict(), "measure": self.measure, "tol": self.tol,
                "lrs": {str(k): v for k, v in self.lrs.items()},
                "live": [[lv.hash, lv.step, lv.ref] for lv in self.live], "pending": [list(r) for r in self.pending]}
        keys = list(self.totals)
        arrays = {
            "credit_live_gamma": np.asarray([lv.gamma for lv in self.live], np.float64).reshape(len(self.live), self.width),
            "credit_keys": np.asarray(keys, dtype="U32"),
            "credit_totals": np.asarray([self.totals[k] for k in keys], np.float64).reshape(len(keys), self.width),
            "credit_own": np.asarray([self.own_totals.get(k, np.zeros(self.width)) for k in keys],
                                     np.float64).reshape(len(keys), self.width),
            "credit_residual": np.asarray(self.residual_total, np.float64),
            "credit_decay": np.asarray(self.decay if self.decay is not None else np.full(self.width, np.nan), np.float64),
            "credit_decay_total": np.asarray(self.decay_total, np.float64),
        }
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: Any, width: int) -> "CreditEngine":
        eng = cls(OptimizerKernel(**meta["kernel"]), width, meta["measure"], float(meta["tol"]))
        eng.lrs = {int(k): float(v) for k, v in meta["lrs"].items()}
        eng.live = [_Live(str(h), int(s), np.asarray(g), float(r)) for (h, s, r), g in zip(meta["live"], arrays["credit_live_gamma"])]
        keys = [str(k) for k in arrays["credit_keys"]]
        eng.totals = {k: np.asarray(v) for k, v in zip(keys, arrays["credit_totals"])}
        eng.own_totals = {k: np.asarray(v) for k, v in zip(keys, arrays["credit_own"])}
        eng.residual_total = np.asarray(arrays["credit_residual"], np.float64)
        if "credit_decay" in arrays and np.isfinite(arrays["credit_decay"]).all():
            eng.decay = np.asarray(arrays["credit_decay"], np.float64)
        if "credit_decay_total" in arrays:
            eng.decay_total = np.asarray(arrays["credit_decay_total"], np.float64)
        eng.pending = [(str(h), int(s), float(sh)) for h, s, sh in meta.get("pending", [])]
        return eng


# ---------------------------------------------------------------- the vector a credit carries
@dataclass(frozen=True)
class CreditLayout:
    """One flat vector per credit: Δβ_X (k), Δβ_Y (k), measured refusal change per probe category (C),
    policy-predicted category move (C), measured harmful/harmless mean refusal change (2).
    All are linear in a step's change, so one kernel credits them all."""

    k: int
    categories: tuple[str, ...]

    @property
    def width(self) -> int:
        return 2 * self.k + 2 * len(self.categories) + 2

    def pack(self, dx: np.ndarray, dy: np.ndarray, cat_measured: dict[str, float], cat_predicted: dict[str, float],
             harmful: float, harmless: float) -> np.ndarray:
        return np.concatenate([np.asarray(dx, np.float64), np.asarray(dy, np.float64),
                               [cat_measured[c] for c in self.categories], [cat_predicted[c] for c in self.categories],
                               [harmful, harmless]])

    def unpack(self, v: np.ndarray) -> dict[str, Any]:
        k, C = self.k, len(self.categories)
        v = np.asarray(v, np.float64)
        dx, dy = v[:k], v[k:2 * k]
        return {"dx": dx, "dy": dy, "d": dx + dy,
                "refusal_by_category": dict(zip(self.categories, v[2 * k:2 * k + C].tolist())),
                "predicted_by_category": dict(zip(self.categories, v[2 * k + C:2 * k + 2 * C].tolist())),
                "refusal_harmful": float(v[-2]), "refusal_harmless": float(v[-1])}


# ---------------------------------------------------------------- any rule, replayed from a ledger
def replay_credits(records: list[dict[str, Any]], policy: dict[str, Any], kernel: OptimizerKernel,
                   measure: str = "deconvolve", part: str = "total", by: str = "hash") -> dict[str, np.ndarray]:
    """Per-pair credit vectors under another rule, recomputed from a ledger's recorded step changes
    (the run is not repeated: every rule sees the same training). `ghost` needs a ghost ledger.
    `part`: "total" (own window + what the momentum carried later, credits.json's numbers) or "own".
    `by`: keyed by pair "hash", or by the "id" the ledger recorded for it (pairs recorded without one left out)."""
    if part not in ("total", "own"):
        raise ValueError(f"replay_credits: part={part!r}; use 'total' or 'own'")
    if by not in ("hash", "id"):
        raise ValueError(f"replay_credits: by={by!r}; use 'hash' or 'id'")
    cats = list(policy["baseline_refusal_by_category"])
    layout = CreditLayout(len(policy["features"]), tuple(cats))
    eng = CreditEngine(kernel, layout.width, measure)
    prev = {"cat": policy["baseline_refusal_by_category"], "harmful": None, "harmless": None}
    y0 = np.asarray(policy["probe_refusal_0"])
    harm = np.asarray([p["label"] == "harmful" for p in policy["probes"]])
    prev["harmful"], prev["harmless"] = float(y0[harm].mean()), float(y0[~harm].mean())
    for r in records:
        if "beta" not in r:
            continue
        steps = list(range(r["window"][0], r["window"][1] + 1))
        for t, lr in zip(steps, r["credit"]["lrs"]):
            if lr is not None:
                eng.lr(t, lr)
        vec = layout.pack(r["delta_beta_x"], r["delta_beta_y"],
                          {c: r["refusal_by_category"][c] - prev["cat"][c] for c in cats},
                          {c: v["x"] + v["y"] for c, v in r["category_pathways"].items()},
                          r["refusal_harmful"] - prev["harmful"], r["refusal_harmless"] - prev["harmless"])
        prev = {"cat": r["refusal_by_category"], "harmful": r["refusal_harmful"], "harmless": r["refusal_harmless"]}
        n = len(r["pairs"])
        rows = [(p["hash"], int(p.get("step") or r["step"]), 1.0 / n if kernel.kind == "step" else float(p["credit"]))
                for p in r["pairs"]]
        ghost = r["credit"].get("ghost") if measure == "ghost" else None
        eng.window(steps, rows, vec, None if ghost is None else np.asarray(ghost))
    got = {h: layout.unpack(v) for h, v in (eng.totals if part == "total" else eng.own_totals).items()}
    if by == "hash":
        return got
    id_of = {p["hash"]: p.get("id") for r in records for p in r.get("pairs", [])}
    return {id_of[h]: v for h, v in got.items() if id_of.get(h) is not None}



def shares_from_slopes(slopes: Sequence[float | None]) -> np.ndarray:
    """Normalise a step's row slopes to shares summing to 1; equal shares where slopes are missing or cancel."""
    n = len(slopes)
    if n == 0:
        return np.zeros(0)
    if any(s is None for s in slopes):
        return np.full(n, 1.0 / n)
    arr = np.asarray(slopes, np.float64)
    total = float(arr.sum())
    if not np.isfinite(total) or abs(total) <= 1e-9 * float(np.abs(arr).sum()) or total == 0.0:
        logger.warning("smda: the rows' first-order contributions cancel (sum %.3g); splitting the step equally", total)
        return np.full(n, 1.0 / n)
    return arr / total
