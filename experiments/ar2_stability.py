"""How much the AR(2)-carried own window's LDS moves when its fit starts one, two or three windows later: the fit per
quantity (`carry.run_forgetting(order=2)`) against one fit of both quantities (`shared=True`); the first column is
the package's own fit (its first row is the run's second window). Reads the kept LDS
files (measured retrains and the own window's per-pair scores) and each ranking run's ledger; trains nothing.

    python experiments/ar2_stability.py benchmarks/lds/lds64x.json:runs/lds64/run \
        benchmarks/lds/lds64o1.json:runs/lds64o1/run benchmarks/lds/lds64o2.json:runs/lds64o2/run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from smda_callback.lab.carry import QUANTITIES, baseline_means, later_windows, run_forgetting
from smda_callback.lab.lds_score import kept_lds
from smda_callback.ledger import load_policy, load_records


def main(argv: list[str]) -> None:
    starts = (0, 1, 2, 3)
    print("| run | fit | " + " | ".join(f"first row window {s + 2}: LDS harmful / harmless" for s in starts) + " | largest move |")
    print("|---|---|" + "---|" * (len(starts) + 1))
    for arg in argv:
        kept_path, run = arg.split(":")
        kept = json.loads(Path(kept_path).read_text())
        records = [r for r in sorted(load_records(Path(run)), key=lambda r: r["step"]) if "refusal_harmful" in r]
        base = baseline_means(load_policy(Path(run)))
        later = later_windows(records, key="id")
        own = kept["reader_scores"]["own window"]
        for fit, shared in (("per quantity", False), ("joint", True)):
            row = []
            for s in starts:  # the fit's first row is window s + 2 (its lag is window s + 1's increment); s = 0: the package's
                start = base if s == 0 else {q: records[s - 1][f"refusal_{q}"] for q in QUANTITIES}
                fits = run_forgetting(records[s:], start, order=2, shared=shared)
                w = {q: fits[q].weights(max(later.values())) for q in QUANTITIES}
                row.append(tuple(kept_lds(kept, {i: v * w[q][later[i]] for i, v in own[q].items() if i in later}, q)
                                 for q in QUANTITIES))
            moves = max(abs(a[k] - b[k]) for a in row for b in row for k in (0, 1))
            print(f"| {Path(kept_path).stem} | {fit} | " + " | ".join(f"{h:+.2f} / {l:+.2f}" for h, l in row)
                  + f" | {moves:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
