"""Carry-through by forgetting: what is left at the end of a run of the change a pair made when it was trained.

The in-run credit is local: it reads the change a pair's step makes when applied. Later training answers that
change; on the demo it partly undoes it (a pair dropped early is barely visible in the final model, docs/
validation.md §10). The replay (replay.py) measures that answer exactly, at several trainings' cost. This module
is the cheap model of it, read off the run's own ledger with no extra pass:

    q_k − q_{k−1} = a_harmful · n_harmful(k) + a_harmless · n_harmless(k) − κ · q_{k−1} + noise,

where q_k is a probe quantity after window k (mean refusal of the harmful or of the harmless probes) and
n_label(k) the window's pairs of each label. κ is the run's rate of forgetting: a push made in window k is
left at (1 − κ)^(K−1−k) of its size after the run's K windows. κ is fitted by least squares per quantity on
the run's own trajectory (no retraining, no look at any benchmark), with a bootstrap interval over windows;
`end_weights` gives that factor per pair, by which any reader's per-pair score is multiplied (`smda suspects
--read end`, the carried readers of `smda benchmark-lds` and `benchmark-poison`). The model is first order and
assumes one forgetting rate for the whole run (a constant learning rate after warm-up, as in the demo).

`order=2` adds the window's last increment, b · (q_{k−1} − q_{k−2}), to the right-hand side: an AR(2) process in
the increments, whose response to a push can overshoot and come back with the other sign, as the demo's run does 24–40
steps before its end (docs/validation.md §9, "Right at the end, wrong 24–40 steps before it"). A push's weight is then
the fitted process's response at the end, by recursion (`Forgetting.weight`); an explosive fit is refused.
Fitted per quantity, the AR(2) response moves with a single window of a 64-window run (docs/validation.md §9, "A
second data order"); `shared=True` fits one κ and one b to both quantities' trajectories (each with its own pushes),
twice the rows for the same dynamics (`fit_shared`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

QUANTITIES = ("harmful", "harmless")


REACH_SHARE = 0.05
"""`Forgetting.reach`: a push carried at under this share of the largest carry is read as gone."""


@dataclass(frozen=True)
class Forgetting:
    """κ of one probe quantity, its 95 % bootstrap interval over windows and the windows it was fitted on."""

    kappa: float
    ci95: tuple[float, float]
    windows: int
    lags: tuple[float, ...] = ()  # b_1 … b_{p−1} of an AR(p) fit (order p > 1); empty for the first-order model

    @property
    def retention(self) -> float:
        """Share of a push kept per later window, 1 − κ (κ clipped into [0, 1))."""
        return 1.0 - min(max(self.kappa, 0.0), 1.0 - 1e-9)

    def weight(self, later_windows: int) -> float:
        """What is left at the end of a unit push made `later_windows` windows before the last one."""
        n = max(int(later_windows), 0)
        return self.retention ** n if not self.lags else float(self.weights(n)[n])

    def weights(self, most: int) -> np.ndarray:
        """`weight(n)` for n = 0 … most, in one pass: the fitted recursion driven by a unit push alone, its level
        after n more windows (for the first-order model, retention^n)."""
        if not self.lags:
            return self.retention ** np.arange(most + 1, dtype=np.float64)
        out, level, steps = np.empty(most + 1), 0.0, []
        for k in range(most + 1):
            step = (1.0 if k == 0 else 0.0) - self.kappa * level + sum(b * steps[-j] for j, b in enumerate(self.lags, 1)
                                                                      if len(steps) >= j)
            steps.append(step)
            level += step
            out[k] = level
        return out

    def reach(self, most: int, share: float = REACH_SHARE) -> int:
        """How many of the last windows (of `most` + 1) a carried read ranks: 1 + the largest n ≤ `most` whose weight is
        at least `share` of the largest |weight|; pairs trained further back are carried at under that share, ≈ 0."""
        w = np.abs(self.weights(most))
        return int(np.flatnonzero(w >= share * w.max())[-1]) + 1


def fit_forgetting(q0: float, q: Sequence[float], n_harmful: Sequence[int], n_harmless: Sequence[int],
                   resamples: int = 500, seed: int = 0, order: int = 1) -> Forgetting:
    """κ from a run's trajectory: `q0` before training, `q[k]` after window k, and the labels of each window's
    pairs; with `order` p > 1 also the weights b of the last p − 1 increments (module docstring). Raises ValueError
    when the trajectory cannot identify the fit (fewer than 3 + p windows, or q never moves) or, for p > 1, when the
    fitted process is explosive (a push would grow without bound)."""
    return fit_shared([(q0, q)], n_harmful, n_harmless, resamples=resamples, seed=seed, order=order)


def fit_shared(trajectories: Sequence[tuple[float, Sequence[float]]], n_harmful: Sequence[int],
               n_harmless: Sequence[int], resamples: int = 500, seed: int = 0, order: int = 1) -> Forgetting:
    """One κ (and, for `order` p > 1, one set of lags b) shared by several quantities of the same run, each
    `(q0, q)` as in `fit_forgetting`, each with its own push per label: the dynamics are the model's and the
    optimizer's, the pushes the quantity's. Twice the rows of a one-quantity fit for the same unknowns of the
    dynamics. The bootstrap interval resamples windows, a window's rows of every quantity together."""
    if order < 1:
        raise ValueError(f"fit_forgetting: order must be ≥ 1, got {order}")
    if not trajectories:
        raise ValueError("fit_shared: no trajectory given; pass one (q0, q) per quantity")
    nh, ns = np.asarray(n_harmful, dtype=np.float64), np.asarray(n_harmless, dtype=np.float64)
    T, label_cols, dyn_rows, ys = len(trajectories), [], [], []
    for t, (q0, q) in enumerate(trajectories):
        qs = np.asarray([q0, *q], dtype=np.float64)
        K = len(qs) - 1
        if K < 3 + order or len(nh) != K or len(ns) != K:
            raise ValueError(f"fit_forgetting: needs ≥ {3 + order} windows with one label count each; got {K} "
                             f"windows, {len(nh)} / {len(ns)} label counts")
        if not np.isfinite(qs).all():
            raise ValueError("fit_forgetting: the trajectory holds non-finite values (a skipped snapshot?)")
        d, prev = np.diff(qs), qs[:-1]
        if np.ptp(prev) == 0:
            raise ValueError("fit_forgetting: the quantity never moved during the run, so no forgetting rate can be "
                             "read")
        rows = np.arange(order - 1, K)  # a window with its p − 1 earlier increments
        push = np.zeros((len(rows), 2 * T))
        push[:, 2 * t], push[:, 2 * t + 1] = nh[rows], ns[rows]
        label_cols.append(push)
        dyn_rows.append(np.column_stack([-prev[rows], *(d[rows - j] for j in range(1, order))]))
        ys.append(d[rows])
    A, y = np.hstack([np.vstack(label_cols), np.vstack(dyn_rows)]), np.concatenate(ys)
    coef = np.linalg.lstsq(A, y, rcond=None)[0]
    kappa, lags = float(coef[2 * T]), tuple(float(b) for b in coef[2 * T + 1:])
    if lags and _spectral_radius(kappa, lags) >= 1.0:
        raise ValueError(f"fit_forgetting: the order-{order} fit is explosive (κ = {kappa:.3g}, b = "
                         f"{', '.join(f'{b:.3g}' for b in lags)}): a push would grow without bound; read order 1")
    rng, n = np.random.default_rng(seed), len(y) // T
    draws = []
    for _ in range(resamples):
        w = rng.integers(0, n, n)
        b = np.concatenate([w + t * n for t in range(T)])
        draws.append(float(np.linalg.lstsq(A[b], y[b], rcond=None)[0][2 * T]))
    lo, hi = np.percentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan)
    return Forgetting(kappa, (float(lo), float(hi)), n + order - 1, lags)


