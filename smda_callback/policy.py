"""The symbolic policy: a ridge regression of refusal on SAE features.

β is written as β = M(X)·Y with M(X) = (XcᵀXc + λI)⁻¹Xcᵀ (Xc centred, and
scaled by a scale frozen at baseline). Because β is linear in Y for fixed X,
the change of β over a step splits exactly into an X part and a Y part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

LAMBDA_GRID = np.logspace(-3, 4, 36)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Rank AUROC with ties counted half; NaN when a class is missing."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@dataclass
class RidgePolicy:
    """Closed-form float64 ridge with an unpenalised intercept and frozen scale."""

    lam: float = 1.0
    intercept: bool = True
    standardize: bool = True
    mean_: np.ndarray | None = None
    scale_: np.ndarray | None = None

    # --- scale, frozen at baseline so β lives in one space for the whole run ---
    def freeze_scale(self, X: np.ndarray) -> "RidgePolicy":
        X = np.asarray(X, dtype=np.float64)
        k = X.shape[1]
        self.mean_ = X.mean(0) if self.standardize else np.zeros(k)
        if self.standardize:
            sd = X.std(0)
            self.scale_ = np.where(sd > 1e-12, sd, 1.0)
        else:
            self.scale_ = np.ones(k)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        if self.scale_ is None:
            raise RuntimeError("RidgePolicy: call freeze_scale(X_baseline) before fitting.")
        return (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_

    def _design(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        Xs = self.transform(X)
        mu = Xs.mean(0) if self.intercept else np.zeros(Xs.shape[1])
        return Xs - mu, mu

    # --- the linear map ---
    def M(self, X: np.ndarray, form: str = "auto") -> np.ndarray:
        """k×P matrix with β = M(X)·Y (form: primal k×k solve or dual P×P)."""
        Xc, _ = self._design(X)
        P, k = Xc.shape
        if form == "auto":
            form = "primal" if k <= P else "dual"
        if form == "primal":
            A = Xc.T @ Xc + self.lam * np.eye(k)
            return np.linalg.solve(A, Xc.T)
        if form == "dual":
            G = Xc @ Xc.T + self.lam * np.eye(P)
            return Xc.T @ np.linalg.solve(G, np.eye(P))
        raise ValueError(f"form must be 'auto', 'primal' or 'dual', got {form!r}")

    def coef(self, X: np.ndarray, Y: np.ndarray, form: str = "auto") -> np.ndarray:
        return self.M(X, form) @ np.asarray(Y, dtype=np.float64)

    def intercept_of(self, X: np.ndarray, Y: np.ndarray, beta: np.ndarray) -> float:
        if not self.intercept:
            return 0.0
        _, mu = self._design(X)
        return float(np.mean(Y) - mu @ beta)

    def predict(self, X: np.ndarray, beta: np.ndarray, b0: float) -> np.ndarray:
        return self.transform(X) @ beta + b0

    # --- λ by generalised cross-validation, once at baseline ---
    def select_lambda(self, X: np.ndarray, Y: np.ndarray, grid: Sequence[float] = LAMBDA_GRID) -> float:
        Xc, _ = self._design(X)
        y = np.asarray(Y, dtype=np.float64)
        y = y - y.mean() if self.intercept else y
        U, s, _ = np.linalg.svd(Xc, full_matrices=False)
        uty = U.T @ y
        resid_perp = float(y @ y - uty @ uty)
        n = len(y)
        best, best_score = float(grid[0]), np.inf
        for lam in grid:
            shrink = s**2 / (s**2 + lam)
            rss = float(np.sum(((1 - shrink) * uty) ** 2) + resid_perp)
            dof = n - float(shrink.sum()) - (1.0 if self.intercept else 0.0)
            if dof <= 0:
                continue
            score = n * rss / dof**2
            if score < best_score:
                best, best_score = float(lam), score
        self.lam = best
        return best

    # --- how good is the policy? ---
    def fit_report(self, X: np.ndarray, Y: np.ndarray, harmful: Sequence[bool], folds: int = 5, seed: int = 0) -> dict[str, Any]:
        """In-sample and k-fold held-out R² and AUROC (policy prediction vs labels)."""
        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64)
        harmful = np.asarray(harmful, dtype=bool)
        beta = self.coef(X, Y)
        pred = self.predict(X, beta, self.intercept_of(X, Y, beta))
        out: dict[str, Any] = {
            "r2": r2(Y, pred),
            "auroc_labels": auroc(pred, harmful),
            "auroc_y_labels": auroc(Y, harmful),
            "lambda": self.lam,
        }
        n = len(Y)
        folds = min(folds, n)
        if folds >= 2:
            held = np.empty(n)
            for train, test in fold_splits(n, folds, seed):
                b = self.coef(X[train], Y[train])
                held[test] = self.predict(X[test], b, self.intercept_of(X[train], Y[train], b))
            out["cv_r2"] = r2(Y, held)
            out["cv_auroc_labels"] = auroc(held, harmful)
            out["cv_folds"] = folds
        return out

    def render(self, beta: np.ndarray, b0: float, labels: Sequence[str], top: int = 8, target: str = "refuse") -> str:
        """`refuse ≈ 0.08 + 0.31·[f1203 weapons] − …`, largest |β| first."""
        order = np.argsort(-np.abs(beta))[:top]
        terms = [f"{b0:.3g}"]
        for j in order:
            sign = "−" if beta[j] < 0 else "+"
            terms.append(f"{sign} {abs(beta[j]):.3g}·[{labels[j]}]")
        rest = len(beta) - len(order)
        tail = f" … ({rest} more)" if rest > 0 else ""
        return f"{target} ≈ " + " ".join(terms) + tail

    def to_dict(self) -> dict[str, Any]:
        return {
            "lambda": self.lam,
            "intercept": self.intercept,
            "standardize": self.standardize,
            "mean": None if self.mean_ is None else self.mean_.tolist(),
            "scale": None if self.scale_ is None else self.scale_.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RidgePolicy":
        p = cls(lam=float(d["lambda"]), intercept=bool(d["intercept"]), standardize=bool(d["standardize"]))
        if d.get("mean") is not None:
            p.mean_ = np.asarray(d["mean"], dtype=np.float64)
            p.scale_ = np.asarray(d["scale"], dtype=np.float64)
        return p


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss = float(np.sum((y - y.mean()) ** 2))
    return float("nan") if ss == 0 else 1.0 - float(np.sum((y - pred) ** 2)) / ss


def fold_splits(n: int, folds: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(train, test) row indices of each of `folds` folds over one seeded permutation of n rows (the one fold
    rule of every cross-validation here: the fit report, the nested estimate, the fold-selection agreement)."""
    perm = np.random.default_rng(seed).permutation(n)
    for f in range(folds):
        test = perm[f::folds]
        yield np.setdiff1d(perm, test), test


def select_features(Z: np.ndarray, harmful: Sequence[bool], k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """The k latents whose pooled activations best separate harmful from harmless.

    Score = |mean_h − mean_s| / pooled sd (a standardised difference). Baseline
    refusal may have no variance on a model that never refuses, so the labels,
    not Y, choose. Dead latents (never active on the probes) are never chosen, nor
    latents outside `allowed` (e.g. format features, see features.py).
    """
    Z = np.asarray(Z, dtype=np.float64)
    h = np.asarray(harmful, dtype=bool)
    mh, ms = Z[h].mean(0), Z[~h].mean(0)
    sd = np.sqrt(0.5 * (Z[h].var(0) + Z[~h].var(0)))
    alive = (Z != 0).any(0)
    if allowed is not None:
        alive &= np.asarray(allowed, dtype=bool)
    score = np.where(alive, np.abs(mh - ms) / (sd + 1e-6 * (1.0 + np.abs(Z).max())), -np.inf)
    k = min(k, int(alive.sum()))
    if k == 0:
        raise ValueError("No SAE latent is active on any probe: check that the SAE matches the model and hook.")
    order = np.argsort(-score, kind="mergesort")[:k]
    return np.sort(order)
