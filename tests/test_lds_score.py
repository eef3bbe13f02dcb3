"""The LDS scorer (lab/lds_score.py) on a synthetic run: a reader whose scores make the measured changes scores LDS 1,
slope 1; the chance band, the carried readers, the replays and peers read beside the credit, the kept file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from smda_callback.credit.replay import replay_trusted_from
from smda_callback.lab.carry import Forgetting
from smda_callback.lab.lds import LDSSettings, subsets
from smda_callback.lab.lds_score import chance_band, format_score, score, thirds_slopes
from smda_callback.lab.specs import REMOVAL_READER  # the name `smda lds-runs` compares by default


def _fake(tmp_path, n=12, k=8):
    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(n)]
    labels = ["harmful" if i % 2 == 0 else "harmless" for i in range(n)]
    effect = {i: float(rng.normal()) for i in ids}  # what each pair does to harmful-probe refusal when trained
    smda = tmp_path / "run" / "smda"
    smda.mkdir(parents=True)
    probes = [{"id": "a", "label": "harmful", "category": "x"}, {"id": "b", "label": "harmless", "category": "y"}]
    (smda / "policy.json").write_text(json.dumps({"probes": probes, "probe_refusal_0": [0.1, 0.1],
                                                  "probe_refusal_final": [0.5, 0.2]}))
    credits = [{"hash": f"h{i}", "id": i, "label": lab, "refusal_harmful": effect[i], "refusal_harmless": 0.5 * effect[i],
                "own": {"refusal_harmful": 2 * effect[i], "refusal_harmless": effect[i]}}
               for i, lab in zip(ids, labels)]
    (smda / "credits.json").write_text(json.dumps({"pairs": credits}))
    recs = [{"step": t + 1, "pairs": [{"id": i, "hash": f"h{i}"}], "refusal_harmful": 0.1 + 0.01 * t,
             "refusal_harmless": 0.1} for t, i in enumerate(ids)]
    (smda / "attribution.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    st = LDSSettings(n_pairs=n, subsets=k)
    sets = subsets(ids, st)
    (tmp_path / "subsets.json").write_text(json.dumps({"settings": {"seed": 0}, "order": ids, "subsets": sets}))
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    full = {"refusal_harmful": 0.5, "refusal_harmless": 0.2}
    for r in range(2):
        (jobs / f"full{r}.json").write_text(json.dumps({**full, "Y": [0.5, 0.2], "dropped": []}))
    for name, drop in sets.items():  # removing a pair removes exactly its effect
        d = sum(effect[i] for i in drop)
        (jobs / f"{name}.json").write_text(json.dumps({"refusal_harmful": 0.5 - d, "refusal_harmless": 0.2 - 0.5 * d,
                                                       "Y": [0.5 - d, 0.2], "dropped": drop}))
    return ids, sets


def test_a_reader_that_is_the_truth_scores_one(tmp_path):
    _fake(tmp_path)
    s = score(tmp_path)
    assert s["n_subsets"] == 8 and s["replicas_max_abs_diff"] == 0.0
    credit = s["readers"]["credit (default)"]
    for q in ("harmful", "harmless"):
        assert credit[q]["lds"] > 0.999 and abs(credit[q]["slope"] - 1.0) < 1e-9
    own = s["readers"]["own window"]["harmful"]
    assert own["lds"] > 0.999 and abs(own["slope"] - 0.5) < 1e-9  # same ranking, twice the magnitude
    assert abs(s["readers"]["random"]["harmful"]["lds"]) < 0.9


def test_the_chance_band_widens_when_subsets_share_pairs():
    """A reader with no information: its LDS band is centred near 0, the truth lies far outside it, and on many
    subsets of few pairs (heavy sharing) it stays about as wide as the number of pairs allows, not 1/sqrt(subsets)."""
    rng = np.random.default_rng(1)
    ids = [f"p{i}" for i in range(30)]
    effect = rng.normal(size=30)
    sets = list(subsets(ids, LDSSettings(n_pairs=30, subsets=400, drop_fracs=(0.1,))).values())
    pos = {i: k for k, i in enumerate(ids)}
    truth = np.asarray([-sum(effect[pos[i]] for i in d) for d in sets])
    lo, hi = chance_band(sets, ids, truth, seed=0)
    assert lo < 0 < hi and abs(lo + hi) < 0.15
    assert hi - lo > 0.4  # ~ 4/sqrt(30 pairs); a bootstrap over 400 subsets would say ~ 4/sqrt(400) = 0.2
    assert chance_band(sets, ids, truth, seed=0) == [lo, hi]  # reproducible
    noisy = effect + rng.normal(size=30)  # half the variance is the truth: an informative reader leaves the band
    from smda_callback.lab.analysis import spearman
    assert spearman(np.asarray([-sum(noisy[pos[i]] for i in d) for d in sets]), truth) > hi


def test_calibration_by_third_finds_the_part_of_the_run_whose_predictions_fail():
    """Measured changes that keep the last two thirds' predicted effects and none of the first third's: the fit gives
    slopes ≈ 0 / 1 / 1; with every third kept, 1 / 1 / 1."""
    rng = np.random.default_rng(2)
    ids = [f"p{i}" for i in range(60)]
    score_of = {i: float(rng.normal()) for i in ids}
    sets = list(subsets(ids, LDSSettings(n_pairs=60, subsets=50, drop_fracs=(0.1, 0.2))).values())
    early = set(ids[:20])
    full = np.asarray([-sum(score_of[i] for i in d) for d in sets])
    late_only = np.asarray([-sum(score_of[i] for i in d if i not in early) for d in sets])
    assert np.allclose(thirds_slopes(score_of, sets, ids, full), [1, 1, 1])
    assert np.allclose(thirds_slopes(score_of, sets, ids, late_only), [0, 1, 1], atol=1e-9)
    assert thirds_slopes(score_of, sets[:5], ids, full[:5]) is None  # too few subsets to fit four numbers


def test_the_replays_trusted_span_starts_after_its_blow_up():
    """Effects ~0.005 with a 20x blow-up over the first 100 of 300 steps: the span starts near step 100; larger effects
    at the end of the run (late pairs matter most) never cut it; effects without a blow-up are all trusted."""
    rng = np.random.default_rng(3)
    calm = 0.005 * (1 + 0.3 * rng.random(300))
    blown = calm.copy()
    blown[:100] *= 20
    blown[-20:] *= 8  # the end of the run
    start = replay_trusted_from(list(blown * np.sign(rng.normal(size=300))))
    assert 100 <= start <= 100 + 8
    assert replay_trusted_from(list(calm)) == 0
    end_only = calm.copy()
    end_only[-40:] *= 10
    assert replay_trusted_from(list(end_only)) == 0
    assert replay_trusted_from([1.0] * 10) == 0  # too short to judge: everything read


def test_the_chance_band_is_printed_with_the_scores(tmp_path):
    _fake(tmp_path)
    s = score(tmp_path)
    for q in ("harmful", "harmless"):
        lo, hi = s["chance"][q]
        assert lo < 0 < hi and s["readers"]["credit (default)"][q]["lds"] > hi
    text = format_score(s)
    assert "chance band" in text
    credit_row = next(line for line in text.splitlines() if line.startswith("| credit (default) |"))
    assert "+1.00*" in credit_row  # the truth is starred: outside the band
    random_row = next(line for line in text.splitlines() if line.startswith("| random |"))
    lo, hi = s["chance"]["harmful"]
    assert ("*" in random_row.split("|")[2]) == (not lo <= s["readers"]["random"]["harmful"]["lds"] <= hi)


def test_the_replay_reader_is_scored_when_replay_json_exists(tmp_path):
    """replay.json holds each pair's removal effect (the change of the quantity when it is dropped): the
    reader's score is minus that, so the truth again scores LDS 1 and slope 1; without the file no row."""
    ids, sets = _fake(tmp_path)
    assert not any(name.startswith("replay") for name in score(tmp_path)["readers"])
    credits = json.loads((tmp_path / "run" / "smda" / "credits.json").read_text())["pairs"]
    eff = {c["id"]: c["refusal_harmful"] for c in credits}
    rep = {"order": ids, "removal_effect": {"harmful": [-eff[i] for i in ids], "harmless": [-0.5 * eff[i] for i in ids]},
           "weight_zero_effect": {"harmful": [eff[i] for i in ids], "harmless": [0.5 * eff[i] for i in ids]}}
    (tmp_path / "replay.json").write_text(json.dumps(rep))
    res = score(tmp_path)
    assert "replay" in res["timing"] and "cost" in format_score(res)
    s = res["readers"]
    for q in ("harmful", "harmless"):
        assert s["replay (dropped in place)"][q]["lds"] > 0.999 and abs(s["replay (dropped in place)"][q]["slope"] - 1) < 1e-9
        assert s["replay (weight zero)"][q]["lds"] < -0.999  # the sign flipped on purpose: the score reads it
    # every reader against the replay, free of retrains: the credit is the replay's truth here, the own window twice it
    v = res["vs_replay"]
    assert v["n_subsets"] == 1000 and not any(name.startswith("replay") for name in v["readers"])
    for q in ("harmful", "harmless"):
        assert v["readers"]["credit (default)"][q]["lds"] > 0.999 and v["readers"]["credit (default)"][q]["pairs"] > 0.999
    assert abs(v["readers"]["own window"]["harmful"]["slope"] - 0.5) < 1e-9
    assert v["readers"]["credit (default)"]["harmful"]["lds_ci95"][0] > 0.99
    assert res["replay_trusted_from"] == {"replay": {"harmful": 0, "harmless": 0}}  # 12 steps: too short to judge, all read
    assert s["replay, trusted span"]["harmful"]["lds"] > 0.999
    assert all(lo < 0 < hi for lo, hi in v["chance"].values())


