"""Findings from a ledger: category gaps, harmful-vs-harmless pathways, interference, top pairs.

Shared by the demo's printed summary and the HTML report, so both say the same thing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu


def bh_fdr(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values."""
    p = np.asarray(p, np.float64)
    n = len(p)
    if n == 0:
        return p
    order = np.argsort(p)
    q = p[order] * n / np.arange(1, n + 1)
    q = np.minimum.accumulate(q[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(q, 1.0)
    return out


def pair_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (step, pair) with its credited share of Δβ_X and Δβ_Y."""
    rows = []
    for r in records:
        if "delta_beta" not in r:
            continue
        for p in r.get("pairs", []):
            c = float(p.get("credit", 1.0))
            rows.append({"step": r["step"], "index": p.get("index"), "hash": p.get("hash"), "id": p.get("id"), "label": p.get("label"),
                         "category": p.get("category"), "prompt": p.get("prompt", ""),
                         "dx": c * np.asarray(r["delta_beta_x"]), "dy": c * np.asarray(r["delta_beta_y"]),
                         "d": c * np.asarray(r["delta_beta"]), "align": c * np.asarray(r["alignment"]),
                         "interference": r.get("interference"), "alert": r.get("alert", False),
                         "dominant_label": r.get("dominant_label"), "intended": r.get("intended_features", []),
                         "dominant_feature": r.get("dominant_feature"),
                         "moves": {cat: c * (v["x"] + v["y"]) for cat, v in (r.get("category_pathways") or {}).items()}})
    return rows


def category_gaps(policy: dict[str, Any]) -> pd.DataFrame:
    """Measured refusal per probe category before/after and the gap to the harmful mean."""
    base, final = policy["baseline_refusal_by_category"], policy["final_refusal_by_category"]
    labels: dict[str, str] = {}
    for p in policy.get("probes", []):
        labels.setdefault(p["category"], p["label"])
    df = pd.DataFrame({"category": list(base), "label": [labels.get(c, "?") for c in base],
                       "before": [base[c] for c in base], "after": [final[c] for c in base]})
    df["change"] = df["after"] - df["before"]
    harmful_mean = df.loc[df.label == "harmful", "after"].mean()
    df["gap_to_harmful_mean"] = df["after"] - harmful_mean
    return df.sort_values(["label", "after"]).reset_index(drop=True)


def pathway_by_label(records: list[dict[str, Any]], policy: dict[str, Any]) -> pd.DataFrame:
    """Per feature: mean ΔX and ΔY pathway of harmful vs harmless pairs, Mann–Whitney p, BH q,
    and effect size (rank-biserial r) for the total Δβ."""
    rows = pair_rows(records)
    labels = policy["feature_labels"]
    h = [r for r in rows if r["label"] == "harmful"]
    s = [r for r in rows if r["label"] == "harmless"]
    out = []
    for j, lab in enumerate(labels):
        dh = np.array([r["d"][j] for r in h])
        ds = np.array([r["d"][j] for r in s])
        p, rb = np.nan, np.nan
        if len(dh) >= 2 and len(ds) >= 2 and (np.ptp(np.concatenate([dh, ds])) > 0):
            u, p = mannwhitneyu(dh, ds, alternative="two-sided")
            rb = 2 * u / (len(dh) * len(ds)) - 1
        out.append({"feature": policy["features"][j], "label": lab,
                    "harmful_dx": np.mean([r["dx"][j] for r in h]) if h else np.nan,
                    "harmful_dy": np.mean([r["dy"][j] for r in h]) if h else np.nan,
                    "harmless_dx": np.mean([r["dx"][j] for r in s]) if s else np.nan,
                    "harmless_dy": np.mean([r["dy"][j] for r in s]) if s else np.nan,
                    "p": p, "effect_r": rb, "n_harmful": len(h), "n_harmless": len(s)})
    df = pd.DataFrame(out)
    ok = df["p"].notna()
    df["q"] = np.nan
    df.loc[ok, "q"] = bh_fdr(df.loc[ok, "p"].to_numpy())
    return df.sort_values("p", na_position="last").reset_index(drop=True)


def interference_table(records: list[dict[str, Any]], policy: dict[str, Any], n: int = 10) -> pd.DataFrame:
    """Pairs whose step's dominant Δβ landed off their intended features, strongest first."""
    labels = dict(zip(policy["features"], policy["feature_labels"]))
    rows = []
    for r in pair_rows(records):
        if r["interference"] is None:
            continue
        mag = float(np.abs(r["d"]).max()) if len(r["d"]) else 0.0
        rows.append({"step": r["step"], "index": r["index"], "label": r["label"], "category": r["category"],
                     "prompt": r["prompt"], "intended": ", ".join(labels.get(f, str(f)) for f in r["intended"]),
                     "dominant": r["dominant_label"], "score": r["interference"], "alert": r["alert"],
                     "magnitude": mag})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["rank_key"] = df["alert"].astype(int) * 10 + df["score"] * df["magnitude"] / (df["magnitude"].max() or 1)
    return df.sort_values("rank_key", ascending=False).drop(columns="rank_key").head(n).reset_index(drop=True)


def top_pairs(records: list[dict[str, Any]], policy: dict[str, Any], feature_pos: int, n: int = 3) -> tuple[list, list]:
    """Pairs that raised / lowered coefficient `feature_pos` most (summed over epochs)."""
    agg: dict[Any, dict[str, Any]] = {}
    for r in pair_rows(records):
        key = r["hash"]
        a = agg.setdefault(key, {"index": r["index"], "label": r["label"], "category": r["category"],
                                 "prompt": r["prompt"], "d": 0.0})
        a["d"] += float(r["d"][feature_pos])
    items = sorted(agg.values(), key=lambda a: a["d"])
    return items[::-1][:n], items[:n]


def category_movers(records: list[dict[str, Any]], policy: dict[str, Any], n: int = 2) -> dict[str, list[dict[str, Any]]]:
    """Per probe category, the pairs whose steps moved that category's measured refusal most
    *beyond the step's mean move over all categories* (so a step that raises refusal everywhere
    does not top every category), both signs."""
    prev: dict[str, float] | None = policy.get("baseline_refusal_by_category")
    moves: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for r in records:
        cur = r.get("refusal_by_category")
        if cur is None:
            continue
        if prev is not None:
            deltas = {c: v - prev[c] for c, v in cur.items()}
            mean = float(np.mean(list(deltas.values())))
            for c, d in deltas.items():
                for p in r.get("pairs", []):
                    moves.setdefault(c, []).append(((d - mean) * p.get("credit", 1.0), p))
        prev = cur
    return {c: [{"delta": d, **{k: p.get(k) for k in ("index", "label", "category", "prompt")}}
                for d, p in sorted(m, key=lambda t: -abs(t[0]))[:n]] for c, m in moves.items()}
