"""The readers of several kept LDS runs side by side (`smda lds-runs benchmarks/lds/*.json`).

Each kept file (`lds_score.keep`, `smda benchmark-lds --keep`) holds one ranking run's retrains and every reader's LDS
on them. One file says how a reader did on one run; the question a user asks is whether it holds across runs: on how
many runs a reader clears a threshold on both quantities, and how far it is from the best reader that costs nothing
on each. A reader is *free* when the run's own ledger gives it (the in-run credits, the carried readers, the label
count): not a replay, a peer at the final weights, the summed leave-one-out retrains, or the random control.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .carry import QUANTITIES
from .lds_score import ADDITIVE
from .specs import REMOVAL_READER


def is_free(reader: str) -> bool:
    """Whether a reader comes from the run's ledger alone (no replay, peer or retrain) and is not the random control."""
    return not (reader.startswith("replay") or reader.endswith("(final weights)") or reader in (ADDITIVE, "random"))


def load_run(path: str | Path) -> dict[str, Any]:
    """One kept file, or a `smda benchmark-lds` output folder (its lds.json, written by every scoring, and its
    subsets.json), as {"name", "n_pairs", "seed", "n_subsets", "full_refusal", "chance", "lds": {reader: {q: LDS}},
    "order"}."""
    path = Path(path)
    try:
        if path.is_dir():  # a run not kept yet: the scorer's last output and the run's settings
            kept = {"score": json.loads((path / "lds.json").read_text()), **json.loads((path / "subsets.json").read_text())}
        else:
            kept = json.loads(path.read_text())
        s, settings = kept["score"], kept["settings"]
        lds = {name: {q: float(r[q]["lds"]) for q in QUANTITIES} for name, r in s["readers"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a kept LDS file or a scored benchmark-lds folder ({type(e).__name__}: {e}); score "
                         "a folder with `smda benchmark-lds -o DIR ... --score-only` (add --keep FILE to keep it; "
                         "benchmarks/lds/ holds the project's)") from None
    return {"name": path.stem, "n_pairs": s.get("n_pairs"), "seed": settings.get("seed"), "n_subsets": s.get("n_subsets"),
            "full_refusal": s.get("full_refusal"), "measured": s.get("measured_abs_mean"), "chance": s.get("chance", {}),
            "lds": lds, "order": kept.get("order")}


def same_run(runs: list[dict[str, Any]]) -> list[list[str]]:
    """Groups of files (by name) whose ranking runs share one training order: one run scored more than once (other
    subsets, other readers), which `compare` would count as several runs."""
    by_order: dict[tuple[str, ...], list[str]] = {}
    for run in runs:
        if run.get("order"):
            by_order.setdefault(tuple(run["order"]), []).append(run["name"])
    return [names for names in by_order.values() if len(names) > 1]


def compare(runs: list[dict[str, Any]], reader: str = REMOVAL_READER, margin: float = 0.05,
            thresholds: tuple[float, ...] = (0.39, 0.6)) -> dict[str, Any]:
    """Per run, `reader`'s LDS beside the best free reader by the mean of the two quantities (`is_free`; `reader`
    itself counts), the gap between their means, and whether `reader` is within `margin` of it; over the runs that
    have `reader`, how many it is within `margin` on and how many it reaches each threshold on, on both quantities."""
    if not runs:
        raise ValueError("no kept LDS files given")
    rows = []
    for run in runs:
        free = {n: v for n, v in run["lds"].items() if is_free(n) and not any(np.isnan(v[q]) for q in QUANTITIES)}
        if not free:
            raise ValueError(f"{run['name']}: no free reader scored (a kept file of `smda benchmark-lds` has the credit and label count)")
        best = max(free, key=lambda n: float(np.mean([free[n][q] for q in QUANTITIES])))
        best_mean = float(np.mean([free[best][q] for q in QUANTITIES]))
        own = run["lds"].get(reader)
        row = {"run": run["name"], "best": best, "best_lds": free[best], "lds": own}
        if own is not None:
            row["gap"] = float(np.mean([own[q] for q in QUANTITIES])) - best_mean
            row["within"] = row["gap"] >= -margin
        rows.append(row)
    have = [r for r in rows if r["lds"] is not None]
    return {"reader": reader, "margin": margin, "runs": rows, "n_with_reader": len(have),
            "within": sum(r["within"] for r in have),
            "at_least": {str(t): sum(all(r["lds"][q] >= t for q in QUANTITIES) for r in have) for t in thresholds}}


def _cell(v: dict[str, float] | None, chance: dict[str, list[float]]) -> str:
    if v is None:
        return "–"

    def one(q: str) -> str:
        band = chance.get(q)
        star = "*" if band and not any(np.isnan(band)) and not band[0] <= v[q] <= band[1] else ""
        return f"{v[q]:+.2f}{star}"
    return " / ".join(one(q) for q in QUANTITIES)


def _level(v: dict[str, float] | None) -> str:
    """A run's own quantity (final refusal, mean |measured change|), harmful / harmless; – where the file has none."""
    if not isinstance(v, dict) or any(not isinstance(v.get(q), (int, float)) for q in QUANTITIES):
        return "–"
    return " / ".join(f"{v[q]:.3f}" for q in QUANTITIES)


def format_runs(runs: list[dict[str, Any]], cmp: dict[str, Any], readers: list[str] | None = None) -> str:
    """A markdown table, readers by run (LDS harmful / harmless, * outside the run's chance band) under two rows of
    each run's own levels (final refusal of the full run, mean absolute measured change), then `cmp` (`compare`) in
    words. `readers`: the rows (default: every reader any run has, in first-seen order)."""
    names = readers or list(dict.fromkeys(n for run in runs for n in run["lds"]))
    head = ["reader"] + [f"{r['name']} ({r['n_pairs']} pairs, seed {r['seed']})" for r in runs]
    L = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for what, key in (("final refusal of the full run", "full_refusal"), ("mean absolute measured change over subsets", "measured")):
        L.append(f"| *{what}* | " + " | ".join(_level(r.get(key)) for r in runs) + " |")
    for n in names:
        mark = "" if is_free(n) else " (not free)"
        L.append(f"| {n}{mark} | " + " | ".join(_cell(r["lds"].get(n), r["chance"]) for r in runs) + " |")
    L += ["", f"LDS harmful / harmless refusal; * outside the run's chance band (random readers on the same subsets). "
          f"Best free reader by the mean of the two, and how far `{cmp['reader']}` is from it:", ""]
    for row in cmp["runs"]:
        best = f"{row['best']} ({_cell(row['best_lds'], {})})"
        if row["lds"] is None:
            L.append(f"- {row['run']}: best free {best}; `{cmp['reader']}` not scored in this file")
        else:
            L.append(f"- {row['run']}: best free {best}; `{cmp['reader']}` {_cell(row['lds'], {})}, "
                     f"{row['gap']:+.2f} from it")
    n = cmp["n_with_reader"]
    L += ["", f"`{cmp['reader']}`: within {cmp['margin']:.2f} of the best free reader on {cmp['within']} of {n} runs; "
          + "; ".join(f"≥ {t} on both quantities on {k} of {n}" for t, k in cmp["at_least"].items())]
    for names in same_run(runs):
        L.append(f"Note: {', '.join(names)} share one training order (one ranking run scored more than once) and are "
                 "counted as separate runs above; give one of them for a count over distinct runs.")
    return "\n".join(L)
