import pytest
import torch

from helpers import tiny_model, tiny_sae
from smda_callback import load_sae, resolve_hook
from smda_callback.sae import decoder_layers


def test_resid_post_matches_hidden_states_and_pre_is_layer_input():
    model = tiny_model(layers=4).eval()
    ids = torch.randint(10, 1000, (1, 7))
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    for kind, expect in (("post", hs[3]), ("pre", hs[2])):
        hook = resolve_hook(tiny_sae(layer=2, kind=kind), model)
        got = {}
        h = hook.register(model, lambda x: got.__setitem__("h", x))
        with torch.no_grad():
            model(input_ids=ids)
        h.remove()
        torch.testing.assert_close(got["h"], expect)


def test_width_mismatch():
    with pytest.raises(ValueError, match=r"SAE width mismatch: the SAE reads d_in=32 but the model's hidden size is 64"):
        resolve_hook(tiny_sae(d_in=32), tiny_model())


def test_layer_out_of_range():
    with pytest.raises(ValueError, match=r"needs layer 9, but the model has only 4 decoder layers"):
        resolve_hook(tiny_sae(layer=9), tiny_model())


def test_unsupported_hook():
    sae = tiny_sae()
    sae.cfg.metadata.hook_name = "blocks.2.attn.hook_z"
    with pytest.raises(ValueError, match=r"not supported: smda reads the residual stream"):
        resolve_hook(sae, tiny_model())


def test_other_model_family_warns():
    sae = tiny_sae()
    sae.cfg.metadata.model_name = "gemma-2-2b"
    model = tiny_model()
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.warns(UserWarning, match="trained on 'gemma-2-2b'"):
        resolve_hook(sae, model)


def test_finds_layers_through_peft():
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert decoder_layers(peft_model) is decoder_layers(model)


def test_load_from_disk_roundtrip_and_refusals(tmp_path):
    sae = tiny_sae()
    sae.save_model(str(tmp_path / "sae"))
    loaded = load_sae(tmp_path / "sae")
    x = torch.randn(5, 64)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    assert load_sae(sae) is sae
    pickled = tmp_path / "sae.pt"
    torch.save(sae.state_dict(), pickled)
    with pytest.raises(ValueError, match="refusing to load a pickle-format file"):
        load_sae(pickled)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="needs cfg.json and sae_weights.safetensors"):
        load_sae(tmp_path / "empty")
    with pytest.raises(TypeError, match="pass an sae_lens.SAE"):
        load_sae(42)


def test_shipped_sae_loads_and_fits_the_embedded_model():
    from smda_callback import embedded_sae_dir
    from smda_callback.sae import load_feature_labels

    sae = load_sae(embedded_sae_dir())
    assert sae.cfg.d_in == 576 and sae.cfg.metadata.hook_name.startswith("blocks.")
    labels = load_feature_labels(embedded_sae_dir(), sae.cfg.d_sae)
    assert len(labels) == sae.cfg.d_sae and sum(len(l) > 6 for l in labels) > sae.cfg.d_sae // 2
