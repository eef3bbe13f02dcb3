"""Does the attribution predict what happens when the data changes? (`smda validate`)

Three checks on ledgers this package wrote, reported whatever they show (docs/validation.md):
agreement of in-training and counterfactual scores (and of the exact and first-order splits),
the curation experiment (retrain.py: top suspects vs random removals over several data orders),
and a causal check of single-pair scores.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .analysis import pair_scores, spearman  # noqa: F401  (pair_scores re-exported)
from ..config import SMDAConfig
from ..ledger import load_policy, load_records
from ..probes import ProbeSet
from .retrain import RetrainSettings, run_jobs, summarize
from .retrain import format_summary as format_retrain

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- per-pair scores
def agreement(train_dir: str | Path, cf_dir: str | Path) -> dict[str, Any]:
    """Spearman of per-pair scores between the two protocols (overall and per shared feature),
    and the distribution of the paper's first-order split error in each."""
    a, b = pair_scores(train_dir), pair_scores(cf_dir)
    ids = a.index.intersection(b.index)
    if len(ids) < 3:
        raise ValueError(f"only {len(ids)} pair ids in both ledgers; run both protocols on the same pairs file")
    fa, fb = load_policy(train_dir)["features"], load_policy(cf_dir)["features"]
    labels = dict(zip(fa, load_policy(train_dir)["feature_labels"]))
    shared = [f for f in fa if f in fb]
    per_feature = []
    for f in shared:
        ja, jb = fa.index(f), fb.index(f)
        x = np.array([a.at[i, "delta_beta"][ja] for i in ids])
        y = np.array([b.at[i, "delta_beta"][jb] for i in ids])
        per_feature.append({"feature": f, "label": labels[f], "spearman": spearman(x, y)})
    pf = pd.DataFrame(per_feature)
    gaps = {}
    for name, d in (("in_training", train_dir), ("counterfactual", cf_dir)):
        g = np.array([r["first_order_gap"] for r in load_records(d) if "first_order_gap" in r])
        gaps[name] = {q: float(np.quantile(g, v)) for q, v in (("p10", .1), ("median", .5), ("p90", .9))} if len(g) else {}
    by_label = {lab: spearman(a.loc[ids][a.loc[ids, "label"] == lab]["score"].to_numpy(),
                               b.loc[ids][a.loc[ids, "label"] == lab]["score"].to_numpy()) for lab in ("harmful", "harmless")}
    return {"n_pairs": int(len(ids)), "n_shared_features": len(shared), "n_features": len(fa),
            "scores": [{"id": i, "label": a.at[i, "label"], "in_training": float(a.at[i, "score"]),
                        "counterfactual": float(b.at[i, "score"])} for i in ids],
            "score_spearman": spearman(a.loc[ids, "score"].to_numpy(), b.loc[ids, "score"].to_numpy()),
            "score_spearman_by_label": by_label,
            "feature_spearman_median": float(pf["spearman"].median()) if len(pf) else float("nan"),
            "feature_spearman_p10_p90": [float(pf["spearman"].quantile(.1)), float(pf["spearman"].quantile(.9))] if len(pf) else [],
            "features_positive": float((pf["spearman"] > 0).mean()) if len(pf) else float("nan"),
            "per_feature": pf.sort_values("spearman").to_dict("records"), "first_order_gap": gaps}


# ----------------------------------------------------------------------------- causal check
@dataclass
class CausalSettings:
    """Insert one pair into a fixed background run and compare with the run without it (same seed)."""

    n_each: int = 10
    """pairs with the highest and the lowest predicted move"""
    background: int = 40
    """background pairs trained before the inserted pair"""
    tail: int = 5
    """background pairs trained after it (the effect must survive further training)"""
    lr: float = 1e-4
    """the demo's learning rate (AdamW, no weight decay)"""
    seed: int = 0


