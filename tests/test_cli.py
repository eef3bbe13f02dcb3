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
    assert all(0.0 <= p["refusal"] <= 1.0 for p in out["probes"])


def test_probe_generate(saved, capsys):
    assert main(["probe", "--generate", "--model", str(saved / "model"), "--probes", str(saved / "probes.jsonl"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["answers"]) == 12 and 0.0 <= out["refusal_rate_harmful"] <= 1.0


def test_cli_errors_are_one_clear_line(saved, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "label": "harmful", "category": "a"}\n{"prompt": "y", "label": "maybe", "category": "b"}\n')
    assert main(["probe", "--model", str(saved / "model"), "--sae", str(saved / "sae"), "--probes", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smda: error:") and "bad.jsonl:2: unknown label 'maybe'" in err and "Traceback" not in err
