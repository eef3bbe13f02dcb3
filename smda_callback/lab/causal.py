"""Does a pair's credit predict what the pair did *in this run*? Insert vs omit it at its place.

The run is replayed in the same optimizer (the SFTTrainer's own tokenised rows, collator,
AdamW, schedule and gradient clipping; one pair per step in the ledger's order). At the step
before each tested pair the state (weights, optimizer, scheduler) is forked: one branch trains on
the next `horizon` pairs *without* the tested pair, the main line trains on it and the same next
pairs. After `horizon` steps (the momentum has mostly decayed: 0.9^20 = 0.12) both are probed, and
the measured difference (with − without) of β and of mean refusal is compared with each credit
rule's prediction, replayed from the ledger up to the same step.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .._resources import data_path
from ..credit import OptimizerKernel
from .analysis import spearman

logger = logging.getLogger(__name__)


def insert_vs_omit(run_dir: str | Path, pairs_file: str | Path, n_pairs: int = 30, horizon: int = 20,
                   out: str | Path | None = None, learning_rate: float = 1e-4, first: int = 11,
                   probes_file: str | Path | None = None) -> dict[str, Any]:
    """Replay a one-pair-per-step demo-settings run, fork at `n_pairs` evenly spaced places from
    step `first` (after the demo's 10 warm-up steps) to T − horizon, and compare measured
    insert-vs-omit effects with the replayed credits (step, optimizer-deconvolve, and ghost when
    the run measured it). `probes_file`: the probe set the run used (default: the shipped one)."""
    from trl import SFTTrainer

    from .demo import DemoSettings, load_pairs, sft_config, to_dataset
    from ..ledger import load_credits, load_policy, load_records
    from .models import load_model
    from ..credit import replay_credits
    from ..policy import RidgePolicy
    from ..probes import ProbeSet
    from ..sae import embedded_sae_dir, load_sae, resolve_hook
    from ..config import SMDAConfig
    from ..snapshot import Snapshotter

    records, policy, credits = load_records(run_dir), load_policy(run_dir), load_credits(run_dir)
    steps = [r for r in records if "beta" in r]
    if not steps or any(len(r["pairs"]) != 1 for r in steps):
        raise ValueError("insert_vs_omit needs a finished run with one pair per optimizer step")
    pairs = load_pairs(pairs_file)
    by_id = {p["id"]: p for p in pairs}
    order = [r["pairs"][0]["id"] for r in steps]
    T = len(order)
    if T - horizon < first:
        raise ValueError(f"the run has {T} steps: too few to test from step {first} with a horizon of {horizon}")
    places = sorted({int(x) for x in np.linspace(first, T - horizon, n_pairs)})
    model, tok = load_model()
    cfg = SMDAConfig.from_dict(policy["config"])
    args = sft_config(Path(out or run_dir) / "_causal_tmp", DemoSettings(learning_rate=learning_rate))
    args.max_steps = T
    args.report_to = []
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset([by_id[i] for i in order]), processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=T)
    opt, sched = trainer.optimizer, trainer.lr_scheduler
    rows = {trainer.train_dataset[i]["id"] if "id" in trainer.train_dataset.column_names else order[i]: trainer.train_dataset[i]
            for i in range(len(trainer.train_dataset))}
    collate = trainer.data_collator
    feature_cols = {"input_ids", "labels", "completion_mask", "attention_mask", "seq_lengths"}  # what the dataloader hands the collator

    def train_step(pid: str) -> None:
        model.train()
        row = {k: v for k, v in rows[pid].items() if k in feature_cols}
        batch = collate([row])
        batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k in ("input_ids", "attention_mask", "labels")}
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    sae = load_sae(embedded_sae_dir())
    snap = Snapshotter(ProbeSet.from_jsonl(probes_file or data_path("probes.jsonl")), tok, sae,
                       resolve_hook(sae, model), cfg)
    snap.features = np.asarray(policy["features"])
    pol = RidgePolicy.from_dict(policy["policy"])
    harm = np.asarray([p["label"] == "harmful" for p in policy["probes"]])

    def probe() -> dict[str, Any]:
        s = snap.take(model)
        return {"beta": pol.M(s.X) @ s.Y, "harmful": float(s.Y[harm].mean()), "harmless": float(s.Y[~harm].mean())}

    def fork() -> tuple[Any, Any, Any]:
        return ({k: v.detach().clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()),
                copy.deepcopy(sched.state_dict()))

    def restore(state: tuple[Any, Any, Any]) -> None:
        with torch.no_grad():
            model.load_state_dict(state[0])
        opt.load_state_dict(copy.deepcopy(state[1]))
        sched.load_state_dict(copy.deepcopy(state[2]))

    without: dict[int, dict[str, Any]] = {}
    with_: dict[int, dict[str, Any]] = {}
    check: list[float] = []
    due = {p + horizon: p for p in places}
    for t in tqdm(range(1, T + 1), desc="insert vs omit", unit="step"):
        if t in places:
            main = fork()
            for s in range(t + 1, t + horizon + 1):
                train_step(order[s - 1])
            without[t] = probe()
            restore(main)
        train_step(order[t - 1])
        if t in due:
            with_[due[t]] = probe()
            check.append(abs(with_[due[t]]["harmless"] - steps[t - 1]["refusal_harmless"]))
    kernel = OptimizerKernel(**credits["kernel"])
    rules = {"step": (OptimizerKernel(), "deconvolve"), "optimizer_deconvolve": (kernel, "deconvolve")}
    if credits["measure"] == "ghost":
        rules["optimizer_ghost"] = (kernel, "ghost")
    hash_of = {r["pairs"][0]["id"]: r["pairs"][0]["hash"] for r in steps}
    table = []
    for p in places:
        pid = order[p - 1]
        upto = [r for r in records if r["step"] <= p + horizon]
        row = {"id": pid, "place": p, "label": by_id[pid]["label"], "plant": by_id[pid].get("plant"),
               "measured_harmless": with_[p]["harmless"] - without[p]["harmless"],
               "measured_harmful": with_[p]["harmful"] - without[p]["harmful"],
               "measured_beta": (with_[p]["beta"] - without[p]["beta"]).tolist()}
        for name, (k, m) in rules.items():
            cr = replay_credits(upto, policy, k, m)[hash_of[pid]]
            row[f"{name}_harmless"], row[f"{name}_harmful"] = cr["refusal_harmless"], cr["refusal_harmful"]
            row[f"{name}_beta"] = np.asarray(cr["d"]).tolist()
        table.append(row)
    df = pd.DataFrame(table)
    summary: dict[str, Any] = {}
    for name in rules:
        s: dict[str, Any] = {}
        for what in ("harmless", "harmful"):
            s[what] = {"all": spearman(df[f"{name}_{what}"].to_numpy(), df[f"measured_{what}"].to_numpy())}
            for lab in ("harmful", "harmless"):
                sub = df[df.label == lab]
                s[what][f"within_{lab}"] = spearman(sub[f"{name}_{what}"].to_numpy(), sub[f"measured_{what}"].to_numpy())
        mb, pb = np.stack(df["measured_beta"].map(np.asarray)), np.stack(df[f"{name}_beta"].map(np.asarray))
        cos = (mb * pb).sum(1) / (np.linalg.norm(mb, axis=1) * np.linalg.norm(pb, axis=1) + 1e-300)
        s["beta_cosine_median"] = float(np.median(cos))
        s["beta_feature_spearman_median"] = float(np.nanmedian([spearman(pb[:, j], mb[:, j]) for j in range(mb.shape[1])]))
        summary[name] = s
    res = {"n_pairs": len(places), "horizon": horizon, "steps": T, "summary": summary,
           "replay_vs_ledger_harmless_abs_diff_max": float(max(check) if check else float("nan")),
           "pairs": df.drop(columns=[c for c in df.columns if c.endswith("_beta")]).to_dict("records")}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "insert_vs_omit.json").write_text(json.dumps(res, indent=1, default=float))
    return res
