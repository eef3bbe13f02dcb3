"""The run's state and one step's record, with no Trainer types (unit-tested without an SFT run).

`RunTracker` holds what the callback knows between steps: the baseline policy, the last
snapshot (X, Y, M), the credit engine, the alert rule and the pairs seen so far. Given the rows
a window trained on and the after-snapshot, `step()` returns the ledger record and the alert
decision; the callback only moves data in and out and turns a decision into `control`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .attribution import AlertDecision, AlertEvent, AlertRule, category_split, decompose_step, intended_features
from .baseline import Baseline, allowed_latents, fit_baseline
from .config import SMDAConfig
from .credit import CreditEngine, CreditLayout, OptimizerKernel, shares_from_slopes, with_decayed_weights
from .policy import RidgePolicy
from .probes import ProbeSet
from .schema import credit_summary, credits_record, decomposition_fields, indexed_pair, policy_record

PAIR_META = ("index", "id", "label", "category", "prompt")
STATE_JSON = "smda_state.json"
STATE_NPZ = "smda_state.npz"


@dataclass
class LocalRow:
    """One trained row as a rank saw it: content hash, optimizer step, split slope, pooled prompt features (z-units)."""

    hash: str
    step: int | None
    slope: float | None
    z: np.ndarray


@dataclass
class StepResult:
    record: dict[str, Any]
    decision: AlertDecision | None = None
    intended: list[int] = field(default_factory=list)


class RunTracker:
    """Run state between steps: the policy, the last snapshot, the credit engine, alerts and pair metadata."""

    def __init__(self, probes: ProbeSet, config: SMDAConfig, kernel: OptimizerKernel, baseline: Baseline,
                 all_labels: Sequence[str], cards: dict[int, dict[str, Any]] | None = None,
                 alerts: AlertRule | None = None, engine: CreditEngine | None = None) -> None:
        self.probes, self.config, self.kernel, self.baseline = probes, config, kernel, baseline
        self.cards = cards or {}
        self.features = np.asarray(baseline.features)
        self.all_labels = list(all_labels)
        self.labels = [all_labels[int(j)] for j in self.features]
        self.fit_final: dict[str, Any] | None = None
        self.after: Baseline | None = None
        """The policy refitted after training (`fit_after`)."""
        self.policy: RidgePolicy = baseline.policy
        self.X, self.Y, self.M = baseline.X, baseline.Y, baseline.M
        self.harmful = np.asarray(probes.is_harmful, dtype=bool)
        self.categories = probes.category_index()
        self.layout = CreditLayout(len(self.features), tuple(self.categories))
        measure = config.credit_measure if kernel.kind != "step" else "deconvolve"
        self.engine = engine or CreditEngine(kernel, self.layout.width, measure)
        self.alerts = alerts or AlertRule(config.interference_threshold, config.noise_floor_mads, config.min_history,
                                          config.patience, config.on_alert == "halt")
        self.baseline_refusal = self.by_category(baseline.Y)
        self.ignored = np.asarray([self.cards.get(int(j), {}).get("kind") in config.alert_ignore_kinds
                                   for j in self.features], dtype=bool)
        self.halted: dict[str, Any] | None = None
        self.skipped = 0
        self.pair_meta: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_snapshot(cls, probes: ProbeSet, config: SMDAConfig, kernel: OptimizerKernel, Z: np.ndarray, Y: np.ndarray,
                      all_labels: Sequence[str], cards: dict[int, dict[str, Any]] | None = None,
                      sae_fve: float | None = None) -> "RunTracker":
        """Start a run from the baseline snapshot: the one baseline recipe (`baseline.fit_baseline`) over the
        latents whose card kind is allowed."""
        bl = fit_baseline(Z, Y, probes.is_harmful, config, allowed_latents(cards or {}, config.feature_kinds, Z.shape[1]))
        bl.fit["sae_fve_probes"] = sae_fve
        return cls(probes, config, kernel, bl, all_labels, cards)

    # ---------------------------------------------------------------- readings
    @property
    def beta0(self) -> np.ndarray:
        return self.baseline.beta0

    @property
    def b0(self) -> float:
        return self.baseline.b0

    @property
    def fit(self) -> dict[str, Any]:
        return self.baseline.fit

    @property
    def Y_base(self) -> np.ndarray:
        return self.baseline.Y

    def beta(self) -> np.ndarray:
        """β of the latest snapshot, M(X)·Y."""
        return self.M @ self.Y

    def intercept(self, beta: np.ndarray | None = None) -> float:
        return self.policy.intercept_of(self.X, self.Y, self.beta() if beta is None else beta)

    def by_category(self, values: np.ndarray) -> dict[str, float]:
        return {c: float(np.mean(np.asarray(values)[idx])) for c, idx in self.categories.items()}

    def policy_text(self, beta: np.ndarray, b0: float, top: int = 12) -> str:
        return self.policy.render(beta, b0, self.labels, top=top)

    # ---------------------------------------------------------------- one change
    def vector(self, X1: np.ndarray, Y1: np.ndarray, M1: np.ndarray | None = None) -> tuple[Any, dict[str, Any], np.ndarray]:
        """A snapshot's change against the current before-snapshot: decomposition, category reading, credit vector."""
        M1 = self.policy.M(X1) if M1 is None else M1
        dec = decompose_step(self.policy, self.X, self.Y, X1, Y1, self.config.method, self.M, M1)
        cats = category_split(self.policy, self.X, X1, dec, self.categories)
        before, after = self.by_category(self.Y), self.by_category(Y1)
        h = self.harmful
        vec = self.layout.pack(dec.delta_beta_x, dec.delta_beta_y, {c: after[c] - before[c] for c in after},
                               {c: v["x"] + v["y"] for c, v in cats.items()},
                               float(Y1[h].mean() - self.Y[h].mean()), float(Y1[~h].mean() - self.Y[~h].mean()))
        return dec, cats, vec

    def set_decay(self, X: np.ndarray, Y: np.ndarray, eps: float) -> None:
        """κ: the probes' response to one unit of weight decay, measured once at baseline."""
        self.engine.decay = self.vector(X, Y)[2] / eps

    def measure_decay(self, optimizer: Any, take: Callable[[], Any], eps: float = 1e-3) -> None:
        """When the kernel decays weights: one extra probe pass (`take`) with the decayed parameters scaled by
        (1 − eps), so each step's decay part goes to the residual instead of the step's newest pair."""
        if optimizer is None or not self.kernel.weight_decay or not self.kernel.decay_coef(1, 1.0):
            return
        shrunk = with_decayed_weights(optimizer, eps, take)
        if shrunk.finite:
            self.set_decay(shrunk.X, shrunk.Y, eps)

    def pairs_of(self, rows: Sequence[LocalRow], index: dict[str, list[int]],
                 meta: Callable[[int], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Ledger entries for a window's rows (all ranks): each row's share of its step from the split slopes."""
        by_step: dict[Any, list[int]] = {}
        for i, r in enumerate(rows):
            by_step.setdefault(r.step, []).append(i)
        shares = np.zeros(len(rows))
        for idxs in by_step.values():
            slopes = [rows[i].slope for i in idxs] if self.kernel.kind != "step" else [None] * len(idxs)
            shares[idxs] = shares_from_slopes(slopes)
        if self.kernel.kind == "step":  # the old rule: a window's pairs share its change equally
            shares[:] = 1.0 / max(len(rows), 1)
        pairs = []
        for r, share in zip(rows, shares):
            pairs.append({**indexed_pair(r.hash, index, meta, share), "step": r.step})
        return pairs

    def step(self, step: int, window: Sequence[int], epoch: float | None, rows: Sequence[LocalRow],
             pairs: list[dict[str, Any]], loss: float | None, X1: np.ndarray, Y1: np.ndarray, finite: bool,
             ghost: tuple[np.ndarray, np.ndarray] | None = None) -> StepResult:
        """Credit a window's change to its pairs; the ledger record and the alert decision."""
        record: dict[str, Any] = {"step": step, "epoch": epoch, "window": list(window), "pairs": pairs,
                                  "n_pairs": len(pairs), "split": len(pairs) > 1, "train_loss": loss}
        if not finite:
            self.skipped += 1
            record.update(skipped="NaN/Inf in the probe snapshot (activations or refusal); step skipped, its change "
                                  "is carried into the next step's record", alert=False)
            return StepResult(record)
        M1 = self.policy.M(X1)
        dec, cats, vec = self.vector(X1, Y1, M1)
        measured = self.vector(*ghost)[2] if ghost is not None else None
        steps = list(range(int(window[0]), int(window[1]) + 1))
        lrs = [self.engine.lrs.get(t) for t in steps]
        credit = self.engine.window(steps, [(p["hash"], int(p.get("step") or step), float(p["credit"])) for p in pairs],
                                    vec, measured)
        for p in pairs:
            self.pair_meta.setdefault(p["hash"], {k: p[k] for k in PAIR_META if k in p})
            p["own_d"] = self.layout.unpack(credit.own.get(p["hash"], np.zeros(self.layout.width)))["d"]
        projected = self.layout.unpack(credit.projected)["d"] if pairs else dec.delta_beta
        intended = sorted({j for r in rows for j in intended_features(r.z, self.config.intended_top_m)})
        decision = self.alerts.decide(np.where(self.ignored, 0.0, projected), intended)
        b1 = self.policy.intercept_of(X1, Y1, dec.beta1)
        res = self.layout.unpack(credit.residual)
        carried = sum(float(np.abs(self.layout.unpack(v)["d"]).sum()) for v in credit.carried.values())
        record.update(decomposition_fields(dec, cats, self.by_category(Y1), decision.score, decision.dominant,
                                           decision.off_target, intended, self.features, self.labels))
        record.update(
            intercept=b1, predicted_by_category=self.by_category(self.policy.predict(X1, dec.beta1, b1)),
            refusal_harmful=float(Y1[self.harmful].mean()), refusal_harmless=float(Y1[~self.harmful].mean()),
            credit={"kind": self.kernel.kind, "measure": self.engine.measure, "residual_d": res["d"],
                    "residual_refusal": [res["refusal_harmful"], res["refusal_harmless"]],
                    "carried_abs_d": carried, "n_carried": len(credit.carried), "projected_d": projected,
                    "lrs": lrs, "ghost": measured},
            noise_floor=decision.noise_floor, alert=decision.alert, alert_reason=decision.reason,
        )
        self.X, self.Y, self.M = X1, Y1, M1
        return StepResult(record, decision, intended)

    def alert_event(self, result: StepResult) -> AlertEvent:
        """What a user's `on_alert` callable receives for an alerting step."""
        d, rec = result.decision, result.record
        assert d is not None
        return AlertEvent(rec["step"], rec["pairs"], d.score, int(self.features[d.dominant]), self.labels[d.dominant],
                          [int(self.features[j]) for j in result.intended], d.reason, self.alerts.n_alerts)

    def halt(self, result: StepResult) -> None:
        d = result.decision
        assert d is not None
        self.halted = {"step": result.record["step"], "reason": d.reason, "dominant_label": self.labels[d.dominant]}
        result.record["halted"] = True

    # ---------------------------------------------------------------- summaries
    def describe(self) -> str:
        """The baseline policy in words, for the log."""
        return (f"{len(self.features)} features, λ={self.policy.lam:.3g}, R²={self.fit.get('r2', float('nan')):.3f}, "
                f"5-fold AUROC (features chosen on all probes, so not held out) "
                f"{self.fit.get('cv_auroc_labels', float('nan')):.3f}\n{self.policy_text(self.beta0, self.b0)}")

    def findings(self, top: int = 3) -> dict[str, Any]:
        """What the run has shown so far (for progress printing while it trains)."""
        beta = self.beta()
        per_pair = [(h, self.layout.unpack(v)) for h, v in self.engine.totals.items()]

        def ranked(key: str, sign: float) -> list[dict[str, Any]]:
            best = sorted(per_pair, key=lambda hv: -sign * hv[1][key])[:top]
            return [{**self.pair_meta.get(h, {}), "score": sign * v[key]} for h, v in best]

        return {"policy": self.policy_text(beta, self.intercept(beta)), "fit": self.fit,
                "baseline": dict(self.baseline_refusal), "now": self.by_category(self.Y),
                "over_refusal": ranked("refusal_harmless", 1.0), "compliance": ranked("refusal_harmful", -1.0),
                "n_alerts": self.alerts.n_alerts, "n_pairs": len(per_pair)}

    def fit_after(self, snap: Any) -> None:
        """The policy the tuned model follows: the baseline recipe refitted on a full snapshot after training
        (features re-chosen), with its in-sample and nested AUROC and R² (against the labels and against Y)."""
        if not snap.finite:
            return
        Z, Y = snap.Z, snap.Y
        bl = fit_baseline(Z, Y, self.probes.is_harmful, self.config,
                          allowed_latents(self.cards, self.config.feature_kinds, Z.shape[1]))
        self.after = bl
        self.fit_final = {**bl.fit, "features": [int(j) for j in bl.features],
                          "labels": [self.all_labels[int(j)] for j in bl.features],
                          "policy": bl.policy.render(bl.beta0, bl.b0, [self.all_labels[int(j)] for j in bl.features], top=12)}

    def policy_record(self, final: bool, step: int, hook: str | None, sae: dict[str, Any] | None,
                      sae_fve: float | None) -> dict[str, Any]:
        beta_T = self.beta()
        return policy_record(
            protocol="callback", probes=self.probes, features=self.features, labels=self.labels, policy=self.policy,
            config=self.config, beta0=self.beta0, b0=self.b0, beta_final=beta_T, intercept_final=self.intercept(beta_T),
            fit=self.fit, Y0=self.Y_base, Y_final=self.Y, cards=self.cards, hook=hook, sae=sae, sae_fve=sae_fve,
            n_alerts=self.alerts.n_alerts, halted=self.halted, skipped=self.skipped, final=final, step=step,
            fit_after_training=self.fit_final, **credit_summary(self.engine, self.layout, self.config.credit, self.kernel))

    def credits_record(self) -> dict[str, Any]:
        return credits_record(self.engine, self.layout, self.pair_meta, self.config.credit, self.kernel)

    # ---------------------------------------------------------------- checkpoints
    def save(self, folder: str | Path, step: int) -> None:
        """The run's state into a checkpoint folder (raises OSError; the caller decides what a failure means)."""
        meta, arrays = self.state()
        np.savez(Path(folder) / STATE_NPZ, **arrays)
        (Path(folder) / STATE_JSON).write_text(json.dumps({**meta, "config": self.config.to_dict(), "step": step},
                                                          default=float))

    @classmethod
    def load(cls, folder: str | Path, probes: ProbeSet, config: SMDAConfig, all_labels: Sequence[str],
             cards: dict[int, dict[str, Any]] | None = None) -> "RunTracker | None":
        """The state `save` left in a checkpoint folder, or None when it holds none."""
        folder = Path(folder)
        if not (folder / STATE_JSON).exists() or not (folder / STATE_NPZ).exists():
            return None
        return cls.from_state(json.loads((folder / STATE_JSON).read_text()), np.load(folder / STATE_NPZ),
                              probes, config, all_labels, cards)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        credit_meta, credit_arrays = self.engine.state()
        arrays = {"X": self.X, "Y": self.Y, "Y_base": self.Y_base, "X_base": self.baseline.X,
                  "features": self.features, "beta0": self.beta0, **credit_arrays}
        meta = {"credit": credit_meta, "pair_meta": self.pair_meta, "policy": self.policy.to_dict(), "b0": self.b0,
                "fit": self.fit, "halted": self.halted, "skipped": self.skipped, "alerts": self.alerts.state(),
                "baseline_refusal": self.baseline_refusal}
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: Any, probes: ProbeSet, config: SMDAConfig,
                   all_labels: Sequence[str], cards: dict[int, dict[str, Any]] | None = None) -> "RunTracker":
        policy = RidgePolicy.from_dict(meta["policy"])
        X_base = arrays["X_base"] if "X_base" in getattr(arrays, "files", arrays) else arrays["X"]
        base = Baseline(arrays["features"], policy, X_base, arrays["Y_base"], policy.M(X_base), arrays["beta0"],
                        float(meta["b0"]), meta["fit"])
        layout = CreditLayout(len(base.features), tuple(probes.category_index()))
        engine = CreditEngine.from_state(meta["credit"], arrays, layout.width)
        run = cls(probes, config, engine.kernel, base, all_labels, cards, engine=engine)
        run.alerts.load_state(meta["alerts"])
        run.X, run.Y = arrays["X"], arrays["Y"]
        run.M = policy.M(run.X)
        run.halted, run.skipped = meta.get("halted"), int(meta.get("skipped", 0))
        run.pair_meta = meta.get("pair_meta", {})
        run.baseline_refusal = meta["baseline_refusal"]
        return run
