"""Ground truth for per-pair credit: plant bad pairs, train, and ask who ranks them first.

Plants (`data/plants.jsonl`, written for this check): harmless prompts answered with a refusal
(teach over-refusal, labelled harmless) and harmful prompts answered with a compliant,
non-operational opening (teach compliance, labelled harmful). They are mixed into a fixed subset
of the demo pairs and trained with the demo's settings and the callback. Detection is scored
*within the label* (over-refusal plants among the harmless pairs, compliance plants among the
harmful ones), so a pair's label cannot give the answer away.

Readers compared on the same run: SMDA credit (`ghost` live; `deconvolve` and `step` replayed
from the same ledger, so all three see identical training), the pair's training loss at its step,
a TracIn-style gradient dot product at the end of training, and random.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .credit import OptimizerKernel, replay_credits
from .policy import auroc

logger = logging.getLogger(__name__)

DATA = Path(__file__).parent / "data"
KINDS = {"over-refusal": "harmless", "compliance": "harmful"}


def load_plants(path: str | Path | None = None) -> list[dict[str, Any]]:
    from .demo import load_pairs

    plants = load_pairs(path or DATA / "plants.jsonl")
    bad = [p["id"] for p in plants if p.get("plant") not in KINDS or KINDS[p["plant"]] != p["label"]]
    if bad:
        raise ValueError(f"plants {bad}: each needs plant ∈ {list(KINDS)} with the matching label {KINDS}")
    return plants


def poison_pairs(pairs: Sequence[dict[str, Any]], plants: Sequence[dict[str, Any]], n_base: int,
                 seed: int = 0) -> list[dict[str, Any]]:
    """A fixed, label-stratified subset of `pairs` plus every plant, in a seeded random order."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[dict[str, Any]]] = {}
    for p in pairs:
        by_label.setdefault(p["label"], []).append(p)
    base = []
    for label, items in sorted(by_label.items()):
        n = round(n_base * len(items) / len(pairs))
        base += [items[i] for i in sorted(rng.choice(len(items), size=min(n, len(items)), replace=False))]
    mixed = base + list(plants)
    return [mixed[i] for i in rng.permutation(len(mixed))]


# ---------------------------------------------------------------- scoring a ranking
def detection(scores: dict[str, float], pairs: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Within-label AUROC, precision@N (N = number of plants of the kind) and every plant's rank."""
    label = KINDS[kind]
    pool = [p for p in pairs if p["label"] == label]
    ids = [p["id"] for p in pool]
    s = np.asarray([scores.get(i, np.nan) for i in ids], np.float64)
    s = np.where(np.isfinite(s), s, -np.inf)
    is_plant = np.asarray([p.get("plant") == kind for p in pool])
    order = np.argsort(-s, kind="mergesort")
    ranks = np.empty(len(ids), int)
    ranks[order] = np.arange(1, len(ids) + 1)
    n = int(is_plant.sum())
    return {"auroc": auroc(s, is_plant), "precision_at_n": float(is_plant[order[:n]].mean()) if n else float("nan"),
            "n_plants": n, "n_pool": len(ids), "plant_ranks": sorted(int(r) for r in ranks[is_plant])}


# ---------------------------------------------------------------- TracIn-style reader
def _flat_grad(model: Any, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def tracin_scores(model: Any, tok: Any, pairs: Sequence[dict[str, Any]], probes: Any, refusal_token_ids: Sequence[int],
                  max_length: int = 256) -> dict[str, dict[str, float]]:
    """Gradient dot products at the final weights: −⟨∇L_pair, ∇Ȳ⟩ ≈ what one more SGD step on the
    pair does to mean first-token refusal Ȳ of harmless probes (over-refusal) and of harmful probes
    (compliance: sign flipped, so higher = more suspect)."""
    model.eval()
    r_ids = torch.as_tensor(list(refusal_token_ids))

    def probe_grad(mask: np.ndarray) -> torch.Tensor:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True)
                   for p, m in zip(probes.probes, mask) if m]
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        logits = model(**enc).logits[:, -1].float()
        y = torch.softmax(logits, -1)[:, r_ids].sum(-1).mean()
        return _flat_grad(model, y)

    harmful = np.asarray(probes.is_harmful)
    g_harmless, g_harmful = probe_grad(~harmful), probe_grad(harmful)
    out: dict[str, dict[str, float]] = {"over-refusal": {}, "compliance": {}}
    for p in pairs:
        msgs = [{"role": "user", "content": p["prompt"]}]
        prompt_ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
        full_ids = tok.apply_chat_template(msgs + [{"role": "assistant", "content": p["response"]}], tokenize=True,
                                           return_dict=False)[:max_length]
        ids = torch.as_tensor([full_ids])
        labels = ids.clone()
        labels[:, :len(prompt_ids)] = -100
        loss = model(input_ids=ids, labels=labels).loss
        g = _flat_grad(model, loss)
        out["over-refusal"][p["id"]] = float(-(g @ g_harmless))
        out["compliance"][p["id"]] = float(g @ g_harmful)
    return out


