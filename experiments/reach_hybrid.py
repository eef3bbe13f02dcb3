"""In-sample look (issue 25), not a registered check: the AR(2)-carried own window ranks only the pairs its fitted
response reaches (`Forgetting.reach`, ≥ 5 % of its largest; 35–65 windows on every kept run), and on the 318-pair
demo run the pairs further back still move the end. Here every pair beyond the reach is scored by its label's mean own
window instead of ≈ 0 (no forgetting assumed for them, no parameter chosen), and the readers' LDS is recomputed from
the kept files alone (their per-pair reader scores, subsets and retrains); the first column reproduces the kept score
of the carried own window, as a check of this script. Trains nothing, reads no run folder.

    python experiments/reach_hybrid.py benchmarks/lds/lds64x.json benchmarks/lds/lds64o1.json \
        benchmarks/lds/lds64o2.json benchmarks/lds/lds_p2_o2.json benchmarks/lds/lds318.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from smda_callback.lab.carry import QUANTITIES, Forgetting
from smda_callback.lab.lds_score import kept_lds

CARRIED, OWN, LABEL = "own window, carried AR(2)", "own window", "label count"


def lds(scores: dict[str, dict[str, float]], kept: dict) -> dict[str, float]:
    """Per quantity, the reader's LDS on the kept file's subsets."""
    return {q: kept_lds(kept, scores[q], q) for q in QUANTITIES}


def hybrid(kept: dict) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """The carried own window inside each quantity's reach, the label's mean own window beyond it; and the reaches."""
    rs, order = kept["reader_scores"], kept["order"]
    later = {i: len(order) - 1 - k for k, i in enumerate(order)}  # one pair per window in these runs
    out, reach = {}, {}
    for q in QUANTITIES:
        fit = kept["score"]["forgetting_ar2"][q]
        reach[q] = Forgetting(fit["kappa"], (0.0, 0.0), fit["windows"], tuple(fit["b"])).reach(fit["windows"] - 1)
        harmful = {i: rs[LABEL][q].get(i, 0.0) == 1.0 for i in order}
        means = {lab: float(np.mean([rs[OWN][q][i] for i in order if harmful[i] == lab and i in rs[OWN][q]]))
                 for lab in (True, False)}
        out[q] = {i: (rs[CARRIED][q].get(i, 0.0) if later[i] < reach[q] else means[harmful[i]]) for i in order}
    return out, reach


def main(argv: list[str]) -> None:
    print("| kept file | windows | reach harmful / harmless | own window carried AR(2) (kept score) | recomputed "
          "| beyond reach: label's mean own window | label count |")
    print("|---|---|---|---|---|---|---|")
    for path in argv:
        kept = json.loads(Path(path).read_text())
        rs, sc = kept["reader_scores"], kept["score"]["readers"]
        h, reach = hybrid(kept)
        fmt = lambda d: " / ".join(f"{d[q]:+.2f}" for q in QUANTITIES)  # noqa: E731
        print(f"| {Path(path).name} | {len(kept['order'])} | {reach['harmful']} / {reach['harmless']} "
              f"| {fmt({q: sc[CARRIED][q]['lds'] for q in QUANTITIES})} | {fmt(lds(rs[CARRIED], kept))} "
              f"| {fmt(lds(h, kept))} | {fmt(lds(rs[LABEL], kept))} |")


if __name__ == "__main__":
    main(sys.argv[1:])
