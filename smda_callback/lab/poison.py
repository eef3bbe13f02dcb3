"""Ground truth for per-pair credit: plant bad pairs, train, and ask who ranks them first.

Plants (`data/plants.jsonl`, written for this check): harmless prompts answered with a refusal
(teach over-refusal, labelled harmless) and harmful prompts answered with a compliant,
non-operational opening (teach compliance, labelled harmful). They are mixed into a fixed subset
of the demo pairs and trained with the demo's settings and the callback. Detection is scored
*within the label* (over-refusal plants among the harmless pairs, compliance plants among the
harmful ones), so a pair's label cannot give the answer away.

Readers compared on the same run: SMDA credit (`ghost` live; `deconvolve` and `step` replayed
from the same ledger, so all three see identical training), the pair's training loss at its step,
random, and the peers of `peers.py` (TracIn-style gradient dot product and kronfluence EK-FAC at the
final weights), each run in its own process for its own time and memory.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._resources import DATA
from .analysis import spearman
from .carry import end_weights
from .peers import peak_rss_mb, run_missing_peers
from .specs import PEERS, poison_train_seed
from ..credit import OptimizerKernel, replay_credits
from ..policy import auroc

logger = logging.getLogger(__name__)

KINDS = {"over-refusal": "harmless", "compliance": "harmful"}


def load_plants(path: str | Path | None = None) -> list[dict[str, Any]]:
    from .demo import load_pairs

    plants = load_pairs(path or DATA / "plants.jsonl")
    bad = [p["id"] for p in plants if p.get("plant") not in KINDS or KINDS[p["plant"]] != p["label"]]
    if bad:
        raise ValueError(f"plants {bad}: each needs plant ∈ {list(KINDS)} with the matching label {KINDS}")
    return plants


def poison_pairs(pairs: Sequence[dict[str, Any]], plants: Sequence[dict[str, Any]], n_base: int,
                 seed: int = 0) -> list[dict[str, Any]]:
    """A fixed, label-stratified subset of `pairs` plus every plant, in a seeded random order."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[dict[str, Any]]] = {}
    for p in pairs:
        by_label.setdefault(p["label"], []).append(p)
    base = []
    for label, items in sorted(by_label.items()):
        n = round(n_base * len(items) / len(pairs))
        base += [items[i] for i in sorted(rng.choice(len(items), size=min(n, len(items)), replace=False))]
    mixed = base + list(plants)
    return [mixed[i] for i in rng.permutation(len(mixed))]


