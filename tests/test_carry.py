"""The forgetting model of carry.py: κ read back from trajectories made with a known κ, the weights it gives,
and its refusals of trajectories that cannot identify it."""

from __future__ import annotations

import numpy as np
import pytest

from smda_callback.lab.carry import Forgetting, end_weights, fit_forgetting, fit_shared, later_windows, run_forgetting


def _trajectory(kappa: float, K: int = 300, seed: int = 0, noise: float = 0.002):
    """q_k = q_{k−1} + a_label − κ q_{k−1} + noise, labels alternating at random; returns q0, q, n_harmful, n_harmless."""
    rng = np.random.default_rng(seed)
    harmful = rng.random(K) < 0.5
    q, qs = 0.05, []
    for h in harmful:
        q = q + (0.02 if h else 0.008) - kappa * q + rng.normal(0, noise)
        qs.append(q)
    return 0.05, qs, harmful.astype(int), (~harmful).astype(int)


@pytest.mark.parametrize("kappa", [0.0, 0.04, 0.15])
def test_kappa_is_read_back_from_a_trajectory_made_with_it(kappa):
    f = fit_forgetting(*_trajectory(kappa))
    assert abs(f.kappa - kappa) < 0.02
    assert f.ci95[0] - 0.005 <= kappa <= f.ci95[1] + 0.005 and f.windows == 300


def test_a_push_is_left_at_retention_to_the_power_of_later_windows():
    f = Forgetting(0.1, (0.05, 0.15), 50)
    assert f.weight(0) == 1.0 and f.weight(3) == pytest.approx(0.9 ** 3)
    assert Forgetting(-0.02, (-0.05, 0.01), 50).weight(10) == 1.0  # no reversion read: nothing forgotten
    assert Forgetting(1.3, (1.0, 1.5), 50).weight(1) < 1e-8  # everything forgotten by the next window


def test_end_weights_follow_the_ledgers_order():
    recs = [{"step": s, "refusal_harmful": 0.1 * s, "refusal_harmless": 0.05 * s ** 0.5, "pairs": [{"id": i, "hash": "h" + i, "label": lab}]}
            for s, i, lab in ((3, "c", "harmful"), (1, "a", "harmless"), (2, "b", "harmful"), (4, "d", "harmless"),
                              (5, "e", "harmful"))]
    assert later_windows(recs) == {"a": 4, "b": 3, "c": 2, "d": 1, "e": 0}
    assert later_windows(recs, key="hash") == {"ha": 4, "hb": 3, "hc": 2, "hd": 1, "he": 0}
    policy = {"probes": [{"label": "harmful"}, {"label": "harmless"}], "probe_refusal_0": [0.0, 0.0]}
    weights, fg = end_weights(recs, policy, key="id")
    w, f = weights["harmful"], fg["harmful"]
    assert w["e"] == 1.0 and w["a"] == pytest.approx(f.retention ** 4) and set(w) == set("abcde")


def test_run_forgetting_reads_the_ledger_per_quantity():
    q0, qh, nh, ns = _trajectory(0.1, K=200, seed=1)
    _, qs, _, _ = _trajectory(0.0, K=200, seed=2)
    recs = [{"step": k + 1, "refusal_harmful": a, "refusal_harmless": b,
             "pairs": [{"id": f"p{k}", "label": "harmful" if h else "harmless"}]} for k, (a, b, h) in enumerate(zip(qh, qs, nh))]
    fg = run_forgetting(recs, {"harmful": q0, "harmless": 0.05})
    assert abs(fg["harmful"].kappa - 0.1) < 0.03
    # the harmless trajectory drifts without a pull back (κ = 0, its labels not the ledger's): no forgetting is read
    assert abs(fg["harmless"].kappa) < 0.02 and fg["harmless"].windows == 200


