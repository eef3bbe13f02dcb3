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
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence


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


__all__ = ["CARDS", "FUNCTION_WORDS", "KINDS", "card_kind", "format_card", "load_cards", "token_kind"]
