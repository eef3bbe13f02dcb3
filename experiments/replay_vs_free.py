"""Where the in-run replay's prediction lies, against the free AR(2) read (issue 25), from a kept file alone: for a
kept run that holds both readers (`replay, last K steps` and the AR(2)-carried own window), the share of each reader's
summed |per-pair score| in each part of the run (before the replayed steps, the replayed steps outside the AR(2)
read's reach, the last `reach` steps), and their Spearman over the pairs of each part. Not a check: a description of
why the replay reads a run the free read does not. Trains nothing, reads no run folder.

    python experiments/replay_vs_free.py benchmarks/lds/lds192o4.json 90 30
(K = 90 replayed steps; 30 = the harmful fit's reach printed by the scorer; the harmless one is 35)
"""

from __future__ import annotations

import json
import sys

import numpy as np

from smda_callback.lab.analysis import spearman
from smda_callback.lab.carry import QUANTITIES
from smda_callback.lab.lds import replay_reader
from smda_callback.lab.specs import REMOVAL_READER


def parts(kept: dict, last: int, reach: int) -> list[str]:
    order, rs = kept["order"], kept["reader_scores"]
    n = len(order)
    bounds = {f"steps 1-{n - last}": (0, n - last), f"steps {n - last + 1}-{n - reach} (replayed, beyond the reach)":
              (n - last, n - reach), f"steps {n - reach + 1}-{n} (the last {reach})": (n - reach, n)}
    out = []
    for q in QUANTITIES:
        rep = np.asarray([rs[f"{replay_reader(last=last)[0]} (dropped in place)"][q].get(i, 0.0) for i in order])
        free = np.asarray([rs[REMOVAL_READER][q].get(i, 0.0) for i in order])
        for name, (a, b) in bounds.items():
            rho = spearman(rep[a:b], free[a:b])  # NaN where either is constant (the steps before the replay)
            out.append(f"{q}, {name}: share of |prediction| replay {np.abs(rep[a:b]).sum() / np.abs(rep).sum():.2f}, "
                       f"free {np.abs(free[a:b]).sum() / np.abs(free).sum():.2f}; Spearman between them {rho:+.2f}")
    return out


if __name__ == "__main__":
    path, last, reach = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print("\n".join(parts(json.loads(open(path).read()), last, reach)))
