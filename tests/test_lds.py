"""The LDS jobs (lab/lds.py): the subsets, the ranking run adopted or trained, the retrains, their settings and the
refusals before any work."""

from __future__ import annotations

import json

import pytest

from smda_callback.lab.lds import LDSSettings, subsets


def test_subsets_drop_the_configured_shares_reproducibly():
    ids = [f"p{i}" for i in range(40)]
    st = LDSSettings(n_pairs=40, subsets=4, drop_fracs=(0.05, 0.10))
    a, b = subsets(ids, st), subsets(ids, st)
    assert a == b and [len(v) for v in a.values()] == [2, 4, 2, 4]
    assert len({tuple(v) for v in a.values()}) == 4


def test_the_second_moment_models_are_one_list_for_replay_lds_and_cli():
    """replay.SECOND_MOMENTS, lds.REPLAYS and the CLI's --replay-second-moment name the same models."""
    from smda_callback.cli.main import build_parser
    from smda_callback.lab.lds import REPLAYS
    from smda_callback.credit.replay import SECOND_MOMENTS

    assert set(REPLAYS) == set(SECOND_MOMENTS)
    for m in SECOND_MOMENTS:
        assert build_parser().parse_args(["benchmark-lds", "--replay-second-moment", m]).replay_second_moment == m
    with pytest.raises(SystemExit):
        build_parser().parse_args(["benchmark-lds", "--replay-second-moment", "frozen"])


@pytest.mark.parametrize("flag,value", [("--replay-last", "0"), ("--replay-eps", "-1"), ("--replay-layers", "31"),
                                        ("--replay-layers", "-31")])
def test_bad_replay_options_are_refused_before_any_retrain(tmp_path, capsys, monkeypatch, flag, value):
    import smda_callback.lab.lds as lds
    from smda_callback.cli import main

    monkeypatch.setattr(lds, "run_jobs", lambda *a, **k: pytest.fail("retrains started before the refusal"))
    assert main(["benchmark-lds", "-o", str(tmp_path / "l"), "--replay", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"smda: error: {flag} {value}") and "Traceback" not in err


def _poison_dir(root, ids, order_seed=7):
    """A finished `benchmark-poison` directory as adopt_ranking_run reads it: pairs.jsonl, run/, poison.json."""
    src = root / "poison"
    smda = src / "run" / "smda"
    smda.mkdir(parents=True)
    (smda / "summary.json").write_text("{}")
    recs = [{"step": t + 1, "pairs": [{"id": i, "hash": f"h{i}"}]} for t, i in enumerate(reversed(ids))]
    (smda / "attribution.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (src / "pairs.jsonl").write_text("".join(json.dumps({"id": i, "prompt": f"q {i}", "response": "r", "label": "harmless",
                                                         "category": "c"}) + "\n" for i in ids))
    (src / "poison.json").write_text(json.dumps({"settings": {"seed": 2, "order_seed": order_seed}}))
    (src / "replay.json").write_text(json.dumps({"order": list(reversed(ids))}))
    (src / "peers").mkdir()
    (src / "peers" / "tracin.json").write_text("{}")
    return src


