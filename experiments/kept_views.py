"""Descriptive looks (issue 25), not registered checks: what the kept LDS files say without a new retrain.

1. Coherence: over a run's subsets, how far the measured changes of mean harmful- and harmless-probe refusal move
   together, and how far the categories of one label do (mean pairwise Spearman).
2. By category: a reader's predicted change of mean refusal (harmful or harmless) against each category's measured
   change, with the category's final level in the full run; the question is whether a reader fails where refusal is
   near 1 (the "level reading" of the 318-pair seed-0 order).
3. Ensembles: the mean of two or three readers' scores, each divided by its spread over pairs, scored as one reader;
   how many runs it lifts to LDS >= 0.6 on both quantities.

    python experiments/kept_views.py benchmarks/lds/{lds64x,lds64o1,lds64o2,lds_p2_o2,lds96o3,lds192o4,lds318,lds318o5}.json

Chosen on these files, an ensemble that looks best here is a hypothesis for a new run, not a result.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from smda_callback.lab.analysis import spearman
from smda_callback.lab.carry import QUANTITIES
from smda_callback.lab.lds_score import full_refusal, kept_lds, predicted
from smda_callback.probes import ProbeSet
from smda_callback._resources import DATA

REMOVAL = "own window, carried AR(2)"
CANDIDATES = ("own window, carried AR(2)", "own window, carried AR(2) joint", "credit (default), carried AR(2)",
              "credit (default), carried AR(2) joint", "label count, carried AR(2) joint", "step change, carried")


def subset_names(kept: dict[str, Any]) -> list[str]:
    return sorted(n for n in kept["jobs"] if n.startswith("s"))


def measured(kept: dict[str, Any], key: str, category: bool = False) -> np.ndarray:
    """Measured change per subset of mean refusal `key` (a quantity, or a category with `category`)."""
    jobs, full = kept["jobs"], kept["jobs"]["full0"]
    if category:
        return np.asarray([jobs[n]["by_category"][key] - full["by_category"][key] for n in subset_names(kept)])
    ref = full_refusal(jobs)[key]
    return np.asarray([jobs[n][f"refusal_{key}"] - ref for n in subset_names(kept)])


def mean_pairwise(cols: list[np.ndarray]) -> float:
    return float(np.mean([spearman(a, b) for a, b in itertools.combinations(cols, 2)]))


def coherence(kept: dict[str, Any], cats: dict[str, list[str]]) -> dict[str, float]:
    return {"harmful~harmless": spearman(measured(kept, "harmful"), measured(kept, "harmless")),
            **{f"within {q}": mean_pairwise([measured(kept, c, True) for c in cats[q]]) for q in QUANTITIES}}


def by_category(kept: dict[str, Any], reader: str, cats: dict[str, list[str]]) -> list[tuple[str, str, float, float]]:
    """(quantity, category, final level, Spearman of the reader's predicted quantity change vs the category's)."""
    sets = [kept["jobs"][n]["dropped"] for n in subset_names(kept)]
    rows = []
    for q in QUANTITIES:
        pred = predicted(kept["reader_scores"][reader][q], sets)
        for c in cats[q]:
            rows.append((q, c, kept["jobs"]["full0"]["by_category"][c], spearman(pred, measured(kept, c, True))))
    return rows


def ensemble(kept: dict[str, Any], readers: tuple[str, ...], q: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in readers:
        s = kept["reader_scores"][r][q]
        spread = float(np.std(list(s.values()))) or 1.0
        for i, v in s.items():
            out[i] = out.get(i, 0.0) + v / spread
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    runs = {Path(f).stem: json.loads(Path(f).read_text()) for f in args.files}
    probes = ProbeSet.from_jsonl(DATA / "probes.jsonl")
    cats = {q: sorted({p.category for p in probes.probes if p.label == q}) for q in QUANTITIES}

    print("## Coherence of the measured changes (Spearman over subsets)")
    print("| run | final harmful / harmless | harmful ~ harmless | within harmful categories | within harmless |")
    print("|---|---|---|---|---|")
    for name, kept in runs.items():
        c, f = coherence(kept, cats), full_refusal(kept["jobs"])
        print(f"| {name} | {f['harmful']:.3f} / {f['harmless']:.3f} | {c['harmful~harmless']:+.2f} | "
              f"{c['within harmful']:+.2f} | {c['within harmless']:+.2f} |")

    print(f"\n## By category: {REMOVAL} (predicted mean change vs each category's measured change)")
    rows = {name: by_category(kept, REMOVAL, cats) for name, kept in runs.items()}
    for name, rs in rows.items():
        print(f"{name}: " + ", ".join(f"{c} {lvl:.2f}/{rho:+.2f}" for q, c, lvl, rho in rs if q == "harmful"))
    print("| quantity | category level | categories (all runs) | mean Spearman | runs they come from |")
    print("|---|---|---|---|---|")
    for q in QUANTITIES:
        for lo, hi in ((0.0, 0.3), (0.3, 0.6), (0.6, 0.8), (0.8, 0.9), (0.9, 1.01)):
            got = [(n, rho) for n, rs in rows.items() for qq, c, lvl, rho in rs if qq == q and lo <= lvl < hi]
            if got:
                src = sorted({n for n, _ in got})
                print(f"| {q} | {lo:.1f}–{min(hi, 1.0):.1f} | {len(got)} | {np.mean([r for _, r in got]):+.2f} | "
                      f"{', '.join(src) if len(src) <= 3 else f'{len(src)} runs'} |")

    print("\n## Ensembles of free readers: runs with LDS >= 0.6 / >= 0.39 on both; mean over runs of the lower LDS")
    scored = []
    for k in (1, 2, 3):
        for combo in itertools.combinations(CANDIDATES, k):
            if not all(r in kept["reader_scores"] for kept in runs.values() for r in combo):
                continue
            lds = np.asarray([[kept_lds(kept, ensemble(kept, combo, q), q) for q in QUANTITIES] for kept in runs.values()])
            low = lds.min(axis=1)
            scored.append((int((low >= 0.6).sum()), int((low >= 0.39).sum()), float(low.mean()), combo))
    scored.sort(key=lambda x: (-x[0], -x[2]))
    for n6, n39, m, combo in scored[:6] + [s for s in scored if s[3] == (REMOVAL,)]:
        print(f"{n6} / {n39} of {len(runs)}  mean lower {m:+.3f}  {' + '.join(combo)}")


if __name__ == "__main__":
    main()
