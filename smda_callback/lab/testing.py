"""Tiny random models and real sae-lens SAEs of the same shape as real ones, for smoke runs and tests.

Used by `examples/* --smoke` and the test suite: a 4-layer Llama/Qwen2 with hidden size 64 and a
TopK (or standard) SAE on one of its residual hooks train and probe in well under a second a step.
"""

from __future__ import annotations

from typing import Any

import torch


def tiny_model(arch: str = "llama", vocab: int = 49152, hidden: int = 64, layers: int = 4, seed: int = 0) -> Any:
    """A randomly initialised causal LM with the embedded model's vocabulary (so its tokenizer works)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                  pad_token_id=2, eos_token_id=2, bos_token_id=1)
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def tiny_sae(d_in: int = 64, d_sae: int = 256, layer: int = 2, kind: str = "post", seed: int = 0, arch: str = "topk") -> Any:
    """A real sae-lens SAE (TopK k=16, or standard ReLU) reading `blocks.{layer}.hook_resid_{kind}`."""
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_{kind}", model_name="tiny-random")
    if arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=16, metadata=meta))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    with torch.no_grad():
        for p in sae.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) / d_in**0.5)
        sae.b_enc.zero_()
    return sae





def model_tokenizer_sae(smoke: bool) -> tuple[Any, Any, Any]:
    """(model, tokenizer, sae) for the examples: the embedded SmolLM2 + shipped SAE, or with
    `smoke` a tiny random model + tiny SAE (same tokenizer) that runs in seconds."""
    from transformers import AutoTokenizer

    from .models import embedded_model_dir, load_model
    from ..sae import embedded_sae_dir

    if smoke:
        return tiny_model(), AutoTokenizer.from_pretrained(str(embedded_model_dir())), tiny_sae()
    model, tok = load_model()
    return model, tok, str(embedded_sae_dir())
__all__ = ["model_tokenizer_sae", "tiny_model", "tiny_sae"]
