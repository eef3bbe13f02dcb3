import torch

from helpers import tiny_model, tiny_sae
from smda_callback.sae_train import collect_activations, label_features

TEXTS = ["The quick brown fox jumps over the lazy dog."] * 5 + ["Hello world, this is a test of activations."] * 5


def test_activation_iterator_stops_at_the_hook_and_skips_position_zero(smol_tokenizer):
    model = tiny_model().eval()
    acts = collect_activations(model, smol_tokenizer, TEXTS, layer=2, n_tokens=60, ctx=32, batch=4)
    assert acts.shape == (60, 64) and acts.dtype == torch.bfloat16
    ids = smol_tokenizer(TEXTS[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[3][0]
    torch.testing.assert_close(acts[: len(h) - 1].float(), h[1:].to(torch.bfloat16).float())


def test_labels_name_every_latent(smol_tokenizer):
    labels = label_features(tiny_sae(), smol_tokenizer, tiny_model().eval(), TEXTS, layer=2, n_tokens=50)
    assert len(labels) == 256 and any(v != "dead" for v in labels.values())
