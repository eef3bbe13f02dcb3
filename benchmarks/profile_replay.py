"""Where a replay's time goes: cProfile around `lab.replay.replay` on the first N demo pairs, the last K replayed
(docs/credit.md, "What it costs"). Prints the wall time, the replay's own seconds and peak RSS, then the profile by
cumulative time. Compare two commits by running this from two checkouts one after the other on an idle machine.

    python benchmarks/profile_replay.py [--pairs 10] [--last 6] [--every 2] [--outer 16]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

from smda_callback._resources import DATA
from smda_callback.lab.demo import load_pairs
from smda_callback.lab.lds import _snapshotter, _trainer_for
from smda_callback.lab.replay import refusal_groups, refusal_objectives, replay


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--last", type=int, default=6)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--outer", type=int, default=16)
    ap.add_argument("--lines", type=int, default=45)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tr = _trainer_for(load_pairs(DATA / "pairs.jsonl")[:a.pairs], Path(tmp) / "run", 0)
        probes, snap = _snapshotter(tr.processing_class, tr.model)
        objectives = refusal_objectives(snap, refusal_groups(probes))
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        res = replay(tr, objectives, Path(tmp) / "ck", every=a.every, outer=a.outer, last=a.last)
        prof.disable()
    print(f"wall {time.perf_counter() - t0:.1f} s; replay {res['seconds']} s; peak RSS {res['peak_rss_mb']} MB")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(a.lines)


if __name__ == "__main__":
    main()
