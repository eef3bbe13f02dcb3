"""Retraining experiments: does removing the pairs SMDA ranks most suspect change the trained model
more than removing as many random pairs? (`smda retrain-experiment`, a stage of `smda validate`)

Every job is a fresh SFT from the base model with the demo's settings on the pairs minus one removal
set, in one data order (the Trainer seed), followed by greedy answers on the probe and held-out sets.
One pair per step makes the outcome depend on the order, so every condition is run over several
orders and reported as mean ± spread. Each job writes its own JSON file as soon as it ends, so an
interrupted experiment resumes where it stopped and several processes can share the job list
(`--shard i/k`).

Conditions, for each N:
- `a_all`: every pair;
- `b_top{N}`: minus the N pairs `smda suspects` ranks highest for the target (label-capped, as `smda curate --drop`);
- `c_random{N}_s{k}`: minus N random pairs with the same label mix as b; random set k is trained in
  order k, so the spread of c covers both which pairs and which order;
- `p_median`: minus the pairs the paper's median rule flags (harmful below the harmless median,
  harmless above the harmful median of the per-pair score).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .files import write_json

logger = logging.getLogger(__name__)


@dataclass
class RetrainSettings:
    target: str = "over-refusal"
    ns: tuple[int, ...] = (32,)
    orders: tuple[int, ...] = (0, 1, 2)
    random_sets: int = 3
    paper_rule: bool = True
    max_label_share: float = 0.25


def flag_pairs(scores: pd.DataFrame) -> list[str]:
    """The paper's rule: harmful pairs scoring below the harmless median, harmless pairs above the harmful median."""
    h, s = scores[scores.label == "harmful"], scores[scores.label == "harmless"]
    return sorted(h.index[h.score < s.score.median()].tolist() + s.index[s.score > h.score.median()].tolist())


def random_like(pairs: list[dict[str, Any]], flagged: list[str], seed: int) -> list[str]:
    """A random removal set with the flagged set's size per label (so only *which* pairs differs)."""
    rng = np.random.default_rng(seed)
    lab = {p["id"]: p["label"] for p in pairs}
    out: list[str] = []
    for label in ("harmful", "harmless"):
        n = sum(lab[i] == label for i in flagged)
        pool = sorted(i for i, v in lab.items() if v == label)
        out += rng.choice(pool, size=n, replace=False).tolist()
    return sorted(out)


def train_sft(pairs: list[dict[str, Any]], out: str | Path, settings: Any = None, callbacks: list | None = None) -> tuple[Any, Any]:
    """The demo's SFT (same settings, no checkpoints, no logging) on `pairs`; returns (model, tokenizer)."""
    from trl import SFTTrainer

    from .demo import DemoSettings, sft_config, to_dataset
    from .models import load_model

    model, tok = load_model()
    args = sft_config(out, settings or DemoSettings())
    args.report_to = []
    if pairs:
        SFTTrainer(model=model, args=args, train_dataset=to_dataset(pairs), processing_class=tok, callbacks=callbacks).train()
    return model, tok


def conditions(run_dir: str | Path, pairs: list[dict[str, Any]], st: RetrainSettings) -> dict[str, list[str]]:
    """Removal set (pair ids) of every condition, from the ranking run's ledger."""
    from .curate import curate
    from .analysis import pair_scores

    out: dict[str, list[str]] = {"a_all": []}
    for n in st.ns:
        _, changes = curate(run_dir, pairs, st.target, n, "drop", st.max_label_share)
        top = [c["id"] for c in changes]
        out[f"b_top{n}"] = top
        for k in range(st.random_sets):
            out[f"c_random{n}_s{k}"] = random_like(pairs, top, seed=k)
    if st.paper_rule:
        out["p_median"] = flag_pairs(pair_scores(run_dir))
    return out


