import torch

from helpers import tiny_model, tiny_sae
from smda_callback.features import build_cards, card_kind, token_kind
from smda_callback.sae_train import collect_activations

TEXTS = ["The quick brown fox jumps over the lazy dog."] * 5 + ["Hello world, this is a test of activations."] * 5


def test_activation_iterator_stops_at_the_hook_and_skips_position_zero(smol_tokenizer):
    model = tiny_model().eval()
    acts = collect_activations(model, smol_tokenizer, TEXTS, layer=2, n_tokens=60, ctx=32, batch=4)
    assert acts.shape == (60, 64) and acts.dtype == torch.bfloat16
    ids = smol_tokenizer(TEXTS[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[3][0]
    torch.testing.assert_close(acts[: len(h) - 1].float(), h[1:].to(torch.bfloat16).float())


def test_cards_name_every_latent_with_marked_contexts(smol_tokenizer):
    cards = build_cards(tiny_sae(), tiny_model().eval(), smol_tokenizer, TEXTS, layer=2, n_tokens=200, top=4)
    assert len(cards) == 256
    live = [c for c in cards.values() if c["label"] != "dead"]
    assert live and all(c["kind"] in ("content", "format", "function-word") for c in live)
    assert all(c["kind"] == "dead" for c in cards.values() if c["label"] == "dead")
    for c in live:
        acts = [x["activation"] for x in c["contexts"]]
        assert acts == sorted(acts, reverse=True) and all("«" in x["text"] and "»" in x["text"] for x in c["contexts"])
        # the marked token is one of the texts' tokens in its real neighbourhood
        assert any(x["text"].replace("«", "").replace("»", "").split()[0] in " ".join(TEXTS) for x in c["contexts"])


def test_kind_rule():
    assert [token_kind(t) for t in (" ,", "\n", "<|im_end|>", " the", " What", "n't", " bomb", " Muslims")] == [
        "format", "format", "format", "function-word", "function-word", "function-word", "content", "content"]
    assert card_kind([" .", " ,", " bomb"]) == "format" and card_kind([" the", " of", " bomb"]) == "function-word"
    assert card_kind([" bomb", " gun", " ."]) == "content"