def test_a_fixed_second_moment_replay_is_scored_beside_the_exact_one_with_its_profile(tmp_path):
    """replay_fixed_v.json (`--replay-second-moment fixed`) is its own reader; a replay with the per-step diagnostics
    gets a profile: per stretch of the run the median |effect|, the adjoint's norms and each part's share."""
    ids, sets = _fake(tmp_path)
    credits = json.loads((tmp_path / "run" / "smda" / "credits.json").read_text())["pairs"]
    eff = {c["id"]: c["refusal_harmful"] for c in credits}
    n = len(ids)
    exact = {"order": ids, "removal_effect": {"harmful": [-eff[i] for i in ids], "harmless": [-eff[i] for i in ids]},
             "weight_zero_effect": {"harmful": [-eff[i] for i in ids], "harmless": [-eff[i] for i in ids]}}
    (tmp_path / "replay.json").write_text(json.dumps(exact))
    wz = [-eff[i] * (10.0 if k < n // 2 else 1.0) for k, i in enumerate(ids)]  # its first half 10x too large
    grow = [10.0 if k < n // 2 else 1.0 for k in range(n)]
    fixed = {"order": ids, "removal_effect": {"harmful": wz, "harmless": wz}, "weight_zero_effect": {"harmful": wz, "harmless": wz},
             "adjoint_norm": {q: {"theta": grow, "m": [0.1] * n} for q in ("harmful", "harmless")},
             "effect_parts": {q: {"theta": [0.75 * x for x in wz], "m": [0.25 * x for x in wz]} for q in ("harmful", "harmless")},
             "second_moment": "fixed", "seconds": 2.0}
    (tmp_path / "replay_fixed_v.json").write_text(json.dumps(fixed))
    res = score(tmp_path)
    s = res["readers"]
    assert s["replay (dropped in place)"]["harmful"]["lds"] > 0.999
    assert {"replay, fixed v (dropped in place)", "replay, fixed v (weight zero)", "replay, fixed v, trusted span"} <= set(s)
    assert s["replay, fixed v (dropped in place)"]["harmful"]["lds"] < 0.999  # its first half is mis-scaled
    assert res["vs_replay"]["yardstick"] == "replay, trusted span"  # the exact replay stays the yardstick
    assert set(res["replay_trusted_from"]) == {"replay", "replay, fixed v"} and "replay, fixed v" in res["timing"]
    prof = res["replay_profile"]
    assert set(prof) == {"replay, fixed v"}  # the exact one here has no diagnostics
    rows = prof["replay, fixed v"]["harmful"]
    assert rows[0]["adjoint_norm_median"]["theta"] == 10.0 and rows[-1]["adjoint_norm_median"]["theta"] == 1.0
    assert rows[0]["share"]["theta"] == pytest.approx(0.75) and rows[0]["share"]["m"] == pytest.approx(0.25)
    assert rows[0]["steps"] == [0, 0] and rows[0]["effect_abs_median"] == pytest.approx(abs(wz[0]))
    text = format_score(res)
    assert "replay, fixed v: where its linearisation grows (harmful refusal" in text and "| 0.75 / 0.25 |" in text
    (tmp_path / "replay.json").unlink()  # the fixed one alone: it is then the yardstick, and the table says so
    alone = score(tmp_path)
    assert alone["vs_replay"]["yardstick"] == "replay, fixed v, trusted span" and "replay (dropped in place)" not in alone["readers"]


def test_a_replay_without_curvature_is_its_own_reader_whole_or_last_k(tmp_path):
    """`--replay-no-curvature` writes replay_nocurv.json (whole run) or replay_nocurv_last<K>.json; each is scored as its
    own reader beside the exact replay, by the name the file records; the CLI passes the flag through."""
    from smda_callback.cli.main import build_parser
    from smda_callback.credit.replay import ReplayVariant
    from smda_callback.lab.lds import replay_reader

    assert replay_reader(ReplayVariant(curvature=False)) == ("replay, no curvature", "replay_nocurv.json")
    assert replay_reader(ReplayVariant(curvature=False), 4) == ("replay, no curvature, last 4 steps", "replay_nocurv_last4.json")
    assert replay_reader(last=4) == ("replay, last 4 steps", "replay_last4.json")
    assert build_parser().parse_args(["benchmark-lds", "--replay-no-curvature"]).replay_no_curvature
    assert replay_reader(ReplayVariant(reverse_eps=1e-6), 90) == ("replay, reverse ε 1e-06, last 90 steps", "replay_eps1e-06_last90.json")
    assert replay_reader(ReplayVariant(reverse_eps=1e-6))[1] == "replay_eps1e-06.json"
    assert build_parser().parse_args(["benchmark-lds", "--replay-eps", "1e-6"]).replay_eps == 1e-6
    assert replay_reader(ReplayVariant(layers=8), 90) == ("replay, last 8 layers, last 90 steps", "replay_layers8_last90.json")
    assert replay_reader(ReplayVariant(layers=-14)) == ("replay, first 14 layers", "replay_first14.json")
    assert build_parser().parse_args(["benchmark-lds", "--replay-layers", "8"]).replay_layers == 8
    ids, sets = _fake(tmp_path)
    credits = json.loads((tmp_path / "run" / "smda" / "credits.json").read_text())["pairs"]
    eff = [-{c["id"]: c["refusal_harmful"] for c in credits}[i] for i in ids]
    n = len(ids)
    for last, sign, eps, layers in ((None, 1.0, 0.0, 0), (4, -1.0, 0.0, 0), (None, 1.0, 1e-6, 0), (None, 1.0, 0.0, 8),
                                    (None, 1.0, 0.0, -3)):
        name, file = replay_reader(ReplayVariant(curvature=False, reverse_eps=eps, layers=layers), last)
        e = [sign * x if last is None or k >= n - last else 0.0 for k, x in enumerate(eff)]
        (tmp_path / file).write_text(json.dumps({"order": ids, "reader": name, "removal_effect": {"harmful": e, "harmless": e},
                                                 "weight_zero_effect": {"harmful": e, "harmless": e}}))
    s = score(tmp_path)["readers"]
    assert s["replay, no curvature (dropped in place)"]["harmful"]["lds"] > 0.999  # the credits' own effects
    last4 = [k for k in s if k.startswith("replay, no curvature, last 4 steps")]
    assert last4 and s[last4[0]]["harmful"]["lds"] < 0.999  # only 4 pairs read, with the wrong sign
    assert s["replay, no curvature, reverse ε 1e-06 (dropped in place)"]["harmful"]["lds"] > 0.999  # the damped file, its own reader
    assert s["replay, no curvature, last 8 layers (dropped in place)"]["harmful"]["lds"] > 0.999  # *_layers8.json, its own reader
    assert s["replay, no curvature, first 3 layers (dropped in place)"]["harmful"]["lds"] > 0.999  # *_first3.json


def test_the_replay_yardstick_needs_no_retrain(tmp_path):
    """Before any retrain has finished, the readers are already scored against the replay (and said to be)."""
    ids, sets = _fake(tmp_path)
    for f in (tmp_path / "jobs").glob("*.json"):
        f.unlink()
    assert score(tmp_path) == {"error": "no full replay has finished yet"}
    credits = json.loads((tmp_path / "run" / "smda" / "credits.json").read_text())["pairs"]
    eff = {c["id"]: c["refusal_harmful"] for c in credits}
    rep = {"order": ids, "removal_effect": {"harmful": [eff[i] for i in ids], "harmless": [0.5 * eff[i] for i in ids]},
           "weight_zero_effect": {"harmful": [eff[i] for i in ids], "harmless": [0.5 * eff[i] for i in ids]}}
    (tmp_path / "replay.json").write_text(json.dumps(rep))
    res = score(tmp_path)
    assert "error" in res and res["vs_replay"]["readers"]["credit (default)"]["harmful"]["lds"] < -0.999
    assert "Against the replay" in format_score(res)


def test_a_replay_of_the_last_steps_alone_is_scored_as_a_reader_not_a_yardstick(tmp_path):
    """Only `--replay-last K` ran (no whole-run replay): its file is a reader scored on the retrains, and no reader is
    scored against it (it reads the earlier pairs as 0); scoring used to stop with StopIteration here."""
    ids, _ = _fake(tmp_path)
    credits = json.loads((tmp_path / "run" / "smda" / "credits.json").read_text())["pairs"]
    eff = {c["id"]: c["refusal_harmful"] for c in credits}
    late = {i: (eff[i] if k >= 4 else 0.0) for k, i in enumerate(ids)}  # the last 8 of 12 steps replayed
    rep = {"reader": "replay, last 8 steps", "first_step": 4, "order": ids, "seconds": 2.0,
           "removal_effect": {"harmful": [-late[i] for i in ids], "harmless": [-0.5 * late[i] for i in ids]},
           "weight_zero_effect": {"harmful": [late[i] for i in ids], "harmless": [0.5 * late[i] for i in ids]}}
    (tmp_path / "replay_last8.json").write_text(json.dumps(rep))
    res = score(tmp_path)
    assert "vs_replay" not in res and "error" not in res
    s = res["readers"]
    assert "replay, last 8 steps, trusted span" not in s  # read as it is, not cut to a span
    # its removal effects are the truth on the last 8 pairs and 0 before: it orders the removals (8 subsets)
    assert s["replay, last 8 steps (dropped in place)"]["harmful"]["lds"] > 0.3
    assert s["replay, last 8 steps (weight zero)"]["harmful"]["lds"] < -0.3  # the sign flipped on purpose
    assert "replay, last 8 steps" in res["timing"] and "replay, last 8 steps" in format_score(res)
    with pytest.raises(ValueError, match="no whole-run replay"):
        from smda_callback.lab.lds_score import against_replay

        against_replay(s and {"replay, last 8 steps (dropped in place)": {"harmful": {}, "harmless": {}}}, ids, {})


def test_peer_scores_are_read_as_predicted_changes(tmp_path):
    """A peer that says "pair raises harmless refusal" (over-refusal) and "pair lowers harmful refusal"
    (compliance) by exactly the true effects scores LDS 1 on both quantities once compliance's sign is flipped."""
    ids, sets = _fake(tmp_path)
    credits = json.loads((tmp_path / "run" / "smda" / "credits.json").read_text())["pairs"]
    eff = {c["id"]: c["refusal_harmful"] for c in credits}
    (tmp_path / "peers").mkdir()
    (tmp_path / "peers" / "tracin.json").write_text(json.dumps({"scores": {
        "over-refusal": {i: 0.5 * eff[i] for i in ids}, "compliance": {i: -eff[i] for i in ids}}, "seconds": 1.0}))
    s = score(tmp_path)["readers"]["tracin (final weights)"]
    assert s["harmful"]["lds"] > 0.999 and s["harmless"]["lds"] > 0.999
    assert abs(s["harmful"]["slope"] - 1) < 1e-9


def test_a_left_out_pair_is_set_beside_every_readers_prediction(tmp_path):
    """A `loo-<id>` job (retrained without one pair) gives that pair's measured removal effect; each reader's
    prediction is minus its score (the truth-telling default credit matches it, the own window is twice it)."""
    ids, _ = _fake(tmp_path)
    credits = json.loads((tmp_path / "run" / "smda" / "credits.json").read_text())["pairs"]
    eff = {c["id"]: c["refusal_harmful"] for c in credits}
    for i in ids[:2]:
        (tmp_path / "jobs" / f"loo-{i}.json").write_text(json.dumps({"refusal_harmful": 0.5 - eff[i], "refusal_harmless": 0.2 - 0.5 * eff[i],
                                                                    "Y": [0.5 - eff[i], 0.2], "dropped": [i]}))
    res = score(tmp_path)
    assert res["n_subsets"] == 8  # the left-out pairs are not random subsets
    loo = {e["id"]: e for e in res["leave_one_out"]}
    assert sorted(loo) == sorted(ids[:2])
    for i, e in loo.items():
        assert abs(e["measured"]["harmful"] + eff[i]) < 1e-12
        assert abs(e["predicted"]["credit (default)"]["harmful"] - e["measured"]["harmful"]) < 1e-12
        assert abs(e["predicted"]["own window"]["harmful"] + 2 * eff[i]) < 1e-12
    assert f"| {ids[0]} |" in format_score(res)


def _run_that_carries(tmp_path, recs, push, q0, moved):
    """Write a fake ranking run's ledger (`recs`), baseline refusal `q0` (harmful, harmless), own-window credits
    `push` (harmful refusal) and every subset's retrain, whose harmful refusal moves by −moved(drop)."""
    smda = tmp_path / "run" / "smda"
    (smda / "attribution.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    policy = json.loads((smda / "policy.json").read_text())
    (smda / "policy.json").write_text(json.dumps({**policy, "probe_refusal_0": list(q0)}))
    credits = json.loads((smda / "credits.json").read_text())["pairs"]
    for c in credits:
        c["own"]["refusal_harmful"] = push[c["id"]]
    (smda / "credits.json").write_text(json.dumps({"pairs": credits}))
    for name, drop in json.loads((tmp_path / "subsets.json").read_text())["subsets"].items():
        d = moved(drop)
        (tmp_path / "jobs" / f"{name}.json").write_text(json.dumps({"refusal_harmful": 0.5 - d, "refusal_harmless": 0.2,
                                                                    "Y": [0.5 - d, 0.2], "dropped": drop}))


def test_the_carried_readers_recover_a_run_that_forgets(tmp_path):
    """A run whose harmful refusal follows q_k = q_{k−1} + u_k − κ q_{k−1} (each pair's push u_k, its own-window
    credit): dropping pair k moves the end by exactly −u_k (1 − κ)^(K−1−k). The carried own window reads κ off the
    ledger and recovers that order; the raw own window, which ignores the forgetting, scores lower."""
    ids, _ = _fake(tmp_path, n=40, k=40)
    rng = np.random.default_rng(3)
    kappa, K = 0.12, len(ids)
    labels = ["harmful" if i % 2 == 0 else "harmless" for i in range(K)]
    push = {i: (0.02 if lab == "harmful" else 0.005) + float(rng.normal(0, 0.004)) for i, lab in zip(ids, labels)}
    q, recs = 0.01, []  # far below the run's level a / κ ≈ 0.1, so that the reversion is visible in the trajectory
    for t, (i, lab) in enumerate(zip(ids, labels)):
        q = q + push[i] - kappa * q
        recs.append({"step": t + 1, "pairs": [{"id": i, "hash": f"h{i}", "label": lab}], "refusal_harmful": q,
                     "refusal_harmless": 0.1 + 0.001 * t + float(rng.normal(0, 1e-4))})
    _run_that_carries(tmp_path, recs, push, (0.01, 0.1),
                      lambda drop: sum(push[i] * (1 - kappa) ** (K - 1 - ids.index(i)) for i in drop))
    s = score(tmp_path)
    assert abs(s["forgetting"]["harmful"]["kappa"] - kappa) < 0.02
    carried, raw = s["readers"]["own window, carried"]["harmful"], s["readers"]["own window"]["harmful"]
    assert carried["lds"] > 0.95 and carried["lds"] > raw["lds"] + 0.2
    assert 0.8 < carried["slope"] < 1.25  # the size too, since κ was read back
    assert "forgetting rate κ" in format_score(s)


def test_the_ar2_carried_readers_recover_a_run_whose_pushes_come_back_with_the_other_sign(tmp_path):
    """A run whose refusal follows an AR(2) process in its increments, d_k = u_k − κ q_{k−1} + b d_{k−1} (each pair's
    push u_k, its own-window credit): dropping pair k moves the end by −u_k r(K−1−k), where the process's response r
    turns negative some steps back. The AR(2)-carried own window reads κ and b off the ledger and recovers that order;
    the AR(1)-carried one, whose weights never change sign, does not."""
    ids, _ = _fake(tmp_path, n=60, k=60)
    rng = np.random.default_rng(5)
    kappa, b, K = 0.08, 0.75, len(ids)
    labels = ["harmful" if i % 2 == 0 else "harmless" for i in range(K)]
    push = {i: (0.02 if lab == "harmful" else -0.01) + float(rng.normal(0, 0.006)) for i, lab in zip(ids, labels)}
    true = Forgetting(kappa, (kappa, kappa), K, (b,))
    q, d, recs = 0.05, 0.0, []
    for t, (i, lab) in enumerate(zip(ids, labels)):
        d = push[i] - kappa * q + b * d
        q = q + d
        recs.append({"step": t + 1, "pairs": [{"id": i, "hash": f"h{i}", "label": lab}], "refusal_harmful": q,
                     "refusal_harmless": q / 2 + float(rng.normal(0, 1e-5))})
    assert min(true.weight(n) for n in range(K)) < -0.1  # the pushes of some places do come back turned round
    _run_that_carries(tmp_path, recs, push, (0.05, 0.025),
                      lambda drop: sum(push[i] * true.weight(K - 1 - ids.index(i)) for i in drop))
    s = score(tmp_path)
    ar2, ar1 = s["readers"][REMOVAL_READER]["harmful"], s["readers"]["own window, carried"]["harmful"]
    assert ar2["lds"] > 0.9 and ar2["lds"] > ar1["lds"] + 0.2
    assert 0.8 < ar2["slope"] < 1.25
    assert "credit (default), carried AR(2)" in s["readers"] and "its AR(2) fit" in format_score(s)
    assert abs(s["forgetting_ar2"]["harmful"]["b"][0] - b) < 0.1
    # the joint fit reads the same process off both quantities (harmless refusal is half of harmful here): one κ, b
    joint = s["forgetting_ar2_joint"]
    assert joint["harmful"] == joint["harmless"] and abs(joint["harmful"]["b"][0] - b) < 0.1
    assert s["readers"]["own window, carried AR(2) joint"]["harmful"]["lds"] > 0.9 and "joint AR(2) fit" in format_score(s)
    # the label count carried by the same response: what label and place alone predict, the carried readers' baseline
    lab, lab_ar2 = s["readers"]["label count"]["harmful"]["lds"], s["readers"]["label count, carried AR(2)"]["harmful"]["lds"]
    assert lab_ar2 > lab + 0.2 and ar2["lds"] > lab_ar2  # the pushes' own sizes add to label and place


def _order_jobs(tmp_path, sets, noise_sd, orders=(1, 2)):
    """Orders o ≥ 1 of `_fake`'s subsets: each order its own full refusal, the same removal effects plus its own noise."""
    from smda_callback.lab.analysis import spearman

    effect = {p["id"]: p["refusal_harmful"] for p in json.loads((tmp_path / "run" / "smda" / "credits.json").read_text())["pairs"]}
    d = np.asarray([sum(effect[i] for i in drop) for drop in sets.values()])
    measured = {0: -d}
    for o in orders:
        ref = 0.5 + 0.1 * o
        noise = np.random.default_rng(o).normal(scale=noise_sd, size=len(d))
        measured[o] = -d + noise
        (tmp_path / "jobs" / f"o{o}-full.json").write_text(json.dumps({"refusal_harmful": ref, "refusal_harmless": 0.2, "dropped": []}))
        for (name, drop), m in zip(sets.items(), measured[o]):
            (tmp_path / "jobs" / f"o{o}-{name}.json").write_text(json.dumps(
                {"refusal_harmful": ref + m, "refusal_harmless": 0.2 - 0.5 * sum(effect[i] for i in drop), "dropped": drop}))
    return measured, spearman


def test_orders_agreeing_exactly_leave_a_ceiling_of_one(tmp_path):
    """Every order measures the same changes: between-order agreement 1, ceiling 1, the truth reader at its full share."""
    _, sets = _fake(tmp_path, n=20, k=12)
    _order_jobs(tmp_path, sets, noise_sd=0.0)
    a = score(tmp_path)["across_orders"]
    assert a["orders"] == [0, 1, 2] and a["n_subsets"] == 12
    for q in ("harmful", "harmless"):
        assert a["between_orders"][q]["mean"] > 0.999 and abs(a["ceiling"][q] - 1.0) < 1e-9
        credit = a["readers"]["credit (default)"][q]
        assert min(credit["lds_by_order"]) > 0.999 and credit["share_of_ceiling"] > 0.999 and abs(credit["slope_mean"] - 1) < 1e-9


def test_order_noise_lowers_the_ceiling_and_each_readers_share_is_read_against_it(tmp_path):
    """Orders that disagree: the between-order Spearman, the Spearman–Brown ceiling and each order's LDS are what
    one computes by hand from the measured changes; the table prints them."""
    _, sets = _fake(tmp_path, n=20, k=12)
    measured, spearman = _order_jobs(tmp_path, sets, noise_sd=1.0)
    s = score(tmp_path)
    a = s["across_orders"]["between_orders"]["harmful"]
    pairs = {"0-1": spearman(measured[0], measured[1]), "0-2": spearman(measured[0], measured[2]),
             "1-2": spearman(measured[1], measured[2])}
    assert a["pairs"] == pytest.approx(pairs)
    r = np.mean(list(pairs.values()))
    assert 0 < r < 0.99
    ceiling = np.sqrt(3 * r / (1 + 2 * r))
    assert s["across_orders"]["ceiling"]["harmful"] == pytest.approx(ceiling)
    credit = s["across_orders"]["readers"]["credit (default)"]["harmful"]
    pred = measured[0]  # the credit is the truth: minus the removed pairs' summed effect
    assert credit["lds_by_order"] == pytest.approx([spearman(pred, measured[o]) for o in (0, 1, 2)])
    mean = np.mean([measured[o] for o in (0, 1, 2)], axis=0)
    assert credit["lds_mean"] == pytest.approx(spearman(pred, mean))
    assert credit["share_of_ceiling"] == pytest.approx(spearman(pred, mean) / ceiling)
    text = format_score(s)
    assert "Across data orders" in text and f"noise ceiling √ρ {ceiling:.2f}" in text


def test_partial_spearman_holds_the_control_out():
    """What a reader says beyond the labels: a signal hidden under a label effect reads near 1 once the label count is
    held, far above its plain Spearman; a reader that only ranks by the control reads NaN."""
    from smda_callback.lab.analysis import partial_spearman, spearman

    rng = np.random.default_rng(1)
    count = rng.integers(10, 22, size=40).astype(float)
    signal = rng.normal(size=40)
    measured = 0.5 * count + signal
    plain, held = spearman(signal, measured), partial_spearman(signal, measured, count)
    assert held > 0.75 and held > plain + 0.3
    assert np.isnan(partial_spearman(-3 * count + 1, measured, count))
    assert partial_spearman(measured, measured, count) == pytest.approx(1.0)
    noise = [partial_spearman(rng.normal(size=40), measured, count) for _ in range(200)]
    assert abs(np.mean(noise)) < 0.05 and 0.1 < np.std(noise) < 0.25  # no information: centred on 0, spread ≈ 1/√n


def test_lds_beyond_label_count_is_scored_with_its_own_chance_band(tmp_path):
    _fake(tmp_path, n=20, k=12)
    s = score(tmp_path)
    for q in ("harmful", "harmless"):
        assert s["readers"]["credit (default)"][q]["lds_beyond_labels"] == pytest.approx(1.0)  # the truth, per pair
        assert np.isnan(s["readers"]["label count"][q]["lds_beyond_labels"])
        lo, hi = s["chance_beyond_labels"][q]
        assert -1 < lo < 0 < hi < 1
    text = format_score(s)
    assert "beyond label count" in text and "| label count |" in text


def test_too_few_subsets_draw_no_chance_band_and_star_nothing():
    from smda_callback.lab.lds_score import _starred

    ids = [f"p{i}" for i in range(8)]
    sets = [["p0", "p1"], ["p2", "p3"], ["p4", "p5"]]
    band = chance_band(sets, ids, np.asarray([0.1, 0.2, 0.3]), seed=0, control=np.asarray([1, 0, 1]))
    assert np.isnan(band).all()  # three subsets cannot hold a control out
    assert _starred(0.9, band) == "+0.90" and _starred(0.9, [-0.5, 0.5]) == "+0.90*" and _starred(float("nan"), band) == "–"


def test_the_kept_file_recomputes_every_readers_lds_without_the_run(tmp_path):
    from scipy.stats import spearmanr

    from smda_callback.lab.lds_score import keep

    _fake(tmp_path, n=20, k=12)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"id": "p0", "prompt": "PROMPT TEXT", "answer": "ANSWER TEXT"}) + "\n")
    s = score(tmp_path)
    kept = json.loads(json.dumps(keep(tmp_path, s, "smda benchmark-lds -o x")))  # what the file holds
    assert "PROMPT TEXT" not in json.dumps(kept) and all("Y" not in j for j in kept["jobs"].values())
    full = kept["jobs"]["full0"]
    for name in ("credit (default)", "own window", "random"):
        for q in ("harmful", "harmless"):
            sc = kept["reader_scores"][name][q]
            subs = [kept["jobs"][n] for n in sorted(kept["subsets"])]
            pred = [-sum(sc.get(i, 0.0) for i in j["dropped"]) for j in subs]
            meas = [j[f"refusal_{q}"] - full[f"refusal_{q}"] for j in subs]
            assert spearmanr(pred, meas)[0] == pytest.approx(kept["score"]["readers"][name][q]["lds"])


def test_cli_keeps_the_scored_benchmark_on_request(tmp_path):
    from smda_callback.cli.main import main

    _fake(tmp_path, n=20, k=12)
    (tmp_path / "subsets.json").write_text(json.dumps({**json.loads((tmp_path / "subsets.json").read_text()),
                                                       "settings": LDSSettings(n_pairs=20, subsets=12).__dict__}))
    kept = tmp_path / "kept.json"
    assert main(["benchmark-lds", "-o", str(tmp_path), "--n-pairs", "20", "--subsets", "12", "--score-only",
                 "--keep", str(kept)]) == 0
    k = json.loads(kept.read_text())
    assert k["what"].startswith("smda benchmark-lds") and k["score"]["n_subsets"] == 12
    assert set(k["reader_scores"]) >= {"credit (default)", "label count", "random"}


def test_a_ghost_ledger_is_read_beside_the_default_credit_replayed_from_it(tmp_path, smol_tokenizer):
    from helpers import run_sft, tiny_model, tiny_sae
    from smda_callback import SMDAConfig, load_records
    from smda_callback.lab.lds_score import readers

    got = {}
    for measure in ("deconvolve", "ghost"):
        run_sft(tmp_path / measure, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8, credit_measure=measure),
                max_steps=6, report_to=[], pair_ids=True)
        order = [r["pairs"][0]["id"] for r in sorted(load_records(tmp_path / measure), key=lambda r: r["step"])]
        got[measure] = readers(tmp_path / measure, order)
    d, g = got["deconvolve"], got["ghost"]
    assert "credit, ghost" not in d and {"credit, ghost", "own window, ghost"} <= set(g)
    for name in ("credit (default)", "own window"):  # the same training, so the replayed default is the live one
        for q in ("harmful", "harmless"):
            assert d[name][q].keys() == g[name][q].keys() and len(d[name][q]) == 6
            np.testing.assert_allclose([g[name][q][i] for i in d[name][q]], list(d[name][q].values()), rtol=1e-9, atol=1e-12)
    ghost, default = g["credit, ghost"]["harmful"], g["credit (default)"]["harmful"]
    # another measure, not the default under a new name (the tiny model's refusal is ~1e-10, so relative)
    assert max(abs(ghost[i] - default[i]) for i in ghost) > 0.01 * max(abs(v) for v in default.values()) > 0


