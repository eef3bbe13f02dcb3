"""The replay reader of `smda benchmark-lds`: a whole recorded demo run stepped again from its trainer.

The maths and the reverse pass are the runtime's (`smda_callback/credit/replay.py`, also behind the callback's
`replay_last_steps`); this module gives them a Trainer set up as the recorded run (same starting weights, same data
in the same order with a sequential sampler, same optimizer arguments), whose `.train()` is never called.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from ..credit.replay import (EXACT, Objective, ReplayVariant, Segment, State, Steps, checkpoint_plan, effect_parts,
                             probe_objective, refusal_groups, refusal_objectives, removal_effect, replay_steps)

logger = logging.getLogger(__name__)

__all__ = ["Objective", "ReplayVariant", "Segment", "State", "Stepper", "checkpoint_plan", "effect_parts", "probe_objective", "refusal_groups",
           "refusal_objectives", "removal_effect", "replay"]


class Stepper(Steps):
    """The recorded run's steps from its trainer: the trainer's dataloader in order, its optimizer and schedule
    (created here for the run's length), its `compute_loss` and `max_grad_norm`."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        batches = list(trainer.get_train_dataloader())
        trainer.create_optimizer_and_scheduler(num_training_steps=len(batches))
        super().__init__(trainer.model, trainer.optimizer, batches, trainer.compute_loss, trainer.args.max_grad_norm,
                         sched=trainer.lr_scheduler)


def replay(trainer: Any, objectives: dict[str, Objective], workdir: str | Path, every: int = 4,
           progress: Callable[[str], None] | None = None, outer: int | None = None,
           resume_every: int = 16, last: int | None = None, variant: ReplayVariant = EXACT,
           segment: Segment | None = None) -> dict[str, Any]:
    """`credit.replay.replay_steps` over the trainer's whole run, or (`last`) over its last `last` steps only: the
    steps before are taken plainly first, as the callback's `replay_last_steps` sees them. The trainer's model is
    left at the final weights. `variant`: the model of the run the reverse pass linearises (`ReplayVariant`); `segment`:
    the early pairs' removals also taken exactly for a stretch (`Segment`; with `last`, in the replayed steps' own
    numbering)."""
    run = Stepper(trainer)
    if last is not None:
        if not 0 < last <= len(run):
            raise ValueError(f"replay: last={last} steps of a {len(run)}-step run; choose 1..{len(run)}.")
        s = len(run) - last
        for t in range(s):
            run.step(t)
            if (t + 1) % 16 == 0:
                (progress or logger.info)(f"replay: plain step {t + 1}/{s} before the replayed ones")
        run = run.tail(s)  # the model and optimizer are where step s starts
    return replay_steps(run, objectives, workdir, every, progress, outer, resume_every, variant, segment)
