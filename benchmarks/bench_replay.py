"""What `SMDAConfig(replay_last_steps=K)` costs on the embedded model, side by side in one run.

Each configuration trains the same demo pairs (batch 1, one optimizer step each) with SMDACallback in its own
process, so that each peak memory is its own; configurations alternate round by round so machine noise hits all
alike. `off`: the default callback; `replay K`: the same with the last K steps replayed after training.
Reported: training seconds per step (SFT + callback, the replay excluded), the replay's seconds per replayed step,
both as ratios to `off`'s training step, and each process's peak RSS. Writes benchmarks/replay_results.json.
Usage: python benchmarks/bench_replay.py [--steps 12] [--last 6] [--rounds 1] [--checkout DIR ...]
`--checkout DIR` (a checkout of another commit, e.g. `git worktree add /tmp/old <commit>`) also runs the replay
configuration with that checkout's package, in the same rounds: a before/after comparison measured side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from trl import SFTTrainer
from smda_callback import SMDACallback, SMDAConfig, embedded_sae_dir
from smda_callback.lab.demo import DATA, DemoSettings, load_pairs, sft_config, to_dataset
from smda_callback.lab.models import load_model
from smda_callback.probes import ProbeSet

out, steps, last = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model, tok = load_model()
args = sft_config(out, DemoSettings())
args.max_steps, args.disable_tqdm, args.report_to = steps, True, []
cfg = SMDAConfig(scorer="first_token", probe_batch_size=16, replay_last_steps=last)
cb = SMDACallback(ProbeSet.from_jsonl(DATA / "probes.jsonl"), embedded_sae_dir(), cfg)
pairs = load_pairs(DATA / "pairs.jsonl")[:steps]
tr = SFTTrainer(model=model, args=args, train_dataset=to_dataset(pairs), processing_class=tok, callbacks=[cb])
cb.bind(tr)
t0 = time.perf_counter()
tr.train()
wall = time.perf_counter() - t0
rep = out / "smda" / "replay.json"
replay = json.loads(rep.read_text())["seconds"] if rep.exists() else 0.0
print("RESULT " + json.dumps({"train_per_step": (wall - replay) / steps, "replay": replay,
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child_result(code: str, argv: list[str], cwd: Path, what: str) -> dict:
    """Run `code` in its own Python process (its own peak memory) from `cwd`, whose package `python -c` imports, and
    return the JSON it prints on its "RESULT " line; exit with its stderr's tail if it fails (`what` names the run)."""
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=cwd)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        raise SystemExit(f"{Path(sys.argv[0]).stem}: {what} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def one(out: Path, steps: int, last: int, checkout: Path) -> dict[str, float]:
    return child_result(CHILD, [str(out), str(steps), str(last)], checkout, f"the run with replay_last_steps={last}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--last", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--checkout", nargs="*", default=[], metavar="DIR", help="also replay with these checkouts' package")
    a = ap.parse_args()
    here = Path(__file__).resolve().parents[1]

    def commit(d: Path) -> str:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=d, capture_output=True, text=True).stdout.strip()

    configs = [("off", 0, here), (f"replay {a.last}", a.last, here)]
    configs += [(f"replay {a.last} @ {commit(Path(d))}", a.last, Path(d).resolve()) for d in a.checkout]
    res: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(a.rounds):
            for k, (name, last, checkout) in enumerate(configs):
                res[name].append(one(Path(tmp) / f"{rnd}-{k}", a.steps, last, checkout))
    base = statistics.median(r["train_per_step"] for r in res["off"])
    table = {}
    print(f"package at {commit(here)}")
    print(f"{'config':24s} {'train s/step':>13} {'ratio':>6} {'replay s/replayed step':>23} {'ratio':>6} {'peak RSS MB':>12}")
    for name, runs in res.items():
        train = statistics.median(r["train_per_step"] for r in runs)
        per = statistics.median(r["replay"] for r in runs) / a.last if name != "off" else 0.0
        rss = max(r["peak_rss_mb"] for r in runs)
        table[name] = {"train_s_per_step": train, "train_ratio": train / base, "replay_s_per_replayed_step": per,
                       "replay_step_ratio": per / base, "peak_rss_mb": rss}
        print(f"{name:24s} {train:13.2f} {train / base:6.2f} {per:23.2f} {per / base:6.2f} {rss:12.0f}")
    out = {"commit": commit(here), "steps": a.steps, "last": a.last, "rounds": a.rounds, "table": table, "runs": res}
    keep_run("replay_results.json", "python benchmarks/bench_replay.py --steps S --last K --rounds R [--checkout DIR] "
             "(each run alone)", out)


def keep_run(name: str, command: str, out: dict) -> None:
    """Append this run (with its arguments) to benchmarks/`name`, every run kept, newest last."""
    path = Path(__file__).with_name(name)
    kept = json.loads(path.read_text()) if path.exists() else {}
    kept["command"] = command
    kept["runs"] = [*kept.get("runs", []), {**out, "args": sys.argv[1:]}]
    path.write_text(json.dumps(kept, indent=1))


if __name__ == "__main__":
    main()
