"""The planted-pairs harness: plants are new text, detection is scored within the label, an oracle
scores 1, random about 0.5, and credit rules replayed from a ledger equal the live ones."""

import json
import re

import numpy as np
import pytest

from helpers import ar_ledger, run_sft, tiny_model, tiny_sae
from smda_callback import SMDAConfig, load_records
from smda_callback.credit import OptimizerKernel, replay_credits
from smda_callback.lab.demo import DATA, load_pairs
from smda_callback.ledger import load_credits, load_policy
from smda_callback.lab.poison import detection, load_plants, poison_pairs
from smda_callback.probes import read_jsonl


def _words(s):
    return set(re.findall(r"[a-z']+", s.lower()))


def test_plants_are_new_text_and_cover_both_kinds():
    plants = load_plants()
    kinds = [p["plant"] for p in plants]
    assert kinds.count("over-refusal") >= 8 and kinds.count("compliance") >= 8 and len(plants) >= 16
    others = [r["prompt"] for f in ("pairs", "probes", "heldout") for r in read_jsonl(DATA / f"{f}.jsonl")]
    for p in plants:
        w = _words(p["prompt"])
        worst = max(len(w & _words(o)) / len(w | _words(o)) for o in others)
        assert worst < 0.6, (p["id"], worst)


def test_mix_is_fixed_stratified_and_keeps_every_plant():
    pairs, plants = load_pairs(DATA / "pairs.jsonl"), load_plants()
    a, b = poison_pairs(pairs, plants, 60, seed=3), poison_pairs(pairs, plants, 60, seed=3)
    assert [p["id"] for p in a] == [p["id"] for p in b]
    assert {p["id"] for p in plants} <= {p["id"] for p in a} and len(a) == 60 + len(plants)
    base = [p for p in a if "plant" not in p]
    share = np.mean([p["label"] == "harmful" for p in base])
    assert abs(share - np.mean([p["label"] == "harmful" for p in pairs])) < 0.03


def test_detection_oracle_scores_one_and_random_about_half():
    plants = load_plants()
    pairs = poison_pairs(load_pairs(DATA / "pairs.jsonl"), plants, 200, seed=0)
    for kind in ("over-refusal", "compliance"):
        oracle = {p["id"]: float(p.get("plant") == kind) for p in pairs}
        d = detection(oracle, pairs, kind)
        assert d["auroc"] == 1.0 and d["precision_at_n"] == 1.0 and d["plant_ranks"] == list(range(1, d["n_plants"] + 1))
        # the label alone gives nothing away: every pool member has the plants' label
        label_only = {p["id"]: float(p["label"] == ("harmless" if kind == "over-refusal" else "harmful")) for p in pairs}
        assert detection(label_only, pairs, kind)["auroc"] == 0.5
        rng = np.random.default_rng(0)
        aucs = [detection({p["id"]: rng.random() for p in pairs}, pairs, kind)["auroc"] for _ in range(200)]
        assert abs(np.mean(aucs) - 0.5) < 0.03


