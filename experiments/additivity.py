"""How far a retrained LDS run's subset changes are the sums of their pairs' single removals, and what that leaves of
the replay's error (docs/validation.md §9, "Every pair left out"). A validation experiment, not part of the package;
numpy only, on the files `smda benchmark-lds --leave-out all` wrote (a `loo-<id>` job for every pair).

    python experiments/additivity.py runs/lds64s [--replay replay.json]

Per quantity and removal size: LDS (Spearman over subsets) of the summed single removals (the additive reader of
retraining itself) and of the replay; the Pearson correlation of each with the measured change; and the split of the
replay's error e = measured − replay into the interaction (measured − summed single removals: what no additive reader
can predict) and the replay's own per-pair error (summed single removals − replay), each as a share of the mean
square of e (the shares need not add to 1: the two parts may correlate). Then, per quantity, whether the interaction
grows when the removed pairs sit close together in the run (Spearman of |interaction| with the smallest gap between
two removed steps, within one removal size); and the replay's agreement with the single removals by place in the run
(the warm-up steps, whose lr is below its peak, then three equal stretches), with the LDS the replay would read if its
warm-up pairs' effects were the measured ones (a diagnostic that uses the retrains, not a reader). With
`--kept-schedule DIR` (single removals retrained with `--keep-schedule`), those are set beside the replay's weight-zero
effects, which keep every later step's rate (and Adam count: the retrains' counts move one place earlier).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from smda_callback.lab.analysis import spearman
from smda_callback.lab.lds_score import full_refusal, load_jobs, removal_changes


def main(out: Path, replay_file: str, kept_schedule: Path | None = None) -> None:
    jobs, order = load_jobs(out), json.loads((out / "subsets.json").read_text())["order"]
    ref, single = full_refusal(jobs), removal_changes(jobs)  # single: pair -> {quantity: change of dropping it alone}
    missing = [i for i in order if i not in single]
    if missing:
        raise SystemExit(f"{out}: {len(missing)} pairs have no loo job (e.g. {missing[0]}); run benchmark-lds --leave-out all")
    subs = [j for n, j in sorted(jobs.items()) if n.startswith("s")]
    rep = json.loads((out / replay_file).read_text())
    place = {i: k for k, i in enumerate(order)}
    sizes = np.asarray([len(j["dropped"]) for j in subs])
    gap = np.asarray([min(np.diff(sorted(place[i] for i in j["dropped"]))) for j in subs])
    keep = removal_changes(load_jobs(kept_schedule)) if kept_schedule is not None else None  # pair -> rates-kept change
    print(f"{out}: {len(subs)} subsets, {len(order)} pairs each retrained without alone; replay {replay_file}")
    for q in ("harmful", "harmless"):
        meas = np.asarray([j[f"refusal_{q}"] - ref[q] for j in subs])
        add = np.asarray([sum(single[i][q] for i in j["dropped"]) for j in subs])
        eff = dict(zip(rep["order"], rep["removal_effect"][q]))
        pred = np.asarray([sum(eff[i] for i in j["dropped"]) for j in subs])
        one = np.asarray([single[i][q] for i in order])
        per_pair = np.asarray([eff[i] for i in order])
        print(f"\n{q}: single removals, replay against measured over the {len(order)} pairs: Spearman "
              f"{spearman(per_pair, one):+.2f}, Pearson {np.corrcoef(per_pair, one)[0, 1]:+.2f}, slope "
              f"{np.polyfit(per_pair, one, 1)[0]:.2f}; mean |single removal| {np.abs(one).mean():.4f}")
        print("| removed | n | LDS summed singles | LDS replay | Pearson summed / replay | interaction share | replay per-pair share |")
        print("|---|---|---|---|---|---|---|")
        for label, m in (("all", np.ones(len(subs), bool)), *((f"{k} pairs", sizes == k) for k in sorted(set(sizes)))):
            e = meas[m] - pred[m]
            inter, own = meas[m] - add[m], add[m] - pred[m]
            ms = float(np.mean(e ** 2))
            print(f"| {label} | {int(m.sum())} | {spearman(add[m], meas[m]):+.2f} | {spearman(pred[m], meas[m]):+.2f} | "
                  f"{np.corrcoef(add[m], meas[m])[0, 1]:+.2f} / {np.corrcoef(pred[m], meas[m])[0, 1]:+.2f} | "
                  f"{np.mean(inter ** 2) / ms:.2f} | {np.mean(own ** 2) / ms:.2f} |")
        # by place: the warm-up steps (lr below its peak) and three equal stretches after them
        lr = np.asarray(rep["lr"])
        w = int(np.argmax(lr >= lr.max()))
        rest = np.array_split(np.arange(w, len(order)), 3)
        for label, idx in ((f"warm-up, steps 0-{w - 1}", np.arange(w)), *((f"steps {r[0]}-{r[-1]}", r) for r in rest)):
            print(f"  single removals, {label}: replay Spearman {spearman(per_pair[idx], one[idx]):+.2f}, slope "
                  f"{np.polyfit(per_pair[idx], one[idx], 1)[0]:.2f}; mean |single removal| {np.abs(one[idx]).mean():.4f}, "
                  f"|replay| {np.abs(per_pair[idx]).mean():.4f}")
        fixed = {i: (one[place[i]] if place[i] < w else eff[i]) for i in order}  # not a reader: it uses the retrains
        print(f"  the replay with its warm-up pairs' effects replaced by the measured ones: LDS "
              f"{spearman(np.asarray([sum(fixed[i] for i in j['dropped']) for j in subs]), meas):+.2f}")
        if keep is not None:  # the same pairs dropped with every kept pair at its full-run rate
            ids = [i for i in order if i in keep]
            k_meas = np.asarray([keep[i][q] for i in ids])
            in_place = np.asarray([single[i][q] for i in ids])
            wz = dict(zip(rep["order"], rep["weight_zero_effect"][q]))
            wz_ids = np.asarray([wz[i] for i in ids])
            print(f"  {len(ids)} pairs also dropped with the rates kept ({kept_schedule}): mean |change| {np.abs(k_meas).mean():.4f}, "
                  f"the schedule's part of dropping them in place (in place − rates kept) {np.abs(in_place - k_meas).mean():.4f}; "
                  f"replay weight zero against rates kept: Spearman {spearman(wz_ids, k_meas):+.2f}, "
                  f"slope {np.polyfit(wz_ids, k_meas, 1)[0]:.2f}; replay in place against in place: "
                  f"Spearman {spearman(np.asarray([eff[i] for i in ids]), in_place):+.2f}")
        for k in sorted(set(sizes)):
            m = sizes == k
            print(f"  {k} pairs removed: Spearman of |interaction| with the smallest gap between removed steps "
                  f"{spearman(np.abs(meas[m] - add[m]), gap[m]):+.2f}; mean |interaction| {np.abs(meas[m] - add[m]).mean():.4f}"
                  f" against mean |measured| {np.abs(meas[m]).mean():.4f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="a `smda benchmark-lds --out` directory with every pair's loo job and a replay")
    ap.add_argument("--replay", default="replay.json", help="the replay file to read")
    ap.add_argument("--kept-schedule", type=Path, default=None,
                    help="a `benchmark-lds --keep-schedule --leave-out ...` directory of the same run: its single removals "
                         "set beside the replay's weight-zero effects (its step skipped, every later rate and count kept)")
    args = ap.parse_args()
    main(Path(args.out), args.replay, args.kept_schedule)