def test_every_pair_left_out_is_scored_as_the_additive_reader_of_retraining_itself(tmp_path):
    """With a `loo-<id>` job for every pair, minus each measured single removal is scored as a reader (`ADDITIVE`): on
    subsets whose change is exactly the sum of their pairs' it reads LDS 1; once removed pairs interact it reads less,
    which is how far additivity holds on those subsets. Each reader's Spearman over the left-out pairs is printed; with
    one pair not left out there is no additive reader (it would read that pair as 0)."""
    from smda_callback.lab.lds_score import ADDITIVE

    ids, sets = _fake(tmp_path)
    credits = json.loads((tmp_path / "run" / "smda" / "credits.json").read_text())["pairs"]
    eff = {c["id"]: c["refusal_harmful"] for c in credits}
    for i in ids:
        (tmp_path / "jobs" / f"loo-{i}.json").write_text(json.dumps({"refusal_harmful": 0.5 - eff[i], "refusal_harmless": 0.2 - 0.5 * eff[i],
                                                                    "Y": [0.5 - eff[i], 0.2], "dropped": [i]}))
    res = score(tmp_path)
    assert res["readers"][ADDITIVE]["harmful"]["lds"] == pytest.approx(1.0)
    assert res["readers"][ADDITIVE]["harmless"]["lds"] == pytest.approx(1.0)
    assert res["leave_one_out_spearman"]["credit (default)"]["harmful"] == pytest.approx(1.0)
    assert res["leave_one_out_spearman"]["random"]["harmful"] < 0.9
    text = format_score(res)
    assert ADDITIVE in text and "Spearman over the pairs" in text
    rng = np.random.default_rng(1)
    for name, drop in sets.items():  # the removed pairs now interact: a term no single removal shows
        d = sum(eff[i] for i in drop) + 3.0 * float(rng.normal())
        (tmp_path / "jobs" / f"{name}.json").write_text(json.dumps({"refusal_harmful": 0.5 - d, "refusal_harmless": 0.2 - 0.5 * d,
                                                                    "Y": [0.5 - d, 0.2], "dropped": drop}))
    assert score(tmp_path)["readers"][ADDITIVE]["harmful"]["lds"] < 0.9
    (tmp_path / "jobs" / f"loo-{ids[0]}.json").unlink()
    assert ADDITIVE not in score(tmp_path)["readers"]


