"""The paper's counterfactual protocol (`smda attribute`): each pair gets one plain SGD step from
the same base weights, which are restored (and checked bitwise) before the next pair.

Answers "what would each pair do on its own", where the callback answers "what did this
run's pairs do". Both write the same ledger format, so `smda report` reads either.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..attribution import category_split, decompose_step, intended_features, interference
from ..capture import content_hash
from ..config import SMDAConfig
from ..baseline import allowed_latents, fit_baseline
from ..features import load_cards
from ..probes import ProbeSet
from ..sae import base_model, load_feature_labels, load_sae, resolve_hook, sae_identity
from ..schema import decomposition_fields, pair_entry, policy_record
from ..sinks import POLICY, LedgerWriter, read_ledger_lines
from ..snapshot import Snapshotter

logger = logging.getLogger(__name__)


def pair_batch(tok: Any, pair: dict[str, Any], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels with the loss on the assistant tokens only."""
    prompt = tok.apply_chat_template([{"role": "user", "content": pair["prompt"]}], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([{"role": "user", "content": pair["prompt"]},
                                    {"role": "assistant", "content": pair["response"]}], tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"][:max_length]
    labels = list(ids)
    for i in range(min(len(p_ids), len(labels))):
        labels[i] = -100
    return torch.tensor([ids]), torch.tensor([labels])


def attribute_pairs(model: Any, tok: Any, pairs: list[dict[str, Any]], probes: ProbeSet, sae_spec: Any, out: str | Path,
                    config: SMDAConfig | None = None, lr: float = 1e-4, max_length: int = 256) -> Path:
    """Write `out/smda/attribution.jsonl` (one line per pair) and `policy.json`; resumable."""
    cfg = config or SMDAConfig.paper()
    sae = load_sae(sae_spec)
    hook = resolve_hook(sae, model)
    snap = Snapshotter(probes, tok, sae, hook, cfg, max_length=getattr(base_model(model).config, "max_position_embeddings", None))
    ledger = LedgerWriter(Path(out) / "smda")
    done = {r["pairs"][0]["id"] for r in read_ledger_lines(ledger.path) if r.get("pairs")}
    base = snap.take(model, full=True)
    harmful = np.asarray(probes.is_harmful)
    cards = load_cards(sae_spec if isinstance(sae_spec, (str, Path)) else None)
    bl = fit_baseline(base.Z, base.Y, harmful, cfg, allowed_latents(cards, cfg.feature_kinds, base.Z.shape[1]))
    feats, policy, X0, Y0, M0, beta0, fit = bl.features, bl.policy, bl.X, bl.Y, bl.M, bl.beta0, bl.fit
    snap.features = feats
    labels_all = load_feature_labels(sae_spec, int(sae.cfg.d_sae))
    labels = [labels_all[j] for j in feats]
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.0)
    cats = probes.category_index()
    for n, pair in enumerate(tqdm(pairs, desc="counterfactual pairs")):
        if pair["id"] in done:
            continue
        ids, lab = pair_batch(tok, pair, max_length)
        model.eval()
        with torch.no_grad():  # the pair's prompt activations on the base model → its intended features
            captured: dict[str, torch.Tensor] = {}
            handle = hook.register(model, lambda h: captured.__setitem__("h", h))
            try:
                model(input_ids=ids[:, : max(int((lab[0] == -100).sum()), 2)], logits_to_keep=1)
            finally:
                handle.remove()
        model.train()
        with torch.random.fork_rng(devices=[]):
            loss = model(input_ids=ids, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()
        s1 = snap.take(model)
        with torch.no_grad():
            model.load_state_dict(saved)
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items()), "base weights not restored bitwise"
        if not s1.finite:
            ledger.append({"step": n + 1, "pairs": [{"id": pair["id"]}], "skipped": "NaN/Inf in the probe snapshot"})
            continue
        d = decompose_step(policy, X0, Y0, s1.X, s1.Y, cfg.method, M0=M0)
        with torch.no_grad():
            z = snap.encode(captured["h"][0, 1:].float(), full=False).mean(0).double().numpy()
        intended = intended_features(policy.transform(z[None])[0], cfg.intended_top_m)
        score, dom, off = interference(d.delta_beta, intended)
        ledger.append({
            "step": n + 1, "protocol": "counterfactual", "train_loss": float(loss.detach()),
            "pairs": [{**pair_entry(content_hash(ids[0].tolist()), n, 1.0, id=pair["id"], label=pair["label"],
                                   category=pair["category"], prompt=pair["prompt"])}],
            "n_pairs": 1, "split": False, "score": float(d.alignment.sum()), "alert": False,
            **decomposition_fields(d, category_split(policy, X0, s1.X, d, cats),
                                   {c: float(s1.Y[i].mean()) for c, i in cats.items()}, score, dom, off, intended,
                                   feats, labels),
        })
    b0 = policy.intercept_of(X0, Y0, beta0)
    ledger.write_json(POLICY, policy_record(
        protocol="counterfactual", probes=probes, features=feats, labels=labels, policy=policy, config=cfg, beta0=beta0,
        b0=b0, beta_final=beta0, intercept_final=b0, fit=fit, Y0=Y0, Y_final=Y0, cards=cards, hook=hook.name,
        sae=sae_identity(sae, sae_spec), sae_fve=base.fve, final=True, step=len(pairs), sgd_lr=lr))
    return ledger.dir
