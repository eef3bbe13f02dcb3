"""Scoring the LDS retrains of lds.py: does a pair's credit predict retraining? (`smda benchmark-lds`)

Every reader's per-pair score (`readers`: the in-run credits, the forgetting-carried readers of carry.py, the replays
and peers read after the run, label count and random) and, over the finished subsets, its LDS per quantity: Spearman
over subsets of the predicted change (minus the removed pairs' summed score) against the measured change from the full
retrain, with a bootstrap interval, the chance band of a random reader, the LDS beyond the label count, and the
calibration (slope and intercept of measured on predicted, by place in the run). Every table shows the label-count
reader (how many harmful pairs were removed) and a random reader beside the credit. `keep` writes what a score was
computed from without the run folder (benchmarks/lds/); `kept_lds` rescores such a file.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..credit.replay import TRUST_FACTOR, replay_trusted_from
from .analysis import partial_spearman, spearman
from .carry import QUANTITIES, baseline_means, end_weights, run_forgetting
from .lds import ORDER_JOB, LDSSettings, post_hoc, records_order, segment_reader, subsets

logger = logging.getLogger(__name__)


TRUSTED = "replay, trusted span"
ADDITIVE = "leave-one-out retrains, summed"
"""The reader whose per-pair score is minus the measured change of retraining without that pair alone (every pair's
`loo-<id>` job): a set's prediction is the sum of its pairs' single removals, measured. A first-order reader that
were exact for every single pair would read this; how far it stays below 1 is how far the subsets' changes are not the
sum of their pairs' (interactions between removed pairs, and each change's own nonlinearity)."""


def replay_profile(rep: dict[str, Any], spans: int = 8) -> dict[str, list[dict[str, Any]]] | None:
    """Where along the run a replay's linearisation grows: per quantity and per `spans` equal stretches of the run,
    the median |effect| of one pair (at weight zero), the median norm of each part of the adjoint (θ, m, v) carried
    back to those steps, and each part's share of the summed |part effects|. None for a replay without the per-step
    diagnostics (lab/replay.py before they were recorded)."""
    if "adjoint_norm" not in rep:
        return None
    out: dict[str, list[dict[str, Any]]] = {}
    for q, eff in rep["weight_zero_effect"].items():
        n, rows, parts = len(eff), [], rep["effect_parts"][q]
        for k in range(spans):
            a, b = k * n // spans, (k + 1) * n // spans
            if a == b:
                continue
            mass = {key: float(np.abs(v[a:b]).sum()) for key, v in parts.items()}
            total = sum(mass.values()) or 1.0
            rows.append({"steps": [a, b - 1], "effect_abs_median": float(np.median(np.abs(eff[a:b]))),
                         "adjoint_norm_median": {key: float(np.median(v[a:b])) for key, v in rep["adjoint_norm"][q].items()},
                         "share": {key: m / total for key, m in mass.items()}})
        out[q] = rows
    return out


FITS = {"forgetting": (1, False), "forgetting_ar2": (2, False), "forgetting_ar2_joint": (2, True)}
"""The ranking run's forgetting fits, (order, shared) for carry.end_weights / run_forgetting: `readers` carries by each,
`score` reports each under its key (forgetting_fits)."""


def readers(run_dir: Path, order: list[str], seed: int = 0, reps: dict[str, dict[str, Any]] | None = None,
            peers: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per reader, per quantity, every pair's score (its predicted effect on that quantity when trained). `reps`:
    the replays by reader name (`post_hoc`), each read dropped in place, at weight zero and over its trusted span."""
    from ..ledger import load_credits, load_policy, load_records

    credits = load_credits(run_dir) or {"pairs": []}
    by_id = {p["id"]: p for p in credits["pairs"] if "id" in p}
    policy = load_policy(run_dir)
    records = sorted(load_records(run_dir), key=lambda r: r["step"])
    base = baseline_means(policy)
    out: dict[str, dict[str, dict[str, float]]] = {"credit (default)": {}, "own window": {}, "step change": {},
                                                   "label count": {}, "random": {}}
    # "credit (default)" and "own window" are always the default measure's (deconvolve). A ghost ledger's own credit
    # is read beside them as "credit, ghost" / "own window, ghost", and the default is replayed from the same ledger
    # (replay_credits: equal to a live deconvolve run's credit, tests/test_poison.py), so both read one training
    ghost = credits.get("measure") == "ghost"
    deconv = {part: _replayed(records, policy, credits, part) for part in ("total", "own")} if ghost else None
    for q in ("harmful", "harmless"):
        key = f"refusal_{q}"
        live = {"credit": {i: float(by_id[i][key]) for i in order if i in by_id},
                "own window": {i: float(by_id[i]["own"][key]) for i in order if i in by_id}}
        if deconv is None:
            out["credit (default)"][q], out["own window"][q] = live["credit"], live["own window"]
        else:
            out["credit (default)"][q] = {i: float(deconv["total"][i][key]) for i in order if i in deconv["total"]}
            out["own window"][q] = {i: float(deconv["own"][i][key]) for i in order if i in deconv["own"]}
            out.setdefault("credit, ghost", {})[q], out.setdefault("own window, ghost", {})[q] = live["credit"], live["own window"]
        prev = base[q]
        step = {}
        for r in records:
            if "refusal_harmful" not in r:
                continue
            now = float(r[key])
            for p in r.get("pairs", []):
                if "id" in p:
                    step[p["id"]] = now - prev
            prev = now
        out["step change"][q] = step
        out["label count"][q] = {i: float(by_id.get(i, {}).get("label") == "harmful") for i in order}
        for pname, peer in (peers or {}).items():
            # peers score "more suspect" as raising harmless refusal (over-refusal) and lowering harmful refusal
            # (compliance): as a predicted change of refusal, the compliance score's sign flips
            sc = peer["scores"]["over-refusal"] if q == "harmless" else {i: -v for i, v in peer["scores"]["compliance"].items()}
            out.setdefault(f"{pname} (final weights)", {})[q] = {i: float(v) for i, v in sc.items()}
        for rname, rep in (reps or {}).items():  # a pair's score is the change it makes when trained: minus its removal's effect
            for name, key in ((f"{rname} (dropped in place)", "removal_effect"), (f"{rname} (weight zero)", "weight_zero_effect")):
                out.setdefault(name, {})[q] = {i: -float(e) for i, e in zip(rep["order"], rep[key][q])}
            for seg in rep.get("segments", {}).get("by_until", []):
                out.setdefault(segment_reader(rname, rep["segments"]["below"], seg["until"]), {})[q] = {
                    i: -float(e) for i, e in zip(rep["order"], seg["removal_effect"][q])}
            if rep.get("first_step", 0):
                continue  # a replay of the run's last steps only is read as it is
            start = replay_trusted_from(rep["removal_effect"][q])
            out.setdefault(f"{rname}, trusted span", {})[q] = {
                i: (-float(e) if k >= start else 0.0) for k, (i, e) in enumerate(zip(rep["order"], rep["removal_effect"][q]))}
        # the credit shrunk toward its label's mean: within a label the ranking (what finds planted pairs) is
        # unchanged; across labels the pair's label carries the sum, as it does on ordinary data
        credit = out["credit (default)"][q]
        labels = {i: by_id.get(i, {}).get("label") for i in credit}
        means = {lab: float(np.mean([v for i, v in credit.items() if labels[i] == lab])) for lab in set(labels.values())}
        for lam in (0.0, 0.25, 0.5):
            name = "label mean of credit" if lam == 0.0 else f"credit shrunk to label mean (λ={lam})"
            out.setdefault(name, {})[q] = {i: means[labels[i]] + lam * (v - means[labels[i]]) for i, v in credit.items()}
        rng = np.random.default_rng([seed, 0x5eed])  # its own stream, not the subsets'
        out["random"][q] = {i: float(v) for i, v in zip(order, rng.normal(size=len(order)))}
    # the in-run readers carried to the end of the run by its own forgetting rate (carry.py), read off the ledger;
    # then the default and own window carried by the AR(2) fit, whose response can turn a push round, fitted per
    # quantity and jointly to both (one κ and b); the label count carried the same way is their baseline (what the
    # label and the place alone predict)
    carried = {"forgetting": ("carried", ("credit (default)", "own window", "step change", "label count",
                                          *(("credit, ghost", "own window, ghost") if ghost else ()))),
               "forgetting_ar2": ("carried AR(2)", ("credit (default)", "own window", "label count")),
               "forgetting_ar2_joint": ("carried AR(2) joint", ("credit (default)", "own window", "label count"))}
    for fit, (suffix, names) in carried.items():
        fit_order, shared = FITS[fit]
        try:
            ends = end_weights(records, policy, key="id", order=fit_order, shared=shared)[0]
        except ValueError as e:
            logger.warning("lds: no '%s' readers for %s: %s", suffix, run_dir, e)
            continue
        for name in names:
            out[f"{name}, {suffix}"] = {q: {i: v * ends[q].get(i, 0.0) for i, v in out[name][q].items()} for q in QUANTITIES}
    return out


