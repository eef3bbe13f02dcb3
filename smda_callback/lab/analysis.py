"""Findings from a ledger: category gaps, harmful-vs-harmless pathways, interference, top pairs.

Shared by the demo's printed summary and the HTML report, so both say the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu, rankdata, spearmanr

from ..ledger import load_credits, load_records
from .specs import SUSPECT_READS


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


def pair_rows(records: list[dict[str, Any]], credits: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One entry per pair (from credits.json: everything the optimizer credit gave it, own step and
    momentum carry) or, for ledgers without credits (counterfactual), per (step, pair) with its share."""
    if credits is not None:
        return _credit_rows(records, credits)
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


def _credit_rows(records: list[dict[str, Any]], credits: dict[str, Any]) -> list[dict[str, Any]]:
    first: dict[str, dict[str, Any]] = {}
    for r in records:
        for p in r.get("pairs", []):
            first.setdefault(p.get("hash"), r)
    rows = []
    for c in credits["pairs"]:
        r = first.get(c["hash"], {})
        d = np.asarray(c["d"])
        beta_before = np.asarray(r["beta"]) - np.asarray(r["delta_beta"]) if "beta" in r else np.zeros_like(d)
        rows.append({"align": d * beta_before, "step": r.get("step"), "index": c.get("index"), "hash": c["hash"], "id": c.get("id"),
                     "label": c.get("label"), "category": c.get("category"), "prompt": c.get("prompt", ""),
                     "dx": np.asarray(c["dx"]), "dy": np.asarray(c["dy"]), "d": d,
                     "interference": r.get("interference"), "alert": r.get("alert", False),
                     "dominant_label": r.get("dominant_label"), "intended": r.get("intended_features", []),
                     "dominant_feature": r.get("dominant_feature"), "moves": c["predicted_by_category"],
                     "measured": c["refusal_by_category"], "refusal_harmful": c["refusal_harmful"],
                     "refusal_harmless": c["refusal_harmless"], "own": c.get("own")})
    return rows


SUSPECT_TARGETS = ("over-refusal", "compliance", "off-target")


def worst_category(measured: dict[str, float], labels: dict[str, str], target: str) -> tuple[str, float]:
    """The probe category a pair's credited change moved most the wrong way, and that change signed so that higher is
    worse: over-refusal, the largest rise of refusal over the harmless categories; compliance, the largest fall over
    the harmful ones. The two refusal means weigh a category by its probes (32 of the shipped 66 harmless probes are
    `edgy`), so a pair that teaches refusing one kind of harmless request moves the mean little; this reads it where it
    lands (planted pairs, pooled over 17 runs: over-refusal AUROC 0.957 against the own window's 0.946, compliance
    0.944 and 0.948; docs/validation.md §10)."""
    want, sign = ("harmless", 1.0) if target == "over-refusal" else ("harmful", -1.0)
    cats = [c for c, lab in labels.items() if lab == want and c in measured]
    if not cats:
        raise ValueError(f"--read category for {target}: the run's probes have no {want} category; add {want} probes "
                         "to the probe set, or read the refusal means (--read trained)")
    cat = max(cats, key=lambda c: sign * measured[c])
    return cat, sign * float(measured[cat])


