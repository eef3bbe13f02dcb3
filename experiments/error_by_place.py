"""Where each reader is right, by a pair's place in the run, on a kept LDS file with every pair left out
(docs/validation.md §9, "Right at the end, wrong 12–34 steps before it"). A validation experiment, not part of the
package; numpy only, on a file `smda benchmark-lds --keep` wrote.

    python experiments/error_by_place.py benchmarks/lds/lds64x.json

For each reader and probe quantity: over the pairs trained in each band of places, the Pearson correlation of the
reader's predicted removal effect (minus its score) with the measured effect of retraining without that pair alone
(the `loo-<id>` jobs), and the mean and spread of the difference (predicted − measured) where the reader is a
change of refusal (the replays); the readers that retrain the first W pairs exactly to step E are listed too.

Then how much a carry factor that depends on the place alone could give an in-run reader: per band of `--band`
places, the least-squares factor of the single removals on the reader's score (fitted on the retrains: an upper
bound, not a reader), and the LDS of the reader so multiplied, on the file's subsets. With `--run` (the ranking
run's folder, its smda/attribution.jsonl and policy.json), the in-run answer to the same question: the run's own
trajectory of mean refusal fitted as an AR(p) process in its increments (p = 1 is lab/carry.py's forgetting model;
p = 2 adds the last increment, which lets a push come back with the other sign), each pair's score carried by the
fit's response at its distance from the end, and that reader's LDS.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from smda_callback.lab.analysis import spearman
from smda_callback.lab.carry import baseline_means

READERS = ("step change", "own window", "credit (default)", "own window, carried", "tracin (final weights)",
           "replay (dropped in place)")


def bands(n: int, warmup: int) -> list[tuple[int, int]]:
    """The warm-up, then the rest in bands of about n / 6 places, the last 12 places on their own."""
    edges = sorted({0, warmup, *range(warmup, n - 12, max((n - 12 - warmup) // 3, 1)), n - 12, n})
    return [(a, b) for a, b in zip(edges, edges[1:]) if b - a >= 4]


def subset_lds(d: dict, q: str, per_pair: np.ndarray) -> float:
    """LDS on the kept file's order-0 subsets of a per-pair predicted removal effect (in the order's places)."""
    place = {p: i for i, p in enumerate(d["order"])}
    keys = sorted(d["subsets"])
    full = d["jobs"]["full0"][f"refusal_{q}"]
    measured = [d["jobs"][k][f"refusal_{q}"] - full for k in keys]
    return spearman(np.asarray([sum(per_pair[place[p]] for p in d["subsets"][k]) for k in keys]), np.asarray(measured))


def trajectory_response(run: Path, q: str, order: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit d_k = a_h n_h(k) + a_s n_s(k) − κ q_{k−1} + Σ_{j<order} b_j d_{k−j} on the run's recorded mean refusal q
    (d: its increments; n: the step's pairs of each label) and return, per place t of n, the fitted response at the
    run's end to a unit push at t, and the coefficients (κ, b...)."""
    recs = sorted((json.loads(x) for x in (run / "smda" / "attribution.jsonl").read_text().splitlines()),
                  key=lambda r: r["step"])
    if len(recs) != n or any(len(r["pairs"]) != 1 for r in recs):
        raise SystemExit(f"{run}: needs one ledger window of one pair per trained pair ({len(recs)} windows, {n} pairs)")
    base = baseline_means(json.loads((run / "smda" / "policy.json").read_text()))
    qs = np.asarray([base[q]] + [r[f"refusal_{q}"] for r in recs])
    d = np.diff(qs)
    harmful = np.asarray([r["pairs"][0]["label"] == "harmful" for r in recs], dtype=np.float64)
    rows = [[harmful[k], 1 - harmful[k], -qs[k], *(d[k - j] for j in range(1, order))] for k in range(order, n)]
    coef = np.linalg.lstsq(np.asarray(rows), d[order:], rcond=None)[0]
    kappa, b = coef[2], coef[3:]

    def response(dist: int) -> float:
        level, steps = 0.0, []
        for k in range(dist + 1):
            step = (1.0 if k == 0 else 0.0) - kappa * level + sum(b[j - 1] * steps[-j] for j in range(1, order) if len(steps) >= j)
            steps.append(step)
            level += step
        return level

    return np.asarray([response(n - 1 - t) for t in range(n)]), coef[2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kept", help="a benchmarks/lds/*.json file with a loo-<id> job for every pair")
    ap.add_argument("--warmup", type=int, default=10, help="the run's warm-up steps (the demo's: 10)")
    ap.add_argument("--band", type=int, default=8, help="places per band of the place-only carry factor")
    ap.add_argument("--run", type=Path, help="the ranking run's folder, for the trajectory's AR(p) carry")
    a = ap.parse_args()
    d = json.loads(open(a.kept).read())
    order, jobs, scores = d["order"], d["jobs"], d["reader_scores"]
    missing = [p for p in order if f"loo-{p}" not in jobs]
    if missing and not a.run:
        raise SystemExit(f"{a.kept}: {len(missing)} pairs have no single-removal retrain (loo-{missing[0]}, ...); "
                         "with --run only the trajectory's carry is read")
    full = jobs["full0"]
    segments = [r for r in scores if "pairs exact to step" in r]
    for q in ("harmful", "harmless"):
        if not missing:
            loo = np.asarray([jobs[f"loo-{p}"][f"refusal_{q}"] - full[f"refusal_{q}"] for p in order])
            print(f"{q} refusal, {len(order)} pairs; |measured| by band: " + ", ".join(
                f"{x}–{y - 1}: {np.abs(loo[x:y]).mean():.4f}" for x, y in bands(len(order), a.warmup)))
            for r in [r for r in READERS if r in scores] + segments:
                pred = np.asarray([-scores[r][q][p] for p in order])
                row = []
                for x, y in bands(len(order), a.warmup):
                    err = pred[x:y] - loo[x:y]
                    cell = f"{x}–{y - 1}: r {np.corrcoef(pred[x:y], loo[x:y])[0, 1]:+.2f}"
                    if r.startswith("replay"):
                        cell += f" err {err.mean():+.4f}±{err.std():.4f}"
                    row.append(cell)
                print(f"  {r:<42} all: Spearman {spearman(pred, loo):+.2f} | " + " | ".join(row))
        print(f"  carried by place, {q} (LDS on {len(d['subsets'])} subsets"
              + ("" if missing else f"; the retrains' factor per band of {a.band} places, first to last") + "):")
        for r in ("own window", "credit (default)"):
            pred = np.asarray([-scores[r][q][p] for p in order])
            line = f"    {r:<18} as read {subset_lds(d, q, pred):+.2f}"
            if not missing:
                factor = np.zeros(len(order))
                for x in range(0, len(order), a.band):
                    s_, m_ = pred[x:x + a.band], loo[x:x + a.band]
                    factor[x:x + a.band] = (s_ @ m_) / (s_ @ s_)
                line += (f"; by the retrains' factor (upper bound) {subset_lds(d, q, factor * pred):+.2f} ["
                         + " ".join(f"{f:+.2f}" for f in factor[::a.band]) + "]")
            if a.run:
                for k in (1, 2, 3):
                    line += f"; AR({k}) {subset_lds(d, q, trajectory_response(a.run, q, k, len(order))[0] * pred):+.2f}"
            print(line)
        if a.run:
            for k in (1, 2, 3):
                resp, coef = trajectory_response(a.run, q, k, len(order))
                print(f"    AR({k}) κ, b = {np.round(coef, 3).tolist()}; response to a unit push at 0, 8, ... steps "
                      "from the end: " + " ".join(f"{x:+.2f}" for x in resp[::-1][::8]))


if __name__ == "__main__":
    main()
