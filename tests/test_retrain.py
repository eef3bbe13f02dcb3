"""The retraining experiment: conditions come from the ranking run, every condition runs in every
order (random sets each in their own), jobs resume and shard, and the summary pools random sets."""

import json

import numpy as np
import pytest

from smda_callback.lab import retrain
from smda_callback.lab.retrain import RetrainSettings, conditions, format_summary, jobs, run_jobs, summarize


def test_conditions_drop_the_top_suspects_and_label_matched_random_sets(credit_run):
    tmp, pairs = credit_run
    st = RetrainSettings(ns=(2,), random_sets=3, max_label_share=1.0)
    conds = conditions(tmp, pairs, st)
    assert set(conds) == {"a_all", "b_top2", "c_random2_s0", "c_random2_s1", "c_random2_s2", "p_median"}
    assert conds["a_all"] == [] and len(conds["b_top2"]) == 2
    label = {p["id"]: p["label"] for p in pairs}
    for k in range(3):
        rnd = conds[f"c_random2_s{k}"]
        assert sorted(label[i] for i in rnd) == sorted(label[i] for i in conds["b_top2"])
    assert len({tuple(conds[f"c_random2_s{k}"]) for k in range(3)}) > 1


def test_every_condition_runs_in_every_order_and_random_sets_in_their_own():
    conds = {"a_all": [], "b_top4": ["x"], "c_random4_s0": ["y"], "c_random4_s1": ["z"], "c_random4_s2": ["w"]}
    got = jobs(conds, RetrainSettings(orders=(0, 1, 2)))
    assert [j for j in got if j[0] == "a_all"] == [("a_all", 0), ("a_all", 1), ("a_all", 2)]
    assert [j for j in got if j[0].startswith("c_")] == [("c_random4_s0", 0), ("c_random4_s1", 1), ("c_random4_s2", 2)]
    assert got[:3] == [("a_all", 0), ("b_top4", 0), ("c_random4_s0", 0)]  # order by order: a stopped run stays balanced


def _fake_answers(rate):
    sub = {"refusal_rate_harmful": 0.9, "refusal_rate_harmless": rate, "over_refusal_edgy": rate, "f1": 0.8, "by_category": {}}
    return {"probes": dict(sub), "heldout": dict(sub)}


def test_jobs_resume_shard_and_summarise(credit_run, tmp_path, monkeypatch):
    """Training and answering are replaced by a stand-in whose over-refusal is the share of pairs kept,
    so the orchestration (which jobs run, what is written, how it pools) is what is tested."""
    tmp, pairs = credit_run
    calls = []

    def train(kept, out, settings):
        calls.append((len(kept), settings.seed))
        return len(kept), None
    monkeypatch.setattr("smda_callback.lab.retrain.train_sft", train)
    monkeypatch.setattr("smda_callback.lab.probing.behaviour", lambda model, tok, sets: _fake_answers(model / len(pairs)))
    st = RetrainSettings(ns=(2,), orders=(0, 1), random_sets=2, paper_rule=False, max_label_share=1.0)
    first = run_jobs(tmp, pairs, {}, tmp_path, st, shard=(0, 2))
    ran = [json.loads(f.read_text())["condition"] for f in first]
    half = summarize(tmp_path)["conditions"]["c_random2"]["shift"]["harmless"]["predicted"]
    predicted = retrain.predicted_shift(tmp, conditions(tmp, pairs, st))
    assert half == pytest.approx(np.mean([predicted[c]["harmless"] for c in ran if c.startswith("c_random")]))
    second = run_jobs(tmp, pairs, {}, tmp_path, st, shard=(1, 2))
    assert len(first) + len(second) == len(jobs(conditions(tmp, pairs, st), st)) == 6
    assert run_jobs(tmp, pairs, {}, tmp_path, st) == [] and len(calls) == 6  # nothing left: resumed, not rerun
    assert sorted(seed for n, seed in calls if n == len(pairs)) == [0, 1]
    s = summarize(tmp_path)
    assert set(s["conditions"]) == {"a_all", "b_top2", "c_random2"}
    assert s["conditions"]["c_random2"]["jobs"] == 2 and s["conditions"]["a_all"]["orders"] == [0, 1]
    assert s["conditions"]["a_all"]["heldout.refusal_rate_harmless"]["mean"] == pytest.approx(1.0)
    assert s["claims"]["b_top2"]["over_refusal_gain_points"] == pytest.approx(0.0)
    one = json.loads(next((tmp_path / "jobs").glob("b_top2__o0.json")).read_text())
    assert one["n_train"] == len(pairs) - 2 and len(one["dropped"]) == 2
    assert "b_top2 vs random" in format_summary(s)
    shift = s["conditions"]["b_top2"]["shift"]["harmless"]  # stand-in: each removed pair lowers over-refusal by 1/len(pairs)
    assert shift["measured"] == pytest.approx(-2 / len(pairs))
    assert shift["predicted"] == pytest.approx(predicted["b_top2"]["harmless"]) and predicted["a_all"]["harmless"] == 0.0
    assert "ledger-predicted" in format_summary(s)


def test_shard_must_name_one_of_k():
    assert retrain.parse_shard("1/2") == (1, 2)
    with pytest.raises(ValueError, match="i/k"):
        retrain.parse_shard("2/2")


def test_the_ranking_runs_own_answers_stand_for_a_all_only_when_it_trained_every_pair(tmp_path):
    pairs = [{"id": f"p{i}", "label": "harmless"} for i in range(4)]
    run = tmp_path / "run"
    (run / "smda").mkdir(parents=True)
    summary = {"steps": 4, "answers": {"before": _fake_answers(0.1), "after": _fake_answers(0.3)}}
    (run / "smda" / "summary.json").write_text(json.dumps(summary))
    path = retrain.reuse_ranking_run(run, pairs, tmp_path / "exp")
    job = json.loads(path.read_text())
    assert path.name == "a_all__o0.json" and job["heldout"]["refusal_rate_harmless"] == 0.3 and job["source"].startswith("ranking run")
    assert retrain.reuse_ranking_run(run, pairs[:3], tmp_path / "exp2") is None  # a --limit run is not the full data