def _spectral_radius(kappa: float, lags: Sequence[float]) -> float:
    """Largest |eigenvalue| of the homogeneous recursion L_k = L_{k−1} + d_k, d_k = −κ L_{k−1} + Σ_j b_j d_{k−j}, on
    the state (L_k, d_k, …, d_{k−p+2})."""
    p = len(lags) + 1
    M = np.zeros((p, p))
    M[1, 0], M[1, 1:] = -kappa, lags  # d_k
    M[0] = M[1]
    M[0, 0] += 1.0  # L_k = L_{k−1} + d_k
    for j in range(2, p):
        M[j, j - 1] = 1.0  # the increments shift down
    return float(np.abs(np.linalg.eigvals(M)).max())


def run_forgetting(records: Sequence[Mapping[str, Any]], baseline: Mapping[str, float],
                   order: int = 1, shared: bool = False) -> dict[str, Forgetting]:
    """κ per quantity from a run's ledger records (`refusal_harmful`, `refusal_harmless` and `pairs` with their
    `label` per window) and the baseline means (`baseline[q]`: mean refusal of the q probes before training);
    `order`: fit_forgetting's; `shared`: one fit of both quantities' trajectories (`fit_shared`), the same for
    each."""
    recs = [r for r in sorted(records, key=lambda r: r["step"]) if "refusal_harmful" in r and "refusal_harmless" in r]
    if not recs:
        raise ValueError("run_forgetting: the ledger has no window with refusal means; was the run recorded by "
                         "SMDACallback (its attribution.jsonl)?")
    nh = [sum(p.get("label") == "harmful" for p in r.get("pairs", [])) for r in recs]
    ns = [sum(p.get("label") != "harmful" for p in r.get("pairs", [])) for r in recs]
    trajectories = {q: (float(baseline[q]), [float(r[f"refusal_{q}"]) for r in recs]) for q in QUANTITIES}
    if shared:
        f = fit_shared(list(trajectories.values()), nh, ns, order=order)
        return {q: f for q in QUANTITIES}
    return {q: fit_forgetting(*t, nh, ns, order=order) for q, t in trajectories.items()}


