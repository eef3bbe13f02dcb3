"""The one place that writes the shape of each record: a ledger step, `policy.json`, `credits.json`, `replay.json`.

Both protocols (the callback's in-training run and the counterfactual `smda attribute`) build
their records here, so `smda report`, `validation.agreement` and `load_ledger` read one format.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .credit import CreditEngine, CreditLayout, OptimizerKernel
from .credit.replay import TRUST_FACTOR, TRUST_WINDOW, replay_trusted_from
from .policy import RidgePolicy
from .probes import ProbeSet
from .sae import feature_url

PROMPT_CHARS = 200
"""A pair's prompt is kept to its first 200 characters in records."""


def decomposition_fields(dec: Any, cats: dict[str, Any], refusal_by_category: dict[str, float], score: float,
                         dominant: int, off_target: bool, intended: Sequence[int], features: np.ndarray,
                         labels: Sequence[str]) -> dict[str, Any]:
    """The part of a ledger step record both protocols share: β after the step, its split into the ΔX and
    ΔY pathways, per-category pathways and the interference reading (positions mapped to SAE latents)."""
    return {"beta": dec.beta1, "delta_beta": dec.delta_beta, "delta_beta_x": dec.delta_beta_x,
            "delta_beta_y": dec.delta_beta_y, "alignment": dec.alignment, "method": dec.method,
            "first_order_gap": dec.first_order_gap, "refusal_by_category": refusal_by_category,
            "category_pathways": cats, "interference": score, "dominant_feature": int(features[dominant]),
            "dominant_label": labels[dominant], "dominant_off_target": off_target,
            "intended_features": [int(features[j]) for j in intended]}


def pair_entry(hash_: str, index: int | None, credit: float | None, **meta: Any) -> dict[str, Any]:
    """One pair in a step record (`prompt` cut to PROMPT_CHARS; the ledger writer moves it out of smda/); `credit`
    None: a record that credits no share (replay.json: a step's effect is its whole pairs' together)."""
    out: dict[str, Any] = {"hash": hash_, "index": index, **({"credit": float(credit)} if credit is not None else {})}
    for k, v in meta.items():
        if v is not None:
            out[k] = v[:PROMPT_CHARS] if k == "prompt" and isinstance(v, str) else v
    return out


def policy_record(*, protocol: str, probes: ProbeSet, features: np.ndarray, labels: Sequence[str], policy: RidgePolicy,
                  config: Any, beta0: np.ndarray, b0: float, beta_final: np.ndarray, intercept_final: float,
                  fit: dict[str, Any], Y0: np.ndarray, Y_final: np.ndarray, cards: dict[int, dict[str, Any]] | None,
                  hook: str | None, sae: dict[str, Any] | None, sae_fve: float | None, n_alerts: int = 0,
                  halted: dict[str, Any] | None = None, skipped: int = 0, final: bool = True, step: int = 0,
                  **extra: Any) -> dict[str, Any]:
    """policy.json: the policy before and after, its fit, the probes' refusal and the SAE's identity."""
    cats = probes.category_index()

    def by_cat(y: np.ndarray) -> dict[str, float]:
        return {c: float(np.mean(np.asarray(y)[i])) for c, i in cats.items()}

    cards = cards or {}
    urls = {str(int(j)): feature_url(sae or {}, int(j)) for j in features}
    return {
        "protocol": protocol, "features": features, "feature_labels": list(labels), "lambda": policy.lam,
        "feature_cards": {str(int(j)): cards[int(j)] for j in features if int(j) in cards},
        "policy": policy.to_dict(), "config": config.to_dict(), "beta_0": beta0, "intercept_0": b0,
        "beta_final": beta_final, "intercept_final": intercept_final, "fit": fit,
        "baseline_refusal_by_category": by_cat(Y0), "final_refusal_by_category": by_cat(Y_final),
        "probe_refusal_0": Y0, "probe_refusal_final": Y_final,
        "probes": [{"id": p.id, "label": p.label, "category": p.category} for p in probes.probes],
        "symbolic_policy_0": policy.render(beta0, b0, list(labels), top=12),
        "symbolic_policy_final": policy.render(beta_final, intercept_final, list(labels), top=12),
        "n_alerts": n_alerts, "halted": halted, "skipped_steps": skipped, "final": final, "step": step,
        "hook": hook, "sae": sae, "sae_fve_probes": sae_fve, "feature_urls": {k: v for k, v in urls.items() if v},
        **extra,
    }


