"""In-sample look (issue 25), then one held-out read: the own window carried by an AR(2) fit of the run's trajectory in
log-odds instead of probability. The probe means move from ≈ 0.2 to 0.5–0.84 over a run; a push of the same size in
probability is a larger push in log-odds near the ends, and the fitted dynamics of a level near 0.84 are not those of a
level near 0.3. Here the trajectory is fitted as logit(q) (carry.fit_forgetting, order 2, the same least squares), each
pair's own window is turned into log-odds at the level before its window (Δq / (q (1 − q))) and multiplied by the
fit's response at the end; the end's own conversion back is one factor for every pair, so it leaves the ranking alone.
No parameter. Reads each kept file's subsets and retrains (lab/lds_score.kept_lds) and its ranking run's ledger; the
first column recomputes the kept probability-space read from its fit, as a check of this script.

    python experiments/logit_carry.py benchmarks/lds/lds64x.json:runs/lds64/run ...  (kept file:ranking run folder)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from smda_callback.lab.carry import QUANTITIES, baseline_means, fit_forgetting
from smda_callback.lab.lds_score import kept_lds
from smda_callback.ledger import load_policy, load_records


def logit(p: np.ndarray | float) -> np.ndarray | float:
    return np.log(p / (1.0 - p))


def reads(kept: dict, run: Path) -> dict[str, dict[str, float]]:
    """Per quantity: the probability-space AR(2) read recomputed, and the log-odds one."""
    recs = [r for r in sorted(load_records(run), key=lambda r: r["step"]) if "refusal_harmful" in r]
    base = baseline_means(load_policy(run))
    nh = [sum(p.get("label") == "harmful" for p in r["pairs"]) for r in recs]
    ns = [sum(p.get("label") != "harmful" for p in r["pairs"]) for r in recs]
    K = len(recs)
    place = {str(p["id"]): k for k, r in enumerate(recs) for p in r["pairs"]}
    out: dict[str, dict[str, float]] = {}
    for q in QUANTITIES:
        traj = np.asarray([float(r[f"refusal_{q}"]) for r in recs])
        before = np.concatenate([[base[q]], traj[:-1]])  # the level before each window
        own = kept["reader_scores"]["own window"][q]
        g_p = fit_forgetting(base[q], traj.tolist(), nh, ns, order=2, resamples=0).weights(K)
        fit = fit_forgetting(float(logit(base[q])), logit(traj).tolist(), nh, ns, order=2, resamples=0)
        g_l = fit.weights(K)
        prob = {i: v * g_p[K - 1 - place[i]] for i, v in own.items()}
        odds = {i: v / (before[place[i]] * (1.0 - before[place[i]])) * g_l[K - 1 - place[i]] for i, v in own.items()}
        out[q] = {"prob": kept_lds(kept, prob, q), "logit": kept_lds(kept, odds, q), "reach": fit.reach(K - 1)}
    return out


def main(argv: list[str]) -> None:
    print("| kept file | own window carried AR(2), probability (recomputed) | log-odds | reach of the log-odds fit |")
    print("|---|---|---|---|")
    for arg in argv:
        kept_file, run = arg.split(":")
        kept = json.loads(Path(kept_file).read_text())
        r = reads(kept, Path(run))
        two = lambda key: " / ".join(f"{r[q][key]:+.2f}" for q in QUANTITIES)  # noqa: E731
        print(f"| {Path(kept_file).name} | {two('prob')} | {two('logit')} | {r['harmful']['reach']} / {r['harmless']['reach']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
