"""Safety SFT with SMDACallback: the README's snippet, runnable on the embedded default.

    python examples/sft_with_smda.py --limit 40          # SmolLM2-135M-Instruct + shipped SAE, 40 pairs
    python examples/sft_with_smda.py --smoke             # tiny random model, a few seconds
    torchrun --nproc_per_node 2 examples/sft_with_smda.py --smoke   # see ddp_torchrun.sh
"""

import argparse
import os

from trl import SFTConfig, SFTTrainer

from smda_callback import SMDACallback, SMDAConfig
from smda_callback.lab.demo import DATA, load_pairs, to_dataset
from smda_callback.lab.testing import model_tokenizer_sae

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--limit", type=int, default=40, help="train on the first N shipped pairs")
ap.add_argument("--out", default="runs/example")
ap.add_argument("--smoke", action="store_true", help="tiny random model: checks the wiring in seconds")
a = ap.parse_args()

model, tokenizer, sae = model_tokenizer_sae(a.smoke)
pairs = to_dataset(load_pairs(DATA / "pairs.jsonl", 6 if a.smoke else a.limit))  # prompt/completion + label/category/id

smda = SMDACallback(
    probes=DATA / "probes.jsonl",            # {"prompt", "label": harmful|harmless, "category"} per line
    sae=sae,                                 # a folder for SAE.load_from_disk, an sae_lens.SAE, or ("release", "sae_id")
    config=SMDAConfig(n_features=8 if a.smoke else 48, scorer="first_token", on_alert="warn"),  # or "halt"
)
args = SFTConfig(output_dir=a.out, per_device_train_batch_size=1, num_train_epochs=1, learning_rate=1e-4,
                 report_to=["tensorboard"], packing=False, use_cpu=True, save_strategy="no", logging_steps=5,
                 **({"ddp_backend": "gloo"} if "WORLD_SIZE" in os.environ else {}))
trainer = SFTTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer, callbacks=[smda])
smda.bind(trainer)                           # lets the ledger name each pair's label/category/prompt
trainer.train()
if trainer.is_world_process_zero():
    print(f"ledger, policy and credits in {smda.run_dir}; next: smda report {a.out}; smda suspects {a.out} --target over-refusal")
