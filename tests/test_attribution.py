import numpy as np
import pytest

from smda_callback import AlertRule, RidgePolicy, decompose_step, interference


def _run(T=12, P=30, k=8, eps=0.05, seed=0):
    rng = np.random.default_rng(seed)
    X = [rng.normal(size=(P, k)) + 1.0]
    Y = [rng.random(P)]
    for _ in range(T):
        X.append(X[-1] + eps * rng.normal(size=(P, k)))
        Y.append(np.clip(Y[-1] + eps * rng.normal(size=P), 0, 1))
    return X, Y


@pytest.mark.parametrize("kw", [dict(), dict(intercept=False, standardize=False, lam=5.0)])
def test_exact_split_reproduces_delta_and_telescopes(kw):
    X, Y = _run()
    pol = RidgePolicy(**{"lam": 0.5, **kw}).freeze_scale(X[0])
    total = np.zeros(X[0].shape[1])
    for t in range(len(X) - 1):
        d = decompose_step(pol, X[t], Y[t], X[t + 1], Y[t + 1])
        true = pol.coef(X[t + 1], Y[t + 1]) - pol.coef(X[t], Y[t])
        np.testing.assert_allclose(d.delta_beta_x + d.delta_beta_y, true, atol=1e-9, rtol=0)
        assert np.abs(d.residual).max() < 1e-9
        total += d.delta_beta_x + d.delta_beta_y
    np.testing.assert_allclose(total, pol.coef(X[-1], Y[-1]) - pol.coef(X[0], Y[0]), atol=1e-9, rtol=0)


def test_pure_pathways():
    X, Y = _run(T=1)
    pol = RidgePolicy(lam=1.0).freeze_scale(X[0])
    only_y = decompose_step(pol, X[0], Y[0], X[0], Y[1])
    assert np.abs(only_y.delta_beta_x).max() == 0 and np.abs(only_y.delta_beta_y).max() > 0
    only_x = decompose_step(pol, X[0], Y[0], X[1], Y[0])
    assert np.abs(only_x.delta_beta_y).max() == 0 and np.abs(only_x.delta_beta_x).max() > 0


def test_first_order_converges_to_exact_at_linear_rate():
    """Paper's linearisation error is O(ε²) on a Δβ of O(ε): relative gap ∝ ε."""
    rng = np.random.default_rng(5)
    P, k = 30, 6
    X0, Y0 = rng.normal(size=(P, k)) + 1, rng.random(P)
    dX, dY = rng.normal(size=(P, k)), rng.normal(size=P)
    pol = RidgePolicy(lam=0.5).freeze_scale(X0)
    gaps = []
    for eps in [1e-1, 1e-2, 1e-3, 1e-4]:
        ex = decompose_step(pol, X0, Y0, X0 + eps * dX, Y0 + eps * dY)
        fo = decompose_step(pol, X0, Y0, X0 + eps * dX, Y0 + eps * dY, method="first_order")
        err_x = np.linalg.norm(fo.delta_beta_x - ex.delta_beta_x) / np.linalg.norm(ex.delta_beta)
        gaps.append((fo.first_order_gap, err_x))
    rates = [gaps[i][0] / gaps[i + 1][0] for i in range(3)]
    assert all(8 < r < 12 for r in rates), rates  # halves of a decade: linear convergence
    assert gaps[-1][0] < 1e-3 and gaps[-1][1] < 1e-3


def test_shape_mismatch_is_a_clear_error():
    X, Y = _run(T=1)
    pol = RidgePolicy().freeze_scale(X[0])
    with pytest.raises(ValueError, match="snapshot shapes differ"):
        decompose_step(pol, X[0], Y[0], X[1][:, :3], Y[1])


def test_interference_score_and_dominant():
    score, dom, off = interference(np.array([0.1, -2.0, 0.3, 0.0]), intended=[0, 2])
    assert dom == 1 and off and abs(score - 2.0 / 2.4) < 1e-12
    score, dom, off = interference(np.array([0.1, -2.0]), intended=[1])
    assert not off and abs(score - 0.1 / 2.1) < 1e-12


def test_alert_rule_needs_history_and_noise_floor():
    rule = AlertRule(threshold=0.5, n_mads=3, min_history=5, patience=2, halt_on_alert=True)
    small = np.array([0.0, 0.01, 0.0])
    for _ in range(5):
        assert not rule.decide(small, intended=[0]).alert  # history warming up
    big = np.array([0.0, 1.0, 0.0])
    d1 = rule.decide(big, intended=[0])
    assert d1.alert and not d1.halt
    d2 = rule.decide(big * 1.5, intended=[0])
    assert d2.alert and d2.halt  # patience 2 reached
    assert not rule.decide(big * 5, intended=[1]).alert  # dominant is on-target
