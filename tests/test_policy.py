import numpy as np
import pytest

from smda_callback import RidgePolicy, auroc, select_features


def _data(P=40, k=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(P, k)) * rng.uniform(0.5, 3, size=k) + rng.normal(size=k)
    Y = X @ rng.normal(size=k) * 0.1 + 0.3 + 0.05 * rng.normal(size=P)
    return X, Y


def _lstsq_reference(pol, X, Y):
    """Independent solve: augmented least squares [Xs 1; sqrt(λ)I 0] with unpenalised intercept."""
    Xs = pol.transform(X)
    P, k = Xs.shape
    A = np.vstack([np.hstack([Xs, np.ones((P, 1))]), np.hstack([np.sqrt(pol.lam) * np.eye(k), np.zeros((k, 1))])])
    b = np.concatenate([Y, np.zeros(k)])
    sol = np.linalg.lstsq(A, b, rcond=None)[0]
    return sol[:k], sol[k]


@pytest.mark.parametrize("form", ["primal", "dual"])
@pytest.mark.parametrize("shape", [(40, 6), (10, 30)])
def test_ridge_matches_independent_lstsq(form, shape):
    X, Y = _data(*shape)
    pol = RidgePolicy(lam=0.7).freeze_scale(X)
    beta = pol.coef(X, Y, form=form)
    ref_beta, ref_b0 = _lstsq_reference(pol, X, Y)
    np.testing.assert_allclose(beta, ref_beta, atol=1e-9)
    assert abs(pol.intercept_of(X, Y, beta) - ref_b0) < 1e-9


def test_primal_equals_dual():
    X, Y = _data(25, 25)
    pol = RidgePolicy(lam=2.0).freeze_scale(X)
    np.testing.assert_allclose(pol.M(X, "primal"), pol.M(X, "dual"), atol=1e-10)


def test_no_intercept_no_standardise_is_plain_ridge():
    X, Y = _data()
    pol = RidgePolicy(lam=5.0, intercept=False, standardize=False).freeze_scale(X)
    ref = np.linalg.solve(X.T @ X + 5.0 * np.eye(X.shape[1]), X.T @ Y)
    np.testing.assert_allclose(pol.coef(X, Y), ref, atol=1e-10)


def test_gcv_picks_small_lambda_for_clean_data_and_large_for_noise():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 5))
    clean = X @ np.arange(1, 6)
    noise = rng.normal(size=80)
    lam_clean = RidgePolicy().freeze_scale(X).select_lambda(X, clean)
    lam_noise = RidgePolicy().freeze_scale(X).select_lambda(X, noise)
    assert lam_clean < 0.1 < lam_noise


def test_fit_report_separates_labels():
    rng = np.random.default_rng(2)
    harmful = np.arange(60) < 30
    X = rng.normal(size=(60, 4)) + harmful[:, None] * np.array([4.0, 0, 0, 0])
    Y = 0.8 * harmful + 0.1 * rng.normal(size=60)
    rep = RidgePolicy(lam=1.0).freeze_scale(X).fit_report(X, Y, harmful)
    assert rep["cv_auroc_labels"] > 0.9 and rep["r2"] > 0.5


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(3)
    s = rng.integers(0, 5, size=30).astype(float)
    pos = rng.random(30) > 0.5
    pairs = [(a > b) + 0.5 * (a == b) for a in s[pos] for b in s[~pos]]
    assert abs(auroc(s, pos) - np.mean(pairs)) < 1e-12


def test_select_features_finds_the_separating_latents_and_skips_dead():
    rng = np.random.default_rng(4)
    harmful = np.arange(50) < 25
    Z = np.abs(rng.normal(size=(50, 20)))
    Z[:, 3] += 3 * harmful
    Z[:, 11] += 2 * ~harmful
    Z[:, 7] = 0.0
    feats = select_features(Z, harmful, 2)
    assert list(feats) == [3, 11]
    assert 7 not in select_features(Z, harmful, 19)


def test_render_names_features():
    pol = RidgePolicy()
    text = pol.render(np.array([0.5, -0.2]), 0.1, ["f1 weapons", "f9 recipes"])
    assert text.startswith("refuse ≈ 0.1 + 0.5·[f1 weapons] − 0.2·[f9 recipes]")
