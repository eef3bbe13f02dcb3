"""Linear datamodeling score on the demo: does a pair's credit predict retraining? (`smda benchmark-lds`)

1. A ranking run: the demo's SFT with SMDACallback on the first `n_pairs` shipped pairs (one pair per
   optimizer step), which records the data order and every pair's credit. Or, with `ranking_run`, a
   finished run of other pairs made with the demo's settings (a `smda benchmark-poison` directory: its
   pairs.jsonl and run/), so that LDS is measured on a run with planted pairs; its replay.json and
   peers/ are reused when they exist.
2. Replays of that order without the callback (sequential sampler over the pairs as trained): two of
   all pairs (the bitwise check: identical retrains must give identical probe refusal), and one per
   random subset that drops `drop_fracs` of the pairs in place (the order of the rest kept).
3. One probe pass at the end of each retrain: the credit's own quantities (mean first-token refusal on
   the harmful and on the harmless probes, per category).
4. The scoring (lds_score.py): every reader's LDS and calibration over the finished subsets, and the kept file
   (`--keep`) that a new statistic needs instead of the run folder.
5. With `--replay`, the replay reader (lab/replay.py): reverse mode through the ranking run's order, each
   pair's removal carried through the rest of the run; written to `replay.json` and scored like the others.

Each retrain writes `jobs/<name>.json` as it ends, so a stopped benchmark resumes, and `--shard i/k`
shares the jobs between processes. The retrains need no per-step probing: a job costs one plain SFT
plus one probe pass.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..credit.replay import EXACT, ReplayVariant, Segment
from .files import write_json
from .specs import poison_train_seed

logger = logging.getLogger(__name__)


@dataclass
class LDSSettings:
    n_pairs: int = 64
    """Shipped pairs in the ranking run (the first n); one optimizer step each."""
    subsets: int = 40
    drop_fracs: tuple[float, ...] = (0.05, 0.10)
    """Subset k drops drop_fracs[k % len] of the pairs (at least one)."""
    seed: int = 0
    """Data-order seed of the ranking run (the Trainer's) and of the subsets' draws."""
    replicas: int = 2
    """Full replays: identical retrains, whose agreement is the bitwise check and the noise floor."""
    ranking_run: str | None = None
    """A finished directory holding pairs.jsonl and run/ (e.g. `smda benchmark-poison --out DIR`), trained with
    the demo's settings and `seed` as its Trainer seed: used as the ranking run instead of training one."""
    leave_out: tuple[str, ...] = ()
    """Pairs retrained without, one at a time (jobs `loo-<id>`, run right after the full replays): the exact
    single-pair counterfactual of this data order, set beside every reader's prediction for that pair. ("all",): every
    pair of the ranking run, whose sum is then scored as the additive reader (`ADDITIVE`)."""
    keep_schedule: bool = False
    """Each kept pair trains at the learning rate it had in the full run (its place's), instead of the rate of the place
    it moves up to. Dropping a pair in place otherwise also changes the rate of every later warm-up step (the demo
    warms up over 10 steps), an effect that is the schedule's, not the pair's; the replay's removals keep the rates."""
    orders: int = 1
    """Data orders every subset is retrained in, for the noise ceiling across runs. Order 0 is the ranking run's; order
    o ≥ 1 is a fixed permutation of all its pairs (`data_order`), each subset's pairs dropped from it in place, with
    its own reference retrain on all pairs. Jobs of order o ≥ 1 are named `o<o>-full` and `o<o>-s<k>`."""
    measure: str = "deconvolve"
    """The ranking run's credit measure (SMDAConfig.credit_measure). With `ghost` (one extra probe pass per step) the
    scorer reads the ghost credit beside the default one, which it replays from the same ledger; the retrains do not
    depend on it (the callback leaves training bitwise unchanged), so a ghost ranking run can be scored against
    another run's retrains of the same order and seed."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.measure not in ("deconvolve", "ghost"):
            raise ValueError(f"LDS measure={self.measure!r}: use 'deconvolve' (the default) or 'ghost'")
        if self.orders < 1:
            raise ValueError(f"LDS orders={self.orders}: give ≥ 1 data orders (1: the ranking run's only; 3 or more for "
                             "the noise ceiling across runs)")
        if self.replicas < 1:
            raise ValueError(f"LDS replicas={self.replicas}: at least one retrain on all pairs is the reference of every "
                             "measured change; use --replicas 1 (reference only) or 2 (also the bitwise check)")


REPLAYS = {"exact": ("replay", "replay.json"), "fixed": ("replay, fixed v", "replay_fixed_v.json")}
"""Per second-moment model (lab/replay.py): the replay reader's name and the file under --out it is written to."""


def replay_reader(variant: ReplayVariant = EXACT, last: int | None = None) -> tuple[str, str]:
    """The replay reader's name and file: the whole run's (`REPLAYS`, by its second-moment model), or over its last
    `last` steps only (what the callback's `replay_last_steps` computes on the user's run; earlier pairs read 0);
    each other field of `variant` that is not the run's own names itself: no curvature (every gradient held at the
    recorded one), the damped replay (AdamW's ε raised in the reverse pass), the replay linearised in the last
    `layers` transformer blocks (the first |layers| if negative)."""
    name, file = REPLAYS[variant.second_moment]
    if not variant.curvature:
        name, file = f"{name}, no curvature", file.replace(".json", "_nocurv.json")
    if variant.reverse_eps:
        eps = variant.reverse_eps
        name, file = f"{name}, reverse ε {eps:g}", file.replace(".json", f"_eps{eps:g}.json")
    if variant.layers > 0:
        name, file = f"{name}, last {variant.layers} layers", file.replace(".json", f"_layers{variant.layers}.json")
    elif variant.layers < 0:
        name, file = f"{name}, first {-variant.layers} layers", file.replace(".json", f"_first{-variant.layers}.json")
    return (name, file) if not last else (f"{name}, last {last} steps", file.replace(".json", f"_last{last}.json"))


def segment_reader(rname: str, below: int, until: int) -> str:
    """The reader of a replay whose first `below` pairs' removals were taken exactly up to step `until` (`Segment`)."""
    return f"{rname}, first {below} pairs exact to step {until}"


def has_segments(rep: dict[str, Any], segment: Segment | None) -> bool:
    """Whether a written replay already holds `segment`'s readers (None: nothing asked)."""
    if segment is None:
        return True
    seg = rep.get("segments")
    return bool(seg) and (segment.below in (None, seg["below"])) and set(segment.until) <= {b["until"] for b in seg["by_until"]}


def records_order(run_dir: Path) -> list[str]:
    """Pair ids in the order the ranking run trained them (one pair per step)."""
    from ..ledger import load_records

    order = []
    for r in sorted(load_records(run_dir), key=lambda r: r["step"]):
        order += [p["id"] for p in r.get("pairs", []) if "id" in p]
    return order


def subsets(ids: list[str], st: LDSSettings) -> dict[str, list[str]]:
    """Removal set of every subset job (random, drawn once from the seed)."""
    out = {}
    for k in range(st.subsets):
        frac = st.drop_fracs[k % len(st.drop_fracs)]
        n = max(1, int(round(frac * len(ids))))
        rng = np.random.default_rng([st.seed, k])
        out[f"s{k:03d}"] = sorted(rng.choice(ids, size=n, replace=False).tolist())
    return out


def data_order(order: list[str], o: int, seed: int) -> list[str]:
    """Data order o of the pairs: the ranking run's own for o = 0, else a permutation drawn from (seed, o)."""
    if o == 0:
        return list(order)
    return [order[k] for k in np.random.default_rng([seed, o, 0x0de7]).permutation(len(order))]


ORDER_JOB = re.compile(r"o(\d+)-(full|s\d+)$")
"""Job names of the data orders o ≥ 1 (`o2-full`, `o2-s013`); order 0's are `full<r>` and `s<k>`."""


def ranked_pairs(run_dir: Path, st: LDSSettings) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The ranking run's pair ids in training order and its pairs by id (checked to be the same set)."""
    from .._resources import DATA
    from .demo import load_pairs

    if st.ranking_run:
        source = Path(st.ranking_run) / "pairs.jsonl"
        pairs = {p["id"]: p for p in load_pairs(source)}
    else:
        source, pairs = f"the first {st.n_pairs} shipped pairs", {p["id"]: p for p in load_pairs(DATA / "pairs.jsonl", st.n_pairs)}
    order = records_order(run_dir)
    if sorted(order) != sorted(pairs):
        raise ValueError(f"{run_dir}: its ledger does not name {source} once each (one pair per step)")
    return order, pairs


def adopt_ranking_run(out: Path, st: LDSSettings) -> Path:
    """Link a finished run (st.ranking_run) in as out/run, after checking that its Trainer seed is `seed`
    (poison.json's settings, where there is one) and reusing its replay.json and peers/ (the same order)."""
    src = Path(st.ranking_run).resolve()
    if not (src / "run" / "smda" / "summary.json").exists() or not (src / "pairs.jsonl").exists():
        raise FileNotFoundError(f"--ranking-run {src}: needs pairs.jsonl and a finished run/ (run/smda/summary.json), "
                                "as `smda benchmark-poison --out DIR` leaves them")
    if (src / "poison.json").exists():
        ps = json.loads((src / "poison.json").read_text())["settings"]
        trained = poison_train_seed(ps["seed"], ps.get("order_seed"))
        if trained != st.seed:
            raise ValueError(f"--ranking-run {src} was trained with seed {trained}; pass --seed {trained} so that "
                             "the retrains replay its order with the same Trainer seed")
    out.mkdir(parents=True, exist_ok=True)
    link = out / "run"
    if (link.is_symlink() and link.resolve() != (src / "run").resolve()) or (link.exists() and not link.is_symlink()):
        raise ValueError(f"{out} already measures another ranking run ({link.resolve()}); use another --out")
    if not link.exists():
        link.symlink_to(src / "run", target_is_directory=True)
    for _, file in REPLAYS.values():
        if (src / file).exists() and not (out / file).exists():
            shutil.copyfile(src / file, out / file)
    for peer in sorted((src / "peers").glob("*.json")):
        if not (out / "peers" / peer.name).exists():
            (out / "peers").mkdir(exist_ok=True)
            shutil.copyfile(peer, out / "peers" / peer.name)
    return link


def ranking_run(out: Path, st: LDSSettings) -> Path:
    from .demo import DemoSettings, run_demo

    if st.ranking_run:
        return adopt_ranking_run(out, st)
    run_dir = out / "run"
    if (run_dir / "smda" / "summary.json").exists():
        return run_dir
    logger.info("lds: ranking run on %d pairs (SFT with SMDACallback)", st.n_pairs)
    run_demo(run_dir, settings=DemoSettings(limit=st.n_pairs, seed=st.seed, check_answers=False, credit_measure=st.measure))
    return run_dir


def retrain_measure(ordered: list[dict[str, Any]], tmp: Path, st: LDSSettings,
                    scorer: dict[str, Any] | None = None, places: tuple[list[int], int] | None = None) -> dict[str, Any]:
    """The demo's SFT on `ordered` in that order (no callback), then one probe pass with the ranking run's refusal
    scorer (`run_scorer`): Y per probe. `places`: each kept pair's place in the full run and the full run's length,
    to train each at its place's learning rate (`LDSSettings.keep_schedule`)."""
    trainer = _trainer_for(ordered, tmp, st.seed, places) if ordered else None
    if trainer is not None:
        trainer.train()
        model, tok = trainer.model, trainer.processing_class
    else:
        from .models import load_model

        model, tok = load_model()
    return probe_refusal(model, tok, scorer)


def probe_refusal(model: Any, tok: Any, scorer: dict[str, Any] | None = None) -> dict[str, Any]:
    """One probe pass on `model` in eval mode with the refusal scorer `scorer` (`run_scorer`): Y per probe, mean
    refusal on the harmful and on the harmless probes, and per category: what every retrain is measured by."""
    model.eval()
    probes, snap = _snapshotter(tok, model, scorer)
    Y = snap.take(model).Y
    harmful = np.asarray(probes.is_harmful)
    return {"Y": Y.tolist(), "refusal_harmful": float(Y[harmful].mean()), "refusal_harmless": float(Y[~harmful].mean()),
            "by_category": {c: float(Y[i].mean()) for c, i in probes.category_index().items()}}


def _trainer_for(ordered: list[dict[str, Any]], tmp: Path, seed: int, places: tuple[list[int], int] | None = None) -> Any:
    """The demo's SFT on `ordered` in that order, without the callback: what every retrain runs. `places` (each
    pair's place in the full run, the full run's length): step k runs at the full run's rate of place places[k]."""
    from trl import SFTTrainer

    from .demo import DemoSettings, sft_config, to_dataset
    from .models import load_model

    model, tok = load_model()
    args = sft_config(tmp, DemoSettings(seed=seed))
    args.report_to, args.train_sampling_strategy = [], "sequential"
    if places is None:
        return SFTTrainer(model=model, args=args, train_dataset=to_dataset(ordered), processing_class=tok)
    if len(places[0]) != len(ordered) or list(places[0]) != sorted(set(places[0])) or max(places[0]) >= places[1]:
        raise ValueError(f"places {places[0]} must rise, one per pair ({len(ordered)}), each below the full run's {places[1]}")
    return _kept_schedule_trainer()(list(places[0]), places[1], model=model, args=args, train_dataset=to_dataset(ordered),
                                    processing_class=tok)


@functools.cache
def _kept_schedule_trainer() -> type:
    """The trainer class, built on first use so that importing this module does not import TRL."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler
    from trl import SFTTrainer

    class KeptScheduleSFT(SFTTrainer):
        """SFT whose step k uses the full run's learning-rate factor at place places[k] (the full run's own schedule,
        built for its length), so that dropping pairs changes no kept pair's rate."""

        def __init__(self, places: list[int], n_full: int, **kw: Any) -> None:
            self.places, self.n_full = places, n_full
            super().__init__(**kw)

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                opt = optimizer if optimizer is not None else self.optimizer
                full = get_scheduler(self.args.lr_scheduler_type, optimizer=opt,
                                     num_warmup_steps=self.args.get_warmup_steps(self.n_full),
                                     num_training_steps=self.n_full, scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
                if not isinstance(full, LambdaLR):
                    raise ValueError(f"keep_schedule needs a LambdaLR schedule; lr_scheduler_type="
                                     f"{self.args.lr_scheduler_type!r} gives {type(full).__name__}")
                places = self.places
                self.lr_scheduler = LambdaLR(opt, [lambda s, f=f: f(places[min(s, len(places) - 1)]) for f in full.lr_lambdas])
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return KeptScheduleSFT


SCORER_KEYS = ("scorer", "refusal_openings", "compliance_openings", "prefix_tokens", "target")
"""The SMDAConfig fields that define the refusal a probe pass measures."""


def run_scorer(run_dir: str | Path | None) -> dict[str, Any]:
    """The refusal scorer a recorded run measured with (its policy.json's config), so that a retrain of it measures
    the same quantity; the demo's first-token scorer where there is no run or its ledger predates the config."""
    from ..ledger import POLICY, smda_dir

    path = smda_dir(run_dir) / POLICY if run_dir is not None else None
    cfg = json.loads(path.read_text()).get("config", {}) if path is not None and path.exists() else {}
    return {k: cfg[k] for k in SCORER_KEYS if k in cfg} or {"scorer": "first_token"}


def _snapshotter(tok: Any, model: Any, scorer: dict[str, Any] | None = None) -> Any:
    """The demo's probe pass on `model`, with the refusal scorer `scorer` (`run_scorer`; default the first-token one)."""
    from ..config import SMDAConfig
    from ..probes import ProbeSet
    from ..sae import embedded_sae_dir, load_sae, resolve_hook
    from ..snapshot import Snapshotter
    from .._resources import DATA

    probes = ProbeSet.from_jsonl(DATA / "probes.jsonl")
    sae = load_sae(str(embedded_sae_dir()))
    snap = Snapshotter(probes, tok, sae, resolve_hook(sae, model),
                       SMDAConfig(**(scorer or run_scorer(None)), probe_batch_size=16))
    snap.features = np.arange(8)
    return probes, snap


def replay_recorded(out: Path, pairs: dict[str, dict[str, Any]], order: list[str], seed: int,
                    every: int = 4, outer: int | None = None, last: int | None = None,
                    variant: ReplayVariant = EXACT, segment: Segment | None = None) -> dict[str, Any]:
    """The replay reader (lab/replay.py) on a recorded one-pair-per-step demo run (the pair ids `order`, trained
    with the demo's settings and `seed`): every pair's predicted effect of dropping it on mean refusal of the
    harmful and of the harmless probes, carried through the rest of the run (the caller writes it down). `last`: only
    the last `last` steps are replayed; the per-step lists keep the run's length, 0 before them. `variant`: the model
    of the run the reverse pass linearises; `segment`: the early pairs also read with their removal taken exactly for
    a stretch (`Segment`; not with `last`)."""
    from .replay import refusal_groups, refusal_objectives, replay

    if segment is not None and last:
        raise ValueError("replay: exact segments read the whole run's early pairs; replay the whole run (no --replay-last).")

    trainer = _trainer_for([pairs[i] for i in order], out / "tmp_replay", seed)
    probes, snap = _snapshotter(trainer.processing_class, trainer.model, run_scorer(out / "run"))
    res = replay(trainer, refusal_objectives(snap, refusal_groups(probes)), out / "tmp_replay" / "checkpoints", every=every, outer=outer,
                 last=last, variant=variant, segment=segment)
    if last:
        before = len(order) - len(res["lr"])
        for key in ("removal_effect", "weight_zero_effect"):
            res[key] = {q: [0.0] * before + list(v) for q, v in res[key].items()}
        for key in ("adjoint_norm", "effect_parts"):
            res[key] = {q: {part: [0.0] * before + list(v) for part, v in d.items()} for q, d in res[key].items()}
    res["order"], res["reader"] = order, replay_reader(variant, last)[0]
    return res


def replay_job(out: str | Path, st: LDSSettings | None = None, every: int = 4, outer: int | None = None,
               last: int | None = None, variant: ReplayVariant = EXACT, segment: Segment | None = None) -> dict[str, Any]:
    """The replay reader on the ranking run's order; `score` then shows it beside the other readers (with `segment`,
    also each exact stretch's reader, `segment_reader`)."""
    st = st or LDSSettings()
    out = Path(out)
    order, pairs = ranked_pairs(out / "run", st)
    res = replay_recorded(out, pairs, order, st.seed, every, outer, last, variant, segment)
    path = out / replay_reader(variant, last)[1]
    write_json(path, res)
    return res


def peer_jobs(out: str | Path, names: tuple[str, ...], st: LDSSettings | None = None) -> list[dict[str, Any]]:
    """The peers of `peers.py` (TracIn, kronfluence EK-FAC) on the ranking run's final model, each in its own
    process (its time and peak memory recorded), written to `peers/<name>.json` and scored like the others."""
    from .._resources import DATA
    from .peers import run_missing_peers

    st = st or LDSSettings()
    out = Path(out)
    order, pairs = ranked_pairs(out / "run", st)
    (out / "pairs.jsonl").write_text("".join(json.dumps(pairs[i]) + "\n" for i in order), encoding="utf-8")
    (out / "probes_at_run.jsonl").write_bytes((DATA / "probes.jsonl").read_bytes())
    return run_missing_peers(out, names)


def run_jobs(out: str | Path, st: LDSSettings | None = None, shard: tuple[int, int] = (0, 1)) -> list[Path]:
    """This shard's retrains that have no result file yet (the ranking run first, on shard 0)."""
    st = st or LDSSettings()
    out = Path(out)
    run_dir = ranking_run(out, st) if shard[0] == 0 or st.ranking_run else out / "run"
    if not (run_dir / "smda" / "summary.json").exists():
        raise FileNotFoundError(f"{run_dir}: the ranking run is not finished; shard 0 makes it")
    order, pairs = ranked_pairs(run_dir, st)
    sets = subsets(order, st)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    if (out / "subsets.json").exists() and any((out / "jobs").glob("*.json")):
        made = json.loads((out / "subsets.json").read_text())
        before = bool(made["settings"].get("keep_schedule", False))
        if before != st.keep_schedule:
            raise ValueError(f"{out} holds retrains made {'with' if before else 'without'} --keep-schedule; the two are "
                             "different counterfactuals and are not scored together: use another --out")
        if made.get("order", order) != order:
            raise ValueError(f"{out} holds retrains of another training order than {run_dir}'s (the ranking run was "
                             "trained again since); they would be scored against the wrong run: use another --out")
    (out / "subsets.json").write_text(json.dumps({"settings": asdict(st), "order": order, "subsets": sets}, indent=1))
    leave_out = tuple(order) if st.leave_out == ("all",) else st.leave_out
    unknown = [i for i in leave_out if i not in pairs]
    if unknown:
        raise ValueError(f"--leave-out {unknown}: not pairs of the ranking run; ids are in {run_dir / 'smda' / 'credits.json'}")
    scorer = run_scorer(run_dir)
    todo = [(f"full{r}", [], order) for r in range(st.replicas)] + [(f"loo-{i}", [i], order) for i in leave_out]
    todo += [(name, drop, order) for name, drop in sets.items()]
    for o in range(1, st.orders):
        perm = data_order(order, o, st.seed)
        todo += [(f"o{o}-full", [], perm)] + [(f"o{o}-{name}", drop, perm) for name, drop in sets.items()]
    written: list[Path] = []
    pending = [job for job in todo[shard[0]::shard[1]] if not (out / "jobs" / f"{job[0]}.json").exists()]
    secs: list[float] = []  # this process's retrains so far, for the time-to-go in the log
    for j, (name, drop, trained) in enumerate(pending):
        dropped = set(drop)
        keep = [k for k, i in enumerate(trained) if i not in dropped]
        kept = [pairs[trained[k]] for k in keep]
        places = (keep, len(trained)) if st.keep_schedule else None
        to_go = f", ≈ {(len(pending) - j) * np.mean(secs) / 60:.0f} min to go at {np.mean(secs):.0f} s a retrain" if secs else ""
        logger.info("lds: retrain %s (%d of %d pairs), job %d of %d in this shard%s", name, len(kept), len(order), j + 1,
                    len(pending), to_go)
        t0 = time.perf_counter()
        res = {"name": name, "dropped": drop, "n_train": len(kept), **retrain_measure(kept, out / f"tmp_{shard[0]}", st, scorer, places),
               "seconds": round(time.perf_counter() - t0, 1)}
        secs.append(res["seconds"])
        write_json(path := out / "jobs" / f"{name}.json", res)
        written.append(path)
    return written


def post_hoc(out: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The readers computed after the run: the replays that ran, by reader name ("replay", "replay, fixed v",
    "replay, last 90 steps"), and peers/<name>.json by name."""
    reps = {name: json.loads((out / file).read_text()) for name, file in REPLAYS.values() if (out / file).exists()}
    for path in sorted({*out.glob("replay*_last*.json"), *out.glob("replay*_nocurv*.json"), *out.glob("replay*_eps*.json"),
                        *out.glob("replay*_layers*.json"), *out.glob("replay*_first*.json")}):
        rep = json.loads(path.read_text())
        reps[rep["reader"]] = rep
    peers = {p.stem: json.loads(p.read_text()) for p in sorted((out / "peers").glob("*.json"))}
    return reps, peers