def later_windows(records: Sequence[Mapping[str, Any]], key: str = "id") -> dict[str, int]:
    """Per pair (its `key` in the ledger: "id", or "hash", which every pair has), the number of windows trained
    after its last own window (0 for the last window's pairs)."""
    recs = [r for r in sorted(records, key=lambda r: r["step"]) if "refusal_harmful" in r]
    out: dict[str, int] = {}
    for k, r in enumerate(recs):
        for p in r.get("pairs", []):
            if key in p:
                out[str(p[key])] = len(recs) - 1 - k
    return out


def baseline_means(policy: Mapping[str, Any]) -> dict[str, float]:
    """Mean refusal of the harmful and of the harmless probes before training, from a run's policy.json."""
    harmful = np.asarray([p["label"] == "harmful" for p in policy["probes"]])
    y0 = np.asarray(policy["probe_refusal_0"], dtype=np.float64)
    return {"harmful": float(y0[harmful].mean()), "harmless": float(y0[~harmful].mean())}


def end_weights(records: Sequence[Mapping[str, Any]], policy: Mapping[str, Any],
                key: str = "hash", order: int = 1,
                shared: bool = False) -> tuple[dict[str, dict[str, float]], dict[str, Forgetting]]:
    """Per quantity (harmful, harmless), per pair (by `key`: "hash", or "id" where the ledger has ids), what the
    run's forgetting leaves of its push at the end of the run, (1 − κ)^(windows after its own), or with `order` > 1
    the AR fit's response; and the fit per quantity (`shared`: one fit of both, run_forgetting's). A pair
    the ledger does not place gets no weight: callers read a missing key as 0, since nothing says when it acted."""
    fg = run_forgetting(records, baseline_means(policy), order=order, shared=shared)
    later = later_windows(records, key=key)
    most = max(later.values(), default=0)
    return {q: dict(zip(later, f.weights(most)[list(later.values())].tolist())) for q, f in fg.items()}, fg
