"""Building feature cards for an SAE (lab work: it runs the model over text); reading them is `features.py`."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable

import torch

from ..features import card_kind
from .activations import hook_batches

def _show(text: str) -> str:
    return text.replace("\n", "⏎").strip() or "␣"


def build_cards(sae: Any, model: Any, tok: Any, texts: Iterable[str], layer: int, n_tokens: int = 80_000,
                top: int = 12, window: int = 8) -> dict[str, dict[str, Any]]:
    """Top contexts, distinctive label and kind for every latent of `sae` over `texts`."""
    d_sae = int(sae.cfg.d_sae)
    best_v = torch.full((top, d_sae), -1.0)
    best_i = torch.zeros((top, d_sae), dtype=torch.long)
    rows: list[list[int]] = []
    flat_doc: list[int] = []
    flat_pos: list[int] = []
    freq: Counter[int] = Counter()
    seen = 0
    with torch.no_grad():
        for h, ids, mask in hook_batches(model, tok, list(texts), layer, ctx=128):
            base = len(rows)
            for r in range(ids.shape[0]):
                rows.append(ids[r][: int(mask[r].nonzero().max()) + 1 if mask[r].any() else 0].tolist())
            where = mask.nonzero()
            flat_doc += (where[:, 0] + base).tolist()
            flat_pos += where[:, 1].tolist()
            freq.update(ids[mask].tolist())
            z = sae.encode(h[mask].float())
            offset = seen
            seen += z.shape[0]
            v, i = torch.cat([best_v, z]).topk(top, dim=0)
            cand = torch.cat([best_i, torch.arange(offset, seen)[:, None].expand(-1, d_sae)])
            best_v, best_i = v, cand.gather(0, i)
            if seen >= n_tokens:
                break
    total = sum(freq.values())
    cards: dict[str, dict[str, Any]] = {}
    for j in range(d_sae):
        hits = [(float(v), int(i)) for v, i in zip(best_v[:, j], best_i[:, j]) if v > 0]
        if not hits:
            cards[str(j)] = {"label": "dead", "kind": "dead", "contexts": [], "max_activation": 0.0}
            continue
        contexts, act_tokens, act_ids = [], [], []
        for v, i in hits:
            doc, pos = flat_doc[i], flat_pos[i]
            ids = rows[doc]
            left = tok.decode(ids[max(0, pos - window): pos])
            mid = tok.decode([ids[pos]])
            right = tok.decode(ids[pos + 1: pos + 1 + window])
            contexts.append({"text": f"{_show(left)} «{_show(mid)}» {_show(right)}", "activation": round(v, 3)})
            act_tokens.append(mid)
            act_ids.append(ids[pos])
        score: Counter[int] = Counter()
        for t in act_ids:
            score[t] += math.log((total + 1) / (freq[t] + 1))
        label = "/".join(_show(tok.decode([t])) for t, _ in score.most_common(3))
        cards[str(j)] = {"label": label, "kind": card_kind(act_tokens), "contexts": contexts,
                         "max_activation": round(hits[0][0], 3)}
    return cards
