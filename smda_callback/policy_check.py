"""Does the baseline symbolic policy generalise? (`smda policy-check`)

The callback reports a 5-fold held-out AUROC of its baseline policy, but it chooses the features
on all probes first, so the test folds helped choose them. This check reports that number next
to two honest ones: nested cross-validation (features re-chosen inside every training fold) and
prompts the policy never saw (fit on the probe set, predict `heldout.jsonl`). Each AUROC scores
the policy's predicted refusal against the harmful/harmless labels, as the callback does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .config import SMDAConfig
from .policy import RidgePolicy, auroc, select_features
from .probes import ProbeSet


def _fit(Z: np.ndarray, Y: np.ndarray, harmful: np.ndarray, cfg: SMDAConfig,
         allowed: np.ndarray | None) -> tuple[np.ndarray, RidgePolicy, np.ndarray, float]:
    """(features, policy, β, intercept), chosen and fitted the way the callback's baseline is."""
    feats = select_features(Z, harmful, cfg.n_features, allowed)
    X = Z[:, feats]
    pol = RidgePolicy(lam=cfg.ridge_lambda or 1.0, intercept=cfg.intercept, standardize=cfg.standardize).freeze_scale(X)
    if cfg.ridge_lambda is None:
        pol.select_lambda(X, Y)
    beta = pol.coef(X, Y)
    return feats, pol, beta, pol.intercept_of(X, Y, beta)


def _predict(Z: np.ndarray, fitted: tuple[np.ndarray, RidgePolicy, np.ndarray, float]) -> np.ndarray:
    feats, pol, beta, b0 = fitted
    return pol.predict(Z[:, feats], beta, b0)


def policy_scores(Zp: np.ndarray, Yp: np.ndarray, harmful_p: np.ndarray, Zh: np.ndarray, harmful_h: np.ndarray,
                  cfg: SMDAConfig, allowed: np.ndarray | None, kinds: dict[int, str], seed: int = 0) -> dict[str, Any]:
    """The three AUROCs and the kinds of the chosen features, from pooled SAE codes Z and refusal Y."""
    full = _fit(Zp, Yp, harmful_p, cfg, allowed)
    pol = full[1]
    report = pol.fit_report(Zp[:, full[0]], Yp, harmful_p, folds=cfg.cv_folds, seed=seed)
    n = len(Yp)
    perm = np.random.default_rng(seed).permutation(n)
    held = np.empty(n)
    for f in range(cfg.cv_folds):
        test = perm[f::cfg.cv_folds]
        train = np.setdiff1d(perm, test)
        held[test] = _predict(Zp[test], _fit(Zp[train], Yp[train], harmful_p[train], cfg, allowed))
    chosen = [kinds.get(int(j), "unknown") for j in full[0]]
    return {
        "cv_auroc_as_reported": report.get("cv_auroc_labels", float("nan")),
        "cv_auroc_nested": auroc(held, harmful_p),
        "heldout_auroc": auroc(_predict(Zh, full), harmful_h),
        "n_features": len(full[0]),
        "content_share": float(np.mean([k == "content" for k in chosen])),
        "kinds": {k: chosen.count(k) for k in sorted(set(chosen))},
        "features": [int(j) for j in full[0]],
    }


def policy_check(model: Any, tok: Any, sae_dir: str | Path, probes: ProbeSet, heldout: ProbeSet,
                 config: SMDAConfig | None = None) -> dict[str, Any]:
    """Snapshot the probes and the held-out prompts through the SAE, then score the policy with the
    configured feature kinds and with every kind (the selection before feature cards)."""
    from .features import load_cards
    from .sae import load_sae, resolve_hook
    from .snapshot import Snapshotter

    cfg = config or SMDAConfig(scorer="first_token")
    sae = load_sae(str(sae_dir))
    hook = resolve_hook(sae, model)
    model.eval()
    snaps = {name: Snapshotter(ps, tok, sae, hook, cfg).take(model, full=True) for name, ps in (("probes", probes), ("heldout", heldout))}
    cards = load_cards(sae_dir)
    kinds = {j: c.get("kind", "unknown") for j, c in cards.items()}
    d_sae = snaps["probes"].Z.shape[1]
    allowed = np.asarray([kinds.get(j) in cfg.feature_kinds for j in range(d_sae)]) if cards else None
    args = (snaps["probes"].Z, snaps["probes"].Y, np.asarray(probes.is_harmful), snaps["heldout"].Z, np.asarray(heldout.is_harmful))
    out = {"configured_kinds": list(cfg.feature_kinds), "configured": policy_scores(*args, cfg, allowed, kinds)}
    out["all_kinds"] = policy_scores(*args, cfg, None, kinds)
    out["baseline_refusal"] = {"probes_harmful": float(snaps["probes"].Y[np.asarray(probes.is_harmful)].mean()),
                               "probes_harmless": float(snaps["probes"].Y[~np.asarray(probes.is_harmful)].mean())}
    return out


def format_policy_check(res: dict[str, Any]) -> str:
    L = ["| selection | features | content share | 5-fold AUROC as the callback reports | nested 5-fold AUROC | held-out prompts AUROC |",
         "|---|---|---|---|---|---|"]
    for key, name in (("configured", "kinds " + "+".join(res["configured_kinds"])), ("all_kinds", "every kind")):
        r = res[key]
        L.append(f"| {name} | {r['n_features']} | {r['content_share']:.0%} | {r['cv_auroc_as_reported']:.3f} | "
                 f"{r['cv_auroc_nested']:.3f} | {r['heldout_auroc']:.3f} |")
    return "\n".join(L)