CREDIT_READS = ("Over-refusal and compliance scores are each pair's own-window credit (`own` in credits.json): the "
                "change of refusal its own steps made when they were applied (category and off-target scores: the total "
                "credit). They rank outliers (planted bad pairs, pooled AUROC 0.946 / 0.948 over 17 runs) and their sizes were calibrated "
                "against retraining on a 64-pair demo run (slope 0.9, but rank agreement with retraining only +0.33 / +0.40; "
                "docs/validation.md §9). They do not say what dropping a pair changes at the end of the run: later pairs "
                "can undo or reverse it (on a planted run, dropping one of three top-ranked over-refusal plants moved final "
                "harmless refusal by -0.052, -0.012 and +0.007; §10). Summed over half a run's pairs they rank removals no better "
                "than counting the harmful and harmless pairs removed (over three data orders: +0.67 / +0.71 against "
                "+0.81 / +0.80, nothing beyond the labels told from chance; §9). `--read end` carries each score by the run's own "
                "forgetting rate (lab/carry.py): a little better at that (rank agreement +0.34 / +0.46 on the 64-pair run, "
                "+0.34 / +0.26 on a planted one) at no cost. `--read removal` carries it by the run's second-order response, which "
                "turns some pushes round: within 0.05 of the best free reader of removals on six of the nine runs measured (rank agreement "
                "+0.39 / +0.62, +0.69 / +0.58, +0.50 / +0.53 on three data orders of the 64-pair run, +0.51 / +0.49 and +0.67 / "
                "+0.58 on 96- and 192-pair ones, +0.59 / +0.77 on a 128-pair one, +0.61 / +0.44 on a planted one, +0.42 / +0.52 on the 318 demo pairs in a "
                "second order, but -0.04 / +0.43 on the 318-pair demo run itself, whose harmful side no free reader reads); "
                "its ranking is this order's (it ranks the pairs trained near the end; another order of the same pairs ranks "
                "others), and "
                "it ranks planted bad pairs poorly (0.657 / 0.837 on the planted run), so do not look for bad pairs with it. To predict it, replay the run's last steps inside it "
                "(SMDAConfig(replay_last_steps=K), `--read replay`: rank agreement +0.78 / +0.74 with retraining for the last "
                "90 steps of the 318-pair demo run, +0.75 / +0.80 on the same pairs in a second order, +0.79 / +0.81 on a 192-pair "
                "run; earlier pairs unranked) or a whole run after it (lab/replay.py). "
                "`--read category` ranks by the probe category a pair moved most the wrong way (the total credit): "
                "planted pairs pooled over 17 runs 0.957 / 0.944 against the own window's 0.946 / 0.948. A pair trained "
                "in the first steps, when the model has no refusal to lose, is at a floor for compliance: read early "
                "pairs' low compliance scores as unmeasured, not innocent (docs/validation.md §10).")
"""What a credit predicts, as `smda suspects` and the report tell users (measured in docs/validation.md §9)."""