def test_trajectories_that_cannot_identify_kappa_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="≥ 4 windows"):
        fit_forgetting(0.1, [0.2, 0.3], [1, 0], [0, 1])
    with pytest.raises(ValueError, match="never moved"):
        fit_forgetting(0.1, [0.1] * 6, [1, 0] * 3, [0, 1] * 3)
    with pytest.raises(ValueError, match="non-finite"):
        fit_forgetting(0.1, [0.2, float("nan"), 0.3, 0.4, 0.5], [1] * 5, [0] * 5)
    with pytest.raises(ValueError, match="no window with refusal means"):
        run_forgetting([{"step": 1, "pairs": []}], {"harmful": 0.1, "harmless": 0.1})


def _ar2_trajectory(kappa: float, b: float, K: int = 400, seed: int = 0, noise: float = 0.0005, push_at: int | None = None):
    """d_k = a_label − κ q_{k−1} + b d_{k−1} + noise, q_k = q_{k−1} + d_k; `push_at`: one more unit of d at that window."""
    rng = np.random.default_rng(seed)
    harmful = rng.random(K) < 0.5
    eps = rng.normal(0, noise, K)
    q, d, qs = 0.05, 0.0, []
    for k, h in enumerate(harmful):
        d = (0.02 if h else 0.008) - kappa * q + b * d + eps[k] + (1.0 if k == push_at else 0.0)
        q = q + d
        qs.append(q)
    return 0.05, qs, harmful.astype(int), (~harmful).astype(int)


def test_an_ar2_fit_reads_its_process_back_and_its_weight_is_what_a_push_leaves_at_the_end():
    kappa, b = 0.05, 0.8
    q0, qs, nh, ns = _ar2_trajectory(kappa, b)
    f = fit_forgetting(q0, qs, nh, ns, order=2)
    assert abs(f.kappa - kappa) < 0.01 and len(f.lags) == 1 and abs(f.lags[0] - b) < 0.05
    # the weight is the process's own answer: a trajectory with one more unit push, minus the one without, at the end
    true = Forgetting(kappa, (kappa, kappa), 400, (b,))
    for n in (0, 1, 5, 12, 30):
        _, pushed, _, _ = _ar2_trajectory(kappa, b, push_at=399 - n)
        assert true.weight(n) == pytest.approx(pushed[-1] - qs[-1], rel=1e-6, abs=1e-9)
        assert f.weight(n) == pytest.approx(true.weight(n), abs=0.15)
    # momentum first carries the push further, then the pull back overshoots: the answer changes sign
    assert true.weight(3) > 1.5 and min(true.weight(n) for n in range(60)) < -0.1
    assert f.weight(3) > 1.5 and min(f.weight(n) for n in range(60)) < -0.1
    # order 1 on the same trajectory cannot turn a push round
    assert min(fit_forgetting(q0, qs, nh, ns).weight(n) for n in range(60)) >= 0


def _two_quantities(kappa: float, b: float, K: int, seed: int, noise: float = 0.002):
    """Two trajectories of one AR(2) process (the same κ, b and labels) with their own pushes per label and their own
    noise, as a run's harmful and harmless refusal: returns [(q0, q) per quantity], n_harmful, n_harmless."""
    rng = np.random.default_rng(seed)
    harmful = rng.random(K) < 0.5
    out = []
    for push_h, push_s in ((0.02, -0.004), (0.003, 0.012)):
        q, d, qs = 0.1, 0.0, []
        for h in harmful:
            d = (push_h if h else push_s) - kappa * q + b * d + rng.normal(0, noise)
            q += d
            qs.append(q)
        out.append((0.1, qs))
    return out, harmful.astype(int), (~harmful).astype(int)


