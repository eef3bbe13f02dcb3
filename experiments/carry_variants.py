"""In-sample looks (issue 25), not registered checks: four parameter-free variants of the AR(2)-carried own window
(`smda suspects --read removal`), each read on kept LDS files and their ranking runs' ledgers. None was registered for a
held-out run; docs/validation.md §9 ("Four carry variants, in-sample") gives the table and why each was dropped.

* log-odds: the trajectory fitted as logit(q) (carry.fit_forgetting, order 2, the same least squares); each pair's own
  window turned into log-odds at the level before its window (Δq / (q (1 − q))) and multiplied by that fit's response
  at the end (the conversion back at the end is one factor for every pair: the ranking is unchanged by it).
* persistent part: the AR(2) fit with two more regressors, each label's count of pairs trained so far, so that every pair
  also moves the level the run returns to by π of its label; a pair is scored by its own window carried by the
  transient response plus π of its label carried by the step response (the same fit's).
* late fit: the AR(2) fitted on the second half of the run's windows only (the response that the last pairs, the only
  ones it reaches, actually met).
* clipped: the own windows clipped at 2 robust standard deviations (1.4826 × MAD) of the run's own windows before the
  carry, against a few extreme windows driving the subset sums.

The first column recomputes the kept probability-space read from its fit, as a check of this script.

    python experiments/carry_variants.py benchmarks/lds/lds64x.json:runs/lds64/run ...  (kept file:ranking run folder)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from smda_callback.lab.carry import QUANTITIES, Forgetting, baseline_means, fit_forgetting, later_windows
from smda_callback.lab.lds_score import kept_lds
from smda_callback.ledger import load_policy, load_records

VARIANTS = ("probability (recomputed)", "log-odds", "persistent part", "late fit", "clipped")


def logit(p: np.ndarray | float) -> np.ndarray | float:
    return np.log(p / (1.0 - p))


def persistent_fit(q0: float, q: np.ndarray, nh: np.ndarray, ns: np.ndarray) -> tuple[float, float, tuple[float, float]]:
    """κ, b and π (harmful, harmless) of Δq_k = a·n(k) − κ (q_{k−1} − π·C(k−1)) + b Δq_{k−1}, C the labels' counts so far."""
    qs = np.concatenate([[q0], q])
    d, prev = np.diff(qs), qs[:-1]
    ch, cs = np.concatenate([[0.0], np.cumsum(nh)[:-1]]), np.concatenate([[0.0], np.cumsum(ns)[:-1]])
    rows = np.arange(1, len(q))
    A = np.column_stack([nh[rows], ns[rows], -prev[rows], ch[rows], cs[rows], d[rows - 1]])
    coef = np.linalg.lstsq(A, d[rows], rcond=None)[0]
    kappa = float(coef[2])
    return kappa, float(coef[5]), (float(coef[3]) / kappa, float(coef[4]) / kappa)


def reads(kept: dict, run: Path) -> dict[str, dict[str, float]]:
    """Per quantity, each variant's LDS on the kept file's subsets."""
    recs = [r for r in sorted(load_records(run), key=lambda r: r["step"]) if "refusal_harmful" in r]
    base = baseline_means(load_policy(run))
    nh = np.asarray([sum(p.get("label") == "harmful" for p in r["pairs"]) for r in recs], dtype=np.float64)
    ns = np.asarray([sum(p.get("label") != "harmful" for p in r["pairs"]) for r in recs], dtype=np.float64)
    K = len(recs)
    later = later_windows(recs, key="id")  # windows trained after each pair's own
    harmful = {str(p["id"]): p.get("label") == "harmful" for r in recs for p in r["pairs"]}
    out: dict[str, dict[str, float]] = {}
    for q in QUANTITIES:
        traj = np.asarray([float(r[f"refusal_{q}"]) for r in recs])
        before = np.concatenate([[base[q]], traj[:-1]])  # the level before each window
        own = kept["reader_scores"]["own window"][q]
        g = fit_forgetting(base[q], traj.tolist(), nh, ns, order=2, resamples=0).weights(K)
        g_odds = fit_forgetting(float(logit(base[q])), logit(traj).tolist(), nh, ns, order=2, resamples=0).weights(K)
        half = K // 2
        g_late = fit_forgetting(float(traj[half - 1]), traj[half:].tolist(), nh[half:], ns[half:], order=2,
                                resamples=0).weights(K)
        kappa, b, pi = persistent_fit(base[q], traj, nh, ns)
        g_tr = Forgetting(kappa, (0.0, 0.0), K, (b,)).weights(K)
        step = np.concatenate([[0.0], np.cumsum(g_tr)])  # a unit push every later window, its level at the end
        v = np.asarray(list(own.values()))
        mid, spread = np.median(v), 1.4826 * np.median(np.abs(v - np.median(v)))
        scores = {
            "probability (recomputed)": {i: x * g[later[i]] for i, x in own.items()},
            "log-odds": {i: x / (before[K - 1 - later[i]] * (1.0 - before[K - 1 - later[i]])) * g_odds[later[i]]
                         for i, x in own.items()},
            "persistent part": {i: x * g_tr[later[i]] + kappa * pi[0 if harmful[i] else 1] * step[later[i]]
                                for i, x in own.items()},
            "late fit": {i: x * g_late[later[i]] for i, x in own.items()},
            "clipped": {i: float(np.clip(x, mid - 2 * spread, mid + 2 * spread)) * g[later[i]] for i, x in own.items()},
        }
        out[q] = {name: kept_lds(kept, s, q) for name, s in scores.items()}
        out[q]["pi"] = pi
    return out


def main(argv: list[str]) -> None:
    print("| kept file | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    fits = []
    for arg in argv:
        kept_file, run = arg.split(":")
        r = reads(json.loads(Path(kept_file).read_text()), Path(run))
        print(f"| {Path(kept_file).name} | " + " | ".join(" / ".join(f"{r[q][v]:+.2f}" for q in QUANTITIES) for v in VARIANTS) + " |")
        fits.append(f"{Path(kept_file).name}: " + "; ".join(f"{q} refusal: π of a harmful pair {r[q]['pi'][0]:+.4f}, of a harmless pair {r[q]['pi'][1]:+.4f}"
                                                             for q in QUANTITIES))
    print("\npersistent part per pair of each label (the level the run returns to, moved for good):\n" + "\n".join(fits))


if __name__ == "__main__":
    main(sys.argv[1:])
