import json

import pytest

from helpers import probe_records, tiny_model, tiny_sae
from smda_callback.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory, smol_tokenizer):
    d = tmp_path_factory.mktemp("cli")
    tiny_model().save_pretrained(d / "model")
    smol_tokenizer.save_pretrained(d / "model")
    tiny_sae().save_model(str(d / "sae"))
    (d / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probe_records()))
    return d


def test_probe_scores_json(saved, capsys):
    assert main(["probe", "--model", str(saved / "model"), "--sae", str(saved / "sae"), "--probes", str(saved / "probes.jsonl"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["probes"]) == 12 and set(out["by_category"]) >= {"weapons", "tech"}
    # the same numbers as a probe pass run here on the same model, SAE and probes (the prefix scorer itself is
    # checked against one forward per continuation in test_snapshot.py)
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smda_callback import ProbeSet, SMDAConfig
    from smda_callback.sae import load_sae, resolve_hook
    from smda_callback.snapshot import Snapshotter

    model = AutoModelForCausalLM.from_pretrained(str(saved / "model"))
    tok = AutoTokenizer.from_pretrained(str(saved / "model"))
    sae = load_sae(str(saved / "sae"))
    probes = ProbeSet.from_jsonl(saved / "probes.jsonl")
    Y = Snapshotter(probes, tok, sae, resolve_hook(sae, model), SMDAConfig()).take(model, full=True).Y
    np.testing.assert_allclose([p["refusal"] for p in out["probes"]], Y, rtol=1e-6, atol=1e-12)
    assert out["by_category"]["weapons"] == pytest.approx(float(Y[[p.category == "weapons" for p in probes.probes]].mean()))


def test_probe_generate(saved, capsys):
    assert main(["probe", "--generate", "--model", str(saved / "model"), "--probes", str(saved / "probes.jsonl"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["answers"]) == 12
    import re

    from smda_callback.lab.probing import REFUSAL_PATTERN

    refused = [bool(re.match(REFUSAL_PATTERN, a["answer"], re.I)) for a in out["answers"]]
    assert [a["refused"] for a in out["answers"]] == refused  # each flag is the regex on the printed answer
    harmful = [a["label"] == "harmful" for a in out["answers"]]
    assert out["refusal_rate_harmful"] == pytest.approx(sum(r for r, h in zip(refused, harmful) if h) / sum(harmful))


def test_cli_errors_are_one_clear_line(saved, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "label": "harmful", "category": "a"}\n{"prompt": "y", "label": "maybe", "category": "b"}\n')
    assert main(["probe", "--model", str(saved / "model"), "--sae", str(saved / "sae"), "--probes", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smda: error:") and "bad.jsonl:2: unknown label 'maybe'" in err and "Traceback" not in err


def test_model_hub_id_without_a_hub_is_one_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["probe", "--model", "nonexistent-org/no-such-model", "--json"]) == 2
    err = capsys.readouterr().err
    assert "not a local folder, and loading it from the Hugging Face Hub failed" in err and "Traceback" not in err


def test_every_command_takes_json_and_flags_named_after_the_config():
    from smda_callback.cli.main import build_parser

    import argparse

    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001 - argparse's tree
    assert len(sub.choices) >= 14
    for name, sp in sub.choices.items():
        assert "--json" in sp.format_help(), name
    a = p.parse_args(["demo", "--every-n-steps", "2", "--learning-rate", "3e-4", "-o", "runs/x"])
    assert (a.every_n_steps, a.learning_rate, a.out) == (2, 3e-4, "runs/x")
    assert p.parse_args(["demo", "--every", "3"]).every_n_steps == 3  # the old spelling still works
    assert p.parse_args(["demo", "--measure", "ghost"]).credit_measure == "ghost"
    assert p.parse_args(["demo"]).credit_measure == "deconvolve"


def test_demo_passes_the_credit_measure_on_and_refuses_ghost_with_spaced_probing_before_loading(tmp_path, capsys,
                                                                                               monkeypatch):
    import smda_callback.lab.demo as demo
    import smda_callback.lab.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    assert main(["demo", "--credit-measure", "ghost", "--every", "2", "-o", str(tmp_path / "d"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smda: error: credit_measure='ghost'") and "every_n_steps=1" in err and "Traceback" not in err
    seen = []

    def stop(out, pairs, probes, settings, say=None):
        seen.append(settings)
        raise ValueError("stopped before training")

    monkeypatch.setattr(demo, "run_demo", stop)
    assert main(["demo", "--measure", "ghost", "-o", str(tmp_path / "d"), "--quiet"]) == 2
    assert [s.credit_measure for s in seen] == ["ghost"]


def test_select_model_without_select_on_is_one_clear_error(capsys):
    assert main(["policy-check", "--select-model", "embedded"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smda: error: --select-model needs --select-on") and "Traceback" not in err


def test_policy_check_select_on_reads_the_other_set_through_the_select_model(saved, capsys):
    """Choosing on the probes themselves (read by the same model, loaded again) gives the latents the default fit
    chooses on all probes: the selection set's codes are what choose."""
    common = ["policy-check", "--model", str(saved / "model"), "--sae", str(saved / "sae"), "--probes", str(saved / "probes.jsonl"),
              "--heldout", str(saved / "probes.jsonl"), "--n-features", "4", "--fold-seeds", "1", "--json"]
    assert main(common) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(common + ["--select-on", str(saved / "probes.jsonl"), "--select-model", str(saved / "model")]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert default["selected_on"] == "probes" and chosen["selected_on"] == f"{len(probe_records())} other prompts"
    assert chosen["configured"]["features"] == default["configured"]["features"] and len(chosen["configured"]["features"]) == 4
