"""Building feature cards for an SAE (lab work: it runs the model over text); reading them is `features.py`."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable

import torch

from ..features import card_kind
from .activations import chat_eval_texts, hook_batches

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


def _template_prefix_len(tok: Any) -> int:
    """Tokens of the chat header every turn shares (system prompt and the user tag)."""
    a = tok.apply_chat_template([{"role": "user", "content": "A"}], tokenize=False)
    b = tok.apply_chat_template([{"role": "user", "content": "B"}], tokenize=False)
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    return len(tok(a[:n], add_special_tokens=False)["input_ids"])


@torch.no_grad()
def behaviour_stats(sae: Any, model: Any, tok: Any, layer: int, ctx: int = 128) -> dict[int, dict[str, float]]:
    """Where each latent fires, for the behaviour kinds (features.behaviour_kind):

    * `first_position_share`: its activation mass at positions 1–2 of plain texts (the shipped pairs' prompts
      and responses without the chat template) over its mass on those texts (position 0 is never read);
    * `template_share`: its activation mass on chat-template tokens (the shared system-prompt header, role
      markup and the tokens that open and close a turn) over its mass on the same texts in the template.
    """
    from ..probes import read_jsonl
    from .._resources import DATA

    recs = read_jsonl(DATA / "pairs.jsonl")
    plain = [r["prompt"] for r in recs] + [r["response"] for r in recs]
    chat = chat_eval_texts(tok)
    special = {i for i in tok.all_special_ids}
    header = _template_prefix_len(tok)
    d_sae = int(sae.cfg.d_sae)
    mass = {k: torch.zeros(d_sae, dtype=torch.float64) for k in ("plain", "first", "chat", "template")}
    for texts, kind in ((plain, "plain"), (chat, "chat")):
        for h, ids, mask in hook_batches(model, tok, texts, layer, ctx=ctx):
            z = sae.encode(h.float()).double() * mask[..., None]  # [B, T, d_sae], padding and position 0 zeroed
            mass[kind] += z.sum((0, 1))
            if kind == "plain":
                mass["first"] += z[:, 1:3].sum((0, 1))
            else:
                tmpl = torch.zeros_like(mask)
                tmpl[:, :header] = True
                is_special = torch.isin(ids, torch.tensor(sorted(special)))
                after = torch.zeros_like(is_special)
                after[:, 1:] = is_special[:, :-1]  # the role name after <|im_start|>
                after2 = torch.zeros_like(is_special)
                after2[:, 2:] = is_special[:, :-2]  # and the newline after it
                tmpl |= is_special | after | after2
                mass["template"] += (z * tmpl[..., None]).sum((0, 1))
    eps = 1e-12
    first = (mass["first"] / (mass["plain"] + eps)).tolist()
    tmpl = (mass["template"] / (mass["chat"] + eps)).tolist()
    alive_plain, alive_chat = (mass["plain"] > 0).tolist(), (mass["chat"] > 0).tolist()
    return {j: {"first_position_share": round(first[j], 4) if alive_plain[j] else None,
                "template_share": round(tmpl[j], 4) if alive_chat[j] else None} for j in range(d_sae)}


def add_behaviour_kinds(sae_dir: Any, model: Any, tok: Any, layer: int | None = None) -> dict[str, int]:
    """Measure `behaviour_stats` for an SAE folder's cards, store them in feature_cards.json (kinds re-derived
    on load by features.behaviour_kind); returns the count of each kind."""
    import json
    from pathlib import Path

    from ..features import CARDS, load_cards
    from ..sae import load_sae, resolve_hook

    sae = load_sae(str(sae_dir))
    layer = layer if layer is not None else resolve_hook(sae, model).layer
    stats = behaviour_stats(sae, model, tok, layer)
    path = Path(sae_dir) / CARDS
    raw = json.loads(path.read_text(encoding="utf-8"))
    for j, card in raw.items():
        card.update(stats[int(j)])
    path.write_text(json.dumps(raw), encoding="utf-8")
    kinds = [c["kind"] for c in load_cards(sae_dir).values()]
    return {k: kinds.count(k) for k in sorted(set(kinds))}