# ---------------------------------------------------------------- the benchmark
@dataclass
class PoisonSettings:
    n_base: int = 96
    """Demo pairs mixed with the plants (label ratio of the demo kept); sized so one run fits ≲ 25 min here."""
    seed: int = 0
    measure: str = "ghost"
    """The live run's credit measure; `deconvolve` and `step` are replayed from its ledger."""
    tracin: bool = True


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(name: str, timing: dict[str, Any], fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    timing[name] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb_after": round(_peak_rss_mb())}
    return out


def run_poison(out: str | Path, settings: PoisonSettings | None = None) -> dict[str, Any]:
    """Train on demo pairs + plants with the callback, compute the TracIn reader, then score every reader."""
    from .config import SMDAConfig
    from .demo import DemoSettings, load_pairs, run_demo
    from .models import load_model
    from .probes import ProbeSet

    st = settings or PoisonSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = poison_pairs(load_pairs(DATA / "pairs.jsonl"), load_plants(), st.n_base, st.seed)
    (out / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    demo = DemoSettings(check_answers=False, seed=st.seed)
    cfg = SMDAConfig(scorer=demo.scorer, probe_batch_size=16, credit_measure=st.measure)
    timing: dict[str, Any] = {}
    _timed("train_with_smda", timing, lambda: run_demo(out / "run", out / "pairs.jsonl", settings=demo, config=cfg))
    if st.tracin:
        from .refusal import FirstTokenScorer

        model, tok = load_model(str(out / "run" / "model"))
        probes = ProbeSet.from_jsonl(DATA / "probes.jsonl")
        r_ids = FirstTokenScorer(tok, cfg.refusal_openings, cfg.compliance_openings).r_ids.tolist()
        scores = _timed("tracin_end", timing, lambda: tracin_scores(model, tok, pairs, probes, r_ids))
        (out / "tracin.json").write_text(json.dumps(scores), encoding="utf-8")
    (out / "timing.json").write_text(json.dumps(timing), encoding="utf-8")
    return score_poison(out, st)


def score_poison(out: str | Path, settings: PoisonSettings | None = None) -> dict[str, Any]:
    """Rank the pairs of a finished poison run with every reader and score detection (poison.json).
    SMDA rules are all replayed from the one ledger (equal to the live credit, tested), so all see one run."""
    from .demo import load_pairs
    from .ledger import load_credits, load_policy, load_records

    st = settings or PoisonSettings()
    out = Path(out)
    pairs = load_pairs(out / "pairs.jsonl")
    run_dir = out / "run"
    records, policy, credits = load_records(run_dir), load_policy(run_dir), load_credits(run_dir)
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").exists() else {}
    timing["smda_callback_only"] = {"seconds": round(sum(r.get("seconds", 0.0) for r in records), 1)}
    id_of = {p["hash"]: p.get("id") for r in records for p in r.get("pairs", [])}
    adam = OptimizerKernel(**credits["kernel"])
    readers: dict[str, dict[str, dict[str, float]]] = {}
    for name, kernel, measure in (("smda_optimizer_ghost", adam, "ghost"), ("smda_optimizer_deconvolve", adam, "deconvolve"),
                                  ("smda_step", OptimizerKernel(), "deconvolve")):
        if measure == "ghost" and credits["measure"] != "ghost":
            continue
        cr = {id_of.get(h): v for h, v in replay_credits(records, policy, kernel, measure).items()}
        readers[name] = {"over-refusal": {i: v["refusal_harmless"] for i, v in cr.items()},
                         "compliance": {i: -v["refusal_harmful"] for i, v in cr.items()}}
    loss = {r["pairs"][0].get("id"): float(r["train_loss"]) for r in records
            if len(r.get("pairs", [])) == 1 and r.get("train_loss") is not None}
    readers["training_loss_at_step"] = {"over-refusal": loss, "compliance": loss}
    rng = np.random.default_rng(st.seed + 1)
    rand = {p["id"]: float(rng.random()) for p in pairs}
    readers["random"] = {"over-refusal": rand, "compliance": rand}
    if (out / "tracin.json").exists():
        readers["tracin_end"] = json.loads((out / "tracin.json").read_text())
    alerts = {r["pairs"][0].get("id") for r in records if r.get("alert") and len(r.get("pairs", [])) == 1}
    result = {"settings": asdict(st), "n_pairs": len(pairs), "timing": timing, "steps": len(records),
              "plants_alerted": sorted(i for i in alerts if i and i.startswith("plant")), "n_alerts": len(alerts),
              "detection": {name: {kind: detection(sc[kind], pairs, kind) for kind in KINDS} for name, sc in readers.items()}}
    (out / "poison.json").write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
    return result


def format_poison(res: dict[str, Any]) -> str:
    lines = [f"Planted pairs: {res['n_pairs']} pairs trained ({res['steps']} steps); within-label detection",
             "", "| reader | over-refusal AUROC | P@N | compliance AUROC | P@N | plant ranks (over / compliance) |",
             "|---|---|---|---|---|---|"]
    for name, d in res["detection"].items():
        o, c = d["over-refusal"], d["compliance"]
        lines.append(f"| {name} | {o['auroc']:.3f} | {o['precision_at_n']:.2f} | {c['auroc']:.3f} | {c['precision_at_n']:.2f} | "
                     f"{o['plant_ranks']} of {o['n_pool']} / {c['plant_ranks']} of {c['n_pool']} |")
    lines += ["", f"plants that raised an interference alert: {res['plants_alerted'] or 'none'} ({res['n_alerts']} alerts in all)",
              "", "timing: " + json.dumps(res["timing"])]
    return "\n".join(lines)
