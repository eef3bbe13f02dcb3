"""What the in-step split (and the ghost pass) hold on top of training, in copies of the trainable weights.

    python benchmarks/bench_split_memory.py [--hidden 1024 --layers 8 --rows 8] [--bf16] [--json out.json]
    python benchmarks/bench_split_memory.py --time 5 --varied   # also: the split's rows stacked vs one per forward
    python benchmarks/bench_split_memory.py --device cuda --bf16 --time 5 --varied --tokens 256   # the same on a GPU

After one AdamW step of a random Llama (batch `--rows` rows, weight decay 0.01), `measure_step` runs as the callback
runs it at batch > 1: each row's loss slope along the newest gradient's part of the update, and (with --ghost) a
probe forward at θ_{t−1} + u. The process's peak resident memory is reset just before (Linux: /proc/self/clear_refs)
and read just after; the extra is printed in copies of the trainable weights (machine-independent: a ratio of bytes
measured in one run). The callback's own θ_{t−1} copy (`base`, taken before the step) is counted separately as 1.

`--time N` then times the split's row slopes N times each way, alternating, in the same process: the rows stacked
into one padded forward per sign (what the callback does at a micro-batch of --rows) and one forward per row
(rows_per_forward=1, as the callback did before 2cc497f), and prints the medians, their ratio and the largest relative gap between the two slopes.
`--varied`: row lengths drawn between half of --tokens and --tokens (padding then costs), instead of all equal.
`--prompt F`: the first F of each row's tokens carry no label (-100), as a chat prompt in SFT does (default 0: every
token labelled). `--head N` times the split's row slopes N times each way, alternating, at --stack rows per forward:
the output head run at the label positions only (what the callback does since the thirtieth session) and at every
position (`causal_lm_row_losses(..., narrow_head=False)`), and prints the medians, their ratio, the largest
relative gap between the two slopes (float rounding differs between the two shapes), and each way's peak memory
beyond what was held before it (MiB; resident memory on the CPU, the device's peak allocation on a GPU).
`--device cuda`: the model and rows on the GPU; the extra memory is then the device's peak allocation beyond what it
held before the split (torch.cuda.max_memory_allocated), not the process's resident memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

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


def peak_beyond(dev: torch.device, fn: Callable[[], Any]) -> tuple[int, Any]:
    """(bytes of peak memory beyond what was held just before `fn`, its result): the device's peak allocation on a
    GPU, the process's peak resident memory (reset through /proc/self/clear_refs) on the CPU."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        with open("/proc/self/clear_refs", "w") as fh:  # resets the peak (VmHWM) to the current resident size
            fh.write("5")
        before = vm("VmRSS")
    out = fn()
    return (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else vm("VmHWM")) - before, out


def alternate(dev: torch.device, n: int, ways: list[Callable[[], Any]]) -> tuple[list[float], list[Any]]:
    """Each way run n times, alternating (so that a machine's drift falls on all): median seconds and last result."""
    secs: list[list[float]] = [[] for _ in ways]
    got: list[Any] = [None] * len(ways)
    for _ in range(n):
        for i, way in enumerate(ways):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            got[i] = way()  # the slopes end on the host
            secs[i].append(time.perf_counter() - t0)
    return [statistics.median(s) for s in secs], got


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--ghost", action="store_true", help="also the ghost pass (a forward at θ_{t−1} + u)")
    ap.add_argument("--time", type=int, default=0, metavar="N", help="also time the split stacked vs one row per forward")
    ap.add_argument("--varied", action="store_true", help="row lengths between --tokens/2 and --tokens")
    ap.add_argument("--stack", type=int, default=8, help="rows per forward in the measured split (the callback: the "
                    "training's micro-batch size; 1: one forward per row)")
    ap.add_argument("--prompt", type=float, default=0.0, help="share of each row's first tokens without a label")
    ap.add_argument("--head", type=int, default=0, metavar="N",
                    help="also time the split with the head at label positions only vs at every position")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the split's memory is then the device's peak)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, LlamaConfig

    from gpu_check import report
    from smda_callback.credit import causal_lm_row_losses, measure_step, read_kernel, row_slopes, trainable_params
    from smda_callback.credit.params import NewestUpdate

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=args.vocab)
    dev = torch.device(args.device)
    with dev:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    rows = []
    for _ in range(args.rows):
        n = int(torch.randint(args.tokens // 2, args.tokens + 1, ())) if args.varied else args.tokens
        ids = torch.randint(0, args.vocab, (1, n)).to(dev)
        labels = ids.clone()
        labels[:, : int(args.prompt * n)] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
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
    extra, slopes = peak_beyond(dev, lambda: measure_step(opt, model, kernel, 2, base, rows, ghost,
                                                          rows_per_forward=args.stack)[0])
    res = {"device": str(dev), "trainable_gib": weights / 2**30, "dtype": str(next(model.parameters()).dtype),
           "rows": args.rows, "rows_per_forward": args.stack,
           "ghost": args.ghost, "split_extra_copies": extra / weights, "slopes_finite": bool(torch.isfinite(torch.as_tensor(slopes)).all())}
    u = NewestUpdate(opt, kernel, 2)
    if args.time:
        (one, stacked), got = alternate(dev, args.time, [
            lambda: row_slopes(params, base, u, causal_lm_row_losses(model, rows, rows_per_forward=1)),
            lambda: row_slopes(params, base, u, causal_lm_row_losses(model, rows, rows_per_forward=args.rows))])
        res.update({"split_s_one_row_per_forward": one, "split_s_stacked": stacked, "stacked_over_one_row": stacked / one,
                    "slopes_max_rel_gap": float((abs(got[0] - got[1]) / abs(got[0]).clip(1e-12)).max())})
    if args.head:
        ways = [lambda narrow=narrow: row_slopes(params, base, u, causal_lm_row_losses(model, rows, args.stack,
                                                                                       narrow_head=narrow))
                for narrow in (True, False)]
        (narrowed, full), got = alternate(dev, args.head, ways)
        peaks = [peak_beyond(dev, way)[0] / 2**20 for way in ways]  # the slopes alone, each way
        labelled = sum(int((r["labels"][:, 1:] != -100).sum()) for r in rows) / sum(r["input_ids"].numel() for r in rows)
        res.update({"label_share": labelled, "split_s_head_at_labels": narrowed, "split_s_head_everywhere": full,
                    "labels_over_everywhere": narrowed / full, "split_peak_mib_head_at_labels": peaks[0],
                    "split_peak_mib_head_everywhere": peaks[1],
                    "head_slopes_max_rel_gap": float((abs(got[0] - got[1]) / abs(got[1]).clip(1e-12)).max())})
    report(res, args.json)
    return res


if __name__ == "__main__":
    main()
