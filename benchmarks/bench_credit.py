"""Per-step cost of the credit rules on the embedded model, side by side in one run.

For batch 1 and batch 8 (one optimizer step each), SFTTrainer + SMDACallback runs a few steps under
`credit="step"`, `credit="optimizer"` with `deconvolve` (default) and with `ghost`; configurations are
interleaved (round-robin) so machine noise hits all alike. Reported: the callback's own seconds per
step (ledger `seconds`: probe pass, ghost pass, split inside the step, bookkeeping) and the whole
step (SFT + callback), as medians and ratios to `step` credit. Writes benchmarks/credit_results.json.
Usage: python benchmarks/bench_credit.py [--steps 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from smda_callback import SMDACallback, SMDAConfig, embedded_sae_dir
from smda_callback.lab.demo import DATA, DemoSettings, load_pairs, sft_config, to_dataset
from smda_callback.ledger import load_records
from smda_callback.lab.models import load_model
from smda_callback.probes import ProbeSet

RULES = {"step": dict(credit="step"), "optimizer-deconvolve": dict(credit="optimizer"),
         "optimizer-ghost": dict(credit="optimizer", credit_measure="ghost")}


def one(out: Path, batch: int, rule: str, steps: int, pairs: list, probes: ProbeSet) -> tuple[list[float], float]:
    from trl import SFTTrainer

    model, tok = load_model()
    args = sft_config(out, DemoSettings())
    args.per_device_train_batch_size = batch
    args.max_steps = steps
    args.warmup_steps = 0
    args.disable_tqdm = True
    args.report_to = []
    cfg = SMDAConfig(scorer="first_token", probe_batch_size=16, **RULES[rule])
    cb = SMDACallback(probes, embedded_sae_dir(), cfg)
    tr = SFTTrainer(model=model, args=args, train_dataset=to_dataset(pairs[: batch * steps]), processing_class=tok, callbacks=[cb])
    cb.bind(tr)
    t0 = time.perf_counter()
    tr.train()
    wall = (time.perf_counter() - t0) / steps
    return [r["seconds"] for r in load_records(out)], wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    pairs = load_pairs(DATA / "pairs.jsonl")
    probes = ProbeSet.from_jsonl(DATA / "probes.jsonl")
    res: dict[str, dict[str, dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(a.rounds):
            for batch in (1, 8):
                for rule in RULES:
                    cb_s, wall = one(Path(tmp) / f"{rnd}-{batch}-{rule}", batch, rule, a.steps, pairs, probes)
                    d = res.setdefault(str(batch), {}).setdefault(rule, {"callback": [], "step_wall": []})
                    d["callback"] += cb_s[1:]  # the first step warms caches
                    d["step_wall"].append(wall)
    table = {}
    print(f"{'batch':>5} {'rule':22s} {'callback s/step':>16} {'ratio':>6} {'whole step s':>13} {'ratio':>6}")
    for batch, rules in res.items():
        base_cb = statistics.median(rules["step"]["callback"])
        base_wall = statistics.median(rules["step"]["step_wall"])
        for rule, d in rules.items():
            cb, wall = statistics.median(d["callback"]), statistics.median(d["step_wall"])
            table[f"{batch}/{rule}"] = {"callback_s": cb, "callback_ratio": cb / base_cb, "step_s": wall, "step_ratio": wall / base_wall}
            print(f"{batch:>5} {rule:22s} {cb:16.2f} {cb / base_cb:6.2f} {wall:13.2f} {wall / base_wall:6.2f}")
    (Path(__file__).resolve().parent / "credit_results.json").write_text(json.dumps({"raw": res, "table": table}, indent=1))


if __name__ == "__main__":
    main()
