"""Where a replay's error sits on a retrained LDS run (docs/validation.md §9, "Where the rest of its error is").
A validation experiment, not part of the package; numpy only, on the files `smda benchmark-lds` wrote.

    python experiments/replay_cutoff.py runs/lds318

1. Cut-off: the replay's dropped-in-place effects summed only over the removed pairs at or after a cut-off step
   (earlier ones read 0, as the trusted span does), LDS against the retrains for a grid of cut-offs; and the same
   counted from the end (the last K steps: what `SMDAConfig(replay_last_steps=K)` gives in the run).
2. Removal size: the same LDS within one removal size, at the trusted span's own start.
3. Early pairs: the residual of the measured change after a linear fit on the trusted span's prediction,
   correlated with the number of harmful and of harmless pairs removed before the span's start.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from smda_callback._resources import DATA
from smda_callback.lab.analysis import spearman
from smda_callback.credit.replay import replay_trusted_from

CUTOFFS = (0, 50, 100, 130, 140, 150, 155, 160, 170, 180, 200, 230, 260, 290)
LAST = (8, 16, 32, 64, 90, 128, 160)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="a `smda benchmark-lds --out` directory with replay.json and finished subsets")
    ap.add_argument("--replay", default="replay.json", help="the replay file to read (replay_fixed_v.json: the fixed-v one)")
    a = ap.parse_args()
    out = Path(a.out)
    jobs = {p.stem: json.loads(p.read_text()) for p in sorted((out / "jobs").glob("*.json"))}
    full = jobs["full0"]
    subs = [j for n, j in sorted(jobs.items()) if n.startswith("s")]
    rep = json.loads((out / a.replay).read_text())
    place = {i: k for k, i in enumerate(rep["order"])}
    label = {d["id"]: d["label"] for f in ("pairs.jsonl", "plants.jsonl")  # a planted run trains plants too
             for d in map(json.loads, (DATA / f).read_text().splitlines())}
    size = np.asarray([len(j["dropped"]) for j in subs])
    print(f"{out}: {len(subs)} subsets, {a.replay}")
    for q in ("harmful", "harmless"):
        meas = np.asarray([j[f"refusal_{q}"] - full[f"refusal_{q}"] for j in subs])
        e = np.asarray(rep["removal_effect"][q])

        def pred(cut: int) -> np.ndarray:
            return np.asarray([sum(e[place[i]] for i in j["dropped"] if place[i] >= cut) for j in subs])

        n = len(e)
        print(f"{q}: LDS by cut-off  " + "  ".join(f"{c}: {spearman(pred(c), meas):+.2f}" for c in CUTOFFS if c < n))
        print(f"  by the last K steps  " + "  ".join(f"{k}: {spearman(pred(n - k), meas):+.2f}" for k in LAST if k <= n))
        start = replay_trusted_from(list(e))
        p = pred(start)
        print(f"  trusted span from step {start}: LDS {spearman(p, meas):+.2f}; by removal size "
              + ", ".join(f"{n} pairs ({(size == n).sum()} subsets): {spearman(p[size == n], meas[size == n]):+.2f}"
                          for n in sorted(set(size))))
        resid = meas - np.polyval(np.polyfit(p, meas, 1), p)
        early = {lab: np.asarray([sum(1 for i in j["dropped"] if place[i] < start and (label[i] == "harmful") == (lab == "harmful"))
                                  for j in subs]) for lab in ("harmful", "harmless")}
        print("  residual vs early pairs removed: " + ", ".join(
            f"{lab} {np.corrcoef(resid, x)[0, 1]:+.2f}" for lab, x in early.items() if np.std(x) > 0))


if __name__ == "__main__":
    main()