def _replayed(records: list[dict[str, Any]], policy: dict[str, Any], credits: dict[str, Any],
              part: str) -> dict[str, dict[str, float]]:
    """The default (deconvolve) credit of every pair id, `part` "total" or "own", replayed from a ledger recorded with
    another measure (the same run: every rule sees the same training)."""
    from ..credit import OptimizerKernel, replay_credits

    return replay_credits(records, policy, OptimizerKernel(**credits["kernel"]), "deconvolve", part, by="id")


def forgetting_fits(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The ranking run's forgetting fits (carry.py), from its ledger (read once) and its baseline refusal, as `score`
    reports them: "forgetting" (κ and its interval per quantity: the 'carried' readers), "forgetting_ar2" (κ and b:
    the 'carried AR(2)' readers) and "forgetting_ar2_joint" (one κ and b for both quantities), each {"error": why}
    where the run cannot give it (too short a run: those readers are left out, said there)."""
    from ..ledger import load_policy, load_records

    try:
        records, base = load_records(run_dir), baseline_means(load_policy(run_dir))
    except ValueError as e:
        return {key: {"error": str(e)} for key in FITS}
    res: dict[str, dict[str, Any]] = {}
    for key, (fit_order, shared) in FITS.items():
        try:
            res[key] = {q: {"kappa": f.kappa, **({"b": list(f.lags)} if f.lags else {"ci95": list(f.ci95)}),
                            "windows": f.windows}
                        for q, f in run_forgetting(records, base, order=fit_order, shared=shared).items()}
        except ValueError as e:
            res[key] = {"error": str(e)}
    return res


REPLAY = "replay (dropped in place)"
CHANCE_DRAWS = 200


def chance_band(sets: list[list[str]], order: list[str], truth: np.ndarray, seed: int,
                draws: int = CHANCE_DRAWS, control: np.ndarray | None = None) -> list[float]:
    """The LDS a reader with no information reaches on these subsets: 2.5 and 97.5 percentiles over `draws`
    random per-pair scores (standard normal), summed over each subset as every reader's are. Subsets share
    pairs, so the LDS of a random reader spreads as if there were about as many subsets as pairs, more than a
    bootstrap over subsets shows; a reader inside this band is not distinguishable from chance. With `control`
    (`label_counts`), the band of the LDS beyond it (`partial_spearman`)."""
    rng = np.random.default_rng([seed, 0xc4a7])
    index = {i: k for k, i in enumerate(order)}
    member = np.zeros((len(sets), len(order)))
    for j, d in enumerate(sets):
        member[j, [index[i] for i in d]] = 1.0
    corr = spearman if control is None else (lambda a, b: partial_spearman(a, b, control))
    lds = np.asarray([corr(-member @ rng.normal(size=len(order)), truth) for _ in range(draws)])
    if np.isnan(lds).all():  # too few subsets for the correlation: no band
        return [float("nan"), float("nan")]
    return [float(np.nanpercentile(lds, 2.5)), float(np.nanpercentile(lds, 97.5))]


def label_counts(sets: list[list[str]], scores: dict[str, dict[str, dict[str, float]]]) -> np.ndarray:
    """[subsets, 2]: how many harmful and how many other pairs each subset removes (the label-count reader's labels).
    The control of `partial_spearman`: a reader's LDS beyond it is what its per-pair scores say that the removed
    pairs' labels do not."""
    harmful = scores["label count"]["harmful"]
    n = np.asarray([sum(harmful.get(i, 0.0) for i in d) for d in sets])
    return np.column_stack([n, [len(d) for d in sets] - n])


def replay_yardstick(scores: dict[str, dict[str, dict[str, float]]]) -> str | None:
    """The reader `against_replay` measures the others by: the exact whole-run replay's trusted span, else another
    whole-run replay's; None where only replays of the run's last steps ran (they read the earlier pairs as 0, so they
    are readers to score, not a yardstick)."""
    return TRUSTED if TRUSTED in scores else next((n for n in scores if n.endswith(", trusted span")), None)


def against_replay(scores: dict[str, dict[str, dict[str, float]]], order: list[str], settings: dict[str, Any],
                   n_subsets: int = 1000) -> dict[str, Any]:
    """Every reader scored against the replay instead of retraining: LDS with the replay's first-order prediction as
    the measured change. It costs no retrain, so it runs over `n_subsets` removal sets drawn as the retrain subsets
    are (the same seed: the first ones are the retrained ones), before any retrain has finished; and each reader's
    Spearman with the replay over single pairs. It is as good as the replay is (its own LDS against retraining). The
    replay read is its trusted span (`replay_trusted_from`): the whole replay on a run where it does not blow up."""
    yard = replay_yardstick(scores)
    if yard is None:
        raise ValueError("no whole-run replay to score the readers against (only replays of the last steps ran)")
    seed = settings.get("seed", 0)
    st = LDSSettings(subsets=n_subsets, drop_fracs=tuple(settings.get("drop_fracs", LDSSettings.drop_fracs)), seed=seed)
    sets = list(subsets(order, st).values())
    res: dict[str, Any] = {"n_subsets": len(sets), "yardstick": yard, "readers": {}, "chance": {}}
    boot = np.random.default_rng([seed, 0xb007])
    draws = [boot.integers(0, len(sets), len(sets)) for _ in range(500)]
    # the yardstick's change per subset, the same for every reader
    truths = {q: predicted(scores[yard][q], sets) for q in QUANTITIES}
    for q in QUANTITIES:
        res["chance"][q] = chance_band(sets, order, truths[q], seed)
    for name, per_q in scores.items():
        if name.startswith("replay"):
            continue
        entry = {}
        for q in QUANTITIES:
            s, r, truth = per_q[q], scores[yard][q], truths[q]
            pred = predicted(s, sets)
            both = [i for i in order if i in s and i in r]
            bs = [spearman(pred[b], truth[b]) for b in draws]
            entry[q] = {"lds": spearman(pred, truth), "lds_ci95": [float(np.nanpercentile(bs, 2.5)), float(np.nanpercentile(bs, 97.5))],
                        "slope": float(np.polyfit(pred, truth, 1)[0]) if np.std(pred) > 0 else float("nan"),
                        "pairs": spearman(np.asarray([s[i] for i in both]), np.asarray([r[i] for i in both]))}
        res["readers"][name] = entry
    return res


def load_jobs(out: Path) -> dict[str, dict[str, Any]]:
    """The finished retrains under `out/jobs`, by job name (`full0`, `loo-<id>`, `s000`, ...)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "jobs").glob("*.json"))}


def full_refusal(jobs: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """Final mean refusal per quantity of the full retrains in the ranking run's order (`full<r>`, bitwise equal where
    the check holds): the reference every measured change of that order is taken from. None before one has finished."""
    fulls = [j for n, j in jobs.items() if n.startswith("full")]
    return {q: float(np.mean([f[f"refusal_{q}"] for f in fulls])) for q in QUANTITIES} if fulls else None


def predicted(s: dict[str, float], sets: list[list[str]]) -> np.ndarray:
    """A reader's predicted change for each removal set: minus the summed scores of the pairs it removes (a pair's score
    is the change it makes when trained; a pair the reader did not score counts 0)."""
    return np.asarray([-sum(s.get(i, 0.0) for i in d) for d in sets])


def kept_lds(kept: dict[str, Any], scores: dict[str, float], q: str) -> float:
    """A reader's LDS for quantity `q` on a kept file (`keep`): Spearman over its retrained subsets of the predicted
    change (`predicted`) against the measured change from the full retrains (`full_refusal`). For rescoring kept files
    with readers they do not hold (experiments/)."""
    jobs = kept["jobs"]
    names = sorted(n for n in jobs if n.startswith("s"))
    ref = full_refusal(jobs)[q]
    return spearman(predicted(scores, [jobs[n]["dropped"] for n in names]),
                    np.asarray([jobs[n][f"refusal_{q}"] - ref for n in names]))


def removal_changes(jobs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per pair retrained without alone (`loo-<id>` jobs), the change of final mean refusal per quantity that dropping it
    made, against the mean of the full retrains (bitwise equal where the check holds). Empty without a full retrain."""
    ref = full_refusal(jobs)
    if ref is None:
        return {}
    return {j["dropped"][0]: {q: j[f"refusal_{q}"] - ref[q] for q in ref} for n, j in sorted(jobs.items()) if n.startswith("loo-")}


