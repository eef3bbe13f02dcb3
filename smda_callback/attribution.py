"""Pathway decomposition of a policy change, interference score and alert rule."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from .policy import RidgePolicy


@dataclass
class StepDecomposition:
    """β₁ − β₀ split into the activation (ΔX) and output-probability (ΔY) pathways."""

    beta0: np.ndarray
    beta1: np.ndarray
    delta_beta_x: np.ndarray
    delta_beta_y: np.ndarray
    method: str
    first_order_gap: float
    """‖(ΔW_X + ΔW_Y)_first-order − (β₁ − β₀)‖ / ‖β₁ − β₀‖: how far the paper's linearisation is off."""

    @property
    def delta_beta(self) -> np.ndarray:
        """The true change β₁ − β₀ (whatever split method was used)."""
        return self.beta1 - self.beta0

    @property
    def alignment(self) -> np.ndarray:
        """The paper's per-feature score Δβ_j·β_j (does the step reinforce the current policy?)."""
        return self.delta_beta * self.beta0

    @property
    def residual(self) -> np.ndarray:
        """What the split leaves unexplained (0 for `exact`)."""
        return self.delta_beta - self.delta_beta_x - self.delta_beta_y


def _first_order(policy: RidgePolicy, X0: np.ndarray, Y0: np.ndarray, X1: np.ndarray, Y1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The paper's linearisation: U = XᵀX + λI, ΔU = ΔXᵀX + XᵀΔX,
    ΔW_X = U⁻¹(ΔXᵀY − ΔU·W), ΔW_Y = U⁻¹XᵀΔY (in the policy's centred, scaled space)."""
    Xc0, _ = policy._design(X0)
    Xc1, _ = policy._design(X1)
    dX = Xc1 - Xc0
    dY = Y1 - Y0
    U = Xc0.T @ Xc0 + policy.lam * np.eye(Xc0.shape[1])
    W = np.linalg.solve(U, Xc0.T @ Y0)
    dU = dX.T @ Xc0 + Xc0.T @ dX
    return np.linalg.solve(U, dX.T @ Y0 - dU @ W), np.linalg.solve(U, Xc0.T @ dY)


def decompose_step(
    policy: RidgePolicy,
    X0: np.ndarray,
    Y0: np.ndarray,
    X1: np.ndarray,
    Y1: np.ndarray,
    method: str = "exact",
    M0: np.ndarray | None = None,
    M1: np.ndarray | None = None,
) -> StepDecomposition:
    """Split the policy change of one step into pathways.

    `exact` (default) is the symmetric two-factor (Shapley) split of β = M(X)·Y:
    Δβ_Y = ½(M₀+M₁)(Y₁−Y₀), Δβ_X = ½(M₁−M₀)(Y₀+Y₁); they sum to β₁−β₀ exactly.
    `first_order` is the paper's linearisation, exact only in the small-step limit.
    Pass M0/M1 to reuse matrices across steps (the callback does).
    """
    X0, X1 = np.asarray(X0, np.float64), np.asarray(X1, np.float64)
    Y0, Y1 = np.asarray(Y0, np.float64), np.asarray(Y1, np.float64)
    if X0.shape != X1.shape or Y0.shape != Y1.shape or X0.shape[0] != Y0.shape[0]:
        raise ValueError(f"snapshot shapes differ: X {X0.shape} vs {X1.shape}, Y {Y0.shape} vs {Y1.shape}")
    M0 = policy.M(X0) if M0 is None else M0
    M1 = policy.M(X1) if M1 is None else M1
    beta0, beta1 = M0 @ Y0, M1 @ Y1
    fo_x, fo_y = _first_order(policy, X0, Y0, X1, Y1)
    true = beta1 - beta0
    norm = float(np.linalg.norm(true))
    gap = float(np.linalg.norm(fo_x + fo_y - true) / norm) if norm > 0 else 0.0
    if method == "exact":
        dy = 0.5 * (M0 + M1) @ (Y1 - Y0)
        dx = 0.5 * (M1 - M0) @ (Y0 + Y1)
    elif method == "first_order":
        dx, dy = fo_x, fo_y
    else:
        raise ValueError(f"method must be 'exact' or 'first_order', got {method!r}")
    return StepDecomposition(beta0, beta1, dx, dy, method, gap)


def category_split(
    policy: RidgePolicy, X0: np.ndarray, X1: np.ndarray, dec: StepDecomposition, categories: dict[str, list[int]]
) -> dict[str, dict[str, float]]:
    """Per probe category, the move of predicted refusal carried by Δβ, split by pathway.

    Evaluated at the midpoint features x̄ = ½(x₀ + x₁) of the category's probes.
    """
    Xm = 0.5 * (policy.transform(X0) + policy.transform(X1))
    out = {}
    for cat, idx in categories.items():
        xbar = Xm[idx].mean(0)
        out[cat] = {"x": float(xbar @ dec.delta_beta_x), "y": float(xbar @ dec.delta_beta_y)}
    return out


def interference(delta_beta: np.ndarray, intended: Iterable[int]) -> tuple[float, int, bool]:
    """(off-target share of |Δβ|, dominant feature position, dominant is off-target)."""
    a = np.abs(np.asarray(delta_beta, np.float64))
    total = float(a.sum())
    mask = np.zeros(len(a), dtype=bool)
    mask[[i for i in intended if 0 <= i < len(a)]] = True
    dom = int(np.argmax(a)) if len(a) else -1
    if total == 0:
        return 0.0, dom, False
    return float(a[~mask].sum() / total), dom, bool(not mask[dom])


def intended_features(z_pair: np.ndarray, top_m: int) -> list[int]:
    """A pair's intended features: the m selected features most active on its prompt (z-units)."""
    if top_m <= 0:
        return []
    z = np.asarray(z_pair, np.float64)
    return sorted(int(i) for i in np.argsort(-z, kind="mergesort")[:top_m])


@dataclass
class AlertEvent:
    """What a user `on_alert` callable receives; return True to halt training."""

    step: int
    pairs: list[dict[str, Any]]
    score: float
    dominant_feature: int
    dominant_label: str
    intended: list[int]
    reason: str
    n_alerts: int


@dataclass
class AlertDecision:
    alert: bool
    score: float
    dominant: int
    off_target: bool
    magnitude: float
    noise_floor: float
    halt: bool = False
    reason: str = ""


@dataclass
class AlertRule:
    """Alert when the dominant Δβ is off-target, the off-target share is high, and
    |Δβ_dominant| stands out from earlier steps (median + n·MAD·1.4826)."""

    threshold: float = 0.6
    n_mads: float = 3.0
    min_history: int = 10
    patience: int = 1
    halt_on_alert: bool = False
    history: deque = field(default_factory=lambda: deque(maxlen=2000))
    n_alerts: int = 0

    def noise_floor(self) -> float:
        """0 when min_history == 0 (floor off); +inf while warming up."""
        if self.min_history == 0:
            return 0.0
        if len(self.history) < self.min_history:
            return float("inf")
        h = np.asarray(self.history, np.float64)
        med = float(np.median(h))
        return med + self.n_mads * 1.4826 * float(np.median(np.abs(h - med)))

    def decide(self, delta_beta: np.ndarray, intended: Sequence[int]) -> AlertDecision:
        score, dom, off = interference(delta_beta, intended)
        mag = float(abs(delta_beta[dom])) if dom >= 0 else 0.0
        floor = self.noise_floor()
        alert = bool(off and score > self.threshold and mag > floor)
        self.history.append(mag)
        halt = False
        reason = ""
        if alert:
            self.n_alerts += 1
            reason = (
                f"dominant feature #{dom} is off-target (|Δβ|={mag:.3g} > floor {floor:.3g}); "
                f"off-target share {score:.2f} > {self.threshold:.2f}"
            )
            halt = self.halt_on_alert and self.n_alerts >= self.patience
        return AlertDecision(alert, score, dom, off, mag, floor, halt, reason)

    def state(self) -> dict[str, Any]:
        return {"history": list(self.history), "n_alerts": self.n_alerts}

    def load_state(self, d: dict[str, Any]) -> None:
        self.history = deque(d.get("history", []), maxlen=self.history.maxlen)
        self.n_alerts = int(d.get("n_alerts", 0))
