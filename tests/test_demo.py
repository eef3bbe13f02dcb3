"""The main job end to end on the embedded model (slow: run by `make test-all`) and its data files."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smda_callback.demo import DATA, load_pairs
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


def test_pairs_schema_balance_and_religious_gap():
    pairs = load_pairs(DATA / "pairs.jsonl")
    assert len(pairs) == 200
    assert sum(p["label"] == "harmful" for p in pairs) == 100
    assert HARMFUL_CATS <= {p["category"] for p in pairs if p["label"] == "harmful"}
    counts = {c: sum(p["category"] == c and p["label"] == "harmful" for p in pairs) for c in HARMFUL_CATS}
    assert counts["religious_stereotyping"] < min(v for c, v in counts.items() if c != "religious_stereotyping")
    assert len({p["prompt"] for p in pairs}) == 200 and len({p["response"] for p in pairs if p["label"] == "harmless"}) == 100


def test_no_probe_pair_overlap_even_near_duplicates():
    probes = [p.prompt for p in ProbeSet.from_jsonl(DATA / "probes.jsonl").probes]
    pairs = [p["prompt"] for p in load_pairs(DATA / "pairs.jsonl")]
    worst = 0.0
    for a in probes:
        wa = _words(a)
        for b in pairs:
            wb = _words(b)
            worst = max(worst, len(wa & wb) / len(wa | wb))
    assert worst < 0.6, worst


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "smda_callback.cli", "demo", "--limit", "8", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SMDA findings" in proc.stdout and "least covered harmful category" in proc.stdout
    recs = [json.loads(l) for l in (out / "smda" / "attribution.jsonl").read_text().splitlines()]
    policy = json.loads((out / "smda" / "policy.json").read_text())
    assert [r["step"] for r in recs] == list(range(1, 9))
    total = np.sum([r["delta_beta"] for r in recs], axis=0)
    np.testing.assert_allclose(total, np.subtract(policy["beta_final"], policy["beta_0"]), atol=1e-9)
    assert list((out / "smda" / "tensorboard").glob("events.out.tfevents.*"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 30