def test_a_finished_planted_run_is_adopted_as_the_ranking_run(tmp_path):
    """--ranking-run: the run is linked in (not retrained), its pairs and order are the LDS's, its replay and peers
    are reused; a seed other than the run's training seed, or a second run in the same --out, is refused."""
    from smda_callback.lab.lds import ranked_pairs, ranking_run

    ids = ["plant-over-1", "a", "b", "c"]
    src = _poison_dir(tmp_path, ids)
    out = tmp_path / "lds"
    with pytest.raises(ValueError, match="--seed 7"):
        ranking_run(out, LDSSettings(seed=2, ranking_run=str(src)))
    st = LDSSettings(seed=7, ranking_run=str(src))
    run = ranking_run(out, st)
    assert run.resolve() == (src / "run").resolve() and (out / "replay.json").exists() and (out / "peers" / "tracin.json").exists()
    order, pairs = ranked_pairs(run, st)
    assert order == list(reversed(ids)) and sorted(pairs) == sorted(ids)
    assert ranking_run(out, st) == run  # idempotent: a resumed benchmark finds its link
    other = _poison_dir(tmp_path / "x", ids)
    with pytest.raises(ValueError, match="another ranking run"):
        ranking_run(out, LDSSettings(seed=7, ranking_run=str(other)))
    (tmp_path / "lds3" / "run").mkdir(parents=True)  # an --out that trained its own ranking run
    with pytest.raises(ValueError, match="another ranking run"):
        ranking_run(tmp_path / "lds3", st)
    with pytest.raises(FileNotFoundError, match="finished run"):
        ranking_run(tmp_path / "lds2", LDSSettings(seed=7, ranking_run=str(tmp_path)))


def test_leave_out_names_must_be_pairs_of_the_run(tmp_path):
    from smda_callback.lab.lds import run_jobs

    src = _poison_dir(tmp_path, ["a", "b", "c"])
    with pytest.raises(ValueError, match="not pairs of the ranking run"):
        run_jobs(tmp_path / "lds", LDSSettings(seed=7, ranking_run=str(src), leave_out=("zz",)))


def test_leave_out_all_retrains_without_every_pair_of_the_run_one_at_a_time(tmp_path, monkeypatch):
    import smda_callback.lab.lds as lds

    src = _poison_dir(tmp_path, ["a", "b", "c"])
    kept = []
    monkeypatch.setattr(lds, "retrain_measure", lambda k, tmp, st, scorer=None, places=None: kept.append([p["id"] for p in k]) or {"Y": []})
    lds.run_jobs(tmp_path / "lds", LDSSettings(seed=7, ranking_run=str(src), leave_out=("all",), replicas=1, subsets=0))
    order = json.loads((tmp_path / "lds" / "subsets.json").read_text())["order"]
    assert sorted(p.stem for p in (tmp_path / "lds" / "jobs").glob("*.json")) == sorted(["full0", *(f"loo-{i}" for i in order)])
    assert kept == [order] + [[j for j in order if j != i] for i in order]  # each pair dropped in place, alone