def suspects(records: list[dict[str, Any]], policy: dict[str, Any], credits: dict[str, Any], target: str,
             top: int | None = None, read: str = "trained", replay: dict[str, Any] | None = None) -> pd.DataFrame:
    """Pairs ranked by what their credit did to a behaviour, most suspect first.

    over-refusal: raised measured refusal on harmless probes; compliance: lowered it on harmful
    probes; a probe category: moved that category the wrong way (down for a harmful category, up
    for a harmless one); off-target: |Δβ| on features outside the pair's intended ones. With
    `read="end"` the over-refusal and compliance scores are carried to the end of the run by its
    forgetting rate (its κ per quantity in the frame's `attrs["forgetting"]`); with `read="removal"` by the response
    of the run's AR(2) fit (κ and b in `attrs["forgetting"]`; a fit that cannot be made is a ValueError that says
    why); with `read="replay"` they are the
    run's replay of its last steps (`replay`, replay.json): the predicted change of final refusal each step's
    pairs made, carried through the rest of the run (a step with several pairs gives each of them its whole effect),
    from the replay's `trusted_from` step of that quantity on (earlier steps are not ranked)."""
    if read not in SUSPECT_READS:
        raise ValueError(f"read={read!r}: use one of {', '.join(SUSPECT_READS)}")
    if read in ("end", "removal", "replay", "category") and target not in ("over-refusal", "compliance"):
        why = {"end": "the forgetting rate is measured on the two refusal means only",
               "removal": "the run's response is fitted to the two refusal means only",
               "replay": "the replay carries the two refusal means only",
               "category": "it picks, per pair, the harmless (over-refusal) or harmful (compliance) category moved most"}[read]
        raise ValueError(f"--read {read} ranks over-refusal or compliance only, not {target!r}: {why}; "
                         f"for {target!r} use the default --read trained")
    if read == "replay":
        if replay is None:
            raise ValueError("--read replay needs the run's replay.json: train with SMDAConfig(replay_last_steps=K) "
                             "(the last K steps are replayed after training)")
        q, sign = ("harmless", -1.0) if target == "over-refusal" else ("harmful", 1.0)
        trusted = int(replay.get("trusted_from", {}).get(q, replay["first_step"]))  # replay.json before it had none
        df = pd.DataFrame([{"id": p.get("id"), "index": p.get("index"), "label": p.get("label"), "category": p.get("category"),
                            "score": sign * float(s["removal_effect"][q]), "prompt": p.get("prompt"), "step": s["step"],
                            "hash": p["hash"]} for s in replay["steps"] if s["step"] >= trusted for p in s["pairs"]],
                          columns=["id", "index", "label", "category", "score", "prompt", "step", "hash"])
        df.attrs["replay"] = {"first_step": replay["first_step"], "last_step": replay["last_step"], "quantity": q,
                              "trusted_from": trusted}
        return _ranked(df, top)
    rows = pair_rows(records, credits)
    cat_label = {p["category"]: p["label"] for p in policy.get("probes", [])}
    feats = list(policy["features"])
    # over-refusal / compliance read the pair's own-window credit where the ledger has it: on planted pairs it ranks
    # as the total does (pooled over 17 runs 0.946 / 0.948 vs 0.943 / 0.944), on random removal sets it predicts
    # retraining better (LDS +0.33 / +0.40 vs +0.24 / +0.32) and its size is calibrated (slope 0.9 vs 0.08)
    if read == "category":
        picks = [worst_category(r["measured"], cat_label, target) for r in rows]
        score = [sc for _, sc in picks]
    elif target == "over-refusal":
        score = [(r.get("own") or r)["refusal_harmless"] for r in rows]
    elif target == "compliance":
        score = [-(r.get("own") or r)["refusal_harmful"] for r in rows]
    elif target == "off-target":
        score = []
        for r in rows:
            on = np.isin(feats, r["intended"])
            score.append(float(np.abs(r["d"][~on]).sum()))
    elif target in cat_label:
        sign = -1.0 if cat_label[target] == "harmful" else 1.0
        score = [sign * r["measured"][target] for r in rows]
    else:
        raise ValueError(f"unknown target {target!r}: use one of {', '.join(SUSPECT_TARGETS)} or a probe category "
                         f"({', '.join(sorted(cat_label))})")
    forgetting = None
    if read in ("end", "removal"):
        from .carry import REACH_SHARE, end_weights

        q = "harmless" if target == "over-refusal" else "harmful"
        fit_order, fitted, instead = {"end": (1, "forgetting rate", "--read trained"),
                                      "removal": (2, "AR(2) response", "--read trained or --read end")}[read]
        try:
            weights, fg = end_weights(records, policy, order=fit_order)
        except ValueError as e:
            raise ValueError(f"--read {read}: this run's {fitted} cannot be read off its ledger ({e}); use {instead}") from e
        forgetting = fg[q]
        score = [sc * weights[q].get(r["hash"], 0.0) for r, sc in zip(rows, score)]
    df = pd.DataFrame([{"id": r["id"], "index": r["index"], "label": r["label"], "category": r["category"],
                        "score": float(sc), "prompt": r["prompt"], "step": r["step"], "hash": r["hash"]}
                       for r, sc in zip(rows, score)])
    if read == "category":
        df["worst_category"] = [cat for cat, _ in picks]
        df.attrs["category"] = True
    if forgetting is not None:
        df.attrs["forgetting"] = {"kappa": forgetting.kappa, "ci95": list(forgetting.ci95), "windows": forgetting.windows,
                                  "b": list(forgetting.lags), "read": read,
                                  "reach": forgetting.reach(forgetting.windows - 1), "reach_share": REACH_SHARE}
    return _ranked(df, top)


