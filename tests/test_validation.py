"""Validation helpers: scores read from ledgers, agreement, the curation rule, the causal check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import probe_records, tiny_model, tiny_sae

from smda_callback import ProbeSet, SMDAConfig
from smda_callback.sinks import POLICY, LedgerWriter
from smda_callback.lab.retrain import METRICS, flag_pairs, random_like
from smda_callback.lab.validation import CausalSettings, agreement, causal_check, pair_scores


def _ledger(tmp, ids, deltas, beta0, gaps, feats=(3, 7, 11)):
    w = LedgerWriter(tmp / "smda")
    for step, (i, d, g) in enumerate(zip(ids, deltas, gaps), 1):
        d = np.asarray(d, float)
        w.append({"step": step, "pairs": [{"id": i, "label": "harmful" if step % 2 else "harmless", "category": "c",
                                          "credit": 1.0}],
                  "delta_beta": d, "delta_beta_x": 0.25 * d, "delta_beta_y": 0.75 * d, "alignment": d * beta0,
                  "first_order_gap": g,
                  "category_pathways": {"c": {"x": float(d[0]), "y": float(d[1])}}})
    w.write_json(POLICY, {"features": list(feats), "feature_labels": [f"f{f}" for f in feats]})
    return tmp


def test_pair_scores_sum_over_epochs_and_agreement(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(12)]
    D = rng.normal(size=(12, 3))
    beta0 = np.array([1.0, -2.0, 0.5])
    a = _ledger(tmp_path / "a", ids + ids[:1], list(D) + [D[0]], beta0, [0.1] * 13)  # p0 seen twice (2 epochs)
    s = pair_scores(a)
    assert s.at["p0", "score"] == pytest.approx(2 * float(D[0] @ beta0))
    assert s.at["p0", "moves"]["c"] == pytest.approx(2 * (D[0, 0] + D[0, 1]))
    # the same pairs' summed Δβ, scaled and one feature's order reversed; features listed in another order
    S = D.copy()
    S[0] *= 2
    b = _ledger(tmp_path / "b", ids, list(np.c_[3 * S[:, 2], -S[:, 1], 2 * S[:, 0]]), np.array([1.0, 2.0, 0.5]),
                [0.3] * 12, feats=(11, 7, 3))
    ag = agreement(a, b)
    assert ag["n_pairs"] == 12 and ag["n_shared_features"] == 3
    rho = {r["feature"]: r["spearman"] for r in ag["per_feature"]}
    assert rho[11] == pytest.approx(1.0) and rho[3] == pytest.approx(1.0) and rho[7] == pytest.approx(-1.0)
    assert ag["first_order_gap"]["counterfactual"]["median"] == pytest.approx(0.3)


def test_pair_scores_refuses_an_unbound_ledger(tmp_path):
    LedgerWriter(tmp_path / "smda").append({"step": 1, "skipped": "NaN"})
    with pytest.raises(ValueError, match="bind"):
        pair_scores(tmp_path)


def test_flag_rule_and_random_control():
    scores = pd.DataFrame({"label": ["harmful"] * 4 + ["harmless"] * 4,
                           "score": [5.0, 4.0, 0.5, -1.0, 0.0, 1.0, 4.5, -2.0]},
                          index=[f"h{i}" for i in range(4)] + [f"s{i}" for i in range(4)])
    # harmless median 0.5 → h3 (−1.0) flagged, h2 (0.5) not; harmful median 2.25 → s2 (4.5) flagged
    assert flag_pairs(scores) == ["h3", "s2"]
    pairs = [{"id": i, "label": lab} for i, lab in zip(scores.index, scores.label)]
    r1, r2 = random_like(pairs, ["h3", "s2", "s1"], 1), random_like(pairs, ["h3", "s2", "s1"], 2)
    for r in (r1, r2):
        assert sum(i.startswith("h") for i in r) == 1 and sum(i.startswith("s") for i in r) == 2
    assert r1 == random_like(pairs, ["h3", "s2", "s1"], 1)
    draws = [tuple(random_like(pairs, ["h3", "s2", "s1"], k)) for k in range(40)]
    assert len(set(draws)) > 10  # different seeds draw different sets
    # every harmless pair is drawn with probability 2/4 (uniform within the label), within sampling error
    share = np.mean([[f"s{i}" in d for i in range(4)] for d in draws], axis=0)
    assert np.all(np.abs(share - 0.5) < 0.25)


def test_causal_check_on_a_tiny_model(smol_tokenizer):
    model, sae = tiny_model(), tiny_sae()
    probes = ProbeSet.from_records(probe_records())
    pairs = [{"id": f"p{i}", "prompt": f"Question number {i}: how do I do thing {i}?",
              "response": ("I can't help with that." if i % 2 else f"Sure, here is step {i}."),
              "label": "harmful" if i % 2 else "harmless", "category": "c"} for i in range(12)]
    scores = pd.DataFrame({"label": [p["label"] for p in pairs], "moves": [{"weapons": float(i)} for i in range(12)]},
                          index=[p["id"] for p in pairs])
    st = CausalSettings(n_each=2, background=3, tail=2, lr=1e-3)
    (res,) = causal_check(model, smol_tokenizer, pairs, scores, probes, ["weapons"], sae, SMDAConfig(scorer="first_token"), st)
    got = pd.DataFrame(res["pairs"])
    assert got.id.tolist() == ["p0", "p1", "p10", "p11"] and got.predicted.tolist() == [0.0, 1.0, 10.0, 11.0]
    assert (got.measured != 0).all(), "inserting a pair at lr 1e-3 must move the measured refusal"
    # the summary numbers recomputed independently from the pairs' predicted and measured values
    from scipy.stats import spearmanr

    assert res["spearman"] == pytest.approx(spearmanr(got.predicted, got.measured).statistic)
    assert res["sign_agreement"] == pytest.approx(float((np.sign(got.predicted) == np.sign(got.measured)).mean()))
    assert res["top_minus_bottom"] == pytest.approx(got.measured[2:].mean() - got.measured[:2].mean())
    with pytest.raises(ValueError, match="no probes"):
        causal_check(model, smol_tokenizer, pairs, scores, probes, ["nope"], sae, SMDAConfig(), st)


def _fake_result():
    stat = {"mean": 0.2, "sd": 0.05, "min": 0.15, "max": 0.25}
    cond = {"jobs": 3, "n_train": [10], "orders": [0, 1, 2], **{f"{s}.{m}": stat for s, m in METRICS}}
    causal = {"category": "edgy", "settings": {"n_each": 2}, "without": 0.1, "spearman": 0.5, "sign_agreement": 0.75,
              "top_minus_bottom": 1e-3, "pairs": [{"id": f"p{i}", "label": "harmful" if i % 2 else "harmless", "category": "c",
                                                   "predicted": i - 1.5, "measured": (i - 1.5) * 1e-3} for i in range(4)]}
    return {"agreement": {"n_pairs": 4, "n_shared_features": 3, "n_features": 3, "score_spearman": 0.4,
                          "score_spearman_by_label": {"harmful": 0.1, "harmless": float("nan")},
                          "feature_spearman_median": 0.2, "feature_spearman_p10_p90": [-0.1, 0.5], "features_positive": 0.6,
                          "first_order_gap": {"in_training": {"p10": 0.1, "median": 0.2, "p90": 0.3}, "counterfactual": {}},
                          "scores": [{"id": f"p{i}", "label": "harmful", "in_training": i, "counterfactual": -i} for i in range(4)]},
            "curation": {"conditions": {n: cond for n in ("a_all", "b_top32", "c_random32")},
                         "claims": {"b_top32": {"over_refusal_gain_points": 0.0, "harmful_refusal_diff_points": 0.0}}},
            "causal": [causal]}


def test_markdown_and_plots_of_a_result(tmp_path):
    from smda_callback.lab.validation import format_validation, plot_validation

    md = format_validation(_fake_result())
    assert "| b_top32 | 3 | 10 | 20 ± 5 |" in md and "+0.0 points lower (target ≥ 15)" in md
    assert "Spearman(predicted, measured) = +0.500" in md
    paths = plot_validation(_fake_result(), tmp_path)
    assert [p.name for p in paths] == ["agreement.png", "curation.png", "causal.png"]
    assert all(p.stat().st_size > 5000 for p in paths)