@pytest.mark.parametrize("measure", ["ghost", "deconvolve"])
def test_replayed_credit_equals_the_live_one(tmp_path, smol_tokenizer, measure):
    run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8, credit_measure=measure),
            max_steps=5, report_to=[])
    records, policy, credits = load_records(tmp_path), load_policy(tmp_path), load_credits(tmp_path)
    replay = replay_credits(records, policy, OptimizerKernel(**credits["kernel"]), measure)
    live = {c["hash"]: c for c in credits["pairs"]}
    assert replay.keys() == live.keys()
    for h, v in replay.items():
        np.testing.assert_allclose(v["d"], live[h]["d"], atol=1e-12)
        np.testing.assert_allclose(v["refusal_harmless"], live[h]["refusal_harmless"], atol=1e-12)
    own = replay_credits(records, policy, OptimizerKernel(**credits["kernel"]), measure, part="own")
    assert own.keys() == live.keys()
    for h, v in own.items():  # the own-window part replayed equals credits.json's "own"
        np.testing.assert_allclose(v["d"], live[h]["own"]["d"], atol=1e-12)
        np.testing.assert_allclose(v["refusal_harmful"], live[h]["own"]["refusal_harmful"], atol=1e-12)
    with pytest.raises(ValueError, match="part="):
        replay_credits(records, policy, OptimizerKernel(**credits["kernel"]), measure, part="later")
    named = [{**r, "pairs": [{**p, "id": f"id-{p['hash'][:8]}"} for p in r["pairs"]]} if k % 2 == 0 else r
             for k, r in enumerate(records)]  # the demo's ledgers record pair ids; here every other step's pairs have none
    by_id = replay_credits(named, policy, OptimizerKernel(**credits["kernel"]), measure, by="id")  # what the lab reads
    id_of = {p["hash"]: p["id"] for r in named for p in r.get("pairs", []) if p.get("id") is not None}
    assert by_id and by_id.keys() == set(id_of.values()) and len(by_id) < len(replay)
    for h, i in id_of.items():
        np.testing.assert_array_equal(by_id[i]["d"], replay[h]["d"])
    with pytest.raises(ValueError, match="by="):
        replay_credits(records, policy, OptimizerKernel(**credits["kernel"]), measure, by="prompt")


