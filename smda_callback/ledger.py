"""Read a run's ledger back as tidy pandas frames for notebooks and reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from .sinks import CREDITS, LEDGER, POLICY, REPLAY, join_prompts, read_ledger_lines


def smda_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    for cand in (run_dir, run_dir / "smda"):
        if (cand / LEDGER).exists():
            return cand
    raise FileNotFoundError(f"{run_dir}: no {LEDGER} here or in {run_dir / 'smda'}; pass the run's output_dir.")


def load_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Raw ledger records (one dict per optimizer step or counterfactual pair), with the pairs' prompt
    text joined back from the run's private folder when it is there (SMDAConfig.prompt_text)."""
    d = smda_dir(run_dir)
    return join_prompts(read_ledger_lines(d / LEDGER), d)


def load_policy(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((smda_dir(run_dir) / POLICY).read_text())


def _load_pairs_json(run_dir: str | Path, name: str) -> dict[str, Any] | None:
    """A JSON output that names pairs, their prompt text joined back (SMDAConfig.prompt_text); None when absent."""
    d = smda_dir(run_dir)
    path = d / name
    return join_prompts(json.loads(path.read_text()), d) if path.exists() else None


def load_credits(run_dir: str | Path) -> dict[str, Any] | None:
    """Per-pair credits (credits.json) of an in-training run; None for ledgers that have none (counterfactual)."""
    return _load_pairs_json(run_dir, CREDITS)


def load_replay(run_dir: str | Path) -> dict[str, Any] | None:
    """The replay of the run's last steps (replay.json, `SMDAConfig(replay_last_steps=K)`); None when it did not run."""
    return _load_pairs_json(run_dir, REPLAY)


def load_ledger(run_dir: str | Path) -> pd.DataFrame:
    """One row per (step, feature): step, feature (SAE latent id), label, beta,
    delta_beta, delta_beta_x, delta_beta_y, alignment, plus the step's interference,
    alert, dominant_feature, n_pairs and pair indices. Skipped steps are left out."""
    policy = load_policy(run_dir)
    feats, labels = policy["features"], policy["feature_labels"]
    rows = []
    for r in load_records(run_dir):
        if "beta" not in r:
            continue
        idx = [p.get("index") for p in r.get("pairs", [])]
        for j, (f, lab) in enumerate(zip(feats, labels)):
            rows.append({
                "step": r["step"], "feature": f, "label": lab, "beta": r["beta"][j], "delta_beta": r["delta_beta"][j],
                "delta_beta_x": r["delta_beta_x"][j], "delta_beta_y": r["delta_beta_y"][j], "alignment": r["alignment"][j],
                "interference": r["interference"], "alert": r["alert"], "dominant_feature": r["dominant_feature"],
                "n_pairs": r["n_pairs"], "pair_indices": idx,
                "pair_label": r["pairs"][0].get("label") if len(r.get("pairs", [])) == 1 else None,
                "pair_category": r["pairs"][0].get("category") if len(r.get("pairs", [])) == 1 else None,
            })
    return pd.DataFrame(rows)