def causal_check(model: Any, tok: Any, pairs: list[dict[str, Any]], scores: pd.DataFrame, probes: ProbeSet,
                 categories: list[str], sae: Any, config: SMDAConfig, st: CausalSettings | None = None) -> list[dict[str, Any]]:
    """Per category: for the pairs with the most extreme predicted move of its refusal, the measured
    move (category mean refusal with the pair − without), and how well the prediction ranks it."""
    from .counterfactual import pair_batch
    from ..sae import resolve_hook
    from ..snapshot import Snapshotter

    st = st or CausalSettings()
    cats = probes.category_index()
    for c in categories:
        if not cats.get(c):
            raise ValueError(f"category {c!r} has no probes; choose one of {sorted(cats)}")
    preds = {c: scores["moves"].map(lambda m, c=c: m.get(c, np.nan)).dropna().sort_values() for c in categories}
    chosen = {c: p.index[: st.n_each].tolist() + p.index[-st.n_each:].tolist() for c, p in preds.items()}
    tested = sorted({i for ids in chosen.values() for i in ids})
    by_id = {p["id"]: p for p in pairs}
    rng = np.random.default_rng(st.seed)
    tested_ids = set(tested)
    rest = [p for p in pairs if p["id"] not in tested_ids]
    order = [rest[i] for i in rng.permutation(len(rest))[: st.background + st.tail]]
    bg, tail = order[: st.background], order[st.background:]
    snap = Snapshotter(probes, tok, sae, resolve_hook(sae, model), config)
    snap.features = np.array([0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=st.lr, weight_decay=0.0)

    def train_on(items: list[dict[str, Any]]) -> None:
        model.train()
        for p in items:
            ids, lab = pair_batch(tok, p, 256)
            model(input_ids=ids, labels=lab).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()

    train_on(bg)
    saved_m = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_o = _clone_state(opt.state_dict())

    def run(extra: list[dict[str, Any]]) -> dict[str, float]:
        with torch.no_grad():
            model.load_state_dict(saved_m)
        opt.load_state_dict(_clone_state(saved_o))
        train_on(extra + tail)
        Y = snap.take(model).Y
        return {c: float(Y[cats[c]].mean()) for c in categories}

    without = run([])
    measured = {i: run([by_id[i]]) for i in tqdm(tested, desc="causal check", leave=False)}
    out = []
    for c in categories:
        df = pd.DataFrame([{"id": i, "label": by_id[i]["label"], "category": by_id[i]["category"],
                            "predicted": float(preds[c][i]), "measured": measured[i][c] - without[c]} for i in chosen[c]])
        out.append({"category": c, "settings": asdict(st), "without": without[c], "pairs": df.to_dict("records"),
                    "spearman": spearman(df.predicted.to_numpy(), df.measured.to_numpy()),
                    "sign_agreement": float((np.sign(df.predicted) == np.sign(df.measured)).mean()),
                    "top_minus_bottom": float(df.measured[st.n_each:].mean() - df.measured[: st.n_each].mean())})
    return out


def _clone_state(sd: dict[str, Any]) -> dict[str, Any]:
    return {"state": {k: {n: (t.clone() if torch.is_tensor(t) else t) for n, t in v.items()} for k, v in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


# ----------------------------------------------------------------------------- orchestration
@dataclass
class ValidationSettings:
    seeds: tuple[int, ...] = (0, 1, 2)
    """data orders of every retraining condition (and the random removal sets, one per order)"""
    curation_target: str = "over-refusal"
    curation_ns: tuple[int, ...] = (32,)
    categories: tuple[str, ...] = ("religious_stereotyping", "edgy")
    counterfactual_lr: float = 1e-2
    """plain SGD; its update norm (lr × grad norm ≈ 0.15 here) is within an order of magnitude of one
    in-training AdamW step at lr 1e-4 (≈ lr·√N ≈ 1.2), where the CLI's 1e-4 would be ~800x smaller"""
    counterfactual_pairs: int | None = None
    """only the first N pairs of the (shuffled) pairs file get the counterfactual protocol; None = all"""
    causal: CausalSettings = field(default_factory=CausalSettings)


def run_validation(run_dir: str | Path, out: str | Path, st: ValidationSettings | None = None,
                   heldout_file: str | Path | None = None,
                   progress: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """All checks on an in-training run (the demo's); writes out/validation.json and returns it."""
    from .counterfactual import attribute_pairs
    from .demo import DATA, load_pairs
    from .models import load_model
    from ..sae import embedded_sae_dir, load_sae

    st = st or ValidationSettings()
    run_dir, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    policy = load_policy(run_dir)
    cfg = SMDAConfig.from_dict(policy["config"])
    pairs = load_pairs(DATA / "pairs.jsonl")
    probes = ProbeSet.from_jsonl(DATA / "probes.jsonl")
    sets = {"probes": probes, "heldout": ProbeSet.from_jsonl(heldout_file or DATA / "heldout.jsonl")}
    scores = pair_scores(run_dir)
    missing = {p["id"] for p in pairs} - set(scores.index)
    if missing:
        raise ValueError(f"{run_dir}: {len(missing)} demo pairs are not in the ledger (e.g. {sorted(missing)[:3]}); "
                         "validate a full `smda demo` run, not a --limit run")
    res: dict[str, Any] = {"run_dir": str(run_dir), "settings": asdict(st), "timings_s": {}}

    def stage(key: str, fn: Callable[[], Any]) -> None:
        """Run one check, store its result under `key`, and write validation.json at once."""
        t0 = time.perf_counter()
        progress(f"validate: {key}")
        v = fn()
        if v is not None:
            res[key] = v
        res["timings_s"][key] = round(time.perf_counter() - t0, 1)
        _write(out, res)

    def counterfactual() -> dict[str, Any]:
        model, tok = load_model()
        attribute_pairs(model, tok, pairs[: st.counterfactual_pairs], probes, embedded_sae_dir(), out / "counterfactual", cfg,
                        lr=st.counterfactual_lr)
        return agreement(run_dir, out / "counterfactual")
    stage("agreement", counterfactual)

    def curation() -> dict[str, Any]:
        rs = RetrainSettings(target=st.curation_target, ns=st.curation_ns, orders=st.seeds, random_sets=len(st.seeds))
        run_jobs(run_dir, pairs, sets, out / "retrain", rs)
        return summarize(out / "retrain")
    stage("curation", curation)

    def causal() -> list[dict[str, Any]]:
        model, tok = load_model()
        return causal_check(model, tok, pairs, scores, probes, list(st.categories), load_sae(embedded_sae_dir()), cfg, st.causal)
    stage("causal", causal)
    return res


def _write(out: Path, res: dict[str, Any]) -> None:
    """After every stage, atomically, so a long run interrupted late keeps what it measured."""
    from ..sinks import LedgerWriter

    LedgerWriter(out).write_json("validation.json", res)


def plot_validation(res: dict[str, Any], out: str | Path) -> list[Path]:
    """Three PNGs next to validation.md: score agreement, curation F1, causal check."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = []
    colors = {"harmful": "#c0392b", "harmless": "#2471a3"}
    fig, ax = plt.subplots(figsize=(5, 4))
    sc = pd.DataFrame(res["agreement"]["scores"])
    for lab, g in sc.groupby("label"):
        ax.scatter(g.in_training, g.counterfactual, s=12, alpha=.7, color=colors.get(lab), label=lab)
    ax.set(xlabel="in-training score Σ Δβ·β", ylabel="counterfactual score Σ Δβ·β",
           title=f"pair scores, Spearman {res['agreement']['score_spearman']:+.2f}")
    ax.legend()
    paths.append(out / "agreement.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    conds = res["curation"]["conditions"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    names = list(conds)
    x = np.arange(len(names))
    for k, (key, off) in enumerate((("heldout.refusal_rate_harmless", -0.2), ("heldout.refusal_rate_harmful", 0.2))):
        ax.bar(x + off, [conds[n][key]["mean"] for n in names], yerr=[conds[n][key]["sd"] for n in names], width=0.4,
               capsize=3, label=key.replace("heldout.refusal_rate_", "held-out refusal, "))
    ax.set_xticks(x, [n.replace("_", "\n", 1) for n in names], fontsize=7)
    ax.set(ylim=(0, 1), title="curation: retrained from the base, mean ± sd over data orders")
    ax.legend(fontsize=8)
    paths.append(out / "curation.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(res["causal"]), figsize=(4.5 * len(res["causal"]), 3.8), squeeze=False)
    for ax, c in zip(axes[0], res["causal"]):
        d = pd.DataFrame(c["pairs"])
        for lab, g in d.groupby("label"):
            ax.scatter(g.predicted, g.measured, s=18, color=colors.get(lab), label=lab)
        ax.axhline(0, color="#888", lw=.6)
        ax.axvline(0, color="#888", lw=.6)
        ax.set(xlabel="predicted move (x̄·Δβ, in-training ledger)", ylabel="measured move (with − without)",
               title=f"{c['category']}: Spearman {c['spearman']:+.2f}")
        ax.legend(fontsize=8)
    paths.append(out / "causal.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def format_validation(res: dict[str, Any]) -> str:
    """Markdown tables of the results (the body of docs/validation.md)."""
    ag = res["agreement"]
    L = ["## 1. Agreement of the two protocols", "",
         f"{ag['n_pairs']} pairs, {ag['n_shared_features']} of {ag['n_features']} features shared by both policies.", "",
         "| measure | value |", "|---|---|",
         f"| Spearman of the paper's pair score Σ Δβ·β, in-training vs counterfactual | {ag['score_spearman']:+.3f} |",
         f"| … within harmful pairs / within harmless pairs | {ag['score_spearman_by_label']['harmful']:+.3f} / "
         f"{ag['score_spearman_by_label']['harmless']:+.3f} |",
         f"| per-feature Spearman of Δβ_j across pairs: median (p10, p90) | {ag['feature_spearman_median']:+.3f} "
         f"({ag['feature_spearman_p10_p90'][0]:+.3f}, {ag['feature_spearman_p10_p90'][1]:+.3f}) |",
         f"| features with positive Spearman | {ag['features_positive']:.0%} |"]
    for name, g in ag["first_order_gap"].items():
        if g:
            L.append(f"| first-order split vs exact, relative error per step ({name}): median (p10, p90) | "
                     f"{g['median']:.3f} ({g['p10']:.3f}, {g['p90']:.3f}) |")
    L += ["", "## 2. Curation experiment", "", format_retrain(res["curation"])]
    L += ["", "## 3. Causal check of single-pair scores", ""]
    for c in res["causal"]:
        L += [f"Category `{c['category']}`: {len(c['pairs'])} pairs; Spearman(predicted, measured) = {c['spearman']:+.3f}; "
              f"sign agreement {c['sign_agreement']:.0%}; mean measured move of the top-{c['settings']['n_each']} minus "
              f"bottom-{c['settings']['n_each']} predicted pairs = {c['top_minus_bottom']:+.2e} "
              f"(category refusal without the pair {c['without']:.3f}).", ""]
    return "\n".join(L)