def predicted_shift(run_dir: str | Path, conds: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """What the ranking run's ledger predicts each removal does to the probes' refusal (minus the
    summed credit of the removed pairs), so the retrains test the credit's prediction, not only its ranking."""
    from .analysis import pair_rows
    from ..ledger import load_credits, load_records

    credits = load_credits(run_dir)
    if credits is None:
        return {}
    rows = {r["id"]: r for r in pair_rows(load_records(run_dir), credits)}
    return {name: {side: -float(sum(rows[i][f"refusal_{side}"] for i in drop if i in rows)) for side in ("harmless", "harmful")}
            for name, drop in conds.items()}


def jobs(conds: dict[str, list[str]], st: RetrainSettings) -> list[tuple[str, int]]:
    """(condition, order) of every retrain; a random set k is trained in order st.orders[k] only.

    Listed order by order (every condition's first order, then every second order, ...), so an
    experiment stopped early has the same number of orders for every condition."""
    out = []
    for name in conds:
        if name.startswith("c_random"):
            k = int(name.rsplit("_s", 1)[1])
            out.append((name, st.orders[k % len(st.orders)]))
        else:
            out += [(name, o) for o in st.orders]
    return sorted(out, key=lambda job: st.orders.index(job[1]))


def reuse_ranking_run(run_dir: str | Path, pairs: list[dict[str, Any]], out: str | Path, order: int = 0) -> Path | None:
    """Record the ranking run's own after-training answers as job `a_all` in `order`.

    Valid only when the ranking run is the demo's SFT on exactly `pairs` with data-order seed `order`:
    training is bitwise identical with and without the callback, so retraining it would repeat it.
    """
    summary_file = next((f for f in (Path(run_dir) / "smda" / "summary.json", Path(run_dir) / "summary.json") if f.exists()), None)
    if summary_file is None:
        return None
    summary = json.loads(summary_file.read_text())
    after = summary.get("answers", {}).get("after")
    if not after or summary.get("steps") != len(pairs):
        return None
    path = Path(out) / "jobs" / f"a_all__o{order}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"condition": "a_all", "order": order, "n_train": len(pairs), "dropped": [],
                                "source": f"ranking run {run_dir}", **after}, default=float), encoding="utf-8")
    return path


def run_jobs(run_dir: str | Path, pairs: list[dict[str, Any]], sets: dict[str, Any], out: str | Path,
             st: RetrainSettings | None = None, shard: tuple[int, int] = (0, 1), settings: Any = None) -> list[Path]:
    """Run this shard's jobs that have no result file yet; returns the result files written."""
    from .demo import DemoSettings
    from .probing import behaviour

    st = st or RetrainSettings()
    out = Path(out)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    conds = conditions(run_dir, pairs, st)
    (out / "conditions.json").write_text(json.dumps({"settings": asdict(st), "run_dir": str(run_dir), "conditions": conds,
                                                     "predicted": predicted_shift(run_dir, conds)}, indent=1), encoding="utf-8")
    todo = jobs(conds, st)[shard[0]::shard[1]]
    base = settings or DemoSettings()
    written = []
    for name, order in todo:
        path = out / "jobs" / f"{name}__o{order}.json"
        if path.exists():
            continue
        drop = set(conds[name])
        kept = [p for p in pairs if p["id"] not in drop]
        logger.info("retrain %s order %d: %d pairs", name, order, len(kept))
        t0 = time.perf_counter()
        model, tok = train_sft(kept, out / f"tmp_{shard[0]}", DemoSettings(**{**asdict(base), "seed": order}))
        res = {"condition": name, "order": order, "n_train": len(kept), "dropped": sorted(drop),
               "train_seconds": round(time.perf_counter() - t0, 1), **behaviour(model, tok, sets)}
        write_json(path, res, default=float)
        written.append(path)
    return written


METRICS = (("heldout", "refusal_rate_harmful"), ("heldout", "refusal_rate_harmless"), ("heldout", "over_refusal_edgy"),
           ("probes", "refusal_rate_harmful"), ("probes", "refusal_rate_harmless"), ("probes", "over_refusal_edgy"))


def group(name: str) -> str:
    """c_random32_s1 → c_random32: random sets pool into one condition."""
    return name.rsplit("_s", 1)[0] if name.startswith("c_random") else name