def test_a_shared_fit_reads_one_process_from_two_quantities_with_their_own_pushes():
    kappa, b = 0.05, 0.8
    errs_shared, errs_single = [], []
    for seed in range(12):  # 64 windows, the demo's LDS runs: short enough for one quantity's fit to wobble
        trajs, nh, ns = _two_quantities(kappa, b, K=64, seed=seed)
        f = fit_shared(trajs, nh, ns, order=2, resamples=50)
        singles = [fit_forgetting(q0, q, nh, ns, order=2, resamples=0) for q0, q in trajs]
        errs_shared.append(abs(f.weight(30) - Forgetting(kappa, (0, 0), 64, (b,)).weight(30)))
        errs_single += [abs(g.weight(30) - Forgetting(kappa, (0, 0), 64, (b,)).weight(30)) for g in singles]
        assert f.windows == 64 and len(f.lags) == 1
    # the same dynamics read off twice the rows: a smaller error of what a push leaves 30 windows on
    assert np.mean(errs_shared) < np.mean(errs_single)
    trajs, nh, ns = _two_quantities(kappa, b, K=400, seed=0)
    f = fit_shared(trajs, nh, ns, order=2, resamples=200)
    assert abs(f.kappa - kappa) < 0.01 and abs(f.lags[0] - b) < 0.05 and f.ci95[0] <= kappa + 0.005 <= f.ci95[1] + 0.01
    with pytest.raises(ValueError, match="no trajectory given"):
        fit_shared([], nh, ns)
    # one trajectory: fit_forgetting itself, bootstrap interval included
    one = fit_shared(trajs[:1], nh, ns, order=2, resamples=50)
    assert one == fit_forgetting(*trajs[0], nh, ns, order=2, resamples=50)


def test_an_explosive_ar2_fit_is_refused_with_the_fix():
    q0, qs, nh, ns = _ar2_trajectory(-0.01, 0.95, K=120, seed=3)
    with pytest.raises(ValueError, match="explosive.*read order 1"):
        fit_forgetting(q0, qs, nh, ns, order=2)
    with pytest.raises(ValueError, match="order must be ≥ 1"):
        fit_forgetting(q0, qs, nh, ns, order=0)


def test_the_weights_in_one_pass_are_each_push_s_own_answer():
    for f in (Forgetting(0.1, (0.05, 0.15), 50), Forgetting(0.05, (0.05, 0.05), 50, (0.8,)),
              Forgetting(0.04, (0.04, 0.04), 50, (0.7, 0.1))):
        w = f.weights(40)
        assert w.shape == (41,) and w[0] == 1.0
        assert all(w[n] == pytest.approx(f.weight(n), rel=1e-12) for n in (0, 1, 7, 40))
    # each n's answer is the recursion run for n windows alone, not a prefix artefact
    f = Forgetting(0.05, (0.05, 0.05), 50, (0.8,))
    level, step, prev = 1.0, 1.0, 0.0
    for _ in range(12):
        step, prev = -0.05 * level + 0.8 * step, step
        level += step
    assert f.weights(12)[12] == pytest.approx(level, rel=1e-12)


def test_reach_counts_the_last_windows_a_carry_still_reads():
    # first order: retention^n ≥ 5 % up to n = ⌊ln 0.05 / ln 0.9⌋ = 28, so the last 29 windows
    assert Forgetting(0.1, (0.05, 0.15), 101).reach(100) == 29
    assert Forgetting(0.1, (0.05, 0.15), 101).reach(100, share=0.5) == 7  # 0.9^6 = 0.53, 0.9^7 = 0.48
    # second order: the response rises, turns negative and dies out; reach is where |weight| last reaches 5 % of its peak,
    # negative weights counted by size
    f = Forgetting(0.08, (0.08, 0.08), 60, (0.75,))
    w, r = np.abs(f.weights(59)), f.reach(59)
    assert f.weights(59)[r - 1] < 0 and w[r - 1] >= 0.05 * w.max() and (w[r:] < 0.05 * w.max()).all() and r < 40
    # a run shorter than the carry's reach is read whole
    assert Forgetting(0.01, (0.0, 0.02), 20).reach(19) == 20
