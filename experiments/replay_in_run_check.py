"""The callback's replay of a run's last steps against the lab replay of the same run, on the embedded 135M model.
A check, not part of the package (docs/credit.md, "The replay in your own run").

    python experiments/replay_in_run_check.py OUT [--pairs 24] [--last 8]

1. The demo's training (`run_demo`, answers skipped) on the first N shipped pairs with
   SMDAConfig(replay_last_steps=K): OUT/smda/replay.json, written by the callback after the last step.
2. The lab replay of the same run (`lds.replay_recorded`: the order read off the run's ledger, the demo's settings
   and seed, a sequential sampler, only the last K steps replayed).
3. Per quantity, the largest |difference| of the two removal effects over the K steps, beside the largest |effect|.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from smda_callback._resources import DATA
from smda_callback.lab.demo import DemoSettings, load_pairs, run_demo
from smda_callback.lab.lds import records_order, replay_recorded
from smda_callback.ledger import load_replay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--last", type=int, default=8)
    a = ap.parse_args()
    out = Path(a.out)
    st = DemoSettings(limit=a.pairs, replay_last_steps=a.last, check_answers=False)
    run_demo(out, settings=st, say=print)
    cb = load_replay(out)
    if cb is None:
        raise SystemExit(f"{out}: the callback wrote no replay.json (see the log above)")
    order = records_order(out / "smda")
    pairs = {p["id"]: p for p in load_pairs(DATA / "pairs.jsonl", a.pairs)}
    lab = replay_recorded(out / "lab", pairs, order, st.seed, every=2, outer=4, last=a.last)
    print(f"{len(order)} steps, the last {a.last} replayed by the callback (steps {cb['first_step']}-{cb['last_step']}); "
          f"callback recompute gap to the trained weights {cb['recompute_gap_to_run']:.1e}, its replay {cb['seconds']:.0f} s, "
          f"the lab's {lab['seconds']:.0f} s")
    for q in ("harmful", "harmless"):
        got = np.asarray([s["removal_effect"][q] for s in cb["steps"]])
        want = np.asarray(lab["removal_effect"][q][-a.last:])
        print(f"{q}: final {cb['final'][q]:.6f} (lab {lab['final'][q]:.6f}); max |effect| {np.abs(want).max():.3e}, "
              f"max |callback - lab| {np.abs(got - want).max():.3e}; pairs in order: "
              f"{[p['id'] for s in cb['steps'] for p in s['pairs']] == order[-a.last:]}")
    (out / "replay_check.json").write_text(json.dumps({"callback": cb["steps"], "lab": lab["removal_effect"]}, default=float))


if __name__ == "__main__":
    main()
