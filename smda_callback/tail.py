"""`SMDAConfig(replay_last_steps=K)`: the run's last K steps carried through the rest of the run, after training.

`ReplayTail` is a companion callback that `SMDACallback` attaches to its trainer at train begin (after refusing a
run the replay cannot take again, before any step). While the run trains it keeps what `credit.replay.TailRecorder`
needs; after the last step it replays those steps in reverse mode and writes `smda/replay.json`
(`schema.replay_record`): per step, its pairs and the predicted change of mean refusal on the harmful and on the
harmless probes at the end had they been dropped. A failure is logged, never raised: the trained model (put back as
trained), the ledger and the policy are already written.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .capture import row_meta_of
from .credit import inner_optimizer, optimizer_step_count
from .credit.replay import TailRecorder, refusal_groups, refusal_objectives
from .schema import replay_record
from .sinks import REPLAY
from .snapshot import rank_world

logger = logging.getLogger(__name__)


class ReplayTail(TrainerCallback):
    """Records the last steps of the run that `smda` (an SMDACallback) watches; replays them at train end."""

    def __init__(self, smda: Any, recorder: TailRecorder) -> None:
        self.smda, self.rec = smda, recorder

    @classmethod
    def attach(cls, smda: Any, args: Any, state: Any, model: Any) -> "ReplayTail | None":
        """At SMDACallback's train begin: refuse what the replay cannot take again (ValueError with the fix), else
        add a recorder to the trainer (one per SMDACallback: a second `train()` replaces the first's)."""
        old = getattr(smda, "_replay_tail", None)
        if old is not None:
            old.rec.remove()
            smda._trainer.remove_callback(old)
        smda._replay_tail = None
        cfg = smda.config
        if not cfg.replay_last_steps:
            return None
        TailRecorder.check(cfg.replay_last_steps, args, smda._trainer, smda._optimizer, rank_world()[1],
                           cfg.replay_every, cfg.replay_outer)
        rec = TailRecorder(cfg.replay_last_steps, Path(args.output_dir) / "_smda_replay", cfg.replay_every, cfg.replay_outer)
        rec.plan(state.max_steps)
        rec.install(model, smda._trainer)
        tail = smda._replay_tail = cls(smda, rec)
        smda._trainer.add_callback(tail)
        logger.info("smda: steps %d-%d of %d are recorded for the replay after training (SMDAConfig.replay_last_steps)",
                    rec.start + 1, state.max_steps, state.max_steps)
        return tail

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                      **kwargs: Any) -> None:
        self.rec.step_begin(state.global_step, model, optimizer)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is None:
            return
        t = optimizer_step_count(optimizer) or state.global_step + 1
        lr = float(inner_optimizer(optimizer).param_groups[0]["lr"])
        self.rec.step_end(t - 1, lr, [r.hash for r in self.smda.capture.rows if r.step == t])

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                     **kwargs: Any) -> None:
        smda, rec = self.smda, self.rec  # stays registered (the trainer is iterating its callbacks), inert from here
        snap, sinks = smda._snap, smda._sinks
        if snap is None or sinks is None or rec.done:
            rec.remove()
            return
        groups = refusal_groups(smda.probes)
        t0 = time.perf_counter()
        logger.info("smda: replaying the last %d steps (reverse mode through the run)", len(rec.batches))
        try:
            res = rec.run(model, optimizer or smda._optimizer, smda._trainer.compute_loss,
                          float(smda._trainer.args.max_grad_norm or 0.0),
                          refusal_objectives(snap, groups), progress=logger.info)
        except (ValueError, RuntimeError, OSError) as exc:
            logger.debug("smda: the replay's failure", exc_info=True)
            logger.error("smda: the replay of the last steps did not run (%s); smda/%s is not written. The trained "
                         "model and the other outputs are unaffected.", exc, REPLAY)
            return
        record = replay_record(res, rec.start, rec.rows, smda._index, row_meta_of(smda.train_dataset),
                               {q: len(idx) for q, idx in groups.items()})
        sinks.ledger.write_json(REPLAY, record)
        for q, s in record["trusted_from"].items():
            if s > record["first_step"]:
                logger.warning("smda: replay: the %s refusal effects of steps %d-%d blew up and are not read (replay.json "
                               "'trust'); replay fewer steps to rank them", q, record["first_step"], s - 1)
        for q in groups:
            read = [s for s in record["steps"] if s["step"] >= record["trusted_from"][q]]
            top = sorted(read, key=lambda s: -abs(s["removal_effect"][q]))[:3]
            logger.info("smda: replay: %s refusal at the end %.4f; the steps whose removal moves it most: %s", q,
                        res["final"][q], ", ".join(f"{s['step']} ({s['removal_effect'][q]:+.4f})" for s in top))
        logger.info("smda: replay of %d steps in %.0f s (recomputed vs trained weights: max |Δθ| %.1e)",
                    len(rec.batches), time.perf_counter() - t0, res["recompute_gap_to_run"])