def across_orders(jobs: dict[str, dict[str, Any]], scores: dict[str, dict[str, dict[str, float]]], order: list[str],
                  seed: int) -> dict[str, Any] | None:
    """The same subsets retrained in several data orders (`LDSSettings.orders`): how far one order's measured changes
    agree with another's (the noise ceiling across runs), and every reader's LDS against each order and against their
    mean, as a share of that ceiling. Each order's change is measured from its own full retrain. The ceiling: with
    r̄ the mean Spearman between two orders' changes over the subsets, the mean of O orders has reliability
    ρ = O r̄ / (1 + (O − 1) r̄) (Spearman–Brown), and no reader correlates with it above √ρ; r̄ itself is what one
    order's retraining says about another's. None with fewer than two orders or six subsets finished in all."""
    found = {int(m.group(1)) for n in jobs if (m := ORDER_JOB.match(n)) and m.group(2) == "full"}
    ref0 = full_refusal(jobs)
    if not found or ref0 is None:
        return None
    orders = [0, *sorted(found)]
    names = [n for n in sorted(jobs) if re.fullmatch(r"s\d+", n) and all(f"o{o}-{n}" in jobs for o in orders[1:])]
    if len(names) < 6:
        return None
    dropped = [jobs[n]["dropped"] for n in names]
    res: dict[str, Any] = {"orders": orders, "n_subsets": len(names), "subset_sizes": sorted({len(d) for d in dropped}),
                           "between_orders": {}, "reliability": {}, "ceiling": {}, "chance": {}, "chance_beyond_labels": {},
                           "readers": {}}
    labels = label_counts(dropped, scores)
    measured, means = {}, {}
    for q in QUANTITIES:
        key = f"refusal_{q}"
        ref = {0: ref0[q], **{o: float(jobs[f"o{o}-full"][key]) for o in orders[1:]}}
        M = np.asarray([[jobs[n if o == 0 else f"o{o}-{n}"][key] - ref[o] for n in names] for o in orders])
        pairs = {f"{a}-{b}": spearman(M[i], M[j]) for i, a in enumerate(orders) for j, b in enumerate(orders) if i < j}
        r = float(np.mean(list(pairs.values())))
        rho = len(orders) * r / (1 + (len(orders) - 1) * r) if r > 0 else float("nan")
        res["between_orders"][q] = {"pairs": pairs, "mean": r}
        res["reliability"][q], res["ceiling"][q] = rho, float(np.sqrt(rho)) if rho > 0 else float("nan")
        measured[q], means[q] = M, M.mean(0)
        res["chance"][q] = chance_band(dropped, order, means[q], seed)
        res["chance_beyond_labels"][q] = chance_band(dropped, order, means[q], seed, control=labels)
    for name, per_q in scores.items():
        entry = {}
        for q in QUANTITIES:
            pred, mean = predicted(per_q[q], dropped), means[q]
            lds = spearman(pred, mean)
            entry[q] = {"lds_by_order": [spearman(pred, m) for m in measured[q]], "lds_mean": lds,
                        "lds_mean_beyond_labels": partial_spearman(pred, mean, labels),
                        "share_of_ceiling": lds / res["ceiling"][q] if res["ceiling"][q] > 0 else float("nan"),
                        "slope_mean": float(np.polyfit(pred, mean, 1)[0]) if np.std(pred) > 0 else float("nan")}
        res["readers"][name] = entry
    return res


