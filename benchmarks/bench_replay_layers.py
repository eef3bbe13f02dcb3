"""What the replay restricted to the last L transformer blocks (`smda benchmark-lds --replay-layers L`) costs against
the whole replay, side by side in one run.

Each configuration replays the same short demo run (the first `--steps` shipped pairs, one AdamW step each, the demo's
settings; its two quantities, mean refusal on the harmful and on the harmless probes) in its own process, so that each
peak memory is its own; configurations alternate round by round so machine noise hits all alike. Reported per
configuration: the replay's seconds (the forward pass that writes the checkpoints, the recomputation and the reverse
pass), their ratio to the whole replay's (`layers 0`), the parameters linearised and the process's peak RSS.
Writes benchmarks/replay_layers_results.json (every run kept, newest last).
Usage: python benchmarks/bench_replay_layers.py [--steps 16] [--layers 0 2 8 30] [--rounds 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench_replay import child_result, keep_run  # this folder is on sys.path when run as a script

CHILD = r"""
import json, resource, sys
from pathlib import Path
from smda_callback._resources import DATA
from smda_callback.lab.demo import load_pairs
from smda_callback.lab.lds import _snapshotter, _trainer_for
from smda_callback.lab.replay import ReplayVariant, refusal_groups, refusal_objectives, replay

tmp, steps, layers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
trainer = _trainer_for(load_pairs(DATA / "pairs.jsonl", steps), tmp / "o", 0)
probes, snap = _snapshotter(trainer.processing_class, trainer.model)
res = replay(trainer, refusal_objectives(snap, refusal_groups(probes)), tmp / "w", every=4,
             variant=ReplayVariant(layers=layers))
print("RESULT " + json.dumps({"seconds": res["seconds"], "linearised": res["linearised_parameters"],
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "removal_effect": res["removal_effect"]}))
"""


def one(tmp: Path, steps: int, layers: int, here: Path) -> dict:
    return child_result(CHILD, [str(tmp), str(steps), str(layers)], here, f"the replay with layers={layers}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 2, 8, 30])
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    if 0 not in a.layers:
        a.layers = [0, *a.layers]  # the whole replay is the reference of every ratio
    here = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
    res: dict[int, list[dict]] = {k: [] for k in a.layers}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(a.rounds):
            for k in a.layers:
                res[k].append(one(Path(tmp) / f"{rnd}-{k}", a.steps, k, here))
                print(f"round {rnd}, layers {k}: {res[k][-1]['seconds']:.0f} s", flush=True)
    base = statistics.median(r["seconds"] for r in res[0])
    table = {}
    print(f"package at {commit}; {a.steps} steps replayed, {a.rounds} round(s)")
    print(f"{'layers':>7} {'linearised':>12} {'replay s':>9} {'ratio':>6} {'peak RSS MB':>12}")
    for k, runs in res.items():
        sec = statistics.median(r["seconds"] for r in runs)
        rss = max(r["peak_rss_mb"] for r in runs)
        table[str(k)] = {"linearised_parameters": runs[0]["linearised"], "replay_seconds": sec, "ratio_to_whole": sec / base,
                         "peak_rss_mb": rss}
        print(f"{k:7d} {runs[0]['linearised']:12,d} {sec:9.1f} {sec / base:6.2f} {rss:12.0f}")
    out = {"commit": commit, "steps": a.steps, "rounds": a.rounds, "table": table,
           "seconds": {str(k): [r["seconds"] for r in v] for k, v in res.items()}}
    keep_run("replay_layers_results.json", "python benchmarks/bench_replay_layers.py --steps S --layers L... --rounds R "
             "(alone on the machine)", out)


if __name__ == "__main__":
    main()
