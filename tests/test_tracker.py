"""RunTracker without a Trainer: a step's record, credit that telescopes, alerts, skips and the checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest

from smda_callback.attribution import decompose_step
from smda_callback.config import SMDAConfig
from smda_callback.credit import OptimizerKernel
from smda_callback.probes import ProbeSet
from smda_callback.tracker import LocalRow, RunTracker

from helpers import probe_records


def _run(config: SMDAConfig | None = None, kernel: OptimizerKernel | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    probes = ProbeSet.from_records(probe_records())
    harmful = np.asarray(probes.is_harmful)
    Z = np.abs(rng.normal(size=(len(probes.probes), 20)))
    Z[harmful, :3] += 2.0  # three latents separate the labels
    Y = np.where(harmful, 0.6, 0.1) + 0.05 * rng.normal(size=len(harmful))
    cfg = config or SMDAConfig(n_features=6, cv_folds=3)
    labels = [f"f{j} latent{j}" for j in range(20)]
    return RunTracker.from_snapshot(probes, cfg, kernel or OptimizerKernel(), Z, Y, labels), Z, Y, rng


def _rows(run: RunTracker, rng, step: int, n: int = 2) -> list[LocalRow]:
    return [LocalRow(f"h{step}_{i}", step, 1.0 + i, rng.normal(size=len(run.features))) for i in range(n)]


def test_step_record_matches_the_decomposition_and_telescopes():
    run, Z, Y, rng = _run(kernel=OptimizerKernel("sgd", optimizer="SGD"))
    X0, Y0, M0 = run.X, run.Y, run.M
    X1 = X0 + 0.05 * rng.normal(size=X0.shape)
    Y1 = Y0 + 0.02 * rng.normal(size=Y0.shape)
    rows = _rows(run, rng, 1)
    pairs = run.pairs_of(rows, {"h1_0": [7]}, lambda i: {"label": "harmful", "prompt": "x" * 500})
    assert pairs[0]["index"] == 7 and len(pairs[0]["prompt"]) == 200 and pairs[1]["unmatched"]
    assert abs(sum(p["credit"] for p in pairs) - 1.0) < 1e-12 and pairs[1]["credit"] > pairs[0]["credit"]
    res = run.step(1, [1, 1], 0.1, rows, pairs, 1.5, X1, Y1, True)
    rec = res.record
    ref = decompose_step(run.policy, X0, Y0, X1, Y1, "exact", M0, run.policy.M(X1))
    np.testing.assert_allclose(rec["delta_beta"], ref.delta_beta, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rec["delta_beta_x"] + rec["delta_beta_y"], ref.delta_beta, atol=1e-12)
    total = sum(np.asarray(p["own_d"]) for p in pairs) + np.asarray(rec["credit"]["residual_d"])
    np.testing.assert_allclose(total, ref.delta_beta, atol=1e-12)  # every pair's part + residual = the change
    assert run.X is X1 and run.Y is Y1  # the after-snapshot is the next step's before
    assert rec["refusal_harmful"] == pytest.approx(float(Y1[np.asarray(run.probes.is_harmful)].mean()))


def test_non_finite_snapshot_is_skipped_and_carried():
    run, *_ , rng = _run()
    X0 = run.X
    res = run.step(1, [1, 1], 0.1, _rows(run, rng, 1), [], None, X0 * np.nan, run.Y, False)
    assert res.decision is None and "skipped" in res.record and run.skipped == 1 and run.X is X0


def test_alert_halts_and_builds_the_event():
    cfg = SMDAConfig(n_features=6, cv_folds=3, intended_top_m=0, interference_threshold=0.0, min_history=0,
                     on_alert="halt", patience=1)
    run, _, _, rng = _run(cfg)
    X1 = run.X + 0.1 * rng.normal(size=run.X.shape)
    rows = _rows(run, rng, 1)
    res = run.step(1, [1, 1], 0.1, rows, run.pairs_of(rows, {}), None, X1, run.Y + 0.01, True)
    assert res.decision.alert and res.decision.halt
    event = run.alert_event(res)
    assert event.dominant_feature in run.features and event.n_alerts == 1 and len(event.pairs) == 2
    run.halt(res)
    assert run.halted["step"] == 1 and res.record["halted"]


def test_state_round_trip_continues_identically(tmp_path):
    kernel = OptimizerKernel("adam", 0.9, optimizer="AdamW")
    run, _, _, rng = _run(kernel=kernel)
    twin, _, _, _ = _run(kernel=kernel)
    steps = [(run.X + 0.03 * rng.normal(size=run.X.shape), run.Y + 0.01 * rng.normal(size=run.Y.shape), _rows(run, rng, t))
             for t in (1, 2, 3)]
    for t, (X1, Y1, rows) in enumerate(steps[:2], 1):
        for r in (run, twin):
            r.engine.lr(t, 1e-4)
            r.step(t, [t, t], None, rows, r.pairs_of(rows, {}), None, X1, Y1, True)
    run.save(tmp_path, 2)
    back = RunTracker.load(tmp_path, run.probes, run.config, [f"f{j} latent{j}" for j in range(20)])
    assert back is not None and back.kernel == kernel
    X1, Y1, rows = steps[2]
    for r in (back, twin):
        r.engine.lr(3, 1e-4)
        r.step(3, [3, 3], None, rows, r.pairs_of(rows, {}), None, X1, Y1, True)
    assert back.engine.totals.keys() == twin.engine.totals.keys()
    for h in twin.engine.totals:  # same code path on both sides, so equal bitwise
        np.testing.assert_array_equal(back.engine.totals[h], twin.engine.totals[h])
    assert RunTracker.load(tmp_path / "nothing", run.probes, run.config, []) is None


def test_policy_record_has_the_same_shape_for_both_protocols():
    run, *_ = _run()
    rec = run.policy_record(True, 3, "blocks.3.hook_resid_post", {"neuronpedia_id": "x/3-res"}, 0.8)
    assert rec["protocol"] == "callback" and rec["feature_urls"][str(int(run.features[0]))].endswith(f"/{int(run.features[0])}")
    from smda_callback.schema import policy_record

    cf = policy_record(protocol="counterfactual", probes=run.probes, features=run.features, labels=run.labels,
                       policy=run.policy, config=run.config, beta0=run.beta0, b0=run.b0, beta_final=run.beta0,
                       intercept_final=run.b0, fit=run.fit, Y0=run.Y, Y_final=run.Y, cards={}, hook="h", sae=None,
                       sae_fve=None)
    assert set(rec) - set(cf) == {"top_pairs_by_total_abs_delta_beta", "credit", "fit_after_training"}  # callback only
    assert set(cf) <= set(rec)
