"""Does memory grow with steps? 500 optimizer steps on a tiny random Llama with SMDACallback,
RSS sampled every 50 steps, side by side with the same run without the callback."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

from helpers import run_sft, tiny_model, tiny_sae  # noqa: E402
from smda_callback import SMDAConfig  # noqa: E402
from smda_callback.lab.models import embedded_model_dir  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Sampler(TrainerCallback):
    def __init__(self) -> None:
        self.samples: list[tuple[int, float]] = []

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % 50 == 0:
            self.samples.append((state.global_step, rss_mb()))


def main(out: str = "/tmp/smda_bench_memory") -> None:
    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    result = {}
    for name, cfg in (("with_callback", SMDAConfig(n_features=16, text_every_n_steps=100)), ("without", None)):
        s = Sampler()
        if cfg is None:
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer

            from helpers import pair_records

            args = SFTConfig(output_dir=f"{out}/{name}", per_device_train_batch_size=1, max_steps=500, learning_rate=1e-4,
                             report_to=[], save_strategy="no", use_cpu=True, max_length=128, disable_tqdm=True,
                             logging_steps=100, bf16=False)
            SFTTrainer(model=tiny_model(), args=args, train_dataset=Dataset.from_list(pair_records(64)),
                       processing_class=tok, callbacks=[s]).train()
        else:
            run_sft(f"{out}/{name}", tiny_model(), tok, tiny_sae(), cfg, pairs=64, max_steps=500, learning_rate=1e-4,
                    callbacks_extra=[s], logging_steps=100, bf16=False)
        result[name] = s.samples
    ledger = Path(out) / "with_callback" / "smda" / "attribution.jsonl"
    result["ledger_mb"] = ledger.stat().st_size / 2**20
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result, indent=1))
    for name in ("with_callback", "without"):
        s = result[name]
        print(f"{name:14s} RSS step {s[0][0]}: {s[0][1]:.0f} MB → step {s[-1][0]}: {s[-1][1]:.0f} MB "
              f"(growth {s[-1][1] - s[0][1]:+.0f} MB)")
    print(f"ledger on disk: {result['ledger_mb']:.1f} MB")


if __name__ == "__main__":
    main()
