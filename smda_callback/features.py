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

Where a latent fires overrides what it fires on (`behaviour_kind`, measured by
`lab/cards.behaviour_stats` and stored in the cards; the card-only rules work on any cards):

* `position`: a position / attention-sink / massive-activation latent: at least 30 % of its activation
  mass on plain texts lies at positions 1–2 (`first_position_share ≥ 0.3`; on the shipped SAE the median
  latent has 0.016 and the 96th percentile 0.3, so 0.3 is ≥ 19× the typical concentration), or the median
  of its top activations is ≥ 10× the median over live latents of their maximum (the shipped SAE: median
  maximum 26; such latents reach 1,000–9,500 on the first word piece of a text), or a mixed latent whose
  maximum is ≥ 10× that median while ≥ 10 % of its mass lies at positions 1–2 (it also reads ordinary
  tokens, but its largest activations are the same first-word-piece sink: f1709 reads 912 on "Exc«av»ations"
  and 30 on "Stevens"; 16 latents of the shipped SAE, all with that same top context);
* `template`: fires on the chat template rather than on what a user wrote: at least 80 % of its activation
  mass on chat texts lies on template tokens (the shared system-prompt header, role markup; they are about
  half of the tokens of a short chat turn, so 0.8 means strongly concentrated), or at most a quarter of its
  top contexts are distinct (one system-prompt context repeated).

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


FIRST_POSITION_SHARE = 0.3
MASSIVE_RATIO = 10.0
MIXED_POSITION_SHARE = 0.1
TEMPLATE_SHARE = 0.8
MAX_DISTINCT_SHARE = 0.25


def behaviour_kind(card: dict[str, Any], median_max: float) -> str | None:
    """`position` / `template` from where the latent fires (thresholds above), else None."""
    if card.get("kind") == "dead" or not card.get("contexts"):
        return None
    first = card.get("first_position_share")
    top = sorted((float(c["activation"]) for c in card["contexts"]), reverse=True)
    if (first is not None and first >= FIRST_POSITION_SHARE) or top[len(top) // 2] >= MASSIVE_RATIO * median_max:
        return "position"
    if first is not None and first >= MIXED_POSITION_SHARE and top[0] >= MASSIVE_RATIO * median_max:
        return "position"  # mixed: reads ordinary tokens too, but its largest activations are the sink
    tmpl = card.get("template_share")
    distinct = len({c["text"] for c in card["contexts"]}) / len(card["contexts"])
    if (tmpl is not None and tmpl >= TEMPLATE_SHARE) or (len(card["contexts"]) >= 4 and distinct <= MAX_DISTINCT_SHARE):
        return "template"
    return None


def load_cards(sae_dir: str | Path | None) -> dict[int, dict[str, Any]]:
    """Cards shipped next to an SAE (empty when it has none), `kind` re-derived: the behaviour kind where one
    applies, else the token rule's (kept as `token_kind`)."""
    if sae_dir is None:
        return {}
    path = Path(sae_dir) / CARDS
    if not path.exists():
        return {}
    cards = {int(k): v for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    maxima = [float(c.get("max_activation", 0.0)) for c in cards.values() if c.get("kind") != "dead"]
    median_max = float(sorted(maxima)[len(maxima) // 2]) if maxima else 0.0
    for c in cards.values():
        c.setdefault("token_kind", c.get("kind"))
        c["kind"] = behaviour_kind(c, median_max) or c["token_kind"]
    return cards


def format_card(j: int, card: dict[str, Any], top: int = 10) -> str:
    lines = [f"f{j}  {card['label']}  [{card['kind']}]  max activation {card.get('max_activation', 0):.3g}"]
    if card.get("first_position_share") is not None or card.get("template_share") is not None:
        lines.append(f"  where it fires: first-position share {card.get('first_position_share')}, template share "
                     f"{card.get('template_share')} (position ≥ {FIRST_POSITION_SHARE}, template ≥ {TEMPLATE_SHARE})")
    for c in card["contexts"][:top]:
        lines.append(f"  {c['activation']:8.3f}  {c['text']}")
    return "\n".join(lines)


__all__ = ["CARDS", "FUNCTION_WORDS", "KINDS", "behaviour_kind", "card_kind", "format_card", "load_cards", "token_kind"]
