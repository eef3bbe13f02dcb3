"""Is a pair's effect on the retrained model linear in its weight? (docs/validation.md §9, "Linear in a pair's
weight?"). A validation experiment, not part of the package: retrains of an `smda benchmark-lds` run's data order in
which one pair's loss (so its gradient, before clipping) is scaled by w, everything else as the retrain runs it.

    python experiments/linearity.py runs/lds64s --steps 0 4 6 40 --weights 0 0.5 0.9 1 [--below-clip 0.5] [--shard i/2]
    python experiments/linearity.py runs/lds64s --report

Writes one job per (step, w) under OUT/linearity/ (resumable, shardable); `--report` prints, per pair and quantity,
the change f(w) − f(1) against the straight line through w = 0 and w = 1 (the change at w is (1 − w) times the change
at 0 when the response is linear), and the replay's effects beside them. w = 1 must reproduce the full retrain
bitwise (checked). The demo clips every gradient to norm 1 (max_grad_norm) and the pairs' gradients have norms
8–18, so any w above 1/|g| trains exactly as w = 1; `--below-clip c` scales the gradient to c times the clip
instead, inside the range where the step depends on w. A zero-weight step still runs (Adam's moments decay, its count and weight decay advance): it is
not the replay's "weight zero" (the step skipped), which the report says beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def job(out: Path, step: int, w: float, below_clip: float | None = None) -> dict:
    from smda_callback.lab.lds import LDSSettings, _trainer_for, probe_refusal, ranked_pairs, run_scorer

    made = json.loads((out / "subsets.json").read_text())
    st = LDSSettings(n_pairs=made["settings"]["n_pairs"], seed=made["settings"]["seed"],
                     ranking_run=made["settings"]["ranking_run"])
    run_dir = out / "run"  # the ranking run as `smda benchmark-lds` adopted it
    order, pairs = ranked_pairs(run_dir, st)
    if order != made["order"]:
        raise SystemExit(f"{run_dir}'s order is not {out}'s")
    trainer = _trainer_for([pairs[i] for i in order], out / "linearity" / f"tmp_{step}_{w}_{below_clip}", st.seed)
    plain = trainer.compute_loss
    if below_clip is not None:  # the weight that leaves the pair's gradient norm at this fraction of the clip
        norm = json.loads((out / "replay.json").read_text())["grad_norm"][step]
        w = below_clip * trainer.args.max_grad_norm / norm

    def scaled(model, inputs, return_outputs=False, **kw):  # this step's loss times w (one pair per step)
        res = plain(model, inputs, return_outputs=return_outputs, **kw)
        if trainer.state.global_step != step or w == 1.0:
            return res
        return (res[0] * w, res[1]) if return_outputs else res * w

    trainer.compute_loss = scaled
    t0 = time.perf_counter()
    trainer.train()
    measured = probe_refusal(trainer.model, trainer.processing_class, run_scorer(run_dir))  # as every retrain is measured
    return {"step": step, "pair": order[step], "w": w, "below_clip": below_clip, **measured,
            "seconds": round(time.perf_counter() - t0, 1)}


def report(out: Path) -> None:
    full = json.loads((out / "jobs" / "full0.json").read_text())
    rep = json.loads((out / "replay.json").read_text())
    loo = {p.stem[4:]: json.loads(p.read_text()) for p in (out / "jobs").glob("loo-*.json")}
    got = [json.loads(p.read_text()) for p in sorted((out / "linearity").glob("*.json"))]
    clip = {(j["step"], j["below_clip"]): j for j in got if j.get("below_clip") is not None}
    got = [j for j in got if j.get("below_clip") is None]
    for j in got:
        if j["w"] == 1.0:
            same = all(j[f"refusal_{q}"] == full[f"refusal_{q}"] for q in ("harmful", "harmless"))
            print(f"w = 1 at step {j['step']}: {'bitwise the full retrain' if same else 'NOT the full retrain'}")
    for q in ("harmful", "harmless"):
        print(f"\n{q}: f(w) − f(1) for the pair at each step; 'linear' = (1 − w)·(f(0) − f(1)); replay: weight-zero and "
              "in-place effects; measured: the pair dropped in place")
        print("| step | pair | w | f(w) − f(1) | linear | replay weight-zero | replay in place | measured in place |")
        print("|---|---|---|---|---|---|---|---|")
        for step in sorted({j["step"] for j in got}):
            mine = {j["w"]: j[f"refusal_{q}"] - full[f"refusal_{q}"] for j in got if j["step"] == step}
            pair = rep["order"][step]
            for w in sorted(mine):
                lin = (1 - w) * mine[0.0] if 0.0 in mine else float("nan")
                dropped = loo[pair][f"refusal_{q}"] - full[f"refusal_{q}"] if pair in loo else float("nan")
                print(f"| {step} | {pair} | {w:g} | {mine[w]:+.4f} | {lin:+.4f} | {rep['weight_zero_effect'][q][step]:+.4f} | "
                      f"{rep['removal_effect'][q][step]:+.4f} | {dropped:+.4f} |")
        if clip:
            print(f"\n{q}, below the clip: the gradient scaled to a fraction c of the clipping norm (w = c·clip/|g|); "
                  "between w = 0 and the clip the change is (1 − c)·(f(0) − f(1)) if it is linear in the gradient's size")
            print("| step | c | w | f(w) − f(1) | linear | f(0) − f(1) |")
            print("|---|---|---|---|---|---|")
            for (step, c), j in sorted(clip.items()):
                zero = next((x[f"refusal_{q}"] for x in got if x["step"] == step and x["w"] == 0.0), float("nan")) - full[f"refusal_{q}"]
                print(f"| {step} | {c:g} | {j['w']:.4f} | {j[f'refusal_{q}'] - full[f'refusal_{q}']:+.4f} | {(1 - c) * zero:+.4f} | {zero:+.4f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="an `smda benchmark-lds --out` directory (subsets.json, jobs/full0.json, replay.json)")
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 4, 6, 40])
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 0.9, 1.0])
    ap.add_argument("--below-clip", type=float, nargs="*", default=[],
                    help="also, per step, the weight that leaves the gradient's norm at these fractions of the clip")
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    if not a.report:
        i, n = map(int, a.shard.split("/"))
        todo = [(s, w, None) for s in a.steps for w in a.weights if not (w == 1.0 and s != a.steps[0])]
        todo += [(s, 1.0, c) for s in a.steps for c in a.below_clip]
        for s, w, c in todo[i::n]:
            path = out / "linearity" / (f"s{s:03d}_w{w:g}.json" if c is None else f"s{s:03d}_c{c:g}.json")
            if not path.exists():
                res = job(out, s, w, c)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(res, indent=1))
                print(json.dumps(res), flush=True)
    report(out)
