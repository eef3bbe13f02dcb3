"""SMDACallback: glue between a Trainer run and the SMDA pieces (hooks, rank-0 decisions, alert → control).

The maths lives in `tracker` (run state, a step's record), `credit` (optimizer kernels, operations on
parameters), `snapshot` (probe passes) and `schema` (record shapes); this module moves data between
the Trainer's events and them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from transformers import TrainerCallback

from .attribution import AlertEvent
from .capture import PairCapture, check_packing, index_dataset, index_unpacked, is_packed, row_meta_of
from .config import SMDAConfig
from .credit import inner_optimizer, measure_step, optimizer_step_count, read_kernel, sharding_check, trainable_params
from .features import load_cards
from .probes import ProbeSet
from .sae import base_model, fve_warning, load_feature_labels, load_sae, resolve_hook, sae_identity
from .sinks import RunSinks, wants_tensorboard
from .snapshot import Snapshotter, gather_lists, rank_world
from .tail import ReplayTail
from .tracker import LocalRow, RunTracker, StepResult

logger = logging.getLogger(__name__)

TB_TOP_BETA = 8
"""TensorBoard's one-colour-per-series chart of β shows the 8 largest |β₀| (all β stay under smda/beta/)."""
__all__ = ["AlertEvent", "SMDACallback"]


