"""Cheap first-order readers at the end of a recorded run, beside the replay (issue 25; docs/validation.md §9,
"Cheaper than the replay?"). A validation experiment, not part of the package.

The replay carries each removal through the later steps exactly. Cheaper guesses of the same number use only the
end of the run: λ = ∂f/∂θ at the final weights (f: mean first-token refusal of the harmful / harmless probes) and
each step's gradient of its own pair's loss re-taken *at the final weights* (one plain backward per step, no
recomputed states), scaled by the clipping factor the step really had:

- `tracin`: lr_t · ⟨λ, g_t⟩ (plain gradient step, TracIn at the final weights with the run's lrs);
- `adam`: ⟨λ, carry_t · g_t / D_T⟩, Adam's update as the final moments precondition it: D_T = √(v_T / bc2) + ε and
  carry_t = Σ_{s ≥ t} lr_s (1 − β1) β1^{s−t} / bc1_s, what g_t moves θ by through the momentum over the rest of the run.

Each is written in the replay's file format (`removal_effect` per step, dropped-in-place = weight zero here) under the
LDS directory as endgrad_<reader>.json, so that `python experiments/replay_cutoff.py DIR --replay FILE` scores it, whole
and by the last K steps, against the retrains (`smda benchmark-lds --score-only` does not read these files).

    python experiments/end_gradient.py runs/lds318                     # the ranking run of `make lds-full`
    python experiments/end_gradient.py runs/lds_p2_o2 --ranking-run runs/poison_p2_o2 --seed 2
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from smda_callback.credit.replay import _grad_of, refusal_groups, refusal_objectives
from smda_callback.lab.lds import LDSSettings, _snapshotter, _trainer_for, ranked_pairs
from smda_callback.lab.replay import Stepper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="a `smda benchmark-lds --out` directory (its run/ is the ranking run)")
    ap.add_argument("--ranking-run", help="as given to `smda benchmark-lds` for an adopted planted run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-pairs", type=int, default=318)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(a.out)
    st = LDSSettings(n_pairs=a.n_pairs, seed=a.seed, ranking_run=a.ranking_run, replicas=1)
    order, pairs = ranked_pairs(out / "run", st)
    trainer = _trainer_for([pairs[i] for i in order], out / "tmp_endgrad", a.seed)
    run = Stepper(trainer)
    t0 = time.perf_counter()
    for t in range(len(run)):
        run.step(t)
        if (t + 1) % 32 == 0:
            logging.info("plain step %d/%d", t + 1, len(run))
    n = len(run)
    probes, snap = _snapshotter(trainer.processing_class, run.model)
    objectives = refusal_objectives(snap, refusal_groups(probes))
    lam = {q: _grad_of(obj, run.model, run.params)[1] for q, obj in objectives.items()}
    hp = run.hp[0]
    (b1, b2), eps = hp["betas"], hp["eps"]
    bc2 = 1 - b2 ** n
    inv_d = [1.0 / ((run.opt.state[p]["exp_avg_sq"] / bc2).sqrt() + eps) for p in run.params]
    carry = [0.0] * n
    acc = 0.0
    for t in range(n - 1, -1, -1):  # Σ_{s ≥ t} lr_s (1 − β1) β1^{s−t} / bc1_s
        acc = run.lrs[t] * (1 - b1) / (1 - b1 ** (t + 1)) + b1 * acc
        carry[t] = acc
    eff = {r: {q: [0.0] * n for q in lam} for r in ("tracin", "adam")}
    for t in range(n):
        run.model.zero_grad(set_to_none=True)
        run.loss(t).backward()
        g = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run.params]
        c = min(1.0, run.clip / (run.norms[t] + 1e-6)) if run.clip > 0 else 1.0
        for q, L in lam.items():
            eff["tracin"][q][t] = run.lrs[t] * c * sum(float((x * y).sum()) for x, y in zip(L, g))
            eff["adam"][q][t] = carry[t] * c * sum(float((x * y * d).sum()) for x, y, d in zip(L, g, inv_d))
        if (t + 1) % 32 == 0:
            logging.info("end gradient %d/%d", t + 1, n)
    secs = round(time.perf_counter() - t0, 1)
    for r, e in eff.items():
        name = f"end gradient, {r}"
        rec = {"order": order, "reader": name, "removal_effect": e, "weight_zero_effect": e, "seconds": secs,
               "lr": run.lrs, "grad_norm": run.norms}
        (out / f"endgrad_{r}.json").write_text(json.dumps(rec), encoding="utf-8")
        print(f"{out / f'endgrad_{r}.json'}: {name}")
    rep = out / "replay.json"
    if rep.exists():  # agreement with the exact replay over the last K pairs, no retrain needed
        from smda_callback.lab.analysis import spearman

        x = json.loads(rep.read_text())["removal_effect"]
        for r, e in eff.items():
            for q in e:
                row = [f"last {k}: {spearman(np.asarray(e[q][-k:]), np.asarray(x[q][-k:])):+.2f}" for k in (16, 32, 64, 90) if k <= n]
                print(f"{r} vs replay, {q}, Spearman over pairs: " + "  ".join(row))
    print(f"{secs} s")


if __name__ == "__main__":
    main()