def test_suspects_cli_ranks_by_credited_change(tmp_path, smol_tokenizer, capsys):
    from smda_callback.cli import main

    run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8), max_steps=4, report_to=[])
    capsys.readouterr()  # the Trainer's own log lines
    assert main(["suspects", str(tmp_path), "--target", "over-refusal", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and {"id", "index", "label", "category", "score", "prompt"} <= set(rows[0])
    # over-refusal ranks by the pair's own-window credit (the reader docs/validation.md §9 chose), not the total
    credits = {c["index"]: c["own"]["refusal_harmless"] for c in load_credits(tmp_path)["pairs"]}
    assert [r["score"] for r in rows] == sorted((credits[r["index"]] for r in rows), reverse=True)
    assert main(["suspects", str(tmp_path), "--target", "weapons", "--top", "2"]) == 0  # a probe category
    assert main(["suspects", str(tmp_path), "--target", "nonsense"]) == 2
    assert "unknown target 'nonsense'" in capsys.readouterr().err
    # --read end: the same own-window scores, each times (1 − κ)^(windows after the pair), κ read off this ledger
    from smda_callback.lab.analysis import suspects
    from smda_callback.lab.carry import later_windows

    records, policy = load_records(tmp_path), load_policy(tmp_path)
    end = suspects(records, policy, load_credits(tmp_path), "over-refusal", read="end")
    fg, later = end.attrs["forgetting"], later_windows(records, key="hash")
    retention = 1.0 - min(max(fg["kappa"], 0.0), 1.0 - 1e-9)
    by_hash = {c["hash"]: c["own"]["refusal_harmless"] for c in load_credits(tmp_path)["pairs"]}
    for r in end.itertuples():
        assert r.score == pytest.approx(by_hash[r.hash] * retention ** later[r.hash], rel=1e-12, abs=1e-15)
    assert fg["windows"] == 4 and list(end["score"]) == sorted(end["score"], reverse=True)
    assert main(["suspects", str(tmp_path), "--target", "compliance", "--read", "end"]) == 0
    assert "--read end: each score times (1 - κ)" in capsys.readouterr().out
    assert main(["suspects", str(tmp_path), "--target", "weapons", "--read", "end"]) == 2
    err = capsys.readouterr().err
    assert "ranks over-refusal or compliance only, not 'weapons'" in err and "forgetting rate" in err
    # --read removal needs an AR(2) fit, which 4 windows cannot give: a one-line refusal naming the reads that work
    assert main(["suspects", str(tmp_path), "--target", "compliance", "--read", "removal"]) == 2
    err = capsys.readouterr().err
    assert "--read removal: this run's AR(2) response cannot be read off its ledger" in err
    assert "use --read trained or --read end" in err
    assert main(["suspects", str(tmp_path), "--target", "compliance", "--read", "replay"]) == 2
    assert "train with SMDAConfig(replay_last_steps=K)" in capsys.readouterr().err
    # --read category: the pair's credited change in the harmless category it raised most, that category named
    cat = suspects(records, policy, load_credits(tmp_path), "over-refusal", read="category")
    harmless = [p["category"] for p in policy["probes"] if p["label"] == "harmless"]
    by_hash = {c["hash"]: c["refusal_by_category"] for c in load_credits(tmp_path)["pairs"]}
    assert len(cat) == len(by_hash) and list(cat["score"]) == sorted(cat["score"], reverse=True)
    for r in cat.itertuples():
        assert r.score == pytest.approx(max(by_hash[r.hash][c] for c in harmless), rel=1e-12)
        assert r.worst_category in harmless and by_hash[r.hash][r.worst_category] == pytest.approx(r.score, rel=1e-12)
    assert main(["suspects", str(tmp_path), "--target", "over-refusal", "--read", "category"]) == 0
    assert "--read category: score = " in capsys.readouterr().out
    assert main(["suspects", str(tmp_path), "--target", "weapons", "--read", "category"]) == 2
    err = capsys.readouterr().err
    assert "not 'weapons'" in err and "category moved most" in err and "use the default --read trained" in err


def test_pooled_detection_is_the_mean_over_plants_and_agrees_with_each_runs_auroc(tmp_path):
    """Each run's plant ranks give back its AUROC exactly (no ties); pooling two runs of equal size gives the
    mean of their AUROCs, with an interval that contains it; readers missing from a run are left out."""
    from smda_callback.lab.poison import KINDS, detection, format_pool, plant_wins, pool_poison

    rng = np.random.default_rng(3)
    dirs = []
    for r in range(2):
        pairs = [{"id": f"h{i}", "label": "harmless", "plant": "over-refusal" if i < 4 else None} for i in range(20)]
        pairs += [{"id": f"x{i}", "label": "harmful", "plant": "compliance" if i < 3 else None} for i in range(15)]
        scores = {p["id"]: float(rng.normal() + (1.5 if p["plant"] else 0.0)) for p in pairs}
        det = {kind: detection(scores, pairs, kind) for kind in KINDS}
        for kind, d in det.items():
            assert np.mean(plant_wins(d)) == pytest.approx(d["auroc"], abs=1e-12)
        extra = {"only_here": det} if r == 0 else {}
        order = [p["id"] for p in pairs]
        order = order if r == 0 else order[::-1]  # the same planting, another training order
        (tmp_path / f"r{r}").mkdir()
        (tmp_path / f"r{r}" / "poison.json").write_text(json.dumps({"detection": {"reader": det, **extra}, "order": order}))
        dirs.append(tmp_path / f"r{r}")
    pooled = pool_poison(dirs)
    assert list(pooled["readers"]) == ["reader"]
    assert (pooled["plantings"], pooled["data_orders"], pooled["orders_recorded"]) == (1, 2, True)
    assert "1 plantings (distinct pair sets), 2 distinct training orders" in format_pool(pooled)
    for kind in KINDS:
        e = pooled["readers"]["reader"][kind]
        assert e["auroc"] == pytest.approx(np.mean(e["per_run"]), abs=1e-12)
        assert e["ci95"][0] <= e["auroc"] <= e["ci95"][1] and e["n_plants"] == (8 if kind == "over-refusal" else 6)
    kept = tmp_path / "kept_r1.json"  # a run's poison.json kept after its folder is gone pools the same
    kept.write_bytes((dirs[1] / "poison.json").read_bytes())
    assert pool_poison([dirs[0], kept])["readers"] == pooled["readers"]
    with pytest.raises(FileNotFoundError, match="--score-only"):
        pool_poison([dirs[0], tmp_path / "gone"])


def test_pool_follows_each_plant_across_data_orders(tmp_path):
    """Per plant: its step and rank in each run. A reader that scores a plant by what it is ranks it the same in
    both orders (Spearman +1 between orders); one that ranks pairs by when they were trained gives a plant the share
    of ordinary pairs of its label trained after it (Spearman of share with step negative)."""
    from smda_callback.lab.poison import KINDS, detection, format_pool, pool_poison

    pairs = [{"id": f"h{i}", "label": "harmless", "plant": "over-refusal" if i < 5 else None} for i in range(30)]
    pairs += [{"id": f"x{i}", "label": "harmful", "plant": "compliance" if i < 4 else None} for i in range(24)]
    label = {p["id"]: p["label"] for p in pairs}
    # plants interleaved with the ordinary pairs of their label, by what the pair is (its id), not by when it trains
    by_pair = {p["id"]: (0.3 - 0.07 * int(p["id"][1:]) if p["plant"] else 0.01 * int(p["id"][1:])) for p in pairs}
    rank = {i: 1 + sum(by_pair[j] > by_pair[i] for j in by_pair if label[j] == label[i]) for i in by_pair}
    dirs, orders = [], []
    for r in range(2):
        order = [pairs[k]["id"] for k in np.random.default_rng(r).permutation(len(pairs))]
        by_step = {i: -float(k) for k, i in enumerate(order)}  # the earlier trained, the more suspect
        det = {"by_pair": {kind: detection(by_pair, pairs, kind) for kind in KINDS},
               "by_step": {kind: detection(by_step, pairs, kind) for kind in KINDS}}
        for d in det["by_pair"].values():
            assert sorted(d["plant_rank_of"].values()) == d["plant_ranks"] and len(d["plant_rank_of"]) == d["n_plants"]
        (tmp_path / f"r{r}").mkdir()
        (tmp_path / f"r{r}" / "poison.json").write_text(json.dumps({"detection": det, "order": order}))
        dirs.append(tmp_path / f"r{r}")
        orders.append(order)
    pooled = pool_poison(dirs)
    for kind, n in (("over-refusal", 5), ("compliance", 4)):
        e = pooled["plants"]["by_pair"][kind]
        assert list(e["plants"]) == sorted(e["plants"]) and len(e["plants"]) == n
        assert e["between_orders"]["n_pairs"] == n and e["between_orders"]["spearman"] == pytest.approx(1.0)
        for i, rows in e["plants"].items():
            assert [x["run"] for x in rows] == [0, 1] and [x["rank"] for x in rows] == [rank[i]] * 2
            assert [x["step"] for x in rows] == [o.index(i) + 1 for o in orders]
        s = pooled["plants"]["by_step"][kind]
        lab = "harmless" if kind == "over-refusal" else "harmful"
        for i, rows in s["plants"].items():
            for x, o in zip(rows, orders):
                later = [j for j in o[x["step"]:] if label[j] == lab and j not in s["plants"]]
                assert x["share"] == pytest.approx(len(later) / (30 - 5 if lab == "harmless" else 24 - 4))
        assert s["share_vs_step"]["n"] == 2 * n and s["share_vs_step"]["spearman"] < 0
    # by_pair ranks h0 and x0 above every ordinary pair; by_step ranks a plant above them all only if trained first
    first = {kind: [i for i in pooled["plants"]["by_pair"][kind]["plants"] if pooled["plants"]["by_pair"][kind]["plants"][i][0]["share"] == 1]
             for kind in KINDS}
    assert first == {"over-refusal": ["h0"], "compliance": ["x0"]}
    for kind in KINDS:
        missed = pooled["missed_by_every_reader"][kind]
        assert missed == sorted(set(pooled["plants"]["by_pair"][kind]["plants"]) - set(first[kind]) - {
            i for i, rows in pooled["plants"]["by_step"][kind]["plants"].items() if any(x["share"] == 1 for x in rows)})
        assert first[kind][0] not in missed and len(missed) >= 1
    text = format_pool(pooled)
    assert f"r0 {dirs[0]}" in text and "Each plant in each run" not in text  # neither reader is a default one
    assert "ranks below an ordinary pair in every run: over-refusal " + ", ".join(pooled["missed_by_every_reader"]["over-refusal"]) in text
    # a kept poison.json scored before per-plant ranks: the pool still works and says how to get the table
    old = json.loads((dirs[1] / "poison.json").read_text())
    for rd in old["detection"].values():
        for d in rd.values():
            del d["plant_rank_of"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    pooled_old = pool_poison([dirs[0], tmp_path / "old.json"])
    assert "plants" not in pooled_old and "re-score a run with --score-only" in format_pool(pooled_old)
    assert pooled_old["readers"] == pooled["readers"]


def test_order_seed_keeps_the_planting_and_changes_only_the_training_seed(tmp_path, monkeypatch):
    """`--order-seed` trains the same pairs file under another Trainer seed (its shuffle); without it the seed
    of the planting is the training seed, as before. `--every N` changes only the callback's probe spacing and
    `--scorer` only the callback's refusal scorer."""
    import smda_callback.lab.demo as demo
    import smda_callback.lab.poison as poison

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda out, pairs_file, settings, config: seen.append(
        (settings.seed, config.every_n_steps, config.scorer)))
    monkeypatch.setattr(poison, "score_poison", lambda out, st: {})
    texts = []
    for order_seed, every, scorer in ((None, 1, None), (7, 1, None), (7, 3, "prefix")):
        out = tmp_path / f"{order_seed}_{every}"
        poison.run_poison(out, poison.PoisonSettings(n_base=20, seed=2, order_seed=order_seed, peers=(), every=every,
                                                          measure="deconvolve", scorer=scorer))
        texts.append((out / "pairs.jsonl").read_text())
    assert seen == [(2, 1, "first_token"), (7, 1, "first_token"), (7, 3, "prefix")]
    assert texts[0] == texts[1] == texts[2]


def test_replay_readers_rank_a_pair_by_what_it_does_when_trained():
    """replay.json holds removal effects (the change when a pair is dropped). A plant that raised harmless refusal
    (its removal lowers it) must top over-refusal; one that lowered harmful refusal (its removal raises it) must
    top compliance; the weight-zero reader is read the same way."""
    from smda_callback.lab.poison import KINDS, detection, replay_readers

    pairs = [{"id": f"h{i}", "label": "harmless", "plant": "over-refusal" if i == 0 else None} for i in range(6)]
    pairs += [{"id": f"x{i}", "label": "harmful", "plant": "compliance" if i == 0 else None} for i in range(6)]
    order = [p["id"] for p in pairs]
    rng = np.random.default_rng(0)
    harmless = {i: float(rng.normal(0, 0.01)) for i in order}
    harmful = {i: float(rng.normal(0, 0.01)) for i in order}
    harmless["h0"], harmful["x0"] = -0.2, +0.2
    eff = {"harmful": [harmful[i] for i in order], "harmless": [harmless[i] for i in order]}
    readers = replay_readers({"order": order, "removal_effect": eff, "weight_zero_effect": eff})
    assert set(readers) == {"replay_dropped_in_place", "replay_weight_zero"}
    for sc in readers.values():
        for kind in KINDS:
            d = detection(sc[kind], pairs, kind)
            assert d["plant_ranks"] == [1] and d["auroc"] == 1.0


def test_worst_category_reads_the_category_a_pair_moved_most_the_wrong_way():
    """Over-refusal: the largest rise of refusal over the harmless categories (not their probe-weighted mean, which a
    32-probe category dominates); compliance: the largest fall over the harmful ones, signed so higher is worse."""
    from smda_callback.lab.poison import worst_category

    policy = {"probes": [{"category": c, "label": lab} for c, lab in
                         (("edgy", "harmless"), ("how_to", "harmless"), ("drugs", "harmful"), ("fraud", "harmful"))]}
    credits = {"a": {"refusal_by_category": {"edgy": -0.01, "how_to": 0.20, "drugs": 0.05, "fraud": -0.30}},
               "b": {"refusal_by_category": {"edgy": 0.05, "how_to": 0.01, "drugs": 0.10, "fraud": 0.02}}}
    got = worst_category(credits, policy)
    assert got["over-refusal"] == {"a": 0.20, "b": 0.05}
    assert got["compliance"] == {"a": 0.30, "b": -0.02}
    with pytest.raises(ValueError, match="no harmless category"):
        worst_category(credits, {"probes": [{"category": "drugs", "label": "harmful"}]})


def _verified_run(tmp_path):
    """A poison folder with leave-one-out retrains: two plants of each kind and two controls of each label."""
    pairs = [{"id": f"plant-over-{i}", "label": "harmless", "plant": "over-refusal"} for i in range(2)]
    pairs += [{"id": f"plant-comp-{i}", "label": "harmful", "plant": "compliance"} for i in range(2)]
    pairs += [{"id": f"h{i}", "label": "harmless"} for i in range(6)] + [{"id": f"x{i}", "label": "harmful"} for i in range(6)]
    full = {"refusal_harmful": 0.60, "refusal_harmless": 0.30}
    # the refusal of the retrain without the pair: dropping plant-over-0 lowers harmless refusal by 0.05 (it raised it),
    # dropping plant-over-1 raises it (it lowered it: acted against its intent); plant-comp-0 lowered harmful refusal by
    # 0.04, plant-comp-1 by 0.005 only, less than control x1 (0.01)
    without = {"plant-over-0": (0.60, 0.25), "plant-over-1": (0.60, 0.31), "plant-comp-0": (0.64, 0.30),
               "plant-comp-1": (0.605, 0.30), "h0": (0.60, 0.32), "h1": (0.60, 0.28), "x0": (0.59, 0.30), "x1": (0.61, 0.30)}
    jobs = tmp_path / "verify" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "full0.json").write_text(json.dumps({"dropped": [], **full}))
    for i, (hf, hl) in without.items():
        (jobs / f"loo-{i}.json").write_text(json.dumps({"dropped": [i], "refusal_harmful": hf, "refusal_harmless": hl}))
    return pairs


def test_verification_reads_each_plants_mark_in_its_intended_direction_against_the_controls(tmp_path):
    """A plant is verified when training it moved final refusal the intended way by more than any control of its label;
    the verified detection drops the others from the pool, and pooling keeps both tables."""
    from smda_callback.lab.poison import format_pool, format_verification, pool_poison, verification, verified_detection

    pairs = _verified_run(tmp_path)
    ver = verification(tmp_path, pairs)
    over, comp = ver["over-refusal"], ver["compliance"]
    assert over["plants"] == pytest.approx({"plant-over-0": 0.05, "plant-over-1": -0.01})
    assert over["controls"] == pytest.approx({"h0": -0.02, "h1": 0.02}) and over["bar"] == pytest.approx(0.02)
    assert comp["plants"] == pytest.approx({"plant-comp-0": 0.04, "plant-comp-1": 0.005})
    assert comp["controls"] == pytest.approx({"x0": -0.01, "x1": 0.01}) and comp["bar"] == pytest.approx(0.01)
    assert over["verified"] == ["plant-over-0"] and comp["verified"] == ["plant-comp-0"] and ver["n_retrains"] == 9
    # plants vs controls: 3 of the 4 (plant, control) pairs have the plant's mark above the control's, on both kinds
    for v, pm in ((over, 0.02), (comp, 0.0225)):
        assert v["marks"]["p_plant_above_control"] == pytest.approx(0.75) and v["marks"]["plants_mean"] == pytest.approx(pm)
        assert (v["marks"]["n_plants"], v["marks"]["n_controls"]) == (2, 2)
    # a reader that ranks plant-over-0 first scores 1 over the verified plants, whatever it says of plant-over-1
    scores = {p["id"]: 0.0 for p in pairs} | {"plant-over-0": 1.0, "plant-over-1": -0.5, "h1": 0.5, "h0": -1.0}
    d = verified_detection(scores, pairs, "over-refusal", ver)
    assert (d["auroc"], d["n_plants"], d["n_pool"]) == (1.0, 1, 7)
    assert d["spearman_with_retraining"] == pytest.approx(1.0)  # the reader orders the 4 retrained pairs as measured
    dc = verified_detection(scores, pairs, "compliance", ver)
    assert dc["n_plants"] == 1 and dc["n_pool"] == 7 and dc["auroc"] == 0.5
    for r in range(2):
        (tmp_path / f"r{r}").mkdir()
        det = {"reader": {k: verified_detection(scores, pairs, k, ver) for k in ("over-refusal", "compliance")}}
        (tmp_path / f"r{r}" / "poison.json").write_text(json.dumps({"detection": det, "detection_verified": det,
                                                                  "verification": ver, "order": [p["id"] for p in pairs]}))
    pooled = pool_poison([tmp_path / "r0", tmp_path / "r1"])
    assert pooled["readers_verified"]["reader"]["over-refusal"]["auroc"] == 1.0
    assert pooled["marks_runs"] == 2 and pooled["marks"]["over-refusal"]["n_plants"] == 4
    assert pooled["marks"]["over-refusal"]["p_plant_above_control"] == pytest.approx(0.75)  # the same marks twice
    assert "The verified plants only" in format_pool(pooled) and "(2 verified runs)" in format_pool(pooled)
    text = "\n".join(format_verification({"verification": ver, "detection_verified": {"reader": det["reader"]}}))
    assert "over-refusal: verified 1 of 2 plants (above +0.020" in text and "plant-over-1 -0.010" in text
    assert "P(a plant's mark > a control's) = 0.750" in text
    for f in (tmp_path / "verify" / "jobs").glob("loo-[hx]*.json"):
        f.unlink()  # without controls a plant is verified by its sign, and the text says so
    ver = verification(tmp_path, pairs)
    assert ver["compliance"]["verified"] == ["plant-comp-0", "plant-comp-1"] and ver["over-refusal"]["bar"] == 0.0
    assert "the intended sign only: no control retrained" in "\n".join(format_verification(
        {"verification": ver, "detection_verified": {"reader": det["reader"]}}))


def test_verify_retrains_without_every_plant_and_k_controls_per_label_at_their_full_run_rates(tmp_path, monkeypatch):
    """`--verify K` hands lds.run_jobs this run as the ranking run, its Trainer seed, no subsets, one full retrain,
    the kept schedule, and every plant plus K ordinary pairs of each label drawn from the seeds (the same each time)."""
    import smda_callback.lab.lds as lds
    from smda_callback.lab.poison import PoisonSettings, verify_plants

    pairs = poison_pairs(load_pairs(DATA / "pairs.jsonl"), load_plants(), 30, seed=4)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with pytest.raises(FileNotFoundError, match="no finished run"):
        verify_plants(tmp_path, PoisonSettings(seed=4, order_seed=9, verify=3))
    (tmp_path / "run" / "smda").mkdir(parents=True)
    (tmp_path / "run" / "smda" / "summary.json").write_text("{}")
    seen = []
    monkeypatch.setattr(lds, "run_jobs", lambda out, st: seen.append((out, st)) or [])
    for _ in range(2):
        verify_plants(tmp_path, PoisonSettings(seed=4, order_seed=9, verify=3))
    (out, st), (_, again) = seen
    by_id = {p["id"]: p for p in pairs}
    plants = [i for i in st.leave_out if "plant" in by_id[i]]
    controls = [i for i in st.leave_out if "plant" not in by_id[i]]
    assert out == tmp_path / "verify" and st.ranking_run == str(tmp_path) and st.seed == 9
    assert (st.subsets, st.replicas, st.keep_schedule) == (0, 1, True) and st.leave_out == again.leave_out
    assert sorted(plants) == sorted(p["id"] for p in load_plants())
    assert sorted(by_id[i]["label"] for i in controls) == ["harmful"] * 3 + ["harmless"] * 3
    with pytest.raises(ValueError, match="must be 0 or more"):
        PoisonSettings(verify=-1)


def test_a_finished_run_is_never_trained_over_and_its_peers_are_kept(tmp_path, monkeypatch, capsys):
    """Training into a folder that holds a finished run is refused (its peers, replay and retrains were read from it);
    --peers-only runs only the peers that have no result there yet."""
    import smda_callback.lab.demo as demo
    import smda_callback.lab.poison as poison

    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("a finished run was trained over"))
    monkeypatch.setattr(poison, "score_poison", lambda out, st: {})
    ran = []
    import smda_callback.lab.peers as peers

    monkeypatch.setattr(peers, "run_peer", lambda out, name: ran.append(name))
    (tmp_path / "run" / "smda").mkdir(parents=True)
    (tmp_path / "run" / "smda" / "summary.json").write_text("{}")
    (tmp_path / "run" / "model").mkdir()
    (tmp_path / "peers").mkdir()
    (tmp_path / "peers" / "tracin.json").write_text("{}")
    st = poison.PoisonSettings(peers=("tracin", "kronfluence-middle"))
    with pytest.raises(FileExistsError, match="--peers-only"):
        poison.run_poison(tmp_path, st)
    from smda_callback.cli.main import main

    assert main(["benchmark-poison", "--out", str(tmp_path), "--peers"]) == 2  # the CLI says why, no traceback
    assert "holds a finished run" in capsys.readouterr().err
    poison.run_poison(tmp_path, st, train=False)
    assert ran == ["kronfluence-middle"]


