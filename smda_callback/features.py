"""Feature cards: what an SAE latent is, from the contexts it fires on.

A card holds a latent's top activating contexts from held-out text (windows of ±8 tokens with the
activating token marked «like this»), a short label made of the activating tokens that are
*distinctive* for it (frequent among its top hits, rare in the text at large: count × idf), and a
`kind`:

* `format`: at least half of its top hits fire on whitespace, punctuation or chat-template markup;
* `function-word`: otherwise, at least half fire on a closed-class word (articles, pronouns,
  auxiliaries, prepositions, conjunctions, question words: FUNCTION_WORDS below);
* `content`: everything else;
* `dead`: never active on the held-out text (never selected).

The policy selects `content` features by default (SMDAConfig.feature_kinds) so that it says what
a prompt is about rather than how it is punctuated, and alerts ignore `format` features.
Cards ship with the SAE (`feature_cards.json`); `smda features ID…` prints them.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .config import KINDS

CARDS = "feature_cards.json"

FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no all both either neither
i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
myself yourself himself herself itself ourselves themselves one ones
is am are was were be been being do does did done have has had having will would shall should
can could may might must ought 's 're 've 'd 'll 'm n't not
of in on at by for with about against between into through during before after above below to from
up down out off over under again further then once than as like until while since
and or but nor so yet if because although though unless whether also too very just only even
what which who whom whose when where why how there here
""".split())

_MARK = re.compile(r"^<\|.*\|>$")


def token_kind(text: str) -> str:
    """The kind of one activating token (used by the card rule)."""
    t = text.strip().lower()
    if not t or _MARK.match(t) or not any(ch.isalnum() for ch in t):
        return "format"
    if t in FUNCTION_WORDS or t.lstrip("'") in FUNCTION_WORDS:
        return "function-word"
    return "content"


def card_kind(tokens: Sequence[str], share: float = 0.5) -> str:
    """`format` / `function-word` when at least `share` of the top hits are of that kind, else `content`."""
    if not tokens:
        return "content"
    counts = Counter(token_kind(t) for t in tokens)
    for kind in ("format", "function-word"):
        if counts[kind] / len(tokens) >= share:
            return kind
    return "content"


def _show(text: str) -> str:
    return text.replace("\n", "⏎").strip() or "␣"


def build_cards(sae: Any, model: Any, tok: Any, texts: Iterable[str], layer: int, n_tokens: int = 80_000,
                top: int = 12, window: int = 8) -> dict[str, dict[str, Any]]:
    """Top contexts, distinctive label and kind for every latent of `sae` over `texts`."""
    from .sae_train import _hook_batches

    d_sae = int(sae.cfg.d_sae)
    best_v = torch.full((top, d_sae), -1.0)
    best_i = torch.zeros((top, d_sae), dtype=torch.long)
    rows: list[list[int]] = []
    flat_doc: list[int] = []
    flat_pos: list[int] = []
    freq: Counter[int] = Counter()
    seen = 0
    with torch.no_grad():
        for h, ids, mask in _hook_batches(model, tok, list(texts), layer, ctx=128):
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


def load_cards(sae_dir: str | Path | None) -> dict[int, dict[str, Any]]:
    """Cards shipped next to an SAE (empty when it has none)."""
    if sae_dir is None:
        return {}
    path = Path(sae_dir) / CARDS
    if not path.exists():
        return {}
    return {int(k): v for k, v in json.loads(path.read_text(encoding="utf-8")).items()}


def format_card(j: int, card: dict[str, Any], top: int = 10) -> str:
    lines = [f"f{j}  {card['label']}  [{card['kind']}]  max activation {card.get('max_activation', 0):.3g}"]
    for c in card["contexts"][:top]:
        lines.append(f"  {c['activation']:8.3f}  {c['text']}")
    return "\n".join(lines)


__all__ = ["CARDS", "FUNCTION_WORDS", "KINDS", "build_cards", "card_kind", "format_card", "load_cards", "token_kind"]