# ---------------------------------------------------------------- scoring a ranking
def detection(scores: dict[str, float], pairs: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Within-label AUROC, precision@N (N = number of plants of the kind) and every plant's rank."""
    label = KINDS[kind]
    pool = [p for p in pairs if p["label"] == label]
    ids = [p["id"] for p in pool]
    s = np.asarray([scores.get(i, np.nan) for i in ids], np.float64)
    s = np.where(np.isfinite(s), s, -np.inf)
    is_plant = np.asarray([p.get("plant") == kind for p in pool])
    order = np.argsort(-s, kind="mergesort")
    ranks = np.empty(len(ids), int)
    ranks[order] = np.arange(1, len(ids) + 1)
    n = int(is_plant.sum())
    return {"auroc": auroc(s, is_plant), "precision_at_n": float(is_plant[order[:n]].mean()) if n else float("nan"),
            "n_plants": n, "n_pool": len(ids), "plant_ranks": sorted(int(r) for r in ranks[is_plant]),
            "plant_rank_of": {i: int(r) for i, r, pl in zip(ids, ranks, is_plant) if pl}}


# ---------------------------------------------------------------- the benchmark
"""Other readers, each run after training in its own fresh process so its time and peak memory are its own."""


@dataclass
class PoisonSettings:
    n_base: int = 96
    """Demo pairs mixed with the plants (label ratio of the demo kept); sized so one run fits ≲ 25 min here."""
    seed: int = 0
    measure: str = "ghost"
    """The live run's credit measure; `deconvolve` and `step` are replayed from its ledger."""
    order_seed: int | None = None
    """Seed of the training run (the Trainer's shuffle of the pairs): another data order of the same planting.
    None: `seed`, so that one seed names one planting and its first order."""
    peers: tuple[str, ...] = PEERS
    every: int = 1
    """The live run's `SMDAConfig.every_n_steps`: one probe pass per this many steps (a window's change is split among
    its pairs through the optimizer's kernel). Training is the same whatever it is; the callback's cost falls with it."""
    scorer: str | None = None
    """The live run's refusal scorer (`SMDAConfig.scorer`): None keeps the demo's (`first_token`); `prefix` scores
    three teacher-forced tokens of each opening, so "I can't" and "I'd be happy" are told apart."""
    replay: bool = False
    """Also the replay reader (lab/replay.py) after training: reverse mode through the run's recorded order."""
    replay_every: int = 4
    """The replay's checkpoint spacing (memory holds this many + 1 states of θ, m, v)."""
    replay_outer: int | None = None
    """The replay's disk checkpoint spacing, a multiple of `replay_every` (None: the same; larger: less disk, one more
    forward pass)."""
    verify: int | None = None
    """Also check what each plant left in the tuned model: retrain the run's order without each plant, and without
    `verify` ordinary pairs of each label (the controls, drawn from the seeds), one at a time (`verify_plants`,
    under `verify/`). None: no retrains."""

    def __post_init__(self) -> None:
        if self.verify is not None and self.verify < 0:
            raise ValueError(f"--verify {self.verify}: the number of ordinary pairs per label retrained without as controls "
                             "must be 0 or more (0: the plants only, verified by sign)")

    @property
    def train_seed(self) -> int:
        """The Trainer seed the run was trained with (its data order)."""
        return poison_train_seed(self.seed, self.order_seed)


def run_poison(out: str | Path, settings: PoisonSettings | None = None, train: bool = True) -> dict[str, Any]:
    """Train on demo pairs + plants with the callback (unless `train` is False and the run exists),
    run every peer reader, then score every reader."""
    from ..config import SMDAConfig
    from .demo import DemoSettings, load_pairs, run_demo

    st = settings or PoisonSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if train:
        if (out / "run" / "smda" / "summary.json").exists():
            raise FileExistsError(f"{out} holds a finished run, and its peers, replay and retrains were read from it: "
                                  "add readers to it with --peers-only, or train into another --out")
        pairs = poison_pairs(load_pairs(DATA / "pairs.jsonl"), load_plants(), st.n_base, st.seed)
        (out / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
        (out / "probes_at_run.jsonl").write_bytes((DATA / "probes.jsonl").read_bytes())
        demo = DemoSettings(check_answers=False, seed=st.train_seed)
        if st.scorer is not None:
            demo.scorer = st.scorer
        cfg = SMDAConfig(scorer=demo.scorer, probe_batch_size=16, credit_measure=st.measure, every_n_steps=st.every)
        t0 = time.perf_counter()
        run_demo(out / "run", out / "pairs.jsonl", settings=demo, config=cfg)
        timing = {"train_with_smda": {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb())}}
        (out / "timing.json").write_text(json.dumps(timing), encoding="utf-8")
    elif not (out / "run" / "model").exists():
        raise FileNotFoundError(f"{out / 'run' / 'model'} does not exist: run without --peers-only first to train")
    run_missing_peers(out, st.peers)
    if st.replay and not (out / "replay.json").exists():
        replay_poison(out, st)
    if st.verify is not None:
        verify_plants(out, st)
    return score_poison(out, st)


VERIFY = "verify"
"""The folder under a poison run that holds its leave-one-out retrains (`verify_plants`)."""


def verify_controls(pairs: Sequence[dict[str, Any]], st: PoisonSettings) -> list[str]:
    """`st.verify` ordinary pairs of each label, drawn from the planting and order seeds: the plants' yardstick."""
    rng = np.random.default_rng([st.seed, st.train_seed, 0x7e71f])
    out = []
    for label in sorted(set(KINDS.values())):
        ids = sorted(p["id"] for p in pairs if p["label"] == label and "plant" not in p)
        if st.verify > len(ids):
            raise ValueError(f"--verify {st.verify}: the run has only {len(ids)} ordinary {label} pairs to draw controls from")
        out += sorted(rng.choice(ids, size=st.verify, replace=False).tolist()) if st.verify else []
    return out


def verify_plants(out: str | Path, settings: PoisonSettings | None = None) -> list[Path]:
    """Retrain the finished run's order (without the callback) once on all pairs, and once without each plant and each
    control (`verify_controls`), each kept pair at its full-run learning rate (`LDSSettings.keep_schedule`: dropping a
    warm-up pair moves no other pair's rate); then one probe pass each. Jobs in `verify/jobs/`, resumable like
    `smda benchmark-lds`'s; `score_poison` reads them (`verification`)."""
    from .demo import load_pairs
    from .lds import LDSSettings, run_jobs

    st = settings or PoisonSettings()
    out = Path(out)
    if st.verify is None:
        raise ValueError("verify=None: give the number of ordinary pairs per label to retrain without (0: the plants only)")
    if not (out / "run" / "smda" / "summary.json").exists():
        raise FileNotFoundError(f"{out / 'run'} holds no finished run: run without --peers-only first to train")
    pairs = load_pairs(out / "pairs.jsonl")
    leave = [p["id"] for p in pairs if "plant" in p] + verify_controls(pairs, st)
    logger.info("poison: verify %s: %d retrains without one pair each (plants and %d controls per label)",
                out, len(leave), st.verify)
    return run_jobs(out / VERIFY, LDSSettings(ranking_run=str(out), seed=st.train_seed, subsets=0, replicas=1,
                                              leave_out=tuple(leave), keep_schedule=True))


def intent_effect(measured: dict[str, float], kind: str) -> float:
    """A measured change of final refusal read in the direction a plant of `kind` intends: over-refusal plants
    mean to raise harmless refusal, compliance plants to lower harmful refusal."""
    return measured["harmless"] if kind == "over-refusal" else -measured["harmful"]


def verification(out: Path, pairs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """What each plant left in the tuned model, from `verify/jobs`: per kind, the change of final refusal that training
    the plant made (the full retrain minus the one without it), read in its intended direction; the same for the
    controls of its label; and the plants verified: those that moved refusal the intended way by more than every
    control did (by more than 0 without controls). None when there are no retrains."""
    from .lds_score import load_jobs, removal_changes

    jobs = load_jobs(out / VERIFY)
    if not any(n.startswith("full") for n in jobs):
        return None
    # pair id -> the change of final refusal its training made: minus its removal's
    made = {i: {q: -v for q, v in m.items()} for i, m in removal_changes(jobs).items()}
    by_id = {p["id"]: p for p in pairs}
    res: dict[str, Any] = {"n_retrains": len(made) + 1}
    for kind, label in KINDS.items():
        plants = {i: intent_effect(m, kind) for i, m in made.items() if by_id[i].get("plant") == kind}
        controls = {i: intent_effect(m, kind) for i, m in made.items() if by_id[i]["label"] == label and "plant" not in by_id[i]}
        bar = max([0.0, *controls.values()])
        missing = sorted(p["id"] for p in pairs if p.get("plant") == kind and p["id"] not in made)
        res[kind] = {"plants": plants, "controls": controls, "bar": bar, "missing": missing,
                     "verified": sorted(i for i, e in plants.items() if e > bar),
                     "marks": marks_vs_controls(list(plants.values()), list(controls.values()))}
    return res


def marks_vs_controls(plants: Sequence[float], controls: Sequence[float]) -> dict[str, Any]:
    """Do the plants as a group leave a larger mark than ordinary pairs? Mean and spread of each side's measured
    effect (intended direction) and the probability that a plant's exceeds a control's (Mann–Whitney AUROC, ties
    half; None without controls). Near 0.5 the plants' end-of-run marks are the size of retraining's own spread."""
    a, b = np.asarray(plants, float), np.asarray(controls, float)
    sd = lambda x: float(np.std(x, ddof=1)) if len(x) > 1 else None
    above = auroc(np.r_[a, b], np.r_[np.ones(len(a), bool), np.zeros(len(b), bool)]) if len(a) and len(b) else None
    return {"n_plants": int(len(a)), "n_controls": int(len(b)), "plants_mean": float(a.mean()) if len(a) else None,
            "plants_sd": sd(a), "controls_mean": float(b.mean()) if len(b) else None, "controls_sd": sd(b),
            "p_plant_above_control": above}


def format_marks(kind: str, m: dict[str, Any]) -> str:
    f = lambda x: "–" if x is None else f"{x:+.3f}"
    g = lambda x: "–" if x is None else f"{x:.3f}"
    return (f"  {kind}: {m['n_plants']} plants moved it {f(m['plants_mean'])} on average (sd {g(m['plants_sd'])}), "
            f"{m['n_controls']} controls {f(m['controls_mean'])} (sd {g(m['controls_sd'])}); "
            f"P(a plant's mark > a control's) = {g(m['p_plant_above_control'])}")


def verified_detection(scores: dict[str, float], pairs: Sequence[dict[str, Any]], kind: str,
                       ver: dict[str, Any]) -> dict[str, Any]:
    """`detection` with the plants that did not act as intended (`verification`) left out of the pool: the verified
    plants against the ordinary pairs of their label; plus the reader's Spearman with the measured effect over the
    pairs retrained without (plants and controls of the label)."""
    keep = set(ver[kind]["verified"])
    pool = [p for p in pairs if p.get("plant") != kind or p["id"] in keep]
    d = detection(scores, pool, kind)
    measured = {**ver[kind]["plants"], **ver[kind]["controls"]}
    ids = [i for i in measured if i in scores and np.isfinite(scores[i])]
    d["spearman_with_retraining"] = spearman([scores[i] for i in ids], [measured[i] for i in ids]) if len(ids) > 2 else None
    return d


def replay_poison(out: str | Path, settings: PoisonSettings | None = None) -> dict[str, Any]:
    """The replay reader on a finished poison run: the run's recorded order retrained without the callback
    (the demo's settings, the run's seed), each pair's removal carried through the rest of the run.
    Written to replay.json, with how far the replay's end refusal is from the run's last snapshot."""
    from .demo import load_pairs
    from .lds import records_order, replay_recorded
    from ..ledger import load_records

    st = settings or PoisonSettings()
    out = Path(out)
    if not (out / "run" / "smda").exists():
        raise FileNotFoundError(f"{out / 'run'} holds no finished run: run without --peers-only first to train")
    pairs = {p["id"]: p for p in load_pairs(out / "pairs.jsonl")}
    order = records_order(out / "run")
    if sorted(order) != sorted(pairs):
        raise ValueError(f"{out / 'run'}: its ledger does not name every pair of {out / 'pairs.jsonl'} once (one pair per step)")
    seed = st.train_seed
    logger.info("poison: replay of %s (%d steps, seed %d)", out, len(order), seed)
    res = replay_recorded(out, pairs, order, seed, every=st.replay_every, outer=st.replay_outer)
    last = max(load_records(out / "run"), key=lambda r: r["step"])
    res["end_vs_run_abs_diff"] = {q: abs(float(res["final"][q]) - float(last[f"refusal_{q}"])) for q in ("harmful", "harmless")}
    (out / "replay.json").write_text(json.dumps(res), encoding="utf-8")
    return res


def score_poison(out: str | Path, settings: PoisonSettings | None = None) -> dict[str, Any]:
    """Rank the pairs of a finished poison run with every reader and score detection (poison.json).
    SMDA rules are all replayed from the one ledger (equal to the live credit, tested), so all see one run."""
    from .demo import load_pairs
    from ..ledger import load_credits, load_policy, load_records

    st = settings or PoisonSettings()
    out = Path(out)
    pairs = load_pairs(out / "pairs.jsonl")
    run_dir = out / "run"
    records, policy, credits = load_records(run_dir), load_policy(run_dir), load_credits(run_dir)
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").exists() else {}
    timing["smda_callback_only"] = {"seconds": round(sum(r.get("seconds", 0.0) for r in records), 1)}
    adam = OptimizerKernel(**credits["kernel"])
    readers: dict[str, dict[str, dict[str, float]]] = {}
    for name, kernel, measure, part in (("smda_optimizer_ghost", adam, "ghost", "total"),
                                        ("smda_optimizer_deconvolve", adam, "deconvolve", "total"),
                                        ("smda_own_window_ghost", adam, "ghost", "own"),
                                        ("smda_own_window_deconvolve", adam, "deconvolve", "own"),
                                        ("smda_step", OptimizerKernel(), "deconvolve", "total")):
        if measure == "ghost" and credits["measure"] != "ghost":
            continue
        cr = replay_credits(records, policy, kernel, measure, part, by="id")
        readers[name] = {"over-refusal": {i: v["refusal_harmless"] for i, v in cr.items()},
                         "compliance": {i: -v["refusal_harmful"] for i, v in cr.items()}}
        if name == "smda_optimizer_deconvolve":
            readers["smda_worst_category_deconvolve"] = worst_category(cr, policy)
    # the own window carried to the end of the run by its forgetting rate (`smda suspects --read end`), and by the
    # AR(2) fits of the run's trajectory (lab readers, docs/credit.md), per quantity and joint
    own = readers.get("smda_own_window_ghost") or readers.get("smda_own_window_deconvolve")
    hash_of = {p.get("id"): p["hash"] for r in records for p in r.get("pairs", [])}
    for name, fit_order, shared in (("smda_own_window_carried", 1, False), ("smda_own_window_carried_ar2", 2, False),
                                    ("smda_own_window_carried_ar2_joint", 2, True)):
        try:
            ends = end_weights(records, policy, order=fit_order, shared=shared)[0]
        except ValueError as e:
            logger.warning("poison: no reader %s: %s", name, e)
            continue
        readers[name] = {kind: {i: v * ends[q].get(hash_of.get(i, ""), 0.0) for i, v in own[kind].items()}
                         for kind, q in (("over-refusal", "harmless"), ("compliance", "harmful"))}
    loss = {r["pairs"][0].get("id"): float(r["train_loss"]) for r in records
            if len(r.get("pairs", [])) == 1 and r.get("train_loss") is not None}
    if loss:  # (a window of several pairs has no one pair's loss)
        readers["training_loss_at_step"] = {"over-refusal": loss, "compliance": loss}
    # the random reader: its own draw per data order (the first order keeps the draw of the planting's seed)
    rng = np.random.default_rng(st.seed + 1 if st.order_seed in (None, st.seed) else [st.seed + 1, st.order_seed])
    rand = {p["id"]: float(rng.random()) for p in pairs}
    readers["random"] = {"over-refusal": rand, "compliance": rand}
    for path in sorted((out / "peers").glob("*.json")):
        peer = json.loads(path.read_text())
        readers[path.stem] = peer["scores"]
        timing[path.stem] = {"seconds": peer["seconds"], "peak_rss_mb": peer["peak_rss_mb"]}
    if (out / "replay.json").exists():
        rep = json.loads((out / "replay.json").read_text())
        readers.update(replay_readers(rep))
        timing["replay"] = {"seconds": rep.get("seconds"), "peak_rss_mb": rep.get("peak_rss_mb"),
                            "end_vs_run_abs_diff": rep.get("end_vs_run_abs_diff")}
    alerts = {r["pairs"][0].get("id") for r in records if r.get("alert") and len(r.get("pairs", [])) == 1}
    order = [p.get("id") for r in records for p in r.get("pairs", [])]
    result = {"settings": asdict(st), "n_pairs": len(pairs), "timing": timing, "steps": len(records), "order": order,
              "plants_alerted": sorted(i for i in alerts if i and i.startswith("plant")), "n_alerts": len(alerts),
              "detection": {name: {kind: detection(sc[kind], pairs, kind) for kind in KINDS} for name, sc in readers.items()}}
    ver = verification(out, pairs)
    if ver is not None:
        result["verification"] = ver
        result["detection_verified"] = {name: {kind: verified_detection(sc[kind], pairs, kind, ver) for kind in KINDS}
                                        for name, sc in readers.items()}
    (out / "poison.json").write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
    return result


def worst_category(credits: dict[str, dict[str, Any]], policy: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per pair and kind, `analysis.worst_category` of its credited change by probe category (`smda suspects --read
    category`)."""
    from .analysis import worst_category as worst

    label = {p["category"]: p["label"] for p in policy.get("probes", [])}
    return {kind: {i: worst(v["refusal_by_category"], label, kind)[1] for i, v in credits.items()} for kind in KINDS}


def replay_readers(rep: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """The replay's two readers as suspicion scores per kind. A pair's removal effect is the change of the
    probe quantity when it is dropped, so what the pair does when trained is minus that: over-refusal is
    raising harmless refusal (score −effect on harmless), compliance is lowering harmful refusal (score +effect)."""
    return {name: {"over-refusal": {i: -float(e) for i, e in zip(rep["order"], rep[key]["harmless"])},
                   "compliance": {i: float(e) for i, e in zip(rep["order"], rep[key]["harmful"])}}
            for name, key in (("replay_dropped_in_place", "removal_effect"), ("replay_weight_zero", "weight_zero_effect"))}


def plant_wins(d: dict[str, Any]) -> list[float]:
    """Per plant, the share of non-plants of its label ranked below it; their mean is the run's AUROC."""
    n_neg = d["n_pool"] - d["n_plants"]
    return [(n_neg - (k - 1 - j)) / n_neg for j, k in enumerate(sorted(d["plant_ranks"]))]


def pool_poison(dirs: Sequence[str | Path], boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Planted-pair detection pooled over finished runs (plantings / data orders): per reader and kind the
    pooled AUROC (mean over every plant of every run of its share of non-plants ranked below it), its 95 %
    bootstrap interval over plants, each run's AUROC and the mean precision@N. A `dirs` entry is a run folder or
    a poison.json kept from one (`benchmarks/poison/` keeps the scores of runs whose folders are gone)."""
    files = [Path(d) if Path(d).suffix == ".json" else Path(d) / "poison.json" for d in dirs]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"--pool: no scores at {', '.join(missing)}; score a finished run with --score-only "
                                "(same --seed and --order-seed as it was trained with), or give its kept poison.json")
    runs = [json.loads(f.read_text()) for f in files]
    orders = [tuple(r.get("order") or ()) for r in runs]
    out: dict[str, Any] = {"runs": [str(d) for d in dirs], "readers": {},
                           "plantings": len({frozenset(o) for o in orders}), "data_orders": len(set(orders)),
                           "orders_recorded": all(orders)}
    out["readers"] = _pool(runs, "detection", boot, seed)
    if runs and all("detection_verified" in r for r in runs):  # the verified plants, where every run was verified
        out["readers_verified"] = _pool(runs, "detection_verified", boot, seed)
    if all("plant_rank_of" in d for r in runs for rd in r["detection"].values() for d in rd.values()):
        out["plants"] = {name: plants_across_runs(runs, name) for name in out["readers"]}
        out["missed_by_every_reader"] = missed_by_every_reader(out["plants"])
    ver = [r["verification"] for r in runs if r.get("verification")]
    if ver:  # every verified run's plants and controls together
        out["marks"] = {k: marks_vs_controls([e for v in ver for e in v[k]["plants"].values()],
                                             [e for v in ver for e in v[k]["controls"].values()]) for k in KINDS}
        out["marks_runs"] = len(ver)
    return out


def plants_across_runs(runs: list[dict[str, Any]], reader: str) -> dict[str, Any]:
    """Each plant in every run that trained it: its step (position in the run's order, 1-based) and its share of
    the ordinary pairs of its label ranked below it by `reader` (1: ranked above all of them). Every planting mixes
    the same plants (data/plants.jsonl) into other ordinary pairs, so a plant recurs across runs. Per kind: over every
    two runs that trained a plant in different orders, the Spearman of its share in one with its share in the other
    (high: what the reader finds is the pair's own; low: its place in the run), and over every plant in every run, the
    Spearman of share with step (positive: plants trained early are missed)."""
    orders = [tuple(r.get("order") or ()) for r in runs]
    steps = [{i: k + 1 for k, i in enumerate(o)} for o in orders]
    out: dict[str, Any] = {}
    for kind in KINDS:
        seen: dict[str, list[dict[str, Any]]] = {}
        for j, r in enumerate(runs):
            d = r["detection"][reader][kind]
            share = dict(zip(sorted(d["plant_ranks"]), plant_wins(d)))
            for i, rank in d["plant_rank_of"].items():
                seen.setdefault(i, []).append({"run": j, "order": orders[j], "step": steps[j].get(i),
                                               "rank": rank, "share": share[rank]})
        a, b = [], []
        for rows in seen.values():
            for x in range(len(rows)):
                for y in range(x + 1, len(rows)):
                    if rows[x]["order"] != rows[y]["order"]:  # both ways round: no run is "first"
                        a += [rows[x]["share"], rows[y]["share"]]
                        b += [rows[y]["share"], rows[x]["share"]]
        flat = [e for rows in seen.values() for e in rows if e["step"] is not None]
        out[kind] = {"plants": {i: [{k: v for k, v in e.items() if k != "order"} for e in rows] for i, rows in sorted(seen.items())},
                     "between_orders": {"spearman": spearman(np.asarray(a), np.asarray(b)), "n_pairs": len(a) // 2},
                     "share_vs_step": {"spearman": spearman(np.asarray([e["share"] for e in flat]),
                                                            np.asarray([e["step"] for e in flat], float)), "n": len(flat)}}
    return out


NOT_READERS = ("random", "training_loss_at_step")
"""Baselines, not attribution readers: left out of `missed_by_every_reader`."""


def missed_by_every_reader(plants: dict[str, Any]) -> dict[str, list[str]]:
    """Per kind, the plants that every attribution reader ranks below an ordinary pair of their label in every run
    (credit, peers, replay alike): plants whose training did not move the scored refusal the intended way, or not
    more than an ordinary pair, in any order. A miss that is the plant's, not a reader's."""
    readers = [r for r in plants if r not in NOT_READERS]
    out: dict[str, list[str]] = {}
    for kind in KINDS:
        ids = set.intersection(*(set(plants[r][kind]["plants"]) for r in readers)) if readers else set()
        out[kind] = sorted(i for i in ids if all(x["share"] < 1 for r in readers for x in plants[r][kind]["plants"][i]))
    return out


def _pool(runs: list[dict[str, Any]], key: str, boot: int, seed: int) -> dict[str, Any]:
    readers = sorted(set.intersection(*(set(r[key]) for r in runs))) if runs else []
    pooled: dict[str, Any] = {}
    for name in readers:
        entry = {}
        for k, kind in enumerate(KINDS):
            per = [r[key][name][kind] for r in runs]
            wins = np.asarray([w for d in per for w in plant_wins(d)])
            if not len(wins):
                continue
            # each reader and kind its own bootstrap stream: its interval does not move when readers are added
            rng = np.random.default_rng([seed, zlib.crc32(name.encode()), k])
            draws = [wins[rng.integers(0, len(wins), len(wins))].mean() for _ in range(boot)]
            entry[kind] = {"auroc": float(wins.mean()), "ci95": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))],
                           "per_run": [float(d["auroc"]) for d in per], "precision_at_n": float(np.mean([d["precision_at_n"] for d in per])),
                           "n_plants": int(len(wins))}
        pooled[name] = entry
    return pooled


def format_pool(res: dict[str, Any]) -> str:
    shape = (f"{res['plantings']} plantings (distinct pair sets), {res['data_orders']} distinct training orders"
             if res.get("orders_recorded") else "training orders not recorded in every poison.json (re-score with --score-only)")
    head = ["| reader | over-refusal AUROC [95 % CI] | per run | P@N | compliance AUROC [95 % CI] | per run | P@N |",
            "|---|---|---|---|---|---|---|"]
    runs = ", ".join(f"r{j} {d}" for j, d in enumerate(res["runs"]))
    lines = [f"Planted pairs pooled over {len(res['runs'])} runs: {runs}", shape, "", *head,
             *_pool_rows(res["readers"])]
    if "readers_verified" in res:
        lines += ["", "The verified plants only (each run's plants that moved final refusal the intended way more than its "
                  "controls; the others left out of the pool):", "", *head, *_pool_rows(res["readers_verified"])]
    lines += format_plants(res)
    if "marks" in res:
        lines += ["", f"What the plants left at the end, against ordinary pairs retrained without the same way "
                  f"({res['marks_runs']} verified runs):", *(format_marks(k, res["marks"][k]) for k in KINDS)]
    return "\n".join(lines)


PLANT_TABLE_READERS = ("smda_own_window_deconvolve", "smda_own_window_ghost", "smda_own_window_carried")
"""The readers whose per-plant table `format_pool` prints: the default `smda suspects` reading (the own window, of
whichever measure the runs have) and the same carried to the end of the run (`--read end`)."""


def format_plants(res: dict[str, Any]) -> list[str]:
    """Per plant, its step and rank in every pooled run, for the readers of PLANT_TABLE_READERS (empty when a
    kept poison.json predates per-plant ranks)."""
    if "plants" not in res:
        return ["", "Per-plant ranks: not in every poison.json (scored before 2026-12-05); re-score a run with --score-only."]
    fmt = lambda x: "–" if x is None or not np.isfinite(x) else f"{x:+.2f}"
    readers = [r for r in res["plants"] if r not in NOT_READERS]
    lines = ["", f"Plants every reader ({', '.join(readers)}) ranks below an ordinary pair in every run: "
             + "; ".join(f"{k} {', '.join(v) or 'none'}" for k, v in res["missed_by_every_reader"].items())]
    for name in PLANT_TABLE_READERS:
        if name not in res["plants"]:
            continue
        lines += ["", f"Each plant in each run by {name} (step it was trained at → its rank among the pairs of its label; "
                  "* = ranked below an ordinary pair):"]
        for kind in KINDS:
            e = res["plants"][name][kind]
            bo, sv = e["between_orders"], e["share_vs_step"]
            lines.append(f"  {kind}: a plant's share of ordinary pairs ranked below it, Spearman between two runs that trained it "
                         f"in different orders {fmt(bo['spearman'])} ({bo['n_pairs']} plant × run pairs), with its step "
                         f"{fmt(sv['spearman'])} ({sv['n']} plant-runs)")
            for i, rows in e["plants"].items():
                cells = [f"r{x['run']}: step {x['step'] if x['step'] is not None else '?'} → {x['rank']}{'*' if x['share'] < 1 else ''}"
                         for x in rows]
                lines.append(f"    {i}: " + "; ".join(cells))
    return lines


def _pool_rows(readers: dict[str, Any]) -> list[str]:
    rows = []
    for name, e in readers.items():
        cells = []
        for kind in KINDS:
            k = e.get(kind)
            cells.append("– | – | –" if k is None else
                         f"{k['auroc']:.3f} [{k['ci95'][0]:.2f}, {k['ci95'][1]:.2f}] | {' / '.join(f'{a:.2f}' for a in k['per_run'])} | "
                         f"{k['precision_at_n']:.2f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def format_poison(res: dict[str, Any]) -> str:
    lines = [f"Planted pairs: {res['n_pairs']} pairs trained ({res['steps']} steps); within-label detection",
             "", "| reader | over-refusal AUROC | P@N | compliance AUROC | P@N | plant ranks (over / compliance) |",
             "|---|---|---|---|---|---|"]
    for name, d in res["detection"].items():
        o, c = d["over-refusal"], d["compliance"]
        lines.append(f"| {name} | {o['auroc']:.3f} | {o['precision_at_n']:.2f} | {c['auroc']:.3f} | {c['precision_at_n']:.2f} | "
                     f"{o['plant_ranks']} of {o['n_pool']} / {c['plant_ranks']} of {c['n_pool']} |")
    lines += format_verification(res)
    lines += ["", f"plants that raised an interference alert: {res['plants_alerted'] or 'none'} ({res['n_alerts']} alerts in all)",
              "", "timing: " + json.dumps(res["timing"])]
    return "\n".join(lines)


def format_verification(res: dict[str, Any]) -> list[str]:
    """The plants' measured effects and the table over verified plants (empty without `verification`)."""
    ver = res.get("verification")
    if not ver:
        return []
    lines = ["", f"What the plants left in the tuned model ({ver['n_retrains']} retrains, each kept pair at its full-run rate): "
             "the change of final refusal their training made, in the intended direction (harmless refusal up / harmful down)"]
    for kind in KINDS:
        v = ver[kind]
        fmt = lambda d: ", ".join(f"{i} {e:+.3f}" for i, e in sorted(d.items(), key=lambda x: -x[1]))
        bar = (f"above {v['bar']:+.3f}, the most any control moved it" if v["controls"] else
               "above 0, the intended sign only: no control retrained")
        lines += [f"  {kind}: verified {len(v['verified'])} of {len(v['plants'])} plants ({bar}); plants: {fmt(v['plants'])}",
                  f"    controls: {fmt(v['controls']) or 'none'}"]
        if v["missing"]:
            lines.append(f"    plants not retrained yet: {v['missing']}")
    if all("marks" in ver[k] for k in KINDS):  # poison.json scored before the plants-vs-controls summary has none
        lines += ["", "The plants as a group against ordinary pairs (0.5: a plant leaves no more mark at the end than an "
                  "ordinary pair):", *(format_marks(k, ver[k]["marks"]) for k in KINDS)]
    lines += ["", "Detection of the verified plants (the others left out of the pool), and Spearman of the reader with the "
              "measured effect over the pairs retrained without:", "",
              "| reader | over-refusal AUROC | Spearman | compliance AUROC | Spearman |", "|---|---|---|---|---|"]
    sp = lambda x: "–" if x is None or not np.isfinite(x) else f"{x:+.2f}"
    au = lambda d: "–" if not d["n_plants"] else f"{d['auroc']:.3f}"
    for name, d in res["detection_verified"].items():
        o, c = d["over-refusal"], d["compliance"]
        lines.append(f"| {name} | {au(o)} | {sp(o['spearman_with_retraining'])} | {au(c)} | {sp(c['spearman_with_retraining'])} |")
    return lines