def against_kept(out: Path, kept_file: str | Path,
                 own_jobs: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """The retrains of a kept file (`keep`, benchmarks/lds/) as the measurements of `out`'s readers: a ranking run
    trained again (a new machine keeps no run folder) is scored on the retrains made for the first one. Its order must
    be theirs; its own full retrain (in `own_jobs`, `load_jobs(out)`), where it has one, says how far this training
    reproduces theirs. Returns the kept
    settings/order/subsets, the kept jobs, and {"file", "full_refusal_gap" (max |Δ| of the full retrain's refusal
    means, or None), "reader_scores" (the kept readers' per-pair scores)}."""
    kept = json.loads(Path(kept_file).read_text())
    order = records_order(out / "run")
    if order != kept["order"]:
        raise ValueError(f"--against {kept_file}: its retrains follow another training order than {out / 'run'}'s; "
                         "score a ranking run trained with the kept file's settings (its 'what' and 'settings').")
    own = [j for n, j in own_jobs.items() if n.startswith("full")]
    gap = None
    if own:
        ref = kept["jobs"]["full0"]
        gap = max(abs(own[0][k] - ref[k]) for k in ref if k.startswith("refusal_"))
    meta = {"settings": kept["settings"], "order": kept["order"], "subsets": kept["subsets"]}
    return meta, kept["jobs"], {"file": str(kept_file), "full_refusal_gap": gap, "reader_scores": kept["reader_scores"]}


def with_kept_readers(scores: dict[str, Any], kept_scores: dict[str, Any]) -> dict[str, Any]:
    """`scores` with a kept file's readers that it lacks (peers, replays of part of the network): this run's own win;
    the summed single removals are left out (`score` computes them from the kept retrains themselves)."""
    return {**scores, **{n: v for n, v in kept_scores.items() if n not in scores and n != ADDITIVE}}


def score(out: str | Path, against: str | Path | None = None) -> dict[str, Any]:
    """LDS and calibration of every reader over the finished subsets (and against the replay, where it ran). `against`:
    a kept file whose retrains are the measurements (`against_kept`); its readers that `out` does not compute (peers,
    replays of part of the network) are read from it, and the summed single removals come from its retrains."""
    out = Path(out)
    meta = json.loads((out / "subsets.json").read_text())
    jobs = own_jobs = load_jobs(out)
    kept = None
    if against is not None:
        meta, jobs, kept = against_kept(out, against, own_jobs)
    fulls = [j for n, j in jobs.items() if n.startswith("full")]
    reps, peers = post_hoc(out)
    # every reader's scores, read once: for the replay yardstick now, for the retrains below
    scores = readers(out / "run", meta["order"], meta["settings"]["seed"], reps, peers) if reps or kept else None
    if kept is not None:
        scores = with_kept_readers(scores, kept.pop("reader_scores"))
    vs_replay = against_replay(scores, meta["order"], meta["settings"]) if reps and replay_yardstick(scores) else None
    profiles = {rname: prof for rname, rep in reps.items()
                if not rep.get("first_step", 0) and (prof := replay_profile(rep)) is not None}
    if not fulls:
        return {"error": "no full replay has finished yet", **({"vs_replay": vs_replay} if vs_replay else {}),
                **({"replay_profile": profiles} if profiles else {})}
    ref = full_refusal(jobs)
    replay_gap = (float(np.abs(np.asarray(fulls[0]["Y"]) - np.asarray(fulls[1]["Y"])).max())
                  if len(fulls) > 1 and all("Y" in f for f in fulls[:2]) else None)
    run_dir = out / "run"
    from ..ledger import load_policy

    run_final = np.asarray(load_policy(run_dir)["probe_refusal_final"])
    with_y = [j for n, j in own_jobs.items() if n.startswith("full") and "Y" in j]  # a kept file's jobs have no Y
    callback_gap = float(np.abs(np.asarray(with_y[0]["Y"]) - run_final).max()) if with_y else None
    subs = [j for n, j in sorted(jobs.items()) if n.startswith("s")]
    res: dict[str, Any] = {"n_subsets": len(subs), "n_pairs": len(meta["order"]), "full_refusal": ref,
                           "replicas_max_abs_diff": replay_gap, "replay_vs_callback_run_max_abs_diff": callback_gap,
                           "measured_abs_mean": {q: float(np.mean([abs(j[f"refusal_{q}"] - ref[q]) for j in subs])) if subs else None
                                                 for q in ref}, "readers": {}}
    if kept is not None:
        res["against"] = kept
    secs = [j["seconds"] for j in jobs.values() if "seconds" in j]
    timing = {"one retrain (mean)": {"seconds": float(np.mean(secs))}} if secs else {}
    if vs_replay:
        res["vs_replay"] = vs_replay
    if profiles:
        res["replay_profile"] = profiles
    if reps:
        res["replay_trusted_from"] = {rname: {q: replay_trusted_from(rep["removal_effect"][q]) for q in ref}
                                      for rname, rep in reps.items() if not rep.get("first_step", 0)}
    for name, r in {**reps, **peers}.items():
        timing[name] = {"seconds": r.get("seconds"), "peak_rss_mb": r.get("peak_rss_mb")}
    res["timing"] = timing
    res.update(forgetting_fits(run_dir))
    loos = removal_changes(jobs)
    if len(subs) < 3 and not loos:
        return res
    if scores is None:
        scores = readers(run_dir, meta["order"], meta["settings"]["seed"], reps, peers)
    if loos:  # a pair's predicted removal effect is minus its score
        res["leave_one_out"] = [{"id": i, "measured": measured,
                                 "predicted": {name: {q: (-per_q[q][i] if i in per_q[q] else None) for q in ref}
                                               for name, per_q in scores.items()}} for i, measured in loos.items()]
        if len(loos) >= 8:  # over the pairs left out: does a reader order single removals as retraining does?
            res["leave_one_out_spearman"] = {
                name: {q: spearman(np.asarray([-per_q[q].get(i, 0.0) for i in loos]), np.asarray([m[q] for m in loos.values()]))
                       for q in ref} for name, per_q in scores.items()}
        if set(loos) >= set(meta["order"]):  # every pair retrained without alone: the additive reader of retraining itself
            scores = {**scores, ADDITIVE: {q: {i: -m[q] for i, m in loos.items()} for q in ref}}
    if len(subs) < 3:
        return res
    dropped = [j["dropped"] for j in subs]
    sizes = np.asarray([len(d) for d in dropped])
    measured = {q: np.asarray([j[f"refusal_{q}"] - ref[q] for j in subs]) for q in ref}  # the same for every reader
    res["chance"] = {q: chance_band(dropped, meta["order"], measured[q], meta["settings"]["seed"]) for q in ref}
    labels = label_counts(dropped, scores)
    res["chance_beyond_labels"] = {q: chance_band(dropped, meta["order"], measured[q], meta["settings"]["seed"], control=labels)
                                   for q in ref}
    for name, per_q in scores.items():
        entry = {}
        for q in ("harmful", "harmless"):
            s, meas = per_q[q], measured[q]
            pred = predicted(s, dropped)
            slope, intercept = (np.polyfit(pred, meas, 1) if np.std(pred) > 0 else (float("nan"), float("nan")))
            boot = np.random.default_rng(0)
            draws = [spearman(pred[b], meas[b]) for b in (boot.integers(0, len(subs), len(subs)) for _ in range(1000))]
            entry[q] = {"lds": spearman(pred, meas), "lds_beyond_labels": partial_spearman(pred, meas, labels),
                        "slope": float(slope), "intercept": float(intercept),
                        "slope_by_third": thirds_slopes(s, dropped, meta["order"], meas),
                        "pred_abs_mean": float(np.abs(pred).mean()),
                        "lds_ci95": [float(np.nanpercentile(draws, 2.5)), float(np.nanpercentile(draws, 97.5))],
                        # within one removal size: the number of removed pairs no longer orders the changes
                        "lds_by_size": {int(n): spearman(pred[sizes == n], meas[sizes == n]) for n in sorted(set(sizes))}}
        res["readers"][name] = entry
    if (ao := across_orders(jobs, scores, meta["order"], meta["settings"]["seed"])) is not None:
        res["across_orders"] = ao
    return res


def keep(out: str | Path, scored: dict[str, Any], command: str, against: str | Path | None = None) -> dict[str, Any]:
    """What `scored` (`score(out)`) was computed from, without the run folder (`--keep FILE`; benchmarks/lds/): the
    settings, the ranking run's training order, every subset's removed pair ids, every retrain's measured refusal (mean
    on each probe label and per category; the per-probe values `Y` are left out), every reader's per-pair score as the
    scorer read it, and the scorer's output. Pair ids only: no prompt or answer text. `against` (`score(out, against)`):
    the settings, subsets and retrains are that kept file's, the readers `out`'s (with the file's that `out` lacks)."""
    out = Path(out)
    meta = json.loads((out / "subsets.json").read_text())
    jobs = load_jobs(out)
    extra: dict[str, Any] = {}
    if against is not None:
        meta, jobs, extra = against_kept(out, against, jobs)
    reps, peers = post_hoc(out)
    scores = with_kept_readers(readers(out / "run", meta["order"], meta["settings"]["seed"], reps, peers),
                               extra.pop("reader_scores", {}))
    return {"what": command, "settings": meta["settings"], "order": meta["order"], "subsets": meta["subsets"],
            "jobs": {n: {k: v for k, v in j.items() if k != "Y"} for n, j in jobs.items()},
            "reader_scores": scores, "score": scored, **({"against": extra} if extra else {})}


def thirds_slopes(s: dict[str, float], dropped: list[list[str]], order: list[str], meas: np.ndarray) -> list[float] | None:
    """Calibration by place in the run: the slopes of one least-squares fit of the measured change on the predicted
    change of the removed pairs from each third of the run (first, middle, last), with an intercept. A reader
    whose early pairs' predictions hold has a first slope near its last; None with fewer subsets than 6."""
    if len(dropped) < 6:
        return None
    place = {i: 3 * k // len(order) for k, i in enumerate(order)}
    X = np.zeros((len(dropped), 4))
    X[:, 3] = 1.0
    for j, d in enumerate(dropped):
        for i in d:
            X[j, place[i]] -= s.get(i, 0.0)
    if np.linalg.matrix_rank(X) < 4:
        return None
    return [float(b) for b in np.linalg.lstsq(X, meas, rcond=None)[0][:3]]


def _ci(x: dict[str, Any]) -> str:
    return f"[{x['lds_ci95'][0]:+.2f}, {x['lds_ci95'][1]:+.2f}]"


def _chance(c: dict[str, list[float]] | None) -> list[str]:
    if not c:
        return []
    return [f"chance band (LDS of {CHANCE_DRAWS} random per-pair scores on the same subsets, 2.5–97.5 %): "
            + ", ".join(f"{q} [{lo:+.2f}, {hi:+.2f}]" for q, (lo, hi) in c.items())
            + "; a reader inside it is not distinguishable from chance (* marks an LDS outside it)"]


def _lds(x: dict[str, Any], band: list[float] | None) -> str:
    """An LDS with its bootstrap interval, starred when it lies outside the chance band."""
    return f"{_starred(x['lds'], band)} {_ci(x)}"


def _starred(x: float | None, band: list[float] | None) -> str:
    """A correlation starred when it lies outside its chance band (none where the band could not be drawn); – where it
    is undefined (e.g. the label count's partial Spearman beyond label count) or was not computed."""
    if x is None or not np.isfinite(x):
        return "–"
    outside = band is not None and bool(np.isfinite(band).all()) and not band[0] <= x <= band[1]
    return f"{x:+.2f}{'*' if outside else ''}"


def format_vs_replay(v: dict[str, Any]) -> list[str]:
    L = ["", f"Against the {v.get('yardstick', REPLAY)} (no retrain: the replay's first-order prediction as the measured change, {v['n_subsets']} "
         "subsets drawn as the retrain subsets are; and Spearman with the replay over single pairs)", "",
         "| reader | LDS vs replay, harmful [95 % CI] | harmless [95 % CI] | slope harmful / harmless | pairs harmful / harmless |",
         "|---|---|---|---|---|"]
    L[3:3] = _chance(v.get("chance")) + ([""] if v.get("chance") else [])
    c = v.get("chance", {})
    for name, e in v["readers"].items():
        h, n = e["harmful"], e["harmless"]
        L.append(f"| {name} | {_lds(h, c.get('harmful'))} | {_lds(n, c.get('harmless'))} | {h['slope']:.3g} / {n['slope']:.3g} | "
                 f"{h['pairs']:+.2f} / {n['pairs']:+.2f} |")
    return L


def format_across_orders(a: dict[str, Any]) -> list[str]:
    qs = list(a["ceiling"])
    L = ["", f"Across data orders: {a['n_subsets']} subsets (dropping {', '.join(map(str, a['subset_sizes']))} pairs) retrained in "
         f"each of orders {', '.join(map(str, a['orders']))} (0: the ranking run's; the others fixed permutations of its pairs, "
         "dropped in place), each order's change measured from its own full retrain; the readers are the ranking run's"]
    for q in qs:
        b = a["between_orders"][q]
        L.append(f"{q}: Spearman between two orders' changes " + ", ".join(f"{k} {v:+.2f}" for k, v in b["pairs"].items())
                 + f" (mean {b['mean']:+.2f}); reliability of the {len(a['orders'])}-order mean {a['reliability'][q]:.2f}, "
                 f"noise ceiling √ρ {a['ceiling'][q]:.2f}; chance band vs the mean [{a['chance'][q][0]:+.2f}, {a['chance'][q][1]:+.2f}], "
                 f"beyond label count [{a['chance_beyond_labels'][q][0]:+.2f}, {a['chance_beyond_labels'][q][1]:+.2f}]")
    L += ["", "| reader | " + " | ".join(f"LDS {q} by order | vs mean of orders (share of ceiling) | beyond label count | slope vs mean"
                                         for q in qs) + " |", "|---|" + "---|---|---|---|" * len(qs)]
    for name, e in a["readers"].items():
        cells = []
        for q in qs:
            x = e[q]
            cells += [" / ".join(f"{v:+.2f}" for v in x["lds_by_order"]),
                      f"{_starred(x['lds_mean'], a['chance'][q])} ({x['share_of_ceiling']:.2f})",
                      _starred(x["lds_mean_beyond_labels"], a["chance_beyond_labels"][q]), f"{x['slope_mean']:.3g}"]
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    return L


def format_profiles(profiles: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    L = []
    for rname, per_q in profiles.items():
        for q, rows in per_q.items():
            keys = list(rows[0]["share"]) if rows else []
            L += ["", f"{rname}: where its linearisation grows ({q} refusal; per stretch of the run, median over its steps)", "",
                  "| steps | median |effect| of a pair | " + " | ".join(f"median |A_{k}|" for k in keys) + " | "
                  + " / ".join(keys) + " share of |effect| |", "|---|---|" + "---|" * len(keys) + "---|"]
            L += [f"| {r['steps'][0]}–{r['steps'][1]} | {r['effect_abs_median']:.3g} | "
                  + " | ".join(f"{r['adjoint_norm_median'][k]:.3g}" for k in keys) + " | "
                  + " / ".join(f"{r['share'][k]:.2f}" for k in keys) + " |" for r in rows]
    return L


def format_score(s: dict[str, Any]) -> str:
    if "error" in s:
        return "\n".join([s["error"], *(format_vs_replay(s["vs_replay"]) if s.get("vs_replay") else []),
                          *format_profiles(s.get("replay_profile", {}))])
    L = [f"{s['n_subsets']} subsets of {s['n_pairs']} pairs; full replay refusal harmful {s['full_refusal']['harmful']:.4f}, "
         f"harmless {s['full_refusal']['harmless']:.4f}; identical retrains differ by "
         f"{s['replicas_max_abs_diff']} (max |ΔY|); replay vs the callback run "
         + ("–" if s["replay_vs_callback_run_max_abs_diff"] is None else f"{s['replay_vs_callback_run_max_abs_diff']:.2e}"),
         *([f"measured by the retrains kept in {s['against']['file']}; this ranking run's full retrain differs from theirs by "
            + ("– (none here)" if s["against"]["full_refusal_gap"] is None else f"{s['against']['full_refusal_gap']:.2e}")
            + " (max |Δ| of the refusal means); readers it does not compute are read from the file"] if s.get("against") else []),
         f"mean |measured change|: harmful {s['measured_abs_mean']['harmful']}, harmless {s['measured_abs_mean']['harmless']}",
         *([f"forgetting rate κ of the ranking run (carry.py; the 'carried' readers): " + ", ".join(
             f"{q} {f['kappa']:.4f} [{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}]" for q, f in s["forgetting"].items())]
           if "error" not in s.get("forgetting", {"error": 1}) else []),
         *([f"its AR(2) fit (the 'carried AR(2)' readers): " + ", ".join(
             f"{q} κ {f['kappa']:.4f}, b {f['b'][0]:.3f}" for q, f in s["forgetting_ar2"].items())]
           if "error" not in s.get("forgetting_ar2", {"error": 1}) else
           [f"no AR(2)-carried readers: {s['forgetting_ar2']['error']}"] if "forgetting_ar2" in s else []),
         *([f"its joint AR(2) fit, both quantities (the 'carried AR(2) joint' readers): κ "
            f"{s['forgetting_ar2_joint']['harmful']['kappa']:.4f}, b {s['forgetting_ar2_joint']['harmful']['b'][0]:.3f}"]
           if "error" not in s.get("forgetting_ar2_joint", {"error": 1}) else []),
         *[f"{rname}, trusted span: the replay's effects read from step " + ", ".join(
             f"{t} ({q})" for q, t in starts.items()) + f" of {s['n_pairs']}; earlier pairs read 0 "
           f"(its |effect| there exceeds {TRUST_FACTOR:g}× its second-half median)" for rname, starts in s.get("replay_trusted_from", {}).items()],
         *_chance(s.get("chance")), "",
         "| reader | LDS harmful [95 % CI] | LDS harmless [95 % CI] | within one removal size (harmful / harmless) "
         "| beyond label count, harmful / harmless | slope harmful | slope harmless | mean |predicted| harmful / harmless |",
         "|---|---|---|---|---|---|---|---|"]
    c, cb = s.get("chance", {}), s.get("chance_beyond_labels", {})
    if cb:
        L[-3:-3] = ["beyond label count: the partial Spearman with the removed pairs' label counts held (what a reader's "
                    "per-pair scores say that counting labels does not); its chance band: "
                    + ", ".join(f"{q} [{lo:+.2f}, {hi:+.2f}]" for q, (lo, hi) in cb.items())]
    for name, e in s["readers"].items():
        h, n = e["harmful"], e["harmless"]
        by = "; ".join(f"{k}: {h['lds_by_size'][k]:+.2f} / {n['lds_by_size'][k]:+.2f}" for k in h["lds_by_size"])
        L.append(f"| {name} | {_lds(h, c.get('harmful'))} | {_lds(n, c.get('harmless'))} | {by} | "
                 f"{_starred(h.get('lds_beyond_labels'), cb.get('harmful'))} / {_starred(n.get('lds_beyond_labels'), cb.get('harmless'))} | "
                 f"{h['slope']:.3g} | {n['slope']:.3g} | {h['pred_abs_mean']:.3g} / {n['pred_abs_mean']:.3g} |")
    thirds = [(name, e) for name, e in s["readers"].items() if e["harmful"].get("slope_by_third")]
    if thirds:
        f3 = lambda x: " / ".join(f"{b:.3g}" for b in x["slope_by_third"]) if x.get("slope_by_third") else "–"  # noqa: E731
        L += ["", "Calibration by place in the run: slopes of one fit of the measured change on the predicted change of the "
              "removed pairs from the first / middle / last third of the run (1 is calibrated; 0, the third's predictions "
              "carry nothing)", "", "| reader | harmful | harmless |", "|---|---|---|"]
        L += [f"| {name} | {f3(e['harmful'])} | {f3(e['harmless'])} |" for name, e in thirds]
    if s.get("across_orders"):
        L += format_across_orders(s["across_orders"])
    if s.get("leave_one_out_spearman"):
        n = len(s["leave_one_out"])
        L += ["", f"One pair left out, {n} pairs each retrained without it alone: Spearman over the pairs of each reader's "
              "predicted change against the measured one (harmful / harmless)", "", "| reader | Spearman |", "|---|---|"]
        L += [f"| {name} | {r['harmful']:+.2f} / {r['harmless']:+.2f} |" for name, r in s["leave_one_out_spearman"].items()]
    if s.get("leave_one_out") and len(s["leave_one_out"]) <= 16:
        names = [n for n in ("credit (default)", "own window", "step change", "replay (dropped in place)")
                 if n in s["leave_one_out"][0]["predicted"]]
        fmt = lambda d: " / ".join("–" if d[q] is None else f"{d[q]:+.4f}" for q in ("harmful", "harmless"))  # noqa: E731
        L += ["", "One pair left out (retrained without it, its order kept): measured change of refusal harmful / harmless, "
              "and each reader's prediction", "", "| pair | measured | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
        L += [f"| {e['id']} | {fmt(e['measured'])} | " + " | ".join(fmt(e["predicted"][n]) for n in names) + " |"
              for e in s["leave_one_out"]]
    if s.get("vs_replay"):
        L += format_vs_replay(s["vs_replay"])
    L += format_profiles(s.get("replay_profile", {}))
    L += ["", "cost (wall seconds on this machine; peak RSS where recorded): " + "; ".join(
        f"{k} {v['seconds']:.0f} s" + (f", {v['peak_rss_mb']} MB" if v.get("peak_rss_mb") else "")
        for k, v in s.get("timing", {}).items() if v.get("seconds") is not None)]
    return "\n".join(L)