def test_the_retrain_log_counts_the_jobs_left_and_the_time_to_go_from_measured_retrains(tmp_path, monkeypatch, caplog):
    """A resumed benchmark counts only the retrains still to do; from its second retrain on, each line says how long
    the rest takes at this process's measured mean (no constant)."""
    import logging

    import smda_callback.lab.lds as lds

    src = _poison_dir(tmp_path, ["a", "b", "c"])
    clock = iter(float(t) for t in range(0, 1000, 60))  # each retrain "takes" 60 s by this clock
    monkeypatch.setattr(lds.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(lds, "retrain_measure", lambda k, tmp, st, scorer=None, places=None: {"Y": []})
    st = LDSSettings(seed=7, ranking_run=str(src), leave_out=("all",), replicas=1, subsets=0)
    (tmp_path / "lds" / "jobs").mkdir(parents=True)
    (tmp_path / "lds" / "jobs" / "full0.json").write_text("{}")  # done before a stop
    with caplog.at_level(logging.INFO, logger="smda_callback.lab.lds"):
        lds.run_jobs(tmp_path / "lds", st)
    lines = [r.getMessage() for r in caplog.records if "lds: retrain" in r.getMessage()]
    assert len(lines) == 3 and all(f"job {k} of 3 in this shard" in line for k, line in enumerate(lines, 1))
    assert "to go" not in lines[0]
    assert lines[1].endswith("≈ 2 min to go at 60 s a retrain") and lines[2].endswith("≈ 1 min to go at 60 s a retrain")


def test_retrains_measure_refusal_with_the_ranking_runs_scorer(tmp_path, monkeypatch, smol_tokenizer):
    """A run recorded with the prefix scorer is retrained and measured with the prefix scorer (its openings too), so
    that measured changes and the run's credits are one quantity; a run without a recorded config uses the demo's."""
    import smda_callback.lab.lds as lds
    from smda_callback.refusal import FirstTokenScorer, PrefixScorer

    src = _poison_dir(tmp_path, ["a", "b", "c"])
    cfg = {"scorer": "prefix", "refusal_openings": ["Sorry, but", "I can't"], "compliance_openings": ["Sure"],
           "prefix_tokens": 2, "target": "mass", "every_n_steps": 1}
    (src / "run" / "smda" / "policy.json").write_text(json.dumps({"config": cfg}))
    seen = []
    monkeypatch.setattr(lds, "retrain_measure", lambda kept, tmp, st, scorer=None, places=None: seen.append(scorer) or {"Y": []})
    lds.run_jobs(tmp_path / "lds", LDSSettings(seed=7, ranking_run=str(src), leave_out=("a",), replicas=1, subsets=0))
    want = {k: cfg[k] for k in lds.SCORER_KEYS}
    assert seen == [want, want]  # full0 and loo-a
    monkeypatch.setattr("smda_callback.sae.resolve_hook", lambda sae, model: None)  # no model: only the scorer is read
    _, snap = lds._snapshotter(smol_tokenizer, None, want)
    assert isinstance(snap.scorer, PrefixScorer) and len(snap.scorer.r) == 2 and all(len(r) <= 2 for r in snap.scorer.r)
    (src / "run" / "smda" / "policy.json").write_text(json.dumps({}))  # a ledger from before the config was written
    assert lds.run_scorer(src / "run") == {"scorer": "first_token"}
    assert isinstance(lds._snapshotter(smol_tokenizer, None, None)[1].scorer, FirstTokenScorer)


def _lrs(trainer, n):
    trainer.create_optimizer_and_scheduler(num_training_steps=n)
    out = []
    for _ in range(n):
        out.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()  # no gradients: only the scheduler's order of calls matters here
        trainer.lr_scheduler.step()
    return out


def test_keep_schedule_trains_each_kept_pair_at_the_rate_of_its_place(tmp_path):
    """Dropping warm-up pairs in place moves every later pair to an earlier (lower) warm-up rate; with keep_schedule
    each kept pair keeps its full-run rate, and keeping all pairs gives the demo's schedule exactly."""
    from smda_callback.lab.lds import _trainer_for

    pairs = [{"id": f"p{i}", "prompt": f"Question {i}?", "response": f"Answer {i}.", "label": "harmless",
              "category": "general"} for i in range(14)]
    full = _lrs(_trainer_for(pairs, tmp_path / "a", 0), 14)
    assert full[0] == 0.0 and full[3] == pytest.approx(3e-5) and full[12] == pytest.approx(1e-4)  # 10 warm-up steps
    same = _lrs(_trainer_for(pairs, tmp_path / "b", 0, (list(range(14)), 14)), 14)
    assert same == full
    kept = [k for k in range(14) if k not in (0, 3)]
    shifted = _lrs(_trainer_for([pairs[k] for k in kept], tmp_path / "c", 0), 12)
    held = _lrs(_trainer_for([pairs[k] for k in kept], tmp_path / "d", 0, (kept, 14)), 12)
    assert held == [full[k] for k in kept]
    assert shifted != held and shifted[0] == 0.0 and held[0] == full[1]
    with pytest.raises(ValueError, match="must rise"):
        _trainer_for(pairs[:2], tmp_path / "e", 0, ([1, 0], 14))


def test_retrains_with_and_without_keep_schedule_are_not_mixed(tmp_path, monkeypatch):
    import smda_callback.lab.lds as lds

    src = _poison_dir(tmp_path, ["a", "b", "c"])
    seen = []
    monkeypatch.setattr(lds, "retrain_measure", lambda kept, tmp, st, scorer=None, places=None: seen.append(places) or {"Y": []})
    out = tmp_path / "lds"
    lds.run_jobs(out, LDSSettings(seed=7, ranking_run=str(src), leave_out=("b",), replicas=1, subsets=0, keep_schedule=True))
    order = json.loads((out / "subsets.json").read_text())["order"]
    assert seen == [([0, 1, 2], 3), ([k for k, i in enumerate(order) if i != "b"], 3)]
    with pytest.raises(ValueError, match="with --keep-schedule"):
        lds.run_jobs(out, LDSSettings(seed=7, ranking_run=str(src), leave_out=("b",), replicas=1, subsets=0))


def test_retrains_of_another_training_order_are_not_mixed(tmp_path, monkeypatch):
    """If the ranking run is trained again in another order after retrains were made, resuming refuses: the old
    retrains dropped pairs at the old places and would be scored against the new run."""
    import smda_callback.lab.lds as lds

    src = _poison_dir(tmp_path, ["a", "b", "c"])
    monkeypatch.setattr(lds, "retrain_measure", lambda kept, tmp, st, scorer=None, places=None: {"Y": []})
    out = tmp_path / "lds"
    st = LDSSettings(seed=7, ranking_run=str(src), leave_out=("b",), replicas=1, subsets=0)
    assert len(lds.run_jobs(out, st)) == 2
    assert lds.run_jobs(out, st) == []  # the same order resumes: nothing left to do
    recs = [{"step": t + 1, "pairs": [{"id": i, "hash": f"h{i}"}]} for t, i in enumerate(["b", "a", "c"])]
    (src / "run" / "smda" / "attribution.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ValueError, match="another training order"):
        lds.run_jobs(out, st)


def test_each_order_retrains_its_own_permutation_with_the_subsets_pairs_dropped_in_place(tmp_path, monkeypatch):
    import smda_callback.lab.lds as lds

    ids = [f"p{i}" for i in range(10)]
    src = _poison_dir(tmp_path, ids)
    seen = {}
    monkeypatch.setattr(lds, "retrain_measure",
                        lambda kept, tmp, st, scorer=None, places=None: seen.setdefault(len(seen), [p["id"] for p in kept]) and {"Y": []})
    out = tmp_path / "lds"
    st = LDSSettings(seed=7, ranking_run=str(src), replicas=1, subsets=2, drop_fracs=(0.5,), orders=3)
    names = [p.stem for p in lds.run_jobs(out, st)]
    assert names == ["full0", "s000", "s001", "o1-full", "o1-s000", "o1-s001", "o2-full", "o2-s000", "o2-s001"]
    meta = json.loads((out / "subsets.json").read_text())
    order, sets = meta["order"], meta["subsets"]
    perm1, perm2 = lds.data_order(order, 1, 7), lds.data_order(order, 2, 7)
    assert sorted(perm1) == sorted(order) and len({tuple(order), tuple(perm1), tuple(perm2)}) == 3
    trained = dict(zip(names, seen.values()))
    assert trained["o1-full"] == perm1 and trained["o2-full"] == perm2
    assert trained["o1-s001"] == [i for i in perm1 if i not in sets["s001"]] and len(trained["o1-s001"]) == 5
    assert trained["s000"] == [i for i in order if i not in sets["s000"]]
    with pytest.raises(ValueError, match="orders=0"):
        LDSSettings(orders=0)


def test_cli_refuses_no_data_order_in_one_line_before_any_work(tmp_path, capsys):
    from smda_callback.cli.main import build_parser, main

    assert build_parser().parse_args(["benchmark-lds", "--orders", "3"]).orders == 3
    out = tmp_path / "lds"
    assert main(["benchmark-lds", "-o", str(out), "--orders", "0"]) == 2
    err = capsys.readouterr().err
    assert "orders=0" in err and "Traceback" not in err and not out.exists()


def test_lds_measure_is_validated():
    with pytest.raises(ValueError, match="measure='exact'"):
        LDSSettings(measure="exact")
