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
from .policy import RidgePolicy, select_features

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


def choose_features(Z: np.ndarray, harmful: np.ndarray, config: SMDAConfig, allowed: np.ndarray | None) -> np.ndarray:
    """The user's features (validated) or the k that best separate the labels among the allowed latents."""
    if config.features is not None:
        feats = np.asarray(sorted({int(f) for f in config.features}))
        if feats.min() < 0 or feats.max() >= Z.shape[1]:
            raise ValueError(f"features must be SAE latent indices in [0, {Z.shape[1]}); got {feats.min()}..{feats.max()}.")
        return feats
    return select_features(Z, harmful, config.n_features, allowed)


def fit_baseline(Z: np.ndarray, Y: np.ndarray, harmful: Sequence[bool], config: SMDAConfig,
                 allowed: np.ndarray | None = None, report: bool = True, seed: int = 0) -> Baseline:
    """Fit the baseline policy on pooled SAE codes Z [P, d_sae] and refusal Y [P]."""
    harmful = np.asarray(harmful, dtype=bool)
    feats = choose_features(Z, harmful, config, allowed)
    X = np.asarray(Z)[:, feats]
    policy = RidgePolicy(lam=config.ridge_lambda or 1.0, intercept=config.intercept,
                         standardize=config.standardize).freeze_scale(X)
    if config.ridge_lambda is None:
        policy.select_lambda(X, Y)
    M = policy.M(X)
    beta0 = M @ Y
    fit = policy.fit_report(X, Y, harmful, folds=config.cv_folds, seed=seed) if report else {}
    return Baseline(feats, policy, X, np.asarray(Y), M, beta0, policy.intercept_of(X, Y, beta0), fit)
