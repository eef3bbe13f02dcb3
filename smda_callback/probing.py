"""Score a probe file on any model, optionally through a saved symbolic policy (`smda probe`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .config import SMDAConfig
from .policy import RidgePolicy, auroc
from .probes import ProbeSet
from .sae import base_model, embedded_sae_dir, load_sae, resolve_hook
from .snapshot import Snapshotter

DATA = Path(__file__).parent / "data"


def score_probes(model_dir: str | None = None, probes_file: str | None = None, policy_path: str | None = None,
                 sae_spec: Any = None) -> dict[str, Any]:
    """Per-probe refusal, per-category means; with a policy, its predictions and AUROC vs labels."""
    from .models import load_model

    probes = ProbeSet.from_jsonl(probes_file or DATA / "probes.jsonl")
    model, tok = load_model(model_dir)
    policy = json.loads(Path(policy_path).read_text()) if policy_path else None
    cfg = SMDAConfig.from_dict(policy["config"]) if policy else SMDAConfig()
    sae = load_sae(sae_spec or embedded_sae_dir())
    snap = Snapshotter(probes, tok, sae, resolve_hook(sae, model), cfg,
                       max_length=getattr(base_model(model).config, "max_position_embeddings", None))
    harmful = np.asarray(probes.is_harmful)
    out: dict[str, Any] = {"model": str(model_dir or "embedded SmolLM2-135M-Instruct"), "scorer": cfg.scorer}
    if policy:
        snap.features = np.asarray(policy["features"])
        s = snap.take(model)
        pol = RidgePolicy.from_dict(policy["policy"])
        beta = np.asarray(policy["beta_final"])
        pred = pol.predict(s.X, beta, float(policy["intercept_final"]))
        out["policy_prediction"] = pred.tolist()
        out["policy_auroc"] = auroc(pred, harmful)
    else:
        s = snap.take(model, full=True)
    Y = s.Y
    out["refusal_auroc"] = auroc(Y, harmful)
    out["probes"] = [{"id": p.id, "label": p.label, "category": p.category, "refusal": float(y)} for p, y in zip(probes.probes, Y)]
    out["by_category"] = {c: float(Y[idx].mean()) for c, idx in probes.category_index().items()}
    out["harmful_mean"], out["harmless_mean"] = float(Y[harmful].mean()), float(Y[~harmful].mean())
    return out
