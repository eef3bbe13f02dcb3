"""benchmarks/gpu_check.py in its CPU smoke mode: the one command a GPU session runs must work here too."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("lora", [False, True])
def test_gpu_check_smoke_on_cpu(tmp_path, lora):
    res = _load().main(["--smoke", "--json", str(tmp_path / "r.json")] + (["--lora"] if lora else []))
    assert res["weights_bitwise_identical"] is True  # the callback leaves training bitwise unchanged
    assert res["telescoping_error"] < 1e-9
    assert res["x_rel_err_vs_fp32"] == 0.0 and res["y_abs_err_vs_fp32"] == 0.0  # fp32 on CPU: the same pass
    assert res["callback_s"] > 0 and res["bare_step_s"] > 0 and (tmp_path / "r.json").exists()
    # where the callback's time goes (each step record's seconds_split and seconds_probe): parts of the whole; batch 2,
    # so every step is split by its rows' loss slopes
    assert 0 < res["callback_split_s"] < res["callback_s"] and 0 < res["callback_probe_s"] < res["callback_s"]
    # the replay of the last 2 steps: ran, recomputed the trained weights, left them as trained
    assert res["replay"] == "last 2 steps" and res["replay_weights_left_as_trained"] is True
    assert res["replay_recompute_gap_to_run"] < 1e-6 and res["replay_effects_finite"] is True
    assert res["replay_s_per_step_over_bare_step"] > 0


def test_random_sae_has_the_sae_lens_surface():
    mod = _load()
    import torch

    sae = mod.RandomTopKSAE(16, 64, 4, "blocks.1.hook_resid_post")
    z = sae.encode(torch.randn(5, 16))
    assert z.shape == (5, 64) and int((z > 0).sum(1).max()) <= 4 and sae.decode(z).shape == (5, 16)
