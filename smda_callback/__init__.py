"""smda-callback: Symbolic Mechanistic Data Attribution for Hugging Face Trainer runs.

Which training pair moved the model's refusal policy, through which SAE
features, by which pathway (activations ΔX or refusal probabilities ΔY)?
"""

from .attribution import AlertRule, StepDecomposition, decompose_step, interference
from .callback import AlertEvent, SMDACallback
from .capture import PackingError
from .config import SMDAConfig
from .credit import CreditEngine, OptimizerKernel
from .ledger import load_credits, load_ledger, load_policy, load_records
from .policy import RidgePolicy, auroc, select_features
from .probes import Probe, ProbeFileError, ProbeSet
from .sae import embedded_sae_dir, load_sae, resolve_hook
from .snapshot import Snapshot, Snapshotter

__version__ = "0.1.0"

__all__ = [
    "AlertEvent", "AlertRule", "CreditEngine", "OptimizerKernel", "PackingError", "Probe", "ProbeFileError", "ProbeSet", "RidgePolicy", "SMDACallback",
    "SMDAConfig", "Snapshot", "Snapshotter", "StepDecomposition", "auroc", "decompose_step", "embedded_sae_dir",
    "interference", "load_credits", "load_ledger", "load_policy", "load_records", "load_sae", "resolve_hook", "select_features",
]