class SMDACallback(TrainerCallback):
    """Attribute every optimizer step's change of the refusal policy to its training pairs.

    Args:
        probes: a ProbeSet or a JSONL path (`prompt`, `label`, `category`).
        sae: an sae-lens SAE, a folder for `SAE.load_from_disk`, or `(release, sae_id)`.
        config: SMDAConfig (`SMDAConfig()` defaults, `SMDAConfig.paper()` preset); `on_alert` "warn" | "halt".
        on_alert: a callable(AlertEvent) -> bool that decides instead of `config.on_alert` (True halts).
        feature_labels: names for SAE latents (index → text); default from the SAE folder.
        scorer: optional callable(model, input_ids, attention_mask) -> [B] refusal scores.
        output_dir: where `smda/` goes (default: the Trainer's output_dir).
    """

    def __init__(self, probes: ProbeSet | str | Path, sae: Any, config: SMDAConfig | None = None, *,
                 on_alert: Callable[[AlertEvent], bool | None] | None = None,
                 feature_labels: dict[int, str] | None = None, scorer: Callable | None = None,
                 output_dir: str | Path | None = None) -> None:
        if on_alert is not None and not callable(on_alert):
            raise ValueError(f"on_alert={on_alert!r}: the constructor takes a callable(AlertEvent) -> bool; 'warn' and "
                             f"'halt' are set in the config: SMDAConfig(on_alert={on_alert!r}).")
        self.probes = probes if isinstance(probes, ProbeSet) else ProbeSet.from_jsonl(probes)
        self.sae = load_sae(sae)
        self.sae_identity = sae_identity(self.sae, sae)
        self.config = config or SMDAConfig()
        self.on_alert, self.user_scorer, self.output_dir = on_alert, scorer, output_dir
        self.cards = load_cards(sae if isinstance(sae, (str, Path)) else None)
        self.all_labels = load_feature_labels(sae, int(self.sae.cfg.d_sae))
        for j, text in (feature_labels or {}).items():
            self.all_labels[int(j)] = f"f{int(j)} {text}"
        self.train_dataset, self.sae_fve, self.capture = None, None, PairCapture()
        self.run: RunTracker | None = None
        self._snap: Snapshotter | None = None
        self._sinks: RunSinks | None = None
        self._index: dict[str, list[int]] = {}
        self._opt_seconds, self._main, self._sharded = 0.0, True, False
        self._base = self._ghost = self._trainer = self._optimizer = None  # _base: θ_{t−1} while a step is split

    def bind(self, trainer: Any, pairs: Any = None) -> "SMDACallback":
        """Give the callback the trainer: its dataset names pairs (label/category/prompt), `trainer.log` carries the
        scalars to every tracker. With packing, pass the dataset before packing as `pairs` to name packed pairs."""
        self._trainer, self.train_dataset = trainer, getattr(trainer, "train_dataset", None)
        if pairs is not None and is_packed(self.train_dataset):
            self._index, self.train_dataset = index_unpacked(trainer, pairs), pairs
        return self

    @property
    def run_dir(self) -> Path | None:
        return self._sinks.ledger.dir if self._sinks is not None else None

    @property
    def labels(self) -> list[str]:
        return self.run.labels if self.run is not None else []

    def findings(self, top: int = 3) -> dict[str, Any]:
        """What the run has shown so far (for progress printing while it trains)."""
        return self.run.findings(top) if self.run is not None else {}

    def _warn(self, msg: str | None, *args: Any) -> str | None:
        if self._main and msg:  # the Trainer logs from the main process; so do we (None: nothing to say)
            logger.warning("smda: " + msg, *args)
        return msg

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if model is None or processing_class is None:
            raise ValueError("SMDACallback needs the Trainer's model and processing_class (pass a tokenizer to the Trainer).")
        self._main = bool(getattr(state, "is_world_process_zero", True))
        hook, tok = resolve_hook(self.sae, model), getattr(processing_class, "tokenizer", processing_class)
        self._snap = Snapshotter(self.probes, tok, self.sae, hook, self.config, self.user_scorer,
                                 getattr(base_model(model).config, "max_position_embeddings", None))
        self._sinks = RunSinks(Path(self.output_dir or args.output_dir) / "smda", self.config.prompt_text, self._main,
                               wants_tensorboard(args.report_to), self._trainer, self.config.log_to_trainer,
                               self.config.text_every_n_steps, TB_TOP_BETA)
        check_packing(args)
        dataset = getattr(train_dataloader, "dataset", None)
        self._index = self._index or index_dataset(dataset)
        self.train_dataset = self.train_dataset if self.train_dataset is not None else dataset
        self._optimizer = kwargs.get("optimizer")
        self._kernel, warning = read_kernel(self.config.credit, self._optimizer)
        self._warn(warning)
        self._sharded = self._kernel.kind != "step" and bool(self._warn(sharding_check(self._optimizer, self.config.credit_measure)))
        self.capture.keep_inputs = self._kernel.kind != "step" and not self._sharded
        self.capture.install(model, hook)
        ReplayTail.attach(self, args, state, model)  # SMDAConfig(replay_last_steps=K): refused here, before any step
        if state.global_step > 0:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if self._restore(RunTracker.load(ckpt, self.probes, self.config, self.all_labels, self.cards), state.global_step):
                logger.info("smda: resumed at step %d from the checkpoint's saved state", state.global_step)
                return
            self._warn("resuming at step %d without saved smda state; a new baseline is taken here.", state.global_step)
        self._baseline(model, state)

    def _baseline(self, model: Any, state: Any) -> None:
        t0 = time.perf_counter()
        snap = self._snap.take(model, full=True)
        if not snap.finite:
            raise ValueError("smda: the baseline snapshot has NaN/Inf activations or refusal scores; check the model's dtype and weights.")
        self.sae_fve = snap.fve
        self._warn(fve_warning(snap.fve, self.config.min_sae_fve))
        run = self.run = RunTracker.from_snapshot(self.probes, self.config, self._kernel, snap.Z, snap.Y,
                                                  self.all_labels, self.cards, snap.fve)
        self._snap.features = run.features
        run.measure_decay(self._optimizer, lambda: self._snap.take(model))
        logger.info("smda: baseline in %.1fs; %s", time.perf_counter() - t0, run.describe())
        self._sinks.baseline(run, self._policy(False, state.global_step), state.global_step)

    # ---------------------------------------------------------------- one optimizer step
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.capture.open(state.global_step)

    @staticmethod
    def _split(n_rows: int) -> bool:  # several rows in this step (here or on other ranks): split by loss slopes
        return n_rows > 1 or rank_world()[1] > 1

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        needs = self.run is not None and self._kernel.kind != "step" and not self._sharded and (
            self.run.engine.measure == "ghost" or self._split(len(self.capture.untagged())))
        self._base = [p.detach().clone() for p in trainable_params(optimizer)] if optimizer is not None and needs else None
        self._opt_seconds += time.perf_counter() - t0

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                          **kwargs: Any) -> None:
        """The update is applied and the gradients are still there: tag this step's rows, split the step
        among them by their loss slopes, and (ghost) measure the newest gradient's part of the update alone."""
        if self.run is None or optimizer is None:
            return
        t0 = time.perf_counter()
        try:
            t = optimizer_step_count(optimizer) or state.global_step + 1
            self.run.engine.lr(t, float(inner_optimizer(optimizer).param_groups[0]["lr"]))
            rows = self.capture.tag(t)
            if self._base is not None:
                batches = [r.inputs for r in rows if r.inputs is not None]
                split = self._split(len(rows)) and rows and len(batches) == len(rows)
                ghost = (lambda: self._snap.take(model)) if self.run.engine.measure == "ghost" else None
                slopes, self._ghost = measure_step(optimizer, model, self._kernel, t, self._base, batches if split else None,
                                                   ghost, rows_per_forward=args.per_device_train_batch_size)
                for r, sl in zip(rows, slopes if slopes is not None else []):
                    r.slope = float(sl)
        finally:
            self._base = None
            self._opt_seconds += time.perf_counter() - t0

    def _local_rows(self) -> tuple[list[LocalRow], list[float]]:
        """This window's rows from every rank, each with its pooled prompt features in z-units."""
        zs = self._snap.pool(self.capture.hidden)
        local = [LocalRow(r.hash, r.step, r.slope, self.run.policy.transform(z[None])[0])
                 for r, z in zip(self.capture.rows, zs)]
        local, losses = gather_lists(local, list(self.capture.losses))
        self.capture.reset()
        return local, losses

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.capture.armed = False
        step = state.global_step
        if self.run is None or (step % self.config.every_n_steps != 0 and not 0 < state.max_steps <= step):
            return
        window = self.capture.close(step)
        t0 = time.perf_counter()
        rows, losses = self._local_rows()
        meta = row_meta_of(self.train_dataset)
        snap, ghost, self._ghost = self._snap.take(model), self._ghost, None
        res = self.run.step(step, window, state.epoch, rows, self.run.pairs_of(rows, self._index, meta),
                            float(np.mean(losses)) if losses else None, snap.X, snap.Y, snap.finite,
                            (ghost.X, ghost.Y) if ghost is not None and ghost.finite else None)
        split, self._opt_seconds = self._opt_seconds, 0.0  # seconds: all; of them the in-step split and the probe pass
        res.record.update(seconds=round(time.perf_counter() - t0 + split, 4), seconds_split=round(split, 4), seconds_probe=round(self._snap.seconds, 4))
        if res.decision is None:
            self._warn("step %d skipped: non-finite snapshot", step)
        elif res.decision.alert:
            self._alert(res, control)
        self._sinks.step(res.record, self.run, getattr(state, "logging_steps", 1), 0 < state.max_steps <= step)

    def _alert(self, res: StepResult, control: Any) -> None:
        """Warn; halt when the config or the user's callable says so (the Trainer saves, then stops)."""
        d, event = res.decision, self.run.alert_event(res)
        self._warn("interference alert at step %d (pairs %s): %s [dominant %s]", event.step,
                   [p.get("index") for p in event.pairs], d.reason, event.dominant_label)
        if bool(self.on_alert(event)) if self.on_alert is not None else d.halt:
            control.should_training_stop = control.should_save = True
            self.run.halt(res)
            self._warn("halting training at step %d after %d alert(s)", event.step, event.n_alerts)

    # ---------------------------------------------------------------- outputs and checkpoints
    def _policy(self, final: bool, step: int) -> dict[str, Any]:
        return self.run.policy_record(final, step, self._snap.hook.name, self.sae_identity, self.sae_fve)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.run is not None:
            self.run.fit_after(self._snap.take(model, full=True))  # the policy the tuned model follows
            self._sinks.close(self.run, self._policy(True, state.global_step), state.global_step)
        self.capture.remove()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Keep our state in the checkpoint folder, found again on resume with no extra flags."""
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.run is None or not self._main or not ckpt.is_dir():
            return
        try:
            self.run.save(ckpt, state.global_step)
        except OSError as exc:
            logger.error("smda: could not save state to %s (%s); a resume from it will take a new baseline.", ckpt, exc)

    def _restore(self, run: RunTracker | None, step: int) -> bool:
        if run is None:
            return False
        if run.kernel != self._kernel:
            self._warn("the optimizer differs from the checkpoint's (%s vs %s); credit goes on with its kernel", self._kernel, run.kernel)
            self._kernel = run.kernel
        self.run, self._snap.features = run, run.features
        self._sinks.resume(step)
        return True
