"""`smda curate`: drop or fix the pairs a run's credit ranks most suspect for a behaviour.

--drop N removes the N most suspect pairs; --fix N keeps them but replaces the response of the
harmless ones by the base model's own greedy answer (the way the demo's helpful answers were made;
an answer that itself opens with a refusal is not used and the pair is dropped instead). Harmful
pairs are never "fixed" into compliance. No label loses more than `max_label_share` of its pairs.
Every change is printed with why: the pair's credited pathway split, its top features and the
probe category it moved most.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .probing import REFUSAL_PATTERN


def explain(row: dict[str, Any], labels: Sequence[str], n_features: int = 3) -> str:
    """One line: pathway split, top features and the category moved most by the pair's credit."""
    dx, dy = np.abs(np.asarray(row["dx"])).sum(), np.abs(np.asarray(row["dy"])).sum()
    d = np.asarray(row["d"])
    feats = ", ".join(f"{labels[j]} {d[j]:+.2g}" for j in np.argsort(-np.abs(d))[:n_features])
    cat, move = max(row["measured"].items(), key=lambda kv: abs(kv[1]))
    share = dx / (dx + dy) if dx + dy > 0 else float("nan")
    return f"pathway ΔX {share:.0%} / ΔY {1 - share:.0%}; features {feats}; moved {cat} {move:+.3f}"


def curate(run_dir: str | Path, pairs: list[dict[str, Any]], target: str, n: int, mode: str = "drop",
           max_label_share: float = 0.25, answer: Any = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(curated pairs, changes). `answer(prompts) -> list[str]` gives the replacement responses for --fix."""
    from .analysis import pair_rows, suspects
    from ..ledger import load_credits, load_policy, load_records

    credits = load_credits(run_dir)
    if credits is None:
        raise ValueError(f"{run_dir}: no credits.json; curate needs an in-training run of SMDACallback.")
    records, policy = load_records(run_dir), load_policy(run_dir)
    ranked = suspects(records, policy, credits, target)
    rows = {r["id"]: r for r in pair_rows(records, credits)}
    by_id = {p["id"]: p for p in pairs}
    missing = [i for i in ranked["id"] if i not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} credited pairs (e.g. {missing[0]!r}) are not in the pairs file; pass the file the run trained on.")
    cap = {lab: int(max_label_share * sum(p["label"] == lab for p in pairs)) for lab in ("harmful", "harmless")}
    chosen: list[str] = []
    taken = {"harmful": 0, "harmless": 0}
    for i in ranked["id"]:
        lab = by_id[i]["label"]
        if len(chosen) == n:
            break
        if taken[lab] >= cap[lab] or (mode == "fix" and lab == "harmful"):
            continue
        chosen.append(i)
        taken[lab] += 1
    new_responses: dict[str, str] = {}
    if mode == "fix" and chosen:
        if answer is None:
            raise ValueError("--fix needs an answer function (the CLI uses the base model's greedy answers)")
        new_responses = dict(zip(chosen, answer([by_id[i]["prompt"] for i in chosen])))
    refusal = re.compile(REFUSAL_PATTERN, re.I)
    changes, out = [], []
    score = dict(zip(ranked["id"], ranked["score"]))
    for p in pairs:
        if p["id"] not in chosen:
            out.append(p)
            continue
        why = explain(rows[p["id"]], policy["feature_labels"])
        fixed = new_responses.get(p["id"])
        if fixed is not None and fixed.strip() and not refusal.match(fixed.strip()):
            out.append({**p, "response": fixed, "source": "base_model_greedy", "curated_from": p["response"]})
            changes.append({"id": p["id"], "action": "fixed", "score": score[p["id"]], "why": why, "prompt": p["prompt"],
                            "old": p["response"], "new": fixed})
        else:
            changes.append({"id": p["id"], "action": "dropped", "score": score[p["id"]], "why": why, "prompt": p["prompt"]})
    changes.sort(key=lambda c: chosen.index(c["id"]))  # most suspect first
    return out, changes


def write_pairs(path: str | Path, pairs: list[dict[str, Any]]) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    tmp.replace(path)


@torch.no_grad()
def greedy_answers(model: Any, tok: Any, prompts: Sequence[str], max_new_tokens: int = 96, batch: int = 8) -> list[str]:
    """The model's own greedy answers (the replacement responses of --fix)."""
    from ..probes import render_prompt

    side, was = tok.padding_side, model.training
    tok.padding_side = "left"
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch):
            enc = tok([render_prompt(tok, p) for p in prompts[i: i + batch]], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out += [tok.decode(r, skip_special_tokens=True).strip() for r in gen[:, enc["input_ids"].shape[1]:]]
    finally:
        tok.padding_side = side
        model.train(was)
    return out
