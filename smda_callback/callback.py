"""SMDACallback: glue between a Trainer run and the SMDA pieces (no maths here)."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import TrainerCallback

from .attribution import AlertDecision, AlertRule, category_split, decompose_step, intended_features
from .capture import PackingError, PairCapture, index_dataset
from .config import SMDAConfig
from .credit import (CreditEngine, CreditLayout, OptimizerKernel, causal_lm_row_losses, newest_update,
                     optimizer_step_count, row_slopes, shares_from_slopes, trainable_params, with_decayed_weights)
from .baseline import allowed_latents, fit_baseline
from .features import load_cards
from .policy import RidgePolicy
from .probes import ProbeSet
from .sae import base_model, feature_url, load_feature_labels, load_sae, resolve_hook, sae_identity
from .sinks import CREDITS, POLICY, LedgerWriter, TensorBoardSink, slug, tracker_scalars
from .snapshot import Snapshotter, rank_world

logger = logging.getLogger(__name__)

STATE_JSON = "smda_state.json"
STATE_NPZ = "smda_state.npz"
TB_TOP_BETA = 8
"""TensorBoard's one-colour-per-series chart of β shows the 8 largest |β₀| (all β stay under smda/beta/)."""


@dataclass
class AlertEvent:
    """What a user `on_alert` callable receives; return True to halt training."""

    step: int
    pairs: list[dict[str, Any]]
    score: float
    dominant_feature: int
    dominant_label: str
    intended: list[int]
    reason: str
    n_alerts: int


@dataclass
class _RunState:
    features: np.ndarray
    policy: RidgePolicy
    X: np.ndarray
    Y: np.ndarray
    M: np.ndarray
    beta0: np.ndarray
    b0: float
    fit: dict[str, Any]
    engine: CreditEngine
    Y_base: np.ndarray | None = None
    halted: dict[str, Any] | None = None
    skipped: int = 0
    pair_meta: dict[str, dict[str, Any]] = field(default_factory=dict)


