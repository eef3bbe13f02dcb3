"""A finite-difference Hessian-vector product against the reverse pass's double backward (docs/credit.md, "Tried and
dropped: the curvature by finite differences"). Step 10 of the demo run (its first 12 pairs, the demo's settings), the
direction a realistic adjoint of step 10's gradient: each refusal objective's gradient scaled by Adam's step
(1 − β1)·(lr/bc1)/(√v̂ + ε).

    python experiments/fd_curvature.py             # seconds per call; central differences against the float32 double backward
    python experiments/fd_curvature.py --precision # harmful objective: float32 and float64, each against the float64
                                                   # double backward (≈ 20 GB of memory)
"""

from __future__ import annotations

import gc
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from smda_callback._resources import DATA
from smda_callback.credit.replay import _grad_of
from smda_callback.lab.demo import load_pairs
from smda_callback.lab.lds import _snapshotter, _trainer_for
from smda_callback.lab.replay import Stepper, refusal_groups, refusal_objectives


def nrm(x):
    return math.sqrt(sum(float((a.double() ** 2).sum()) for a in x))


def setup():
    torch.manual_seed(0)
    tr = _trainer_for(load_pairs(DATA / "pairs.jsonl", 12), Path(tempfile.mkdtemp()), 0)
    probes, snap = _snapshotter(tr.processing_class, tr.model)
    objs = refusal_objectives(snap, refusal_groups(probes))
    run = Stepper(tr)
    for t in range(10):
        run.step(t)
    t = 10
    st = run.state(t)
    vs = {}
    for name, obj in objs.items():
        f, gT = _grad_of(obj, run.model, run.params)
        k = t + 1
        hp = run.hp[0]
        (b1, b2), eps = hp["betas"], hp["eps"]
        bc1, bc2s = 1 - b1 ** k, math.sqrt(1 - b2 ** k)
        vs[name] = [(1 - b1) * (run.lrs[-1] / bc1) / (vv.sqrt() / bc2s + eps) * a for vv, a in zip(st.v, gT)]
    run.load(st)
    return run, t, vs


def timing(run, t, vs):
    params = run.params

    def timed(fn):
        t0 = time.perf_counter()
        r = fn()
        return r, time.perf_counter() - t0

    for _ in range(2):
        _, tp = timed(lambda: run.train_grad(t, create_graph=False))
        g, tg = timed(lambda: run.train_grad(t, create_graph=True))

        def hv2():
            names = list(vs)
            return {n: [h.detach() for h in torch.autograd.grad(g, params, grad_outputs=vs[n], retain_graph=j < 1)]
                    for j, n in enumerate(names)}
        exact, th = timed(hv2)
        print(f"plain grad {tp:.2f}s  graph grad {tg:.2f}s  2 hvps {th:.2f}s", flush=True)
        del g
    theta0 = [p.detach().clone() for p in params]

    def gat(h, v):
        with torch.no_grad():
            for p, p0, x in zip(params, theta0, v):
                p.copy_(p0).add_(x, alpha=h)
        return [x.detach() for x in run.train_grad(t, create_graph=False)]

    tn = nrm(theta0)
    for name, v in vs.items():
        vn, en = nrm(v), nrm(exact[name])
        print(name, "|theta|", tn, "|v|", vn, "|Hv|", en, "max|v|", max(float(x.abs().max()) for x in v))
        for r in (1e-2, 3e-3, 1e-3, 3e-4, 1e-4):
            h = r * tn / vn
            t0 = time.perf_counter()
            gp, gm = gat(h, v), gat(-h, v)
            dt = time.perf_counter() - t0
            fd = [(a - b) / (2 * h) for a, b in zip(gp, gm)]
            err = nrm([a - b for a, b in zip(fd, exact[name])]) / en
            cos = sum(float((a.double() * b.double()).sum()) for a, b in zip(fd, exact[name])) / (nrm(fd) * en)
            print(f"  r={r:g} h={h:.3g} rel err {err:.2e} cos {cos:.6f}  (2 grads {dt:.2f}s)", flush=True)
    with torch.no_grad():
        for p, p0 in zip(params, theta0):
            p.copy_(p0)


def precision(run, t, vs):
    v32 = next(iter(vs.values()))
    run.opt.state.clear()
    gc.collect()

    def rel(a, b):
        return math.sqrt(sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b))) / nrm(b)

    res = {}
    for dt in (torch.float64, torch.float32):
        run.model.to(dt)
        gc.collect()
        params = run.params
        theta0 = [p.detach().clone() for p in params]
        v = [x.to(dt) for x in v32]
        g = run.train_grad(t, create_graph=True)
        res[f"{dt}-exact"] = [h.detach().float() for h in torch.autograd.grad(g, params, grad_outputs=v)]
        del g
        gc.collect()
        tn, vn = nrm(theta0), nrm(v)
        for r in ((1e-6, 1e-7) if dt == torch.float64 else (1e-4,)):
            h = r * tn / vn
            acc = None
            for sgn in (1, -1):
                with torch.no_grad():
                    for p, p0, x in zip(params, theta0, v):
                        p.copy_(p0).add_(x, alpha=sgn * h)
                gg = [x.detach() for x in run.train_grad(t, create_graph=False)]
                acc = gg if acc is None else [(a - b) / (2 * h) for a, b in zip(acc, gg)]
                del gg
            res[f"{dt}-fd{r:g}"] = [a.float() for a in acc]
            del acc
            gc.collect()
        with torch.no_grad():
            for p, p0 in zip(params, theta0):
                p.copy_(p0)
        del theta0, v
        gc.collect()
        print("done", dt, flush=True)
    ref = res["torch.float64-exact"]
    for key, x in res.items():
        print(f"{key}: rel to float64 exact {rel(x, ref):.2e}", flush=True)


if __name__ == "__main__":
    (precision if "--precision" in sys.argv else timing)(*setup())