def read_note(df: pd.DataFrame) -> list[str]:
    """What a `suspects` frame's read means on this run, in words: for `--read replay`, `category`, `removal` and `end`
    (from the frame's attrs: the replayed steps, the fitted κ and b, how far back the fit reaches); none for `trained`.
    The CLI prints these lines above the ranking, the report shows them beside it."""
    lines: list[str] = []
    rp = df.attrs.get("replay")
    if rp:
        lines.append(f"--read replay: steps {rp['first_step']}-{rp['last_step']} replayed after training (replay.json); score = "
                     f"the change of final {rp['quantity']} refusal the pair's step made, carried through the rest of the run "
                     "(signed so that higher is more suspect); earlier pairs are not ranked.")
        if rp["trusted_from"] > rp["first_step"]:
            lines.append(f"  steps {rp['first_step']}-{rp['trusted_from'] - 1} are not ranked either: there the replay's effects "
                         "blew up (a linearisation carried back through many steps; replay.json's \"trust\"). Replay fewer "
                         "steps, or read them as unknown.")
    if df.attrs.get("category"):
        lines.append("--read category: score = the pair's credited change of refusal in the probe category it moved most the "
                     "wrong way (over-refusal: the largest rise over the harmless categories; compliance: the largest fall over "
                     "the harmful ones), that category in brackets: planted bad pairs are found a little more reliably this way "
                     "(docs/validation.md §10), sizes are per category, not the refusal mean.")
    fg = df.attrs.get("forgetting")
    if fg and fg["read"] == "removal":
        lines.append(f"--read removal: each score times the response at the end of the run to a unit push at the pair's place, "
                     f"from this run's AR(2) fit of its own trajectory (κ = {fg['kappa']:.4f}, b = {fg['b'][0]:+.4f}, "
                     f"{fg['windows']} windows; lab/carry.py): the change of final refusal the pair leaves, which leaving it out "
                     "would undo. The response turns negative at some places, which turns those pairs round: this reads "
                     "removals, not which pairs pushed the wrong way (for that, --read trained or end). The ranking "
                     "is this order's, not the pairs': it ranks the pairs trained near the end, so the same pairs in another "
                     "order rank otherwise (a pair's score in two orders of the 318 demo pairs: Spearman +0.06 / +0.01; "
                     "docs/validation.md §9).")
        if fg["reach"] < fg["windows"]:
            lines.append(f"  it ranks the pairs of the last {fg['reach']} of {fg['windows']} windows only (further back the "
                         f"response is under {fg['reach_share']:.0%} of its largest, so those pairs score ≈ 0): where early pairs "
                         "still move the end, it misses them (the 318-pair demo run's harmful refusal, docs/validation.md §9).")
    elif fg:
        lines.append(f"--read end: each score times (1 - κ)^(windows trained after the pair), κ = {fg['kappa']:.4f} "
                     f"[{fg['ci95'][0]:.3f}, {fg['ci95'][1]:.3f}] per window read off this run's ledger ({fg['windows']} windows; "
                     "lab/carry.py): what is left of the pair's change at the end of the run, if later training fades it.")
        if fg["reach"] < fg["windows"]:
            lines.append(f"  pairs trained before the last {fg['reach']} of {fg['windows']} windows are carried at under "
                         f"{fg['reach_share']:.0%} of a last pair's weight, so a bad pair there ranks low: look for early ones "
                         "with --read trained.")
    return lines


def _ranked(df: pd.DataFrame, top: int | None) -> pd.DataFrame:
    """Most suspect first (ties in the frame's order), the first `top` rows."""
    if df.empty:
        return df
    df = df.sort_values("score", ascending=False, kind="mergesort").reset_index(drop=True)
    return df.head(top) if top else df


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


def pathway_by_label(records: list[dict[str, Any]], policy: dict[str, Any], credits: dict[str, Any] | None = None) -> pd.DataFrame:
    """Per feature: mean ΔX and ΔY pathway of harmful vs harmless pairs, Mann–Whitney p, BH q,
    and effect size (rank-biserial r) for the total Δβ."""
    rows = pair_rows(records, credits)
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