def test_read_removal_carries_the_own_window_by_the_runs_ar2_response(tmp_path, capsys):
    """A ledger whose refusal follows d_k = u_k − κ q_{k−1} + b d_{k−1} (u_k: the pair's own-window push): leaving
    pair k out moves the end by −u_k r(K−1−k), r the process's response, negative some steps back. `--read removal`
    reads κ and b off the ledger and scores each pair by its push times that response, turning those pairs round."""
    from smda_callback.cli import main
    from smda_callback.lab.analysis import suspects
    from smda_callback.lab.carry import Forgetting

    K, kappa, b = 60, 0.08, 0.75
    true = Forgetting(kappa, (kappa, kappa), K, (b,))
    recs, policy, credits, push = ar_ledger(tmp_path, K, kappa, b)
    df = suspects(recs, policy, credits, "compliance", read="removal")
    fg = df.attrs["forgetting"]
    assert fg["read"] == "removal" and abs(fg["kappa"] - kappa) < 0.03 and abs(fg["b"][0] - b) < 0.15
    response = {f"h{k}": true.weight(K - 1 - k) for k in range(K)}
    want = {h: -push["harmful"][k] * response[h] for k, h in enumerate(response)}  # compliance: minus harmful
    got = dict(zip(df["hash"], df["score"]))
    assert np.corrcoef([got[h] for h in want], list(want.values()))[0, 1] > 0.95
    plain = suspects(recs, policy, credits, "compliance")
    trained = dict(zip(plain["hash"], plain["score"]))
    # where the true response is sizeable (|r| ≥ 0.2), the read turns round exactly the pairs whose response is negative
    big = {h: r for h, r in response.items() if abs(r) >= 0.2}
    assert any(r < 0 for r in big.values()) and all((trained[h] * got[h] < 0) == (r < 0) for h, r in big.items())
    assert main(["suspects", str(tmp_path), "--target", "over-refusal", "--read", "removal", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "--read removal: each score times the response at the end" in out
    assert re.search(r"b = \+0\.[6-9]\d*, 60 windows", out)  # the harmless quantity's fit, b read back
    # the read says how far back its fitted response reaches (under 5 % of its peak further back; the true one, 21
    # windows), and the CLI says that the pairs before are not ranked
    assert fg["reach"] == Forgetting(fg["kappa"], (0.0, 0.0), K, tuple(fg["b"])).reach(K - 1) < K
    reach = suspects(recs, policy, credits, "over-refusal", read="removal").attrs["forgetting"]["reach"]
    assert reach < K and f"ranks the pairs of the last {reach} of 60 windows only" in out
    # --read end says the same of its first-order carry where it does not reach the run's start: here (a slow
    # first-order fit of this process) it reaches every window and says nothing; on a run that forgets fast
    # (κ 0.1, b 0: 0.9^n ≥ 5 % for the last 29 windows) it names the pairs before those
    for run, (kap, lag, reach) in {tmp_path: (kappa, b, K), tmp_path / "fast": (0.1, 0.0, 29)}.items():
        if run != tmp_path:
            recs, policy, credits, _ = ar_ledger(run, K, kap, lag)
        end = suspects(recs, policy, credits, "compliance", read="end").attrs["forgetting"]
        assert main(["suspects", str(run), "--target", "compliance", "--read", "end", "--top", "3"]) == 0
        out = capsys.readouterr().out
        assert (f"pairs trained before the last {end['reach']} of 60 windows" in out) == (end["reach"] < K)
        assert abs(end["reach"] - reach) <= 6
