import torch

from helpers import tiny_model, tiny_sae
from smda_callback.features import card_kind, token_kind
from smda_callback.lab.cards import build_cards
from smda_callback.lab.sae_train import collect_activations

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


def test_fit_sae_trains_at_unit_scale_and_ships_raw_scale_weights(tmp_path):
    """Residual streams have norms in the hundreds; the fit runs on rescaled activations and folds the
    factor into the saved weights, so the SAE loaded from disk reconstructs raw activations."""
    from smda_callback.lab.sae_train import SAETrainSpec, fit_sae, sae_quality

    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(48, 16, generator=g)
    codes = torch.relu(torch.randn(12_288, 48, generator=g) - 1.0)
    x = (codes @ dirs) * 60 + 25  # norms ~ 10²: the raw scale of a real residual stream
    spec = SAETrainSpec(layer=2, d_sae=64, k=6, batch=256, epochs=2, dead_feature_window=20)
    sae = fit_sae(x[1024:], spec, 16, tmp_path)
    assert (tmp_path / "sae_weights.safetensors").exists() and sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    q = sae_quality(sae, x[:1024])
    assert q["fve"] > 0.6 and q["l0"] == 6.0, q


def test_the_shipped_sae_reconstructs_prompts_it_never_saw():
    """The shipped SAE against the real model on the held-out prompts (chat template), with the
    quality recorded next to it: a stale or mismatched SAE fails here."""
    import json

    from smda_callback.lab.models import load_model
    from smda_callback.probes import read_jsonl
    from smda_callback.sae import embedded_sae_dir, load_sae
    from smda_callback.lab.sae_train import sae_quality

    model, tok = load_model()
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True)
             for r in read_jsonl(embedded_sae_dir().parent / "heldout.jsonl")]
    record = json.loads((embedded_sae_dir() / "smda_training.json").read_text())
    acts = collect_activations(model.eval(), tok, texts, record["spec"]["layer"], None, ctx=128)
    q = sae_quality(load_sae(embedded_sae_dir()), acts)
    assert q["fve"] >= 0.75 and abs(q["fve"] - record["quality"]["fve_chat"]) < 0.1, (q, record["quality"])