def test_a_retrained_ranking_run_is_scored_on_kept_retrains_with_its_exact_segment_readers(tmp_path):
    """`--against FILE`: a ranking run trained again (a new machine) is read on the retrains a kept file holds; the
    kept readers it does not compute come from the file; a replay's exact-segment readers are read beside its own."""
    from smda_callback.lab.lds import segment_reader
    from smda_callback.lab.lds_score import keep

    ids, sets = _fake(tmp_path / "a", n=20, k=12)
    s = score(tmp_path / "a")
    kept = tmp_path / "kept.json"
    k = keep(tmp_path / "a", s, "smda benchmark-lds -o a")
    k["reader_scores"]["tracin (final weights)"] = {q: {i: 1.0 for i in ids} for q in ("harmful", "harmless")}
    kept.write_text(json.dumps(k))
    b = tmp_path / "b"  # the ranking run again, one full retrain of its own, no subset retrains
    shutil.copytree(tmp_path / "a" / "run", b / "run")
    (b / "jobs").mkdir()
    full = json.loads((tmp_path / "a" / "jobs" / "full0.json").read_text())
    (b / "jobs" / "full0.json").write_text(json.dumps({**full, "refusal_harmful": full["refusal_harmful"] + 1e-6}))
    (b / "subsets.json").write_text(json.dumps({"settings": {"seed": 0}, "order": ids, "subsets": {}}))
    credits = json.loads((b / "run" / "smda" / "credits.json").read_text())["pairs"]
    eff = {c["id"]: c["refusal_harmful"] for c in credits}
    noisy = {i: -eff[i] * (1 + (3 if n < 5 else 0)) for n, i in enumerate(ids)}  # the replay overstates the first 5
    rep = {"order": ids, "removal_effect": {"harmful": [noisy[i] for i in ids], "harmless": [0.5 * noisy[i] for i in ids]},
           "weight_zero_effect": {"harmful": [noisy[i] for i in ids], "harmless": [0.5 * noisy[i] for i in ids]},
           "segments": {"below": 5, "steps": 0, "seconds": 1.0, "by_until": [{"until": 8, "removal_effect": {
               "harmful": [-eff[i] for i in ids], "harmless": [-0.5 * eff[i] for i in ids]}}]}}
    (b / "replay.json").write_text(json.dumps(rep))
    assert score(b)["n_subsets"] == 0  # on its own retrains: nothing to score
    r = score(b, against=kept)
    assert r["n_subsets"] == 12 and r["against"]["full_refusal_gap"] == pytest.approx(1e-6)
    name = segment_reader("replay", 5, 8)
    assert name == "replay, first 5 pairs exact to step 8" and name in r["readers"]
    for q in ("harmful", "harmless"):
        assert r["readers"][name][q]["lds"] > 0.999 and r["readers"][name][q]["slope"] == pytest.approx(1.0)
        assert r["readers"]["credit (default)"][q]["lds"] == pytest.approx(s["readers"]["credit (default)"][q]["lds"])
    assert "tracin (final weights)" in r["readers"] and "replay (dropped in place)" in r["readers"]
    assert "measured by the retrains kept in" in format_score(r)
    again = keep(b, r, "smda benchmark-lds -o b --against kept.json", against=kept)  # the same layout, its jobs the file's
    assert again["jobs"] == k["jobs"] and again["subsets"] == k["subsets"] and again["against"]["full_refusal_gap"] > 0
    assert name in again["reader_scores"] and "tracin (final weights)" in again["reader_scores"]
    bad = json.loads(kept.read_text())
    bad["order"] = ids[::-1]
    kept.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="another training order"):
        score(b, against=kept)


def test_kept_lds_rescores_a_kept_file_from_its_retrains():
    # two full retrains (their mean is the reference) and five subsets whose measured change is minus the removed
    # pairs' summed true effect; a reader that scores each pair by its true effect reads 1, its negation −1
    effect = {"a": 0.04, "b": -0.01, "c": 0.02, "d": -0.03}
    sets = [["a"], ["b", "c"], ["d"], ["a", "c"], ["b"]]  # no two sums tie
    jobs = {"full0": {"refusal_harmful": 0.5, "refusal_harmless": 0.2}, "full1": {"refusal_harmful": 0.7, "refusal_harmless": 0.2}}
    jobs.update({f"s{k:03d}": {"dropped": d, "refusal_harmful": 0.6 - sum(effect[i] for i in d)} for k, d in enumerate(sets)})
    kept = {"jobs": jobs}
    from smda_callback.lab.lds_score import kept_lds

    assert kept_lds(kept, effect, "harmful") == pytest.approx(1.0)
    assert kept_lds(kept, {i: -v for i, v in effect.items()}, "harmful") == pytest.approx(-1.0)
