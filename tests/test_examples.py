"""examples/ run in --smoke mode, and the README's Python blocks run as written (so neither goes stale)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("script", ["sft_with_smda.py", "lora_sft.py", "custom_scorer.py", "halt_on_alert.py", "read_ledger.py"])
def test_example_smoke(tmp_path, script):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--smoke", *([str(out)] if script == "read_ledger.py" else
                          ["--out", str(out)])], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expect = {"sft_with_smda.py": "ledger, policy and credits in", "lora_sft.py": "pairs credited through the adapters",
              "custom_scorer.py": "custom scorer: mean refusal score per category", "halt_on_alert.py": "halted: {'step': 2",
              "read_ledger.py": "plot:"}[script]
    assert expect in proc.stdout, proc.stdout[-2000:]
    if script == "read_ledger.py":
        assert (out / "beta.png").stat().st_size > 1000


def test_ddp_example_two_processes(tmp_path):
    proc = subprocess.run(["bash", str(EXAMPLES / "ddp_torchrun.sh")], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**__import__("os").environ, "MASTER_PORT": str(free_port()), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ledger = (ROOT / "runs" / "example-ddp" / "smda" / "attribution.jsonl").read_text().splitlines()
    assert len(ledger) == 3  # 6 pairs over 2 ranks = 3 steps, written once by rank 0


def _readme_blocks():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_python_blocks_run_as_written(tmp_path, smol_tokenizer, monkeypatch):
    """The blocks use `model`, `tokenizer`, `pairs`, a probe file `probes.jsonl` and an SAE folder
    `path/to/sae`: give them tiny real ones and run every block in order, unchanged."""
    import json

    from datasets import Dataset

    from helpers import pair_records, probe_records
    from smda_callback.lab.testing import tiny_model, tiny_sae

    monkeypatch.chdir(tmp_path)
    Path("probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probe_records()))
    tiny_sae().save_model("path/to/sae")
    ns = {"model": tiny_model(), "tokenizer": smol_tokenizer, "pairs": Dataset.from_list(pair_records(4))}
    blocks = _readme_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)  # noqa: S102 - our own README
    assert (tmp_path / "runs" / "safety" / "smda" / "credits.json").exists()
