"""Residual-stream activations after a decoder layer, batch by batch (SAE training and card building)."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from .._resources import DATA
from ..sae import decoder_layers


class _Stop(Exception):
    pass


@torch.no_grad()
def hook_batches(model: Any, tok: Any, texts: list[str], layer: int, ctx: int, batch: int = 16) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(hidden [B,T,d] after decoder layer `layer`, input_ids, usable-token mask) per batch of texts.

    Stops each forward at the hook (no wasted layers); the mask drops padding and position 0
    (an attention sink with an outlier norm).
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(_m: Any, _i: Any, out: Any) -> None:
        captured["h"] = out[0] if isinstance(out, tuple) else out
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    tok.padding_side = "right"
    try:
        for i in range(0, len(texts), batch):
            enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, truncation=True, max_length=ctx, add_special_tokens=False)
            try:
                model(**enc)
            except _Stop:
                pass
            mask = enc["attention_mask"].bool().clone()
            mask[:, 0] = False
            yield captured["h"].float(), enc["input_ids"], mask
    finally:
        handle.remove()


def collect_activations(model: Any, tok: Any, texts: list[str], layer: int, n_tokens: int | None, ctx: int,
                        batch: int = 16) -> torch.Tensor:
    """Residual stream after decoder layer `layer` for up to n_tokens tokens (None: every text), without
    tokens whose norm is >10x the batch median (attention sinks)."""
    buf: list[torch.Tensor] = []
    total = 0
    with tqdm(total=n_tokens, desc=f"activations L{layer}", unit="tok") as bar:
        for h, _, mask in hook_batches(model, tok, texts, layer, ctx, batch):
            norms = h.norm(dim=-1)
            mask &= norms < 10 * norms[mask].median()
            acts = h[mask]
            buf.append(acts.to(torch.bfloat16))
            total += len(acts)
            bar.update(len(acts))
            if n_tokens is not None and total >= n_tokens:
                break
    return torch.cat(buf)[:n_tokens]


def chat_eval_texts(tok: Any) -> list[str]:
    """Chat-formatted turns the SAE never saw: the demo's pairs (prompt and response) and the
    prompts of the probe and held-out sets, in the model's template, as the callback reads them."""
    from ..probes import read_jsonl

    data = DATA
    turns = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
             for r in read_jsonl(data / "pairs.jsonl")]
    turns += [[{"role": "user", "content": r["prompt"]}] for f in ("probes", "heldout") for r in read_jsonl(data / f"{f}.jsonl")]
    return [tok.apply_chat_template(t, tokenize=False, add_generation_prompt=len(t) == 1) for t in turns]
