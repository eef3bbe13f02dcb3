"""The one baseline recipe every caller uses: select features → freeze the scale → choose λ → fit → report.

The callback (in-training protocol), the counterfactual protocol (`smda attribute`) and
`smda policy-check` all build their baseline policy here, so they cannot drift apart (they did:
the counterfactual copy once left out the feature-kind mask).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .config import KINDS, SMDAConfig
from .policy import RidgePolicy, auroc, fold_splits, r2, select_features

logger = logging.getLogger(__name__)


@dataclass
class Baseline:
    """The policy at the run's start: features, frozen scale and λ, β₀ = M(X₀)·Y₀ and its fit."""

    features: np.ndarray
    policy: RidgePolicy
    X: np.ndarray
    Y: np.ndarray
    M: np.ndarray
    beta0: np.ndarray
    b0: float
    fit: dict[str, Any] = field(default_factory=dict)

    def predict(self, Z: np.ndarray) -> np.ndarray:
        """Predicted refusal of new rows of pooled SAE codes (all latents)."""
        return self.policy.predict(np.asarray(Z)[:, self.features], self.beta0, self.b0)


def allowed_latents(cards: dict[int, dict[str, Any]], kinds: Sequence[str], d_sae: int) -> np.ndarray | None:
    """Latents whose card kind is in `kinds` (None: the SAE has no cards, every latent is eligible)."""
    if not cards:
        if set(kinds) != set(KINDS):
            logger.warning("smda: this SAE has no feature cards (feature_cards.json), so feature kinds are unknown and "
                           "selection cannot skip format/function-word latents; every latent is eligible.")
        return None
    return np.asarray([cards.get(j, {}).get("kind") in kinds for j in range(d_sae)])


def stable_features(Z: np.ndarray, harmful: np.ndarray, k: int, allowed: np.ndarray | None, resamples: int,
                    seed: int = 0) -> np.ndarray:
    """Stability selection: the k latents chosen most often by `select_features` over `resamples` half-samples of
    the probes (drawn within each label), ties broken by the full-sample score. A latent that separates the labels
    only through a few probes is chosen in few half-samples and drops out."""
    Z, harmful = np.asarray(Z, dtype=np.float64), np.asarray(harmful, dtype=bool)
    rng = np.random.default_rng(seed)
    counts = np.zeros(Z.shape[1])
    groups = [np.flatnonzero(harmful), np.flatnonzero(~harmful)]
    for _ in range(resamples):
        rows = np.concatenate([rng.choice(g, size=max(len(g) // 2, 2), replace=False) for g in groups])
        counts[select_features(Z[rows], harmful[rows], k, allowed)] += 1
    full = np.zeros(Z.shape[1])
    full_pick = select_features(Z, harmful, Z.shape[1], allowed)  # every eligible latent, best first
    full[full_pick] = np.linspace(1.0, 0.0, len(full_pick), endpoint=False)
    order = np.lexsort((-full, -counts))  # most often chosen first, then the full-sample rank
    eligible = np.zeros(Z.shape[1], dtype=bool)
    eligible[full_pick] = True
    return np.sort([j for j in order if eligible[j]][:k])


def choose_features(Z: np.ndarray, harmful: np.ndarray, config: SMDAConfig, allowed: np.ndarray | None,
                    seed: int = 0) -> np.ndarray:
    """The user's features (validated), or the k that separate the labels among the allowed latents
    (`config.selection`: `stable` by stability selection, `score` by the full-sample score alone)."""
    if config.features is not None:
        feats = np.asarray(sorted({int(f) for f in config.features}))
        if feats.min() < 0 or feats.max() >= Z.shape[1]:
            raise ValueError(f"features must be SAE latent indices in [0, {Z.shape[1]}); got {feats.min()}..{feats.max()}.")
        return feats
    if config.selection == "stable":
        return stable_features(Z, harmful, config.n_features, allowed, config.selection_resamples, seed)
    return select_features(Z, harmful, config.n_features, allowed)


NESTED_SPLITS = 3
"""Fold splits the nested estimate is averaged over (one split of 130 probes moves it by ±0.05)."""


def nested_cv(Z: np.ndarray, Y: np.ndarray, harmful: np.ndarray, config: SMDAConfig, allowed: np.ndarray | None,
              folds: int = 5, seed: int = 0, splits: int = 1) -> dict[str, Any]:
    """Held-out AUROC and R² with the features re-chosen inside every training fold (nothing of a test fold
    helps choose them): the estimate a reader can stand behind. Averaged over `splits` fold splits (seeds
    seed, seed + 1, …); each split's AUROC is kept too."""
    Z, Y, harmful = np.asarray(Z), np.asarray(Y, dtype=np.float64), np.asarray(harmful, dtype=bool)
    n = len(Y)
    if min(folds, n) < 2:
        return {}
    aucs, r2s = [], []
    for k in range(max(1, splits)):
        held = np.empty(n)
        for train, test in fold_splits(n, folds, seed + k):
            bl = fit_baseline(Z[train], Y[train], harmful[train], config, allowed, report=False, seed=seed + k)
            held[test] = bl.predict(Z[test])
        aucs.append(auroc(held, harmful))
        r2s.append(r2(Y, held))
    return {"cv_auroc_nested": float(np.mean(aucs)), "cv_r2_nested": float(np.mean(r2s)), "cv_folds": folds,
            "cv_auroc_nested_per_split": [float(a) for a in aucs], "cv_nested_splits": len(aucs)}


def fit_baseline(Z: np.ndarray, Y: np.ndarray, harmful: Sequence[bool], config: SMDAConfig,
                 allowed: np.ndarray | None = None, report: bool = True, seed: int = 0) -> Baseline:
    """Fit the baseline policy on pooled SAE codes Z [P, d_sae] and refusal Y [P]."""
    harmful = np.asarray(harmful, dtype=bool)
    feats = choose_features(Z, harmful, config, allowed, seed)
    X = np.asarray(Z)[:, feats]
    policy = RidgePolicy(lam=config.ridge_lambda or 1.0, intercept=config.intercept,
                         standardize=config.standardize).freeze_scale(X)
    if config.ridge_lambda is None:
        policy.select_lambda(X, Y)
    M = policy.M(X)
    beta0 = M @ Y
    fit = policy.fit_report(X, Y, harmful, folds=config.cv_folds, seed=seed) if report else {}
    if report:
        fit.update(nested_cv(Z, Y, harmful, config, allowed, config.cv_folds, seed, NESTED_SPLITS))
    return Baseline(feats, policy, X, np.asarray(Y), M, beta0, policy.intercept_of(X, Y, beta0), fit)
