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

from ..config import SMDAConfig
from ..baseline import Baseline, allowed_latents, fit_baseline, nested_cv
from ..policy import auroc, fold_splits
from ..probes import ProbeSet


def _fit(Z: np.ndarray, Y: np.ndarray, harmful: np.ndarray, cfg: SMDAConfig, allowed: np.ndarray | None) -> Baseline:
    return fit_baseline(Z, Y, harmful, cfg, allowed, report=False)


def chosen_elsewhere(cfg: SMDAConfig, select: tuple[np.ndarray, np.ndarray] | None,
                     allowed: np.ndarray | None) -> SMDAConfig:
    """`cfg` with its features chosen once on another labelled set (SAE codes, harmful flags), e.g. the training
    pairs' prompts; None: unchanged (features chosen on the probes). With features fixed this way no probe helps
    choose them, so the nested estimate is a plain cross-validation of the fit."""
    if select is None:
        return cfg
    from dataclasses import replace

    from ..baseline import choose_features

    Zs, hs = select
    feats = choose_features(np.asarray(Zs), np.asarray(hs, dtype=bool), replace(cfg, features=None), allowed)
    return replace(cfg, features=tuple(int(j) for j in feats))


def policy_scores(Zp: np.ndarray, Yp: np.ndarray, harmful_p: np.ndarray, Zh: np.ndarray, harmful_h: np.ndarray,
                  cfg: SMDAConfig, allowed: np.ndarray | None, kinds: dict[int, str], seed: int = 0,
                  fold_seeds: int = 1, select: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """The AUROCs and the kinds of the chosen features, from pooled SAE codes Z and refusal Y. The nested estimate
    (features re-chosen in every training fold, `baseline.nested_cv`) is averaged over `fold_seeds` fold splits.
    `select`: choose the features on that labelled set instead (`chosen_elsewhere`)."""
    cfg = chosen_elsewhere(cfg, select, allowed)
    full = _fit(Zp, Yp, harmful_p, cfg, allowed)
    report = full.policy.fit_report(full.X, Yp, harmful_p, folds=cfg.cv_folds, seed=seed)
    nested = nested_cv(Zp, Yp, harmful_p, cfg, allowed, cfg.cv_folds, seed, fold_seeds)
    chosen = [kinds.get(int(j), "unknown") for j in full.features]
    return {
        "cv_auroc_as_reported": report.get("cv_auroc_labels", float("nan")),
        "cv_auroc_nested": nested["cv_auroc_nested"],
        "cv_auroc_nested_per_split": nested["cv_auroc_nested_per_split"],
        "cv_r2_nested": nested["cv_r2_nested"],
        "in_sample_auroc": report["auroc_labels"], "in_sample_r2": report["r2"], "y_auroc": report["auroc_y_labels"],
        "heldout_auroc": auroc(full.predict(Zh), harmful_h),
        "n_features": len(full.features),
        "content_share": float(np.mean([k == "content" for k in chosen])),
        "kinds": {k: chosen.count(k) for k in sorted(set(chosen))},
        "features": [int(j) for j in full.features],
    }


def fold_jaccard(Z: np.ndarray, harmful: np.ndarray, cfg: SMDAConfig, allowed: np.ndarray | None, folds: int,
                 fold_seeds: int) -> float:
    """Mean pairwise Jaccard overlap of the latents chosen on the training folds of `fold_seeds` splits (1 = the
    same latents whatever the fold)."""
    from itertools import combinations

    from ..baseline import choose_features

    sets = [set(choose_features(Z[train], harmful[train], cfg, allowed).tolist())
            for k in range(fold_seeds) for train, _ in fold_splits(len(harmful), folds, k)]
    return float(np.mean([len(a & b) / len(a | b) for a, b in combinations(sets, 2)]))


def sweep(Zp: np.ndarray, Yp: np.ndarray, harmful_p: np.ndarray, Zh: np.ndarray, harmful_h: np.ndarray,
          cfg: SMDAConfig, allowed: np.ndarray | None, counts: tuple[int, ...] = (16, 24, 32, 48, 64),
          fold_seeds: int = 3, select: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Nested AUROC, held-out-prompt AUROC and fold-selection agreement per selection rule and feature count
    (features chosen on `select` when given: then every fold has the same latents, Jaccard 1)."""
    from dataclasses import replace

    rows = []
    for selection in ("score", "stable"):
        for n in counts:
            c = chosen_elsewhere(replace(cfg, selection=selection, n_features=n), select, allowed)
            r = policy_scores(Zp, Yp, harmful_p, Zh, harmful_h, c, allowed, {}, fold_seeds=fold_seeds)
            rows.append({"selection": selection, "n_features": n, "nested": r["cv_auroc_nested"],
                         "nested_per_split": r["cv_auroc_nested_per_split"], "heldout": r["heldout_auroc"],
                         "fold_jaccard": fold_jaccard(Zp, harmful_p, c, allowed, c.cv_folds, fold_seeds)})
    return rows


def policy_check(model: Any, tok: Any, sae_dir: str | Path, probes: ProbeSet, heldout: ProbeSet,
                 config: SMDAConfig | None = None, fold_seeds: int = 1, with_sweep: bool = False,
                 selection_set: ProbeSet | None = None, select_model: tuple[Any, Any] | None = None,
                 counts: tuple[int, ...] = (16, 24, 32, 48, 64)) -> dict[str, Any]:
    """Snapshot the probes and the held-out prompts through the SAE, then score the policy with the
    configured feature kinds and with every kind (the selection before feature cards). With `selection_set`
    (labelled prompts, e.g. the training pairs) the features are chosen on it instead, its codes read through
    `select_model` (model, tokenizer; default the checked model: the base model's codes are what a run has
    when it starts)."""
    from ..features import load_cards
    from ..sae import load_sae, resolve_hook
    from ..snapshot import Snapshotter

    cfg = config or SMDAConfig(scorer="first_token")
    sae = load_sae(str(sae_dir))
    hook = resolve_hook(sae, model)
    model.eval()
    snaps = {name: Snapshotter(ps, tok, sae, hook, cfg).take(model, full=True) for name, ps in (("probes", probes), ("heldout", heldout))}
    cards = load_cards(sae_dir)
    kinds = {j: c.get("kind", "unknown") for j, c in cards.items()}
    d_sae = snaps["probes"].Z.shape[1]
    allowed = allowed_latents(cards, cfg.feature_kinds, d_sae)
    select = None
    if selection_set is not None:
        sm, st = select_model or (model, tok)
        sm.eval()
        snap = Snapshotter(selection_set, st, sae, resolve_hook(sae, sm), cfg).take(sm, full=True)
        select = (snap.Z, np.asarray(selection_set.is_harmful))
    args = (snaps["probes"].Z, snaps["probes"].Y, np.asarray(probes.is_harmful), snaps["heldout"].Z, np.asarray(heldout.is_harmful))
    out = {"configured_kinds": list(cfg.feature_kinds), "selection": cfg.selection, "fold_seeds": fold_seeds,
           "selected_on": "probes" if selection_set is None else f"{len(selection_set)} other prompts",
           "configured": policy_scores(*args, cfg, allowed, kinds, fold_seeds=fold_seeds, select=select)}
    out["all_kinds"] = policy_scores(*args, cfg, None, kinds, fold_seeds=fold_seeds, select=select)
    if with_sweep:
        out["sweep"] = sweep(*args, cfg, allowed, counts=counts, fold_seeds=fold_seeds, select=select)
    out["baseline_refusal"] = {"probes_harmful": float(snaps["probes"].Y[np.asarray(probes.is_harmful)].mean()),
                               "probes_harmless": float(snaps["probes"].Y[~np.asarray(probes.is_harmful)].mean())}
    return out


def _format_sweep(rows: list[dict[str, Any]]) -> list[str]:
    L = ["", "| selection | features | nested AUROC (mean) | per split | held-out prompts | fold-selection Jaccard |",
         "|---|---|---|---|---|---|"]
    L += [f"| {r['selection']} | {r['n_features']} | {r['nested']:.3f} | "
          f"{' / '.join(f'{v:.2f}' for v in r['nested_per_split'])} | {r['heldout']:.3f} | {r['fold_jaccard']:.2f} |"
          for r in rows]
    return L


def format_policy_check(res: dict[str, Any]) -> str:
    L = [f"features chosen on: {res.get('selected_on', 'probes')}", "",
         "| latents | features | content share | 5-fold AUROC, features chosen on all probes (leaky) | nested 5-fold AUROC "
         f"(mean of {res.get('fold_seeds', 1)} splits) | held-out prompts AUROC |", "|---|---|---|---|---|---|"]
    for key, name in (("configured", "kinds " + "+".join(res["configured_kinds"])), ("all_kinds", "every kind")):
        r = res[key]
        L.append(f"| {name} | {r['n_features']} | {r['content_share']:.0%} | {r['cv_auroc_as_reported']:.3f} | "
                 f"{r['cv_auroc_nested']:.3f} | {r['heldout_auroc']:.3f} |")
    if res.get("sweep"):
        L += _format_sweep(res["sweep"])
    return "\n".join(L)
