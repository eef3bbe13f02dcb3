"""Where each planted pair of a finished `smda benchmark-poison` run sits (docs/validation.md §10, "Two more fresh
plantings"): its training step, the mean refusal of the harmful and harmless probes just before that step, the lr of
its step, and its own-window credit and rank within its label (what `smda suspects` reads). A validation aid, not part
of the package.

    python experiments/plant_steps.py runs/poison_p5_o5 runs/poison_p6_o6
"""

from __future__ import annotations

import argparse
from pathlib import Path

from smda_callback.lab.demo import load_pairs
from smda_callback.ledger import load_credits, load_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="finished `smda benchmark-poison --out DIR` folders (one pair per step)")
    for d in map(Path, ap.parse_args().runs):
        recs = load_records(d / "run")
        pairs = {p["id"]: p for p in load_pairs(d / "pairs.jsonl")}
        credits = load_credits(d / "run")
        id_of = {p["hash"]: p.get("id") for r in recs for p in r.get("pairs", [])}
        step_of = {p.get("id"): i for i, r in enumerate(recs) for p in r.get("pairs", [])}
        own = {id_of[c["hash"]]: c["own"] for c in credits["pairs"] if c["hash"] in id_of}
        for kind, q, sign, label in (("over-refusal", "refusal_harmless", 1, "harmless"),
                                     ("compliance", "refusal_harmful", -1, "harmful")):
            pool = sorted(((sign * own[i][q], i) for i in own if pairs[i]["label"] == label), reverse=True)
            rank = {i: k + 1 for k, (_, i) in enumerate(pool)}
            print(f"{d.name} {kind}")
            for i in sorted((i for i in own if pairs[i].get("plant") == kind), key=lambda i: step_of[i]):
                t = step_of[i]
                before = (f"harmful {recs[t - 1]['refusal_harmful']:.3f} harmless {recs[t - 1]['refusal_harmless']:.3f}"
                          if t else "harmful/harmless: the baseline")
                print(f"  step {t:3d}  rank {rank[i]:3d}/{len(pool)}  own {sign * own[i][q]:+.4f}  before: {before}  "
                      f"lr {recs[t]['credit']['lrs'][0]:.1e}  {i}  {pairs[i]['prompt'][:48]!r}")
            print()


if __name__ == "__main__":
    main()
