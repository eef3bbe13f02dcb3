"""Why the label count reads +0.21 on one data order of the 64-pair run and +0.61 on another (issue 25): what removing
a pair of each label moves at the end, by the pair's place, over each kept LDS file's random subsets (least squares of
the measured change on the removed pairs counted per label and band of places), and the label count carried by the
run's own AR(2) response (a harmful pair scores 1 × the fit's weight at its place, a harmless one 0). Reads the kept
files and the ranking runs' ledgers; trains nothing.

    python experiments/label_by_place.py benchmarks/lds/lds64x.json:runs/lds64/run \
        benchmarks/lds/lds64o1.json:runs/lds64o1/run benchmarks/lds/lds64o2.json:runs/lds64o2/run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from smda_callback.lab.carry import QUANTITIES, baseline_means, later_windows, run_forgetting
from smda_callback.lab.lds_score import predicted
from smda_callback.ledger import load_policy, load_records

BANDS = ((0, 12), (12, 24), (24, 40), (40, 64))  # windows after the pair's own, as in error_by_place.py's bands


def main(argv: list[str]) -> None:
    print("| run | harmful pairs per band (" + ", ".join(f"{a}–{b - 1}" for a, b in BANDS) + " windows before the end) "
          "| quantity | change per harmful pair removed, by band | per harmless pair removed, by band | R² | label count LDS "
          "| label count carried AR(2) LDS |")
    print("|---|---|---|---|---|---|---|---|")
    for arg in argv:
        kept_path, run = arg.split(":")
        kept = json.loads(Path(kept_path).read_text())
        records = load_records(Path(run))
        later = later_windows(records, key="id")
        fits = run_forgetting(records, baseline_means(load_policy(Path(run))), order=2)
        harmful = {i: bool(v) for i, v in kept["reader_scores"]["label count"]["harmful"].items()}
        names = sorted(n for n in kept["subsets"] if n in kept["jobs"])
        band = {i: next(b for b, (lo, hi) in enumerate(BANDS) if lo <= later[i] < hi) for i in later}
        per_band = [sum(harmful[i] and band[i] == b for i in later) for b in range(len(BANDS))]
        X = np.array([[sum(harmful[i] == h and band[i] == b for i in kept["subsets"][n])
                       for h in (True, False) for b in range(len(BANDS))] for n in names], dtype=np.float64)
        for q in QUANTITIES:
            y = np.array([kept["jobs"][n][f"refusal_{q}"] - kept["jobs"]["full0"][f"refusal_{q}"] for n in names])
            coef = np.linalg.lstsq(X, y, rcond=None)[0]
            r2 = 1 - ((y - X @ coef) ** 2).sum() / ((y - y.mean()) ** 2).sum()
            w = fits[q].weights(max(later.values()))
            sets = [kept["subsets"][n] for n in names]
            count = predicted({i: float(h) for i, h in harmful.items()}, sets)
            carried = predicted({i: harmful[i] * w[later[i]] for i in later}, sets)
            nb = len(BANDS)
            print(f"| {Path(kept_path).stem} | {' / '.join(map(str, per_band))} | {q} | "
                  + " / ".join(f"{c:+.3f}" for c in coef[:nb]) + " | " + " / ".join(f"{c:+.3f}" for c in coef[nb:])
                  + f" | {r2:.2f} | {spearmanr(count, y)[0]:+.2f} | {spearmanr(carried, y)[0]:+.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
