"""Lab settings that the CLI reads to build its parser: plain Python, no torch (`smda --help` stays light)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SECOND_MOMENTS  # noqa: F401  (the CLI reads it here, torch-free)

PEERS = ("tracin", "kronfluence", "kronfluence-middle")
"""Attribution methods from other projects that `smda benchmark-poison` scores beside SMDA."""

SUSPECT_READS = ("trained", "end", "removal", "replay", "category")
"""`trained`: what a pair's own steps did when applied; `end`: that, times what the run's forgetting rate leaves
of it at the end of the run (carry.py); `removal`: that, times the response at the end of the run's second-order
(AR(2)) fit of its own trajectory, which can turn a push round (carry.py): a free prediction of what leaving the
pair out changes at the end; `replay`: the run's replay of its last steps (replay.json,
SMDAConfig.replay_last_steps), each pair's step carried through the rest of the run (pairs before it unranked).
`end`, `removal` and `replay` read over-refusal and compliance only."""

REMOVAL_READER = "own window, carried AR(2)"
"""The LDS reader name (lab/lds_score.py) of what `smda suspects --read removal` reads; `smda lds-runs` compares it."""


def poison_train_seed(seed: int, order_seed: int | None) -> int:
    """The Trainer seed (data order) of a `smda benchmark-poison` run: its --order-seed, else its planting --seed.
    Read by poison (to train and replay) and by lds (to retrain a planted run it adopts)."""
    return seed if order_seed is None else order_seed


@dataclass
class SAETrainSpec:
    """Settings of the shipped SAE (recorded in its folder as smda_training.json)."""

    layer: int = 15
    d_sae: int = 4096
    k: int = 64
    """k 32 → 64: held-out FVE 0.709 → 0.767 after one pass over 100k tokens (pilot, same lr)."""
    tokens: int = 500_000
    ctx: int = 128
    lr: float = 3e-2
    """On activations scaled to mean norm √d_in. Pilots (100k tokens, one pass, k 32): lr 2e-3 → FVE 0.28,
    1e-2 → 0.58, 3e-2 → 0.71 (3.9 % dead), 1e-1 → 0.70 (25 % dead)."""
    lr_end: float = 3e-3
    batch: int = 1024
    dead_feature_window: int = 50
    epochs: int = 3
    """Passes over the activations; 3 passes over 100k tokens took the k-32 pilot from FVE 0.71 to 0.78."""
    generated_answers: int = 256
    seed: int = 0

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"
