"""LoRA (PEFT) safety SFT with SMDACallback: probes run through the adapters, the SAE hook sits on the base model.

    python examples/lora_sft.py --limit 40    |    python examples/lora_sft.py --smoke
"""

import argparse

from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from smda_callback import SMDACallback, SMDAConfig
from smda_callback.lab.demo import DATA, load_pairs, to_dataset
from smda_callback.lab.testing import model_tokenizer_sae

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--limit", type=int, default=40)
ap.add_argument("--out", default="runs/example-lora")
ap.add_argument("--smoke", action="store_true")
a = ap.parse_args()

model, tokenizer, sae = model_tokenizer_sae(a.smoke)
lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
smda = SMDACallback(DATA / "probes.jsonl", sae, SMDAConfig(n_features=8 if a.smoke else 48, scorer="first_token"))
args = SFTConfig(output_dir=a.out, per_device_train_batch_size=2, learning_rate=5e-4, num_train_epochs=1,
                 report_to=[], packing=False, use_cpu=True, save_strategy="no")
trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset(load_pairs(DATA / "pairs.jsonl", 6 if a.smoke else a.limit)),
                     processing_class=tokenizer, peft_config=lora, callbacks=[smda])
smda.bind(trainer)
trainer.train()
credits = smda.run.engine.totals
print(f"{len(credits)} pairs credited through the adapters ({smda.run.engine.kernel.kind} kernel); ledger in {smda.run_dir}")
