"""smda-callback: Symbolic Mechanistic Data Attribution for Hugging Face Trainer runs.

Which training pair moved the model's refusal policy, through which SAE
features, by which pathway (activations ΔX or refusal probabilities ΔY)?

The names below load on first use (PEP 562), so `import smda_callback` and `smda --help` stay
light; `from smda_callback import SMDACallback` loads the runtime (torch, transformers, sae-lens),
never the lab (`smda_callback.lab`) nor trl, datasets or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "AlertRule": "attribution", "StepDecomposition": "attribution", "decompose_step": "attribution",
    "interference": "attribution",
    "AlertEvent": "callback", "SMDACallback": "callback",
    "PackingError": "capture",
    "SMDAConfig": "config",
    "CreditEngine": "credit", "OptimizerKernel": "credit",
    "load_credits": "ledger", "load_ledger": "ledger", "load_policy": "ledger", "load_records": "ledger",
    "load_replay": "ledger",
    "RidgePolicy": "policy", "auroc": "policy", "select_features": "policy",
    "Probe": "probes", "ProbeFileError": "probes", "ProbeSet": "probes",
    "embedded_sae_dir": "sae", "load_sae": "sae", "resolve_hook": "sae",
    "Snapshot": "snapshot", "Snapshotter": "snapshot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'smda_callback' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