def summarize(out: str | Path) -> dict[str, Any]:
    """Mean, sd, min and max of every metric per condition over its jobs, and the issue's claim per N."""
    rows = [json.loads(p.read_text()) for p in sorted((Path(out) / "jobs").glob("*.json"))]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(group(r["condition"]), []).append(r)
    table: dict[str, Any] = {}
    for name, rs in sorted(by.items()):
        entry: dict[str, Any] = {"jobs": len(rs), "n_train": sorted({r["n_train"] for r in rs}),
                                 "orders": sorted(r["order"] for r in rs)}
        for s, m in METRICS:
            v = np.asarray([r[s][m] for r in rs], float)
            entry[f"{s}.{m}"] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                                 "min": float(v.min()), "max": float(v.max())}
        table[name] = entry
    _add_predictions(table, Path(out) / "conditions.json", {r["condition"] for r in rows})
    claims = {}
    for name in table:
        if not name.startswith("b_top"):
            continue
        c = table.get("c_random" + name[len("b_top"):])
        if c is None:
            continue
        b = table[name]
        over = "heldout.refusal_rate_harmless"
        claims[name] = {"over_refusal_gain_points": 100 * (c[over]["mean"] - b[over]["mean"]),
                        "harmful_refusal_diff_points": 100 * (b["heldout.refusal_rate_harmful"]["mean"]
                                                              - c["heldout.refusal_rate_harmful"]["mean"])}
    return {"conditions": table, "claims": claims}


def _add_predictions(table: dict[str, Any], conditions_file: Path, ran: set[str]) -> None:
    """Ledger-predicted vs measured shift of probe refusal relative to a_all, per condition, over the
    removal sets that have finished jobs (so both sides average the same sets)."""
    if "a_all" not in table or not conditions_file.exists():
        return
    predicted = json.loads(conditions_file.read_text()).get("predicted") or {}
    for name, entry in table.items():
        preds = [v for k, v in predicted.items() if group(k) == name and k in ran]
        if not preds or name == "a_all":
            continue
        entry["shift"] = {side: {"predicted": float(np.mean([p[side] for p in preds])),
                                 "measured": entry[f"probes.refusal_rate_{side}"]["mean"] - table["a_all"][f"probes.refusal_rate_{side}"]["mean"]}
                          for side in ("harmless", "harmful")}


def format_summary(s: dict[str, Any]) -> str:
    cols = [f"{a} {b.replace('refusal_rate_', '').replace('over_refusal_', '')}" for a, b in METRICS]
    L = ["| condition | jobs | pairs | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for name, e in s["conditions"].items():
        cells = [f"{100 * e[f'{a}.{b}']['mean']:.0f} ± {100 * e[f'{a}.{b}']['sd']:.0f}" for a, b in METRICS]
        L.append(f"| {name} | {e['jobs']} | {'/'.join(map(str, e['n_train']))} | " + " | ".join(cells) + " |")
    shifts = {n: e["shift"] for n, e in s["conditions"].items() if "shift" in e}
    if shifts:
        L += ["", "| condition | harmless: ledger-predicted | harmless: measured | harmful: ledger-predicted | harmful: measured |",
              "|---|---|---|---|---|"]
        L += [f"| {n} | {100 * v['harmless']['predicted']:+.1f} | {100 * v['harmless']['measured']:+.1f} | "
              f"{100 * v['harmful']['predicted']:+.1f} | {100 * v['harmful']['measured']:+.1f} |" for n, v in shifts.items()]
        L.append("(points of probe refusal vs a_all; predicted = minus the removed pairs' summed credit, a refusal-probability "
                 "change; measured = greedy-answer refusal rate)")
    for name, c in s["claims"].items():
        L.append(f"\n{name} vs random: held-out harmless refusal {c['over_refusal_gain_points']:+.1f} points lower "
                 f"(target ≥ 15) at harmful refusal {c['harmful_refusal_diff_points']:+.1f} points")
    return "\n".join(L)


def parse_shard(text: str) -> tuple[int, int]:
    i, k = (int(v) for v in text.split("/"))
    if not 0 <= i < k:
        raise ValueError(f"--shard {text!r}: want i/k with 0 ≤ i < k, e.g. 0/2")
    return i, k

