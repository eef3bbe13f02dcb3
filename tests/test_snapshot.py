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