def interference_table(records: list[dict[str, Any]], policy: dict[str, Any], n: int = 10,
                       credits: dict[str, Any] | None = None) -> pd.DataFrame:
    """Pairs whose step's dominant Δβ landed off their intended features, strongest first."""
    labels = dict(zip(policy["features"], policy["feature_labels"]))
    rows = []
    for r in pair_rows(records, credits):
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


def top_pairs(records: list[dict[str, Any]], policy: dict[str, Any], feature_pos: int, n: int = 3,
              credits: dict[str, Any] | None = None) -> tuple[list, list]:
    """Pairs that raised / lowered coefficient `feature_pos` most (summed over epochs)."""
    agg: dict[Any, dict[str, Any]] = {}
    for r in pair_rows(records, credits):
        key = r["hash"]
        a = agg.setdefault(key, {"index": r["index"], "label": r["label"], "category": r["category"],
                                 "prompt": r["prompt"], "d": 0.0})
        a["d"] += float(r["d"][feature_pos])
    items = sorted(agg.values(), key=lambda a: a["d"])
    return items[::-1][:n], items[:n]


def category_movers(records: list[dict[str, Any]], policy: dict[str, Any], n: int = 2,
                    credits: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Per probe category, the pairs that moved that category's measured refusal most *beyond
    their mean move over all categories* (so a pair that raises refusal everywhere does not top
    every category), both signs. With credits, a pair's move is its credited one."""
    if credits is not None:
        by: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        for r in pair_rows(records, credits):
            mean = float(np.mean(list(r["measured"].values())))
            for c, d in r["measured"].items():
                by.setdefault(c, []).append((d - mean, r))
        return {c: [{"delta": d, **{k: p.get(k) for k in ("index", "label", "category", "prompt")}}
                    for d, p in sorted(m, key=lambda t: -abs(t[0]))[:n]] for c, m in by.items()}
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


def pair_scores(run_dir: str | Path) -> pd.DataFrame:
    """One row per pair id: the paper's score Σⱼ Δβⱼ·βⱼ, Δβ, and the predicted move of each probe
    category's refusal (x̄_cat·Δβ), summed over the pair's steps (epochs)."""
    rows: dict[str, dict[str, Any]] = {}
    for r in pair_rows(load_records(run_dir), load_credits(run_dir)):
        key = r["id"] or r["hash"]
        row = rows.setdefault(key, {"id": key, "label": r["label"], "category": r["category"], "prompt": r["prompt"],
                                    "step": r["step"], "score": 0.0, "delta_beta": 0.0, "moves": {}})
        row["score"] += float(r["align"].sum())
        row["delta_beta"] = row["delta_beta"] + r["d"]
        for cat, v in r["moves"].items():
            row["moves"][cat] = row["moves"].get(cat, 0.0) + v
    if not rows:
        raise ValueError(f"{run_dir}: the ledger has no attributed pair steps (was the callback bound with .bind(trainer)?)")
    return pd.DataFrame(list(rows.values())).set_index("id")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def partial_spearman(a: np.ndarray, b: np.ndarray, control: np.ndarray) -> float:
    """Spearman of a and b with `control` held: the Pearson correlation of a's and b's ranks after each is fitted by
    least squares on the ranks of the columns of `control` [n, c] with an intercept. What a and b share beyond what the
    controls explain (e.g. a reader's LDS beyond the removed pairs' label counts); a that ranks as a control does reads
    NaN. NaN too when a residual is constant or there are too few rows."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    cols = np.asarray(control, dtype=float).reshape(len(a), -1)
    C = np.column_stack([np.ones(len(a)), *(rankdata(c) for c in cols.T)])
    if len(a) < C.shape[1] + 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    res = [r - C @ np.linalg.lstsq(C, r, rcond=None)[0] for r in (rankdata(a), rankdata(b))]
    scale = float(np.linalg.norm(res[0]) * np.linalg.norm(res[1]))
    if scale < 1e-9 * len(a) ** 2:
        return float("nan")
    return float(res[0] @ res[1] / scale)
