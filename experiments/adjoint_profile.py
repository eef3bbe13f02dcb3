"""Where does the replay's adjoint live? (issue 25; docs/validation.md §9, "Where the replay blows up"). A validation
experiment, not part of the package.

Replays steps [S, E) of the 318-pair demo run (the ranking run of `make lds-full`, its order read from
runs/lds318/subsets.json) with f = mean first-token refusal of the harmful probes at θ_E, and prints after every
reverse step the norms of the adjoints of θ, m and v, the share of each on coordinates whose Adam denominator
√v̂ is below 1e-6 (100 × AdamW's ε), and the parameters that carry most of it.

    python experiments/adjoint_profile.py 120 156            # steps 120–155 (≈ 10 min on the 2-core machine)
    python experiments/adjoint_profile.py 120 156 --reverse-eps 1e-6
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from smda_callback._resources import DATA
from smda_callback.credit import replay as R
from smda_callback.lab.demo import load_pairs
from smda_callback.lab.lds import _snapshotter, _trainer_for
from smda_callback.lab.replay import Stepper, refusal_groups, refusal_objectives, replay_steps

TINY = 1e-6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("start", type=int)
    ap.add_argument("end", type=int)
    ap.add_argument("--lds-dir", default="runs/lds318")
    ap.add_argument("--reverse-eps", type=float, default=0.0)
    ap.add_argument("--work", default="/tmp/adjoint_profile")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    order = json.loads(Path(a.lds_dir, "subsets.json").read_text())["order"]
    pairs = {p["id"]: p for p in load_pairs(DATA / "pairs.jsonl")}
    tr = _trainer_for([pairs[i] for i in order[:a.end]], Path(a.work), 0)
    probes, snap = _snapshotter(tr.processing_class, tr.model)
    objs = {"harmful": refusal_objectives(snap, refusal_groups(probes))["harmful"]}
    run = Stepper(tr)
    for t in range(a.start):
        run.step(t)
    tail = run.tail(a.start)
    orig = R.Steps.vjp

    def vjp(self, t, post, adjoints, variant=R.EXACT):
        orig(self, t, post, adjoints, variant)
        A = adjoints["harmful"]
        tot, small, rows = {"theta": 0.0, "m": 0.0, "v": 0.0}, {"theta": 0.0, "m": 0.0}, []
        for i, name in enumerate(self.names):
            b2 = self.hp[i]["betas"][1]
            tiny = post.v[i].sqrt() / math.sqrt(1 - b2 ** (self.start + t + 1)) < TINY
            sq = {key: float(A[key][i].double().pow(2).sum()) for key in ("theta", "m", "v")}
            for key in tot:
                tot[key] += sq[key]
            for key in small:
                small[key] += float(A[key][i][tiny].double().pow(2).sum())
            rows.append((sq["theta"], sq["m"], name, float(tiny.double().mean())))
        print(f"step {self.start + t}: |A_th| {tot['theta'] ** .5:.3e} (share on √v̂<{TINY:g}: {small['theta'] / tot['theta']:.3f}) "
              f"|A_m| {tot['m'] ** .5:.3e} (share: {small['m'] / max(tot['m'], 1e-300):.3f}) |A_v| {tot['v'] ** .5:.3e}", flush=True)
        print("   top θ:", ", ".join(f"{n} {x ** .5:.2e} (tiny {f:.3f})" for x, _, n, f in sorted(rows, reverse=True)[:4]), flush=True)
        print("   top m:", ", ".join(f"{n} {y ** .5:.2e} (tiny {f:.3f})" for _, y, n, f in sorted(rows, key=lambda r: -r[1])[:4]),
              flush=True)

    R.Steps.vjp = vjp
    res = replay_steps(tail, objs, Path(a.work) / "ck", every=4, variant=R.ReplayVariant(reverse_eps=a.reverse_eps))
    print("effects", [f"{x:+.2e}" for x in res["removal_effect"]["harmful"]])


if __name__ == "__main__":
    main()