class SMDACallback(TrainerCallback):
    """Attribute every optimizer step's change of the refusal policy to its training pairs.

    Args:
        probes: a ProbeSet or a JSONL path (`prompt`, `label`, `category`).
        sae: an sae-lens SAE, a folder for `SAE.load_from_disk`, or `(release, sae_id)`.
        config: SMDAConfig (`SMDAConfig()` defaults, `SMDAConfig.paper()` preset).
        on_alert: "warn" | "halt" | callable(AlertEvent) -> bool (True halts); overrides config.on_alert.
        feature_labels: names for SAE latents (index → text); default from the SAE folder.
        scorer: optional callable(model, input_ids, attention_mask) -> [B] refusal scores.
        output_dir: where `smda/` goes (default: the Trainer's output_dir).
    """

    def __init__(self, probes: ProbeSet | str | Path, sae: Any, config: SMDAConfig | None = None, *,
                 on_alert: str | Callable[[AlertEvent], bool | None] | None = None,
                 feature_labels: dict[int, str] | None = None, scorer: Callable | None = None,
                 output_dir: str | Path | None = None) -> None:
        self.probes = probes if isinstance(probes, ProbeSet) else ProbeSet.from_jsonl(probes)
        self.sae_spec = sae
        self.sae = load_sae(sae)
        self.sae_identity = sae_identity(self.sae, sae)
        self.config = config or SMDAConfig()
        if on_alert is not None and not callable(on_alert) and on_alert not in ("warn", "halt"):
            raise ValueError(f"on_alert={on_alert!r}: use 'warn', 'halt' or a callable(AlertEvent) -> bool.")
        self.on_alert = on_alert if on_alert is not None else self.config.on_alert
        labels = load_feature_labels(sae, int(self.sae.cfg.d_sae))
        self._category_label = {p.category: p.label for p in self.probes.probes}
        self.cards = load_cards(sae if isinstance(sae, (str, Path)) else None)
        for j, text in (feature_labels or {}).items():
            labels[int(j)] = f"f{int(j)} {text}"
        self.all_labels = labels
        self.user_scorer = scorer
        self.output_dir = output_dir
        self.train_dataset: Any = None
        self.run: _RunState | None = None
        self.capture = PairCapture()
        self.alerts = AlertRule(self.config.interference_threshold, self.config.noise_floor_mads,
                                self.config.min_history, self.config.patience, self.on_alert == "halt")
        self._snap: Snapshotter | None = None
        self._tb: TensorBoardSink | None = None
        self._ledger: LedgerWriter | None = None
        self._index: dict[str, list[int]] = {}
        self._window_start: int | None = None
        self._baseline_refusal: dict[str, float] = {}
        self._kernel = OptimizerKernel()
        self._layout: CreditLayout | None = None
        self._tagged = 0
        self._base: list[torch.Tensor] | None = None
        self._ghost: Any = None
        self._opt_seconds = 0.0
        self._trainer: Any = None
        self._main = True
        self.sae_fve: float | None = None

    # ---------------------------------------------------------------- wiring
    def bind(self, trainer: Any) -> "SMDACallback":
        """Give the callback the trainer's dataset so the ledger can name pairs'
        label/category/prompt (callbacks never see the dataset's extra columns)."""
        self.train_dataset = getattr(trainer, "train_dataset", None)
        self._trainer = trainer
        return self

    @property
    def run_dir(self) -> Path | None:
        return self._ledger.dir if self._ledger is not None else None

    @property
    def labels(self) -> list[str]:
        assert self.run is not None
        return [self.all_labels[j] for j in self.run.features]

    def _is_main(self, state: Any) -> bool:
        return bool(getattr(state, "is_world_process_zero", True))

    def _read_kernel(self, optimizer: Any) -> OptimizerKernel:
        if self.config.credit == "step":
            return OptimizerKernel(optimizer=type(getattr(optimizer, "optimizer", optimizer)).__name__)
        if optimizer is None:
            if self._main:
                logger.warning("smda: the Trainer passed no optimizer to the callback; credit='optimizer' falls back to 'step'.")
            return OptimizerKernel()
        kernel, warning = OptimizerKernel.from_optimizer(optimizer)
        if warning:
            if self._main:
                logger.warning("smda: %s.", warning)
        return kernel

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if getattr(args, "packing", False) or getattr(args, "padding_free", False):
            raise PackingError(
                "smda: packing/padding_free merges several pairs into one row, so per-pair attribution is impossible. "
                "Set `packing=False, padding_free=False` in SFTConfig."
            )
        if model is None or processing_class is None:
            raise ValueError("SMDACallback needs the Trainer's model and processing_class (pass a tokenizer to the Trainer).")
        tok = getattr(processing_class, "tokenizer", processing_class)
        hook = resolve_hook(self.sae, model)
        ctx = getattr(base_model(model).config, "max_position_embeddings", None)
        self._snap = Snapshotter(self.probes, tok, self.sae, hook, self.config, self.user_scorer, ctx)
        out = Path(self.output_dir or args.output_dir) / "smda"
        self._ledger = LedgerWriter(out, self.config.prompt_text)
        self._main = self._is_main(state)
        use_tb = self.config.tensorboard
        if use_tb is None:
            rt = getattr(args, "report_to", None) or []
            rt = [rt] if isinstance(rt, str) else list(rt)
            use_tb = "tensorboard" in rt or "all" in rt
        self._tb = TensorBoardSink(out / "tensorboard") if use_tb and self._is_main(state) else None
        dataset = getattr(train_dataloader, "dataset", None)
        self._index = index_dataset(dataset)
        if self.train_dataset is None and dataset is not None:
            self.train_dataset = dataset
        self._optimizer = kwargs.get("optimizer")
        self._kernel = self._read_kernel(self._optimizer)
        self.capture.keep_inputs = self._kernel.kind != "step"
        self.capture.install(model, hook)
        if state.global_step > 0 and self._restore(Path(args.output_dir) / f"checkpoint-{state.global_step}"):
            if self._is_main(state):
                self._ledger.truncate_after(state.global_step)
            logger.info("smda: resumed at step %d from the checkpoint's saved state", state.global_step)
            return
        if state.global_step > 0:
            if self._main:
                logger.warning("smda: resuming at step %d without saved smda state; a new baseline is taken here.",
                               state.global_step)
        self._baseline(model, state)

    def _ignored(self) -> np.ndarray:
        """Policy positions the alert treats as noise (their card kind is in alert_ignore_kinds)."""
        assert self.run is not None
        return np.asarray([self.cards.get(int(j), {}).get("kind") in self.config.alert_ignore_kinds for j in self.run.features])

    def _baseline(self, model: Any, state: Any) -> None:
        t0 = time.perf_counter()
        snap = self._snap.take(model, full=True)
        if not snap.finite:
            raise ValueError("smda: the baseline snapshot has NaN/Inf activations or refusal scores; check the model's dtype and weights.")
        self.sae_fve = snap.fve
        if snap.fve is not None:
            if snap.fve < self.config.min_sae_fve and self._main:
                logger.warning("smda: the SAE explains only %.2f of the variance of this model's hook activations on the probes "
                               "(warning below %.2f): it was probably trained on another model or layer (a base-model SAE on an "
                               "instruct model is the usual cause), so its features may not mean what their labels say.",
                               snap.fve, self.config.min_sae_fve)
        bl = fit_baseline(snap.Z, snap.Y, self.probes.is_harmful, self.config,
                          allowed_latents(self.cards, self.config.feature_kinds, snap.Z.shape[1]))
        feats, policy, X, M, beta0, fit = bl.features, bl.policy, bl.X, bl.M, bl.beta0, bl.fit
        fit["sae_fve_probes"] = snap.fve
        self._snap.features = feats
        self._layout = CreditLayout(len(feats), tuple(self.probes.category_index()))
        engine = CreditEngine(self._kernel, self._layout.width, self._measure())
        self.run = _RunState(feats, policy, X, snap.Y, M, beta0, bl.b0, fit, engine, snap.Y)
        self._baseline_refusal = self._by_category(snap.Y)
        if self._kernel.weight_decay and self._kernel.decay_coef(1, 1.0) and self._optimizer is not None:
            self._measure_decay(model)
        logger.info("smda: baseline in %.1fs; %d features, λ=%.3g, R²=%.3f, 5-fold AUROC (features chosen on all probes, "
                    "so not held out) %.3f\n%s",
                    time.perf_counter() - t0, len(feats), policy.lam, fit["r2"], fit.get("cv_auroc_labels", float("nan")),
                    policy.render(beta0, self.run.b0, self.labels))
        if self._is_main(state):
            self._ledger.reset()
            self._write_policy(final=False, step=state.global_step)
            if self._tb is not None:
                self._tb.layout(self.labels, list(self.probes.category_index()))
                self._tb.text("smda/policy", self._policy_text(beta0, self.run.b0), state.global_step)
                self._tb.flush()

    def _measure_decay(self, model: Any, eps: float = 1e-3) -> None:
        """κ for the credit engine: the probes' response to one unit of weight decay (one extra probe pass at
        baseline), so each step's decay part goes to the residual instead of the step's newest pair."""
        assert self.run is not None and self._snap is not None
        shrunk = with_decayed_weights(self._optimizer, eps, lambda: self._snap.take(model))
        if shrunk.finite:
            self.run.engine.decay = self._vector(shrunk.X, shrunk.Y, self.run.policy.M(shrunk.X))[2] / eps

    def _measure(self) -> str:
        return self.config.credit_measure if self._kernel.kind != "step" else "deconvolve"

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._window_start is None:
            self.capture.reset()
            self._tagged = 0
            self._window_start = state.global_step + 1
        self.capture.armed = True

    def _needs_base(self) -> bool:
        """θ_{t−1} is kept for one step when the ghost pass or the split inside a step needs it."""
        if self.run is None or self._kernel.kind == "step":
            return False
        return self._measure() == "ghost" or self._split(len(self.capture.rows) - self._tagged)

    @staticmethod
    def _split(n_rows: int) -> bool:
        """Does a step with n local rows need the first-order split (several rows here or on other ranks)?"""
        return n_rows > 1 or rank_world()[1] > 1

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        self._base = ([p.detach().clone() for p in trainable_params(optimizer)]
                      if optimizer is not None and self._needs_base() else None)
        self._opt_seconds += time.perf_counter() - t0

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                          **kwargs: Any) -> None:
        """The update is applied and the gradients are still there: tag this step's rows, split
        the step among them, and (ghost) measure the newest gradient's part of the update alone."""
        if self.run is None or optimizer is None:
            return
        t0 = time.perf_counter()
        try:
            self._credit_step(state, model, optimizer)
        finally:
            self._opt_seconds += time.perf_counter() - t0

    def _credit_step(self, state: Any, model: Any, optimizer: Any) -> None:
        t = optimizer_step_count(optimizer) or state.global_step + 1
        self.run.engine.lr(t, float(getattr(optimizer, "optimizer", optimizer).param_groups[0]["lr"]))
        rows = self.capture.rows[self._tagged:]
        for r in rows:
            r.step = t
        self._tagged = len(self.capture.rows)
        if self._base is None:
            return
        params = trainable_params(optimizer)
        u = newest_update(optimizer, self._kernel, t)
        if self._split(len(rows)):
            batches = [r.inputs for r in rows if r.inputs is not None]
            if len(batches) == len(rows) and rows:
                slopes = row_slopes(params, self._base, u, causal_lm_row_losses(model, batches))
                for r, sl in zip(rows, slopes):
                    r.slope = float(sl)
        if self._measure() == "ghost":
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, b, d in zip(params, self._base, u):
                    p.copy_(b + d)
            try:
                self._ghost = self._snap.take(model)
            finally:
                with torch.no_grad():
                    for p, sv in zip(params, saved):
                        p.copy_(sv)
        self._base = None

    def _vector(self, X1: np.ndarray, Y1: np.ndarray, M1: np.ndarray) -> tuple[Any, dict[str, Any], np.ndarray]:
        """A snapshot's change against the current before-snapshot: decomposition, category reading, credit vector."""
        run = self.run
        assert run is not None and self._layout is not None
        dec = decompose_step(run.policy, run.X, run.Y, X1, Y1, self.config.method, run.M, M1)
        cats = category_split(run.policy, run.X, X1, dec, self.probes.category_index())
        harmful = np.asarray(self.probes.is_harmful)
        before, after = self._by_category(run.Y), self._by_category(Y1)
        vec = self._layout.pack(dec.delta_beta_x, dec.delta_beta_y, {c: after[c] - before[c] for c in after},
                                {c: v["x"] + v["y"] for c, v in cats.items()},
                                float(Y1[harmful].mean() - run.Y[harmful].mean()),
                                float(Y1[~harmful].mean() - run.Y[~harmful].mean()))
        return dec, cats, vec

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.capture.armed = False
        if self.run is None or self._snap is None:
            return
        step = state.global_step
        last = state.max_steps > 0 and step >= state.max_steps
        if step % self.config.every_n_steps != 0 and not last:
            return
        window = [self._window_start or step, step]
        self._window_start = None
        t0 = time.perf_counter()
        pairs, zs, loss = self._gather_pairs()
        snap = self._snap.take(model)
        ghost, self._ghost = self._ghost, None
        record: dict[str, Any] = {"step": step, "epoch": state.epoch, "window": window, "pairs": pairs,
                                  "n_pairs": len(pairs), "split": len(pairs) > 1, "train_loss": loss}
        if not snap.finite:
            self.run.skipped += 1
            record.update(skipped="NaN/Inf in the probe snapshot (activations or refusal); step skipped, its change "
                                  "is carried into the next step's record", alert=False)
            if self._main:
                logger.warning("smda: step %d skipped: non-finite snapshot", step)
            self._emit(record, state)
            return
        run = self.run
        assert self._layout is not None
        M1 = run.policy.M(snap.X)
        dec, cats, vec = self._vector(snap.X, snap.Y, M1)
        measured = None
        if ghost is not None and ghost.finite:
            measured = self._vector(ghost.X, ghost.Y, run.policy.M(ghost.X))[2]
        steps = list(range(window[0], window[1] + 1))
        rows = [(p["hash"], int(p.get("step") or step), float(p["credit"])) for p in pairs]
        lrs = [run.engine.lrs.get(t) for t in steps]
        credit = run.engine.window(steps, rows, vec, measured)
        for p in pairs:
            run.pair_meta.setdefault(p["hash"], {k: p[k] for k in ("index", "id", "label", "category", "prompt") if k in p})
            own = self._layout.unpack(credit.own.get(p["hash"], np.zeros(self._layout.width)))
            p["own_d"] = own["d"]
        projected = self._layout.unpack(credit.projected)["d"] if pairs else dec.delta_beta
        intended = sorted({j for z in zs for j in intended_features(z, self.config.intended_top_m)})
        decision = self.alerts.decide(np.where(self._ignored(), 0.0, projected), intended)
        b1 = run.policy.intercept_of(snap.X, snap.Y, dec.beta1)
        pred = run.policy.predict(snap.X, dec.beta1, b1)
        res = self._layout.unpack(credit.residual)
        carried = sum(float(np.abs(self._layout.unpack(v)["d"]).sum()) for v in credit.carried.values())
        record.update(
            beta=dec.beta1, intercept=b1, delta_beta=dec.delta_beta, delta_beta_x=dec.delta_beta_x,
            delta_beta_y=dec.delta_beta_y, alignment=dec.alignment, method=dec.method,
            first_order_gap=dec.first_order_gap, refusal_by_category=self._by_category(snap.Y),
            predicted_by_category=self._by_category(pred), category_pathways=cats,
            refusal_harmful=float(snap.Y[self.probes.is_harmful].mean()),
            refusal_harmless=float(snap.Y[~np.asarray(self.probes.is_harmful)].mean()),
            credit={"kind": self._kernel.kind, "measure": run.engine.measure, "residual_d": res["d"],
                    "residual_refusal": [res["refusal_harmful"], res["refusal_harmless"]],
                    "carried_abs_d": carried, "n_carried": len(credit.carried), "projected_d": projected,
                    "lrs": lrs, "ghost": measured},
            interference=decision.score, dominant_feature=int(run.features[decision.dominant]),
            dominant_label=self.labels[decision.dominant], dominant_off_target=decision.off_target,
            intended_features=[int(run.features[j]) for j in intended], noise_floor=decision.noise_floor,
            alert=decision.alert, alert_reason=decision.reason,
            seconds=round(time.perf_counter() - t0 + self._opt_seconds, 4),
        )
        self._opt_seconds = 0.0
        run.X, run.Y, run.M = snap.X, snap.Y, M1
        if decision.alert:
            self._handle_alert(decision, record, pairs, intended, state, control)
        self._emit(record, state)
        if self._is_main(state) and step % self.config.text_every_n_steps == 0:
            self._write_credits()

    def _handle_alert(self, d: AlertDecision, record: dict[str, Any], pairs: list[dict[str, Any]], intended: list[int],
                      state: Any, control: Any) -> None:
        assert self.run is not None
        lab = self.labels[d.dominant]
        if self._main:
            logger.warning("smda: interference alert at step %d (pairs %s): %s [dominant %s]", state.global_step,
                           [p.get("index") for p in pairs], d.reason, lab)
        halt = d.halt
        if callable(self.on_alert):
            event = AlertEvent(state.global_step, pairs, d.score, int(self.run.features[d.dominant]), lab,
                               [int(self.run.features[j]) for j in intended], d.reason, self.alerts.n_alerts)
            halt = bool(self.on_alert(event))
        if halt:
            control.should_training_stop = True
            control.should_save = True
            self.run.halted = {"step": state.global_step, "reason": d.reason, "dominant_label": lab}
            record["halted"] = True
            if self._main:
                logger.warning("smda: halting training at step %d after %d alert(s)", state.global_step, self.alerts.n_alerts)

    def _emit(self, record: dict[str, Any], state: Any) -> None:
        """Rank 0: the ledger line and TensorBoard (tags defined in sinks.py). Every rank: the tracker-neutral
        scalars through `trainer.log`, which the integrations write from rank 0 only (TRL's `log` gathers its
        own metrics across ranks, so calling it on one rank alone would hang the others)."""
        assert self._ledger is not None and self.run is not None
        step = record["step"]
        if self._is_main(state):
            self._ledger.append(record)
            if self._tb is not None and "beta" in record:
                top = np.argsort(-np.abs(self.run.beta0), kind="mergesort")[:TB_TOP_BETA]
                text = self._policy_text(np.asarray(record["beta"]), record["intercept"]) \
                    if step % self.config.text_every_n_steps == 0 else None
                self._tb.record(record, self.labels, top, self._category_label, self.alerts.n_alerts, text)
        every = max(int(getattr(state, "logging_steps", 1) or 1), 1)  # the Trainer's own logging cadence
        last = state.max_steps > 0 and step >= state.max_steps
        if ("beta" in record and self.config.log_to_trainer and self._trainer is not None
                and (step % every == 0 or last or record.get("halted"))):
            self._trainer.log(tracker_scalars(record, self.labels, self.alerts.n_alerts, TB_TOP_BETA))

    # ---------------------------------------------------------------- pairs
    def _gather_pairs(self) -> tuple[list[dict[str, Any]], list[np.ndarray], float | None]:
        """Rows trained in this window (all ranks), each with its optimizer step, its share of that
        step's new gradient, and its pooled prompt features in z-units."""
        assert self.run is not None and self._snap is not None
        local = []
        for row, h in zip(self.capture.rows, self.capture.hidden):
            with torch.no_grad():
                z = self._snap.encode(h, full=False).mean(0).double().numpy()
            local.append((row.hash, row.step, row.slope, self.run.policy.transform(z[None])[0]))
        losses = list(self.capture.losses)
        rank, world = rank_world()
        if world > 1:
            parts: list[Any] = [None] * world
            torch.distributed.all_gather_object(parts, (local, losses))
            local = [x for part in parts for x in part[0]]
            losses = [x for part in parts for x in part[1]]
        by_step: dict[Any, list[int]] = {}
        for i, (_, st, _, _) in enumerate(local):
            by_step.setdefault(st, []).append(i)
        shares = np.zeros(len(local))
        for idxs in by_step.values():
            slopes = [local[i][2] for i in idxs] if self._kernel.kind != "step" else [None] * len(idxs)
            shares[idxs] = shares_from_slopes(slopes)
        if self._kernel.kind == "step":  # the old rule: a window's pairs share its change equally
            shares[:] = 1.0 / max(len(local), 1)
        pairs = []
        for (h, st, _, _), share in zip(local, shares):
            idx = self._index.get(h, [])
            rec: dict[str, Any] = {"hash": h, "index": idx[0] if idx else None, "step": st, "credit": float(share)}
            if not idx:
                rec["unmatched"] = True
            elif self.train_dataset is not None:
                rec.update(self._meta(idx[0]))
            pairs.append(rec)
        loss = float(np.mean(losses)) if losses else None
        self.capture.reset()
        self._tagged = 0
        return pairs, [z for *_, z in local], loss

    def _meta(self, i: int) -> dict[str, Any]:
        try:
            row = self.train_dataset[int(i)]
        except Exception:  # noqa: BLE001 - metadata is best effort, the hash and index are the record
            return {}
        out = {k: row[k] for k in ("label", "category", "id") if k in row and isinstance(row[k], (str, int))}
        prompt = row.get("prompt") if hasattr(row, "get") else None
        if isinstance(prompt, list):
            prompt = " ".join(m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user")
        if isinstance(prompt, str):
            out["prompt"] = prompt[:200]
        return out

    def findings(self, top: int = 3) -> dict[str, Any]:
        """What the run has shown so far (for progress printing while it trains)."""
        run = self.run
        if run is None or self._layout is None:
            return {}
        beta = run.M @ run.Y
        lay = self._layout
        per_pair = [(h, lay.unpack(v)) for h, v in run.engine.totals.items()]

        def ranked(key: str, sign: float) -> list[dict[str, Any]]:
            best = sorted(per_pair, key=lambda hv: -sign * hv[1][key])[:top]
            return [{**run.pair_meta.get(h, {}), "score": sign * v[key]} for h, v in best]

        return {"policy": self._policy_text(beta, run.policy.intercept_of(run.X, run.Y, beta)),
                "fit": run.fit, "baseline": dict(self._baseline_refusal), "now": self._by_category(run.Y),
                "over_refusal": ranked("refusal_harmless", 1.0), "compliance": ranked("refusal_harmful", -1.0),
                "n_alerts": self.alerts.n_alerts, "n_pairs": len(per_pair)}

    # ---------------------------------------------------------------- outputs
    def _by_category(self, values: np.ndarray) -> dict[str, float]:
        return {c: float(np.mean(values[idx])) for c, idx in self.probes.category_index().items()}

    def _policy_text(self, beta: np.ndarray, b0: float) -> str:
        assert self.run is not None
        return self.run.policy.render(beta, b0, self.labels, top=12)

    def _write_policy(self, final: bool, step: int) -> None:
        assert self.run is not None and self._ledger is not None
        run = self.run
        beta_T = run.M @ run.Y
        assert self._layout is not None
        d_of = {h: self._layout.unpack(v)["d"] for h, v in run.engine.totals.items()}
        top_pairs = sorted(d_of.items(), key=lambda kv: -float(np.abs(kv[1]).sum()))[:50]
        res = self._layout.unpack(run.engine.residual_total)
        self._ledger.write_json(POLICY, {
            "features": run.features, "feature_labels": self.labels, "lambda": run.policy.lam,
            "feature_cards": {str(int(j)): self.cards[int(j)] for j in run.features if int(j) in self.cards},
            "policy": run.policy.to_dict(), "config": self.config.to_dict(),
            "beta_0": run.beta0, "intercept_0": run.b0, "beta_final": beta_T,
            "intercept_final": run.policy.intercept_of(run.X, run.Y, beta_T), "fit": run.fit,
            "baseline_refusal_by_category": self._baseline_refusal,
            "final_refusal_by_category": self._by_category(run.Y),
            "probe_refusal_0": run.Y_base, "probe_refusal_final": run.Y,
            "probes": [{"id": p.id, "label": p.label, "category": p.category} for p in self.probes.probes],
            "symbolic_policy_0": self._policy_text(run.beta0, run.b0),
            "symbolic_policy_final": self._policy_text(beta_T, run.policy.intercept_of(run.X, run.Y, beta_T)),
            "n_alerts": self.alerts.n_alerts, "halted": run.halted, "skipped_steps": run.skipped,
            "final": final, "step": step, "hook": self._snap.hook.name if self._snap else None,
            "sae": self.sae_identity, "sae_fve_probes": self.sae_fve,
            "feature_urls": {str(int(j)): feature_url(self.sae_identity, int(j)) for j in run.features
                             if feature_url(self.sae_identity, int(j))},
            "top_pairs_by_total_abs_delta_beta": [{"hash": h, "delta_beta": v} for h, v in top_pairs],
            "credit": {"rule": self.config.credit, "kernel": self._kernel.to_dict(), "measure": run.engine.measure,
                       "residual_total_d": res["d"], "residual_total_refusal": [res["refusal_harmful"], res["refusal_harmless"]]},
        })
        self._write_credits()

    def _write_credits(self) -> None:
        """credits.json: every pair's total credit (own window + what its momentum carried later), atomically."""
        assert self.run is not None and self._ledger is not None and self._layout is not None
        eng, lay = self.run.engine, self._layout
        out = []
        for h, v in eng.totals.items():
            tot, own = lay.unpack(v), lay.unpack(eng.own_totals.get(h, np.zeros(lay.width)))
            out.append({"hash": h, **self.run.pair_meta.get(h, {}), **tot,
                        "own": {"d": own["d"], "refusal_harmful": own["refusal_harmful"],
                                "refusal_harmless": own["refusal_harmless"]}})
        self._ledger.write_json(CREDITS, {"rule": self.config.credit, "kernel": self._kernel.to_dict(),
                                          "measure": eng.measure, "categories": list(lay.categories), "pairs": out})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is not None and self._is_main(state):
            self._write_policy(final=True, step=state.global_step)
            if self._tb is not None:
                self._tb.text("smda/policy", self._policy_text(self.run.M @ self.run.Y, self.run.b0), state.global_step)
                self._tb.close()
        self.capture.remove()

    # ---------------------------------------------------------------- checkpoints
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Keep our state in the checkpoint folder, found again on resume with no extra flags."""
        if self.run is None or not self._is_main(state):
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            return
        run = self.run
        try:
            credit_meta, credit_arrays = run.engine.state()
            np.savez(ckpt / STATE_NPZ, X=run.X, Y=run.Y, Y_base=run.Y_base, features=run.features, beta0=run.beta0,
                     **credit_arrays)
            (ckpt / STATE_JSON).write_text(json.dumps({
                "credit": credit_meta, "pair_meta": run.pair_meta,
                "policy": run.policy.to_dict(), "b0": run.b0, "fit": run.fit, "halted": run.halted,
                "skipped": run.skipped, "alerts": self.alerts.state(), "baseline_refusal": self._baseline_refusal,
                "config": self.config.to_dict(), "step": state.global_step,
            }, default=float))
        except OSError as exc:
            logger.error("smda: could not save state to %s (%s); a resume from it will take a new baseline.", ckpt, exc)

    def _restore(self, ckpt: Path) -> bool:
        if not (ckpt / STATE_JSON).exists() or not (ckpt / STATE_NPZ).exists():
            return False
        meta = json.loads((ckpt / STATE_JSON).read_text())
        arr = np.load(ckpt / STATE_NPZ, allow_pickle=False)
        policy = RidgePolicy.from_dict(meta["policy"])
        X, Y = arr["X"], arr["Y"]
        feats = arr["features"]
        self._layout = CreditLayout(len(feats), tuple(self.probes.category_index()))
        engine = CreditEngine.from_state(meta["credit"], arr, self._layout.width)
        if engine.kernel != self._kernel:
            logger.warning("smda: the optimizer differs from the checkpoint's (%s vs %s); credit continues with the "
                           "checkpoint's kernel", self._kernel, engine.kernel)
            self._kernel = engine.kernel
        self.run = _RunState(feats, policy, X, Y, policy.M(X), arr["beta0"], float(meta["b0"]), meta["fit"], engine,
                             arr["Y_base"], meta.get("halted"), int(meta.get("skipped", 0)), meta.get("pair_meta", {}))
        assert self._snap is not None
        self._snap.features = self.run.features
        self.alerts.load_state(meta["alerts"])
        self._baseline_refusal = meta["baseline_refusal"]
        return True
