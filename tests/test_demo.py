"""The main job end to end on the embedded model (slow: run by `make test-all`) and its data files."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from smda_callback.lab.demo import DATA, load_pairs
from smda_callback.probes import ProbeSet

HARMFUL_CATS = {"religious_stereotyping", "hate", "violence", "weapons", "cybercrime", "drugs", "self_harm", "fraud", "privacy"}


def _words(text):
    return set(re.findall(r"[a-z']+", text.lower()))


def test_probe_set_schema_and_coverage():
    probes = ProbeSet.from_jsonl(DATA / "probes.jsonl")
    assert len(probes) >= 120
    cats = {p.category for p in probes.probes if p.harmful}
    assert HARMFUL_CATS <= cats and len(cats) >= 8
    assert sum(p.edgy for p in probes.probes) >= 30
    assert all(not p.harmful for p in probes.probes if p.edgy)


OPENERS = ("what", "how", "why", "who", "where", "when", "which", "is", "are", "can", "could", "do", "does", "should",
           "would", "will")


def _form(records, label):
    rs = [r for r in records if r["label"] == label]
    return (np.mean([r["prompt"].strip().endswith("?") for r in rs]),
            np.mean([r["prompt"].split()[0].lower().strip(",") in OPENERS for r in rs]),
            np.mean([len(r["prompt"].split()) for r in rs]))


@pytest.mark.parametrize("name", ["probes", "heldout", "pairs"])
def test_harmful_and_harmless_prompts_match_in_form(name):
    """Otherwise "is it a question?" separates the labels and the policy learns form, not content."""
    from smda_callback.probes import read_jsonl

    recs = read_jsonl(DATA / f"{name}.jsonl")
    (qh, wh, lh), (qs, ws, ls) = _form(recs, "harmful"), _form(recs, "harmless")
    assert abs(qh - qs) <= 0.10, (name, qh, qs)  # share of questions
    assert 0.75 <= lh / ls <= 1.33, (name, lh, ls)  # mean length in words
    if name != "pairs":  # the probes choose features: wh-/aux-openings matched too
        assert abs(wh - ws) <= 0.10, (name, wh, ws)


def test_pairs_schema_balance_and_religious_gap():
    pairs = load_pairs(DATA / "pairs.jsonl")
    assert sum(p["label"] == "harmful" for p in pairs) == 100
    # harmless requests outnumber refusals ~2:1 (a 1:1 mix taught the 135M model to refuse most requests)
    assert 2 * 100 <= sum(p["label"] == "harmless" for p in pairs) <= 2.5 * 100
    assert HARMFUL_CATS <= {p["category"] for p in pairs if p["label"] == "harmful"}
    counts = {c: sum(p["category"] == c and p["label"] == "harmful" for p in pairs) for c in HARMFUL_CATS}
    assert counts["religious_stereotyping"] < min(v for c, v in counts.items() if c != "religious_stereotyping")
    harmless = [p for p in pairs if p["label"] == "harmless"]
    assert len({p["prompt"] for p in pairs}) == len(pairs) and len({p["response"] for p in harmless}) == len(harmless)
    distilled = [p for p in harmless if p.get("source") == "base_model_greedy"]
    assert distilled and not any(re.match(r"\s*(i can't|i cannot|i won't|i'm sorry|sorry)", p["response"], re.I) for p in distilled)


@pytest.mark.parametrize("held_out", ["probes.jsonl", "heldout.jsonl"])
def test_no_overlap_with_training_pairs_even_near_duplicates(held_out):
    held = [p.prompt for p in ProbeSet.from_jsonl(DATA / held_out).probes]
    pairs = [p["prompt"] for p in load_pairs(DATA / "pairs.jsonl")]
    worst = max(len(_words(a) & _words(b)) / len(_words(a) | _words(b)) for a in held for b in pairs)
    assert worst < 0.6, worst


def test_heldout_set_is_disjoint_from_the_probes():
    probes = [p.prompt for p in ProbeSet.from_jsonl(DATA / "probes.jsonl").probes]
    held = ProbeSet.from_jsonl(DATA / "heldout.jsonl")
    assert HARMFUL_CATS <= {p.category for p in held.probes if p.harmful} and sum(p.edgy for p in held.probes) >= 10
    worst = max(len(_words(a.prompt) & _words(b)) / len(_words(a.prompt) | _words(b)) for a in held.probes for b in probes)
    assert worst < 0.6, worst


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "smda_callback.cli", "demo", "--limit", "8", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SMDA findings" in proc.stdout and "least covered harmful category" in proc.stdout
    summary = json.loads((out / "smda" / "summary.json").read_text())
    for when in ("before", "after"):
        for name in ("probes", "heldout"):
            assert 0.0 <= summary["answers"][when][name]["refusal_rate_harmful"] <= 1.0
    assert "Greedy answers that open with a refusal" in proc.stdout
    # the AUROCs the demo prints are the nested one and the held-out-prompt one, before and after training
    pa = summary["policy_auroc"]
    assert "AUROC vs labels it can stand behind: nested 5-fold" in proc.stdout
    assert all(0.0 <= pa[k] <= 1.0 for k in ("nested_before", "heldout_before", "nested_after", "heldout_after"))
    policy_json = json.loads((out / "smda" / "policy.json").read_text())
    assert pa["nested_before"] == policy_json["fit"]["cv_auroc_nested"]
    assert pa["nested_after"] == policy_json["fit_after_training"]["cv_auroc_nested"]
    recs = [json.loads(l) for l in (out / "smda" / "attribution.jsonl").read_text().splitlines()]
    policy = json.loads((out / "smda" / "policy.json").read_text())
    assert [r["step"] for r in recs] == list(range(1, 9))
    total = np.sum([r["delta_beta"] for r in recs], axis=0)
    np.testing.assert_allclose(total, np.subtract(policy["beta_final"], policy["beta_0"]), atol=1e-9)
    assert list((out / "smda" / "tensorboard").glob("events.out.tfevents.*"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 30
