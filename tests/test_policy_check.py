"""The policy check scores what it says: a policy on real signal generalises to new prompts, a
policy on noise does not, and feature kinds restrict the selection."""

import numpy as np

from smda_callback.config import SMDAConfig
from smda_callback.lab.policy_check import format_policy_check, policy_scores


def _data(n, signal, rng):
    harmful = np.arange(n) % 2 == 0
    Z = np.abs(rng.normal(size=(n, 200))) * (rng.random((n, 200)) < 0.3)
    Z[:, :6] += signal * harmful[:, None] * rng.random((n, 6))
    Y = 0.02 + 0.05 * harmful * signal + 0.01 * rng.random(n)
    return Z, Y, harmful


def test_signal_generalises_and_noise_does_not():
    rng = np.random.default_rng(0)
    cfg = SMDAConfig(n_features=8)
    kinds = {j: ("content" if j % 2 == 0 else "format") for j in range(200)}
    Zp, Yp, hp = _data(120, 1.0, rng)
    Zh, _, hh = _data(40, 1.0, rng)
    good = policy_scores(Zp, Yp, hp, Zh, hh, cfg, None, kinds)
    assert good["cv_auroc_nested"] > 0.9 and good["heldout_auroc"] > 0.9
    Zp, Yp, hp = _data(120, 0.0, rng)
    Zh, _, hh = _data(40, 0.0, rng)
    noise = policy_scores(Zp, Yp, hp, Zh, hh, cfg, None, kinds)
    assert abs(noise["heldout_auroc"] - 0.5) < 0.25 and abs(noise["cv_auroc_nested"] - 0.5) < 0.2


def test_kinds_restrict_the_selection():
    rng = np.random.default_rng(1)
    Zp, Yp, hp = _data(120, 1.0, rng)
    Zh, _, hh = _data(40, 1.0, rng)
    kinds = {j: ("content" if j % 2 == 0 else "format") for j in range(200)}
    allowed = np.asarray([kinds[j] == "content" for j in range(200)])
    res = policy_scores(Zp, Yp, hp, Zh, hh, SMDAConfig(n_features=8), allowed, kinds)
    assert res["content_share"] == 1.0 and all(j % 2 == 0 for j in res["features"]) and res["kinds"] == {"content": 8}
    table = format_policy_check({"configured_kinds": ["content"], "configured": res, "all_kinds": res})
    assert "| kinds content | 8 | 100% |" in table


def test_nested_cv_rechooses_features_and_is_lower_than_the_leaky_estimate_on_noise():
    """Pure-noise latents: choosing features on all probes first makes the 'held-out' AUROC look good; the nested
    estimate (features re-chosen per fold) stays near chance."""
    from smda_callback.baseline import fit_baseline, nested_cv, stable_features
    from smda_callback.config import SMDAConfig

    rng = np.random.default_rng(1)
    Z = np.abs(rng.normal(size=(80, 600)))
    harmful = np.arange(80) % 2 == 0
    Y = np.where(harmful, 0.6, 0.2) + 0.05 * rng.normal(size=80)
    cfg = SMDAConfig(n_features=8, cv_folds=5)
    leaky = fit_baseline(Z, Y, harmful, cfg).fit["cv_auroc_labels"]
    nested = nested_cv(Z, Y, harmful, cfg, None)["cv_auroc_nested"]
    assert leaky > 0.75 and nested < 0.65 and leaky - nested > 0.15
    Z[:, :3] += 2.0 * harmful[:, None]  # now three latents carry the labels
    assert nested_cv(Z, Y, harmful, cfg, None)["cv_auroc_nested"] > 0.9
    assert set(range(3)) <= set(stable_features(Z, harmful, 8, None, resamples=20).tolist())


def test_sweep_rows_and_fold_agreement():
    from smda_callback.config import SMDAConfig
    from smda_callback.lab.policy_check import fold_jaccard, sweep

    rng = np.random.default_rng(2)
    harmful = np.arange(60) % 2 == 0
    Z = np.abs(rng.normal(size=(60, 300)))
    Z[:, :6] += 3.0 * harmful[:, None]  # six strong latents: every fold picks them
    Y = np.where(harmful, 0.5, 0.1) + 0.02 * rng.normal(size=60)
    cfg = SMDAConfig(n_features=6, cv_folds=3, selection_resamples=5)
    assert fold_jaccard(Z, harmful, cfg, None, 3, 2) == 1.0
    noise = np.abs(rng.normal(size=(60, 300)))
    assert fold_jaccard(noise, harmful, cfg, None, 3, 2) < 0.5  # on noise the folds choose different latents
    rows = sweep(Z[:30], Y[:30], harmful[:30], Z[30:], harmful[30:], cfg, None, counts=(6, 12), fold_seeds=1)
    assert [(r["selection"], r["n_features"]) for r in rows] == [("score", 6), ("score", 12), ("stable", 6), ("stable", 12)]
    assert all(r["heldout"] > 0.9 for r in rows)


def test_features_chosen_on_a_larger_labelled_set_are_the_signal_and_the_probes_only_fit():
    """With few probes and a weak signal, choosing on the probes picks noise latents; a larger labelled set (the
    training pairs' prompts) picks the signal latents, every fold then has them and the nested estimate rises
    (on average over draws: one draw of 40 probes is noisy)."""
    from smda_callback.lab.policy_check import chosen_elsewhere, fold_jaccard

    cfg = SMDAConfig(n_features=6, cv_folds=5)
    gains = []
    for seed in range(6):
        rng = np.random.default_rng(seed)

        def data(n):
            harmful = np.arange(n) % 2 == 0
            Z = np.abs(rng.normal(size=(n, 400)))
            Z[:, :6] += 0.35 * harmful[:, None]
            return Z, 0.1 + 0.05 * Z[:, :6].sum(1) + 0.05 * rng.normal(size=n), harmful

        (Zp, Yp, hp), (Zh, _, hh), (Zs, _, hs) = data(40), data(60), data(600)
        assert chosen_elsewhere(cfg, (Zs, hs), None).features == tuple(range(6))
        on_probes = policy_scores(Zp, Yp, hp, Zh, hh, cfg, None, {}, fold_seeds=3)
        elsewhere = policy_scores(Zp, Yp, hp, Zh, hh, cfg, None, {}, fold_seeds=3, select=(Zs, hs))
        assert elsewhere["features"] == list(range(6))
        gains.append((elsewhere["cv_auroc_nested"] - on_probes["cv_auroc_nested"],
                      elsewhere["heldout_auroc"] - on_probes["heldout_auroc"]))
    assert np.mean(gains, axis=0).min() > 0.1
    assert chosen_elsewhere(cfg, None, None) is cfg
    assert fold_jaccard(Zp, hp, chosen_elsewhere(cfg, (Zs, hs), None), None, 5, 1) == 1.0