def credits_record(engine: CreditEngine, layout: CreditLayout, pair_meta: dict[str, dict[str, Any]], rule: str,
                   kernel: OptimizerKernel) -> dict[str, Any]:
    """credits.json: every pair's total credit (own window + what its momentum carried later)."""
    out = []
    for h, v in engine.totals.items():
        tot, own = layout.unpack(v), layout.unpack(engine.own_totals.get(h, np.zeros(layout.width)))
        out.append({"hash": h, **pair_meta.get(h, {}), **tot,
                    "own": {"d": own["d"], "refusal_harmful": own["refusal_harmful"],
                            "refusal_harmless": own["refusal_harmless"]}})
    return {"rule": rule, "kernel": kernel.to_dict(), "measure": engine.measure, "categories": list(layout.categories),
            "pairs": out}


def credit_summary(engine: CreditEngine, layout: CreditLayout, rule: str, kernel: OptimizerKernel,
                   top: int = 50) -> dict[str, Any]:
    """policy.json's credit part: the rule, the kernel, the residual and the pairs with the largest total |Δβ|."""
    d_of = {h: layout.unpack(v)["d"] for h, v in engine.totals.items()}
    top_pairs = sorted(d_of.items(), key=lambda kv: -float(np.abs(kv[1]).sum()))[:top]
    res = layout.unpack(engine.residual_total)
    return {"top_pairs_by_total_abs_delta_beta": [{"hash": h, "delta_beta": v} for h, v in top_pairs],
            "credit": {"rule": rule, "kernel": kernel.to_dict(), "measure": engine.measure, "residual_total_d": res["d"],
                       "residual_total_refusal": [res["refusal_harmful"], res["refusal_harmless"]]}}


def indexed_pair(hash_: str, index: dict[str, list[int]], meta: Any, credit: float | None) -> dict[str, Any]:
    """`pair_entry` of a captured row: its dataset index (the first row with its content) and that row's metadata
    (`meta(i)`), or `unmatched` when no dataset row has its content."""
    idx = index.get(hash_, [])
    rec = pair_entry(hash_, idx[0] if idx else None, credit, **(meta(idx[0]) if idx and meta is not None else {}))
    if not idx:
        rec["unmatched"] = True
    return rec


def replay_record(res: dict[str, Any], start: int, rows: Sequence[Sequence[str]], index: dict[str, list[int]],
                  meta: Any, quantities: dict[str, int]) -> dict[str, Any]:
    """`replay.json`: the callback's replay of the run's last steps (`credit.replay.TailRecorder`). Per replayed
    step (1-based, as the ledger numbers them) its pairs and the predicted change of each quantity at the end of
    training had the step been dropped; `quantities`: each one's number of probes. `trusted_from`: per quantity, the
    first step whose effect is read (`credit.replay.replay_trusted_from`: where a long replay's linearisation blew up,
    the steps before it are not)."""
    steps = []
    for i, hashes in enumerate(rows):
        pairs = [indexed_pair(h, index, meta, None) for h in hashes]
        steps.append({"step": start + i + 1, "lr": res["lr"][i], "pairs": pairs,
                      "removal_effect": {q: float(v[i]) for q, v in res["removal_effect"].items()},
                      "weight_zero_effect": {q: float(v[i]) for q, v in res["weight_zero_effect"].items()}})
    return {"protocol": "replay of the run's last steps", "first_step": start + 1, "last_step": start + len(rows),
            "quantities": {q: f"mean refusal score of the {n} {q} probes" for q, n in quantities.items()},
            "reading": "removal_effect: the predicted change of the quantity at the end of training had the step's pairs "
                       "been dropped, the later steps moved one place earlier (weight_zero_effect: kept in place); a "
                       "pair's contribution when trained is minus it. First order in each step: a set's is the sum.",
            "trusted_from": {q: start + replay_trusted_from(list(v)) + 1 for q, v in res["removal_effect"].items()},
            "trust": f"a step before trusted_from is not read: there the replay's rolling mean |effect| over {TRUST_WINDOW} "
                     f"steps exceeds {TRUST_FACTOR:g}x the median |effect| of the replay's second half (a linearisation "
                     "carried back through many steps that blew up; docs/validation.md §9). Replays shorter than "
                     f"{2 * TRUST_WINDOW} steps are read whole.",
            "final": res["final"], "steps": steps, "recompute_gap": res["recompute_gap"],
            "recompute_gap_to_run": res["recompute_gap_to_run"], "seconds": res["seconds"],
            "peak_rss_mb": res["peak_rss_mb"], "checkpoints": res["checkpoints"]}
