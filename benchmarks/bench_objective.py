"""The replay's fixed cost: the gradient of its two end objectives (mean refusal on the harmful and on the harmless
probes) on the embedded 135M model, one probe per forward against padded batches of probes (`probe_objective`'s
`batch`), side by side in one invocation. Each setting runs in its own process, so that its peak RSS is its own.
Prints seconds, peak RSS, the objective values and the gradients' agreement with one probe per forward.

    python benchmarks/bench_objective.py [--batches 1 8 16 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(batch: int, repeats: int, out: Path) -> None:
    import torch

    from smda_callback.credit.replay import _grad_of, probe_objective, refusal_groups
    from smda_callback.lab.lds import _snapshotter
    from smda_callback.lab.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(None)
    params = [p for p in model.parameters() if p.requires_grad]
    probes, snap = _snapshotter(tok, model)
    groups = refusal_groups(probes)
    times, values, grads = [], {}, {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        for q, idx in groups.items():
            values[q], grads[q] = _grad_of(probe_objective(snap, idx, batch=batch), model, params)
        times.append(time.perf_counter() - t0)
    g = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1))
    proj = {q: float(torch.cat([x.reshape(-1) for x in grads[q]]).double() @ g.double()) for q in grads}
    norm = {q: float(torch.cat([x.reshape(-1) for x in grads[q]]).double().norm()) for q in grads}
    torch.save({q: torch.cat([x.reshape(-1) for x in grads[q]]) for q in grads}, out.with_suffix(".pt"))
    out.write_text(json.dumps({"batch": batch, "seconds": times, "values": values, "grad_norm": norm, "grad_proj": proj,
                               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one is not None:
        return one(a.one, a.repeats, Path(a.out))
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        res = []
        for b in a.batches:
            out = Path(tmp) / f"b{b}.json"
            subprocess.run([sys.executable, __file__, "--one", str(b), "--repeats", str(a.repeats), "--out", str(out)],
                           check=True, capture_output=True)
            res.append(json.loads(out.read_text()))
        ref = torch.load(Path(tmp) / f"b{a.batches[0]}.pt")
        base = min(res[0]["seconds"])
        print(f"| probes per forward | seconds (best of {a.repeats}) | ratio to {a.batches[0]} | peak RSS MB | "
              "harmful / harmless objective | max |Δgrad| / max |grad| (vs " f"{a.batches[0]}) |\n|---|---|---|---|---|---|")
        for r in res:
            g = torch.load(Path(tmp) / f"b{r['batch']}.pt")
            rel = max(float((g[q] - ref[q]).abs().max() / ref[q].abs().max()) for q in ref)
            v = " / ".join(f"{r['values'][q]:.6f}" for q in r["values"])
            print(f"| {r['batch']} | {min(r['seconds']):.1f} | {min(r['seconds']) / base:.2f} | {r['peak_rss_mb']} | {v} | {rel:.1e} |")


if __name__ == "__main__":
    main()
