import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import probe_records, tiny_model, tiny_sae
from smda_callback import ProbeSet, SMDAConfig, resolve_hook
from smda_callback.probes import render_prompt
from smda_callback.snapshot import Snapshotter


def _snap(model, tok, sae, **cfg):
    s = Snapshotter(ProbeSet.from_records(probe_records()), tok, sae, resolve_hook(sae, model), SMDAConfig(**cfg))
    full = s.take(model, full=True)
    s.features = np.arange(0, 256, 7)
    return s, full


@pytest.mark.parametrize("pooling", ["mean", "max", "last", "eot"])
@pytest.mark.parametrize("scorer", ["prefix", "first_token"])
def test_shared_prefix_and_batching_do_not_change_x_or_y(smol_tokenizer, pooling, scorer):
    model, sae = tiny_model().eval(), tiny_sae()
    _, a = _snap(model, smol_tokenizer, sae, pooling=pooling, scorer=scorer, share_prefix=True, probe_batch_size=5)
    _, b = _snap(model, smol_tokenizer, sae, pooling=pooling, scorer=scorer, share_prefix=False, probe_batch_size=1)
    np.testing.assert_allclose(a.Z, b.Z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.Y, b.Y, rtol=1e-4, atol=1e-7)


def test_prefix_scorer_matches_one_forward_per_continuation(smol_tokenizer):
    model, sae = tiny_model().eval(), tiny_sae()
    s, snap = _snap(model, smol_tokenizer, sae, target="logit")
    sc = s.scorer
    for i, rec in enumerate(probe_records()[:3]):
        ids = smol_tokenizer(render_prompt(smol_tokenizer, rec["prompt"]), add_special_tokens=False)["input_ids"]
        tot = []
        for cont in sc.r + sc.c:
            with torch.no_grad():
                lp = F.log_softmax(model(input_ids=torch.tensor([ids + cont])).logits[0].float(), -1)
            tot.append(sum(float(lp[len(ids) - 1 + j, cont[j]]) for j in range(len(cont))))
        tot = torch.tensor(tot)
        naive = float(torch.logsumexp(tot[: len(sc.r)], 0) - torch.logsumexp(tot[len(sc.r):], 0))
        assert abs(naive - snap.Y[i]) < 1e-4


def test_snapshot_restores_mode_and_rng(smol_tokenizer):
    model, sae = tiny_model(), tiny_sae()
    model.train()
    torch.manual_seed(123)
    expect = torch.rand(3)
    torch.manual_seed(123)
    _snap(model, smol_tokenizer, sae)
    assert model.training
    assert torch.equal(torch.rand(3), expect)


def test_bf16_model_with_fp32_sae(smol_tokenizer):
    """Dtype mismatch between model and SAE: activations are cast to the SAE's dtype, results finite."""
    model, sae = tiny_model().to(torch.bfloat16).eval(), tiny_sae()
    _, snap = _snap(model, smol_tokenizer, sae)
    assert snap.finite and snap.Z.dtype == np.float64 and np.abs(snap.Z).sum() > 0


def test_probe_pass_creates_no_tensor_off_the_model_device(smol_tokenizer):
    """Under `torch.device("meta")` every tensor made without an explicit device is a meta tensor, so a probe
    pass that built one (ids, masks, positions, index tensors) fails at the first copy; the model and SAE sit on
    the CPU. Checked on d50a4de: its probe pass fails here ("Cannot copy out of meta tensor")."""
    model, sae = tiny_model().eval(), tiny_sae()
    ref_s, ref = _snap(model, smol_tokenizer, sae, scorer="prefix")
    for scorer in ("prefix", "first_token"):
        s = Snapshotter(ProbeSet.from_records(probe_records()), smol_tokenizer, sae, resolve_hook(sae, model),
                        SMDAConfig(scorer=scorer))
        with torch.device("meta"):
            full = s.take(model, full=True)
            s.features = ref_s.features
            part = s.take(model)
        assert full.finite and part.finite and full.fve is not None
        if scorer == "prefix":
            np.testing.assert_allclose(full.Z, ref.Z, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(full.Y, ref.Y, rtol=1e-6, atol=1e-9)


def test_dtypes_on_a_bf16_model(smol_tokenizer):
    """The documented dtypes: the probe forward runs in the weights' dtype (bf16 here), hook activations are
    cast to the SAE's dtype (`sae_dtype`, fp32 by default) before encoding, X and Y come back as float64."""
    model, sae = tiny_model().to(torch.bfloat16).eval(), tiny_sae()
    s = Snapshotter(ProbeSet.from_records(probe_records()), smol_tokenizer, sae, resolve_hook(sae, model), SMDAConfig())
    seen = {}
    orig = s.encode

    def spy(h, full=False):
        seen.setdefault("hook", h.dtype)
        z = orig(h, full)
        seen.setdefault("z", z.dtype)
        return z

    s.encode = spy
    snap = s.take(model, full=True)
    assert seen == {"hook": torch.bfloat16, "z": torch.float32}
    assert sae.W_enc.dtype == torch.float32 and snap.X.dtype == np.float64 and snap.Y.dtype == np.float64
    s2 = Snapshotter(ProbeSet.from_records(probe_records()), smol_tokenizer, tiny_sae(), resolve_hook(sae, model),
                     SMDAConfig(sae_dtype="bfloat16"))
    s2.take(model, full=True)
    assert s2.sae.W_enc.dtype == torch.bfloat16  # moved once, in the configured dtype


def test_sae_fve_is_measured_on_the_probes(smol_tokenizer):
    """The baseline pass reports how much of the hook activations the SAE reconstructs: a random SAE explains
    almost nothing (below the warning threshold), an SAE whose decoder is the identity explains everything."""
    model = tiny_model().eval()
    sae = tiny_sae()
    _, snap = _snap(model, smol_tokenizer, sae)
    assert snap.fve is not None and snap.fve < SMDAConfig().min_sae_fve
    ident = tiny_sae(arch="standard")
    d = int(ident.cfg.d_in)
    with torch.no_grad():  # encode relu(x)|relu(−x), decode relu(x) − relu(−x) = x: a perfect reconstruction
        ident.W_enc.zero_(); ident.W_dec.zero_(); ident.b_enc.zero_(); ident.b_dec.zero_()
        ident.W_enc[:d, :d] = torch.eye(d); ident.W_enc[:d, d:2 * d] = -torch.eye(d)
        ident.W_dec[:d, :d] = torch.eye(d); ident.W_dec[d:2 * d, :d] = -torch.eye(d)
    _, snap2 = _snap(model, smol_tokenizer, ident)
    assert snap2.fve == pytest.approx(1.0, abs=1e-4)
