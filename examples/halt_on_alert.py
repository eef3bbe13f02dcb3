"""Halt training from your own code when a pair's effect lands on features it was not meant to touch.

`on_alert` receives an AlertEvent (step, pairs, off-target score, dominant feature, intended
features, reason, running alert count); returning True stops training and saves a checkpoint.

    python examples/halt_on_alert.py --smoke     # thresholds at 0 so the first alert fires at once
"""

import argparse
import logging

from trl import SFTConfig, SFTTrainer

from smda_callback import SMDACallback, SMDAConfig
from smda_callback.lab.demo import DATA, load_pairs, to_dataset
from smda_callback.lab.testing import model_tokenizer_sae

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--smoke", action="store_true")
ap.add_argument("--after", type=int, default=2, help="halt at the N-th alert")
ap.add_argument("--out", default="runs/example-halt")
a = ap.parse_args()
logging.basicConfig(level=logging.WARNING)
alerts_log = logging.getLogger("safety.alerts")


def on_alert(event):
    alerts_log.warning("step %d: %s moved %s (off-target share %.2f)", event.step,
                       [p.get("id") for p in event.pairs], event.dominant_label, event.score)
    return event.n_alerts >= a.after


model, tokenizer, sae = model_tokenizer_sae(a.smoke)
cfg = SMDAConfig(n_features=8, intended_top_m=1, interference_threshold=0.0, min_history=0) if a.smoke else SMDAConfig()
smda = SMDACallback(DATA / "probes.jsonl", sae, cfg, on_alert=on_alert)
args = SFTConfig(output_dir=a.out, per_device_train_batch_size=1, max_steps=10 if a.smoke else 200, learning_rate=1e-4,
                 report_to=[], packing=False, use_cpu=True, save_strategy="no")
trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset(load_pairs(DATA / "pairs.jsonl", 40)),
                     processing_class=tokenizer, callbacks=[smda])
smda.bind(trainer)
trainer.train()
print(f"stopped at step {trainer.state.global_step}; halted: {smda.run.halted}")
