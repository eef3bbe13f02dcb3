"""What the in-step split (and the ghost pass) hold on top of training, in copies of the trainable weights.

    python benchmarks/bench_split_memory.py [--hidden 1024 --layers 8 --rows 8] [--bf16] [--json out.json]

After one AdamW step of a random Llama (batch `--rows` rows, weight decay 0.01), `measure_step` runs as the callback
runs it at batch > 1: each row's loss slope along the newest gradient's part of the update, and (with --ghost) a
probe forward at θ_{t−1} + u. The process's peak resident memory is reset just before (Linux: /proc/self/clear_refs)
and read just after; the extra is printed in copies of the trainable weights (machine-independent: a ratio of bytes
measured in one run). The callback's own θ_{t−1} copy (`base`, taken before the step) is counted separately as 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def vm(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--ghost", action="store_true", help="also the ghost pass (a forward at θ_{t−1} + u)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, LlamaConfig

    from gpu_check import report
    from smda_callback.credit import measure_step, read_kernel, trainable_params

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=args.vocab)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    rows = []
    for _ in range(args.rows):
        ids = torch.randint(0, args.vocab, (1, args.tokens))
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, foreach=False)
    for i in range(2):  # one step taken (so Adam's moments exist), then the measured step's gradient
        opt.zero_grad()
        (sum(model(**r).loss for r in rows) / len(rows)).backward()
        if i == 0:
            opt.step()
    params = trainable_params(opt)
    base = [p.detach().clone() for p in params]
    opt.step()
    kernel, _ = read_kernel("optimizer", opt)
    weights = sum(p.numel() * p.element_size() for p in params)
    ghost = (lambda: model(input_ids=rows[0]["input_ids"]).logits.sum().item()) if args.ghost else None
    with open("/proc/self/clear_refs", "w") as fh:  # resets the peak (VmHWM) to the current resident size
        fh.write("5")
    before = vm("VmRSS")
    slopes, _ = measure_step(opt, model, kernel, 2, base, rows, ghost)
    extra = vm("VmHWM") - before
    res = {"trainable_gib": weights / 2**30, "dtype": str(next(model.parameters()).dtype), "rows": args.rows,
           "ghost": args.ghost, "split_extra_copies": extra / weights, "slopes_finite": bool(torch.isfinite(torch.as_tensor(slopes)).all())}
    report(res, args.json)
    return res


if __name__ == "__main__":
    main()
