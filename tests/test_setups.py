"""Real training setups: LoRA, batches + accumulation, checkpoint/resume after SIGKILL, determinism."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import run_sft, tiny_model, tiny_sae
from smda_callback import SMDAConfig, load_records


def _telescopes(run_dir):
    recs = load_records(run_dir)
    policy = json.loads((Path(run_dir) / "smda" / "policy.json").read_text())
    total = np.sum([r["delta_beta"] for r in recs], axis=0)
    np.testing.assert_allclose(total, np.subtract(policy["beta_final"], policy["beta_0"]), atol=1e-9)
    return recs


@pytest.mark.parametrize("how", ["peft_config", "prewrapped"])
def test_lora(tmp_path, smol_tokenizer, how):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    model = tiny_model()
    extra = {}
    if how == "prewrapped":
        model = get_peft_model(model, lora)
    else:
        extra["peft_config"] = lora
    run_sft(tmp_path, model, smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8), max_steps=3, learning_rate=5e-2,
            report_to=[], trainer_kwargs=extra)
    recs = _telescopes(tmp_path)
    assert len(recs) == 3 and all(r["pairs"][0]["index"] is not None for r in recs)
    assert sum(np.abs(r["delta_beta"]).sum() for r in recs) > 0  # the adapters moved the policy


@pytest.mark.parametrize("rule", ["step", "optimizer"])
def test_batches_and_accumulation_list_every_pair_once_per_step(tmp_path, smol_tokenizer, rule):
    _, _, seen = run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8, credit=rule), max_steps=2,
                         per_device_train_batch_size=2, gradient_accumulation_steps=2, record_rows=True, report_to=[],
                         pairs=8, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2)
    recs = _telescopes(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
    for k, r in enumerate(recs):
        shares = [p["credit"] for p in r["pairs"]]
        assert r["n_pairs"] == 4 and r["split"] and sum(shares) == pytest.approx(1.0, abs=1e-12)
        if rule == "step":
            assert shares == [0.25] * 4
        else:  # split by each row's first-order contribution to the update, not 1/n
            assert np.ptp(shares) > 1e-3
        assert sorted(p["index"] for p in r["pairs"]) == sorted(seen[4 * k: 4 * k + 4])
    # eval forwards (train mode off) and our own probe forwards are never captured
    assert len(seen) == 8 and sorted(p["index"] for r in recs for p in r["pairs"]) == sorted(range(8))


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from transformers import AutoTokenizer
    from helpers import run_sft, tiny_model, tiny_sae
    from smda_callback import SMDAConfig
    from smda_callback.lab.models import embedded_model_dir
    out, resume, delay = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    if delay:
        from transformers import TrainerCallback
        import time
        class Slow(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                time.sleep(delay)
        extra = {{"callbacks_extra": [Slow()]}}
    else:
        extra = {{}}
    run_sft(out, tiny_model(), tok, tiny_sae(), SMDAConfig(n_features=8), max_steps=8, save_strategy="steps", save_steps=2,
            report_to=[], pairs=8, resume=resume, **extra)
""")


def _run(script, out, resume, delay, wait=True):
    cmd = [sys.executable, str(script), str(out), "1" if resume else "0", str(delay)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600) if wait else subprocess.Popen(cmd)


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    ref = _run(script, tmp_path / "ref", False, 0)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = _run(script, tmp_path / "run", False, 1.5, wait=False)
    ledger = tmp_path / "run" / "smda" / "attribution.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once step 5 is logged (checkpoint-4 exists, step 5 is past it)
        if ledger.exists() and len(ledger.read_text().splitlines()) >= 5:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "run" / "checkpoint-4").is_dir()
    res = _run(script, tmp_path / "run", True, 0)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = load_records(tmp_path / "ref"), load_records(tmp_path / "run")
    assert [r["step"] for r in b] == list(range(1, 9))  # every step exactly once
    for ra, rb in zip(a, b):
        assert ra["pairs"][0]["hash"] == rb["pairs"][0]["hash"]
        np.testing.assert_allclose(ra["delta_beta"], rb["delta_beta"], atol=1e-6)
    pa = json.loads((tmp_path / "ref" / "smda" / "policy.json").read_text())
    pb = json.loads((tmp_path / "run" / "smda" / "policy.json").read_text())
    np.testing.assert_allclose(pa["beta_final"], pb["beta_final"], atol=1e-6)
    # the optimizer-credit state (live momentum, per-pair totals) came back from checkpoint-4
    ca, cb = (json.loads((tmp_path / n / "smda" / "credits.json").read_text()) for n in ("ref", "run"))
    assert sorted(x["hash"] for x in ca["pairs"]) == sorted(x["hash"] for x in cb["pairs"])
    tb = {x["hash"]: x["d"] for x in cb["pairs"]}
    for x in ca["pairs"]:
        np.testing.assert_allclose(x["d"], tb[x["hash"]], atol=1e-6)


def test_same_seed_same_ledger(tmp_path, smol_tokenizer):
    for name in ("a", "b"):
        run_sft(tmp_path / name, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8), max_steps=3, report_to=[])
    a, b = load_records(tmp_path / "a"), load_records(tmp_path / "b")
    for ra, rb in zip(a, b):
        for r in (ra, rb):  # wall times: the whole callback, the in-step split, the probe pass
            assert r.pop("seconds") >= r.pop("seconds_split") >= 0 and r.pop("seconds_probe") > 0
        assert ra == rb  # bitwise: same floats written


def test_nonfinite_snapshot_is_skipped_not_poisoning_beta(tmp_path, smol_tokenizer):
    import torch

    calls = {"n": 0}

    def scorer(model, ids, mask):
        calls["n"] += 1
        y = torch.rand(ids.shape[0], generator=torch.Generator().manual_seed(calls["n"]))
        return torch.full_like(y, float("nan")) if calls["n"] == 3 else y  # the 2nd step's snapshot

    run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8, probe_batch_size=64),
            max_steps=4, report_to=[], callback_kwargs={"scorer": scorer})
    recs = load_records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert "NaN/Inf" in recs[1]["skipped"] and "beta" not in recs[1]
    good = [r for r in recs if "beta" in r]
    policy = json.loads((tmp_path / "smda" / "policy.json").read_text())
    assert policy["skipped_steps"] == 1 and np.isfinite(policy["beta_final"]).all()
    np.testing.assert_allclose(np.sum([r["delta_beta"] for r in good], axis=0),
                               np.subtract(policy["beta_final"], policy["beta_0"]), atol=1e-9)


def test_unwritable_output_dir_reports_once_and_training_goes_on(tmp_path, smol_tokenizer, caplog):
    (tmp_path / "smda").write_text("a file where the smda/ folder should go")
    trainer, _, _ = run_sft(tmp_path, tiny_model(), smol_tokenizer, tiny_sae(), SMDAConfig(n_features=8), max_steps=3,
                            report_to=[])
    assert trainer.state.global_step == 3
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "smda: cannot write" in r.getMessage()]
    assert len(errors) == 1
