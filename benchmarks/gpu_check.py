"""What SMDA costs where users train: one command, on whatever accelerator is present (CPU included).

    python benchmarks/gpu_check.py --shape llama-3.2-1b            # full fine-tune, bf16 where supported
    python benchmarks/gpu_check.py --shape llama-3.2-1b --lora
    torchrun --nproc_per_node 2 benchmarks/gpu_check.py --shape llama-3.2-1b --fsdp
    python benchmarks/gpu_check.py --smoke                         # tiny shape, CPU, seconds (run by the tests)

Needs only: torch, transformers, accelerate, numpy, pandas, safetensors, tensorboard (and peft for --lora),
plus this repository on the path (`PYTHONPATH=.`). No trl, sae-lens, datasets or network: the model is a
randomly initialised one of a named real shape (cost does not depend on the weights) or `--model DIR`, the
SAE a random TopK SAE written here with sae-lens' encode/decode surface, the tokenizer a word-level one built
from the shipped probes and pairs with a ChatML template (or the model folder's own). Random models are built on
the device; a timed progress line per phase goes to stderr, so a run stopped at a time limit says where it was.

Prints, side by side in one run (same seed, same initial weights, same batches):
  step s (bare / with SMDA), callback s per step and its ratio to the bare step (and of it the probe pass and the
  in-step split, the records' seconds_probe and seconds_split), peak device memory with and
  without the callback, the credit's telescoping error, whether the trained weights are bitwise identical
  with and without the callback, and X/Y agreement of a probe pass in the training dtype with an fp32 one.
  With --replay K (default 4; 2 in --smoke; off for 0, --fsdp or several processes) a third run with
  SMDAConfig(replay_last_steps=K): the replay's seconds per replayed step against the bare step, its peak device
  memory, how far its recomputation lands from the trained weights, whether the weights are left as trained, and
  the error if it failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES: dict[str, dict[str, Any]] = {
    # hidden, intermediate, layers, heads, kv heads, vocab: the published configs' shapes
    "llama-3.2-1b": dict(arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.2-3b": dict(arch="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class RandomTopKSAE(nn.Module):
    """A random TopK SAE with sae-lens' inference surface (W_enc, b_enc, W_dec, b_dec, encode, decode, cfg)."""

    def __init__(self, d_in: int, d_sae: int, k: int, hook_name: str, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(self.W_enc.detach().T.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.k = k
        meta = argparse.Namespace(hook_name=hook_name, model_name="random", neuronpedia_id=None)
        self.cfg = argparse.Namespace(d_in=d_in, d_sae=d_sae, k=k, metadata=meta)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec


def word_tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    special = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts + ["system user assistant"], trainers.WordLevelTrainer(special_tokens=special))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


T0 = time.perf_counter()


def say(msg: str) -> None:
    """A progress line on stderr (seconds since the start), so that a run stopped at its time limit shows where."""
    print(f"[gpu_check {time.perf_counter() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def build_model(args: argparse.Namespace, tok: Any, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    shape = dict(SHAPES[args.shape])
    arch = shape.pop("arch")
    shape["vocab_size"] = max(shape["vocab_size"], len(tok))  # the tiny shape with more data than --smoke's
    common = dict(max_position_embeddings=2048, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.bos_token_id)
    cfg = (LlamaConfig if arch == "llama" else Qwen2Config)(**shape, **common)
    torch.manual_seed(args.seed)
    with torch.device(device):  # a random init of 1B weights on the CPU takes ~30 s; on the device, a moment
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def encode_pairs(tok: Any, pairs: list[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    rows = []
    for p in pairs:
        prompt = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False, add_generation_prompt=True)
        full = prompt + p["response"] + "<|im_end|>\n"
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        ids = tok(full, add_special_tokens=False)["input_ids"][:max_length]
        rows.append({"input_ids": ids, "labels": [-100] * min(n, len(ids)) + ids[n:]})
    return rows


class Collate:
    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        T = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        lab = torch.full((len(rows), T), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            lab[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": mask}


class StepTimer:
    """Wall time of each optimizer step as the Trainer sees it (on_step_begin → on_step_end)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._t0 = device, [], 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class _T(TrainerCallback):
            def on_step_begin(self, *a: Any, **k: Any) -> None:
                timer._sync()
                timer._t0 = time.perf_counter()

            def on_step_end(self, *a: Any, **k: Any) -> None:
                timer._sync()
                timer.times.append(time.perf_counter() - timer._t0)
        return _T()


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (GiB), never reset


def train(args: argparse.Namespace, tok: Any, rows: list, init: dict, dtype: torch.dtype, device: torch.device,
          out: Path, smda: Any = None) -> tuple[Any, StepTimer, float]:
    from transformers import Trainer, TrainingArguments

    model = build_model(args, tok, dtype, device)
    model.load_state_dict(init)
    if args.lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(device)
    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-4,
        weight_decay=0.01, logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed,
        bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu", disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, fsdp="full_shard" if args.fsdp else "", lr_scheduler_type="constant")
    cbs = [timer.callback()] + ([smda] if smda is not None else [])
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=Collate(tok.pad_token_id),
                      processing_class=tok, callbacks=cbs)
    if smda is not None:
        smda.bind(trainer)
    trainer.train()
    return trainer.model, timer, peak_memory(device)


def replay_run(args: argparse.Namespace, tok: Any, rows: list, init: dict, dtype: torch.dtype, device: torch.device,
               tmp: Path, make_sae: Any, probes: list, bare_w: dict) -> dict[str, Any]:
    """The same training with SMDAConfig(replay_last_steps=K): what the replay of the last K steps costs here and
    whether it reproduces and restores the trained weights (the callback logs a failed replay; it is caught here)."""
    import logging

    from smda_callback import ProbeSet, SMDACallback, SMDAConfig

    if not args.replay or args.fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return {"replay": "off" if not args.replay else "not with several processes (the replay steps one process's model)"}
    errors: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record.getMessage())

    grab = Grab(logging.ERROR)
    logging.getLogger("smda_callback").addHandler(grab)
    try:
        smda = SMDACallback(ProbeSet.from_records(probes), make_sae(), SMDAConfig(
            n_features=48, scorer="first_token", replay_last_steps=args.replay, replay_every=1), output_dir=tmp / "replay_run")
        model, _, mem = train(args, tok, rows, init, dtype, device, tmp / "replay", smda)
    finally:
        logging.getLogger("smda_callback").removeHandler(grab)
    path = tmp / "replay_run" / "smda" / "replay.json"
    rep = json.loads(path.read_text()) if path.exists() else None
    out: dict[str, Any] = {
        "replay": f"last {args.replay} steps" if rep else "failed: " + (" | ".join(errors) or "no replay.json"),
        "replay_weights_left_as_trained": all(torch.equal(bare_w[k], v.detach().cpu())
                                              for k, v in model.state_dict().items()),
        "peak_mem_replay_gib": mem}
    if rep:
        out.update(replay_s_per_step=rep["seconds"] / len(rep["steps"]),
                   replay_recompute_gap_to_run=rep["recompute_gap_to_run"],
                   replay_effects_finite=bool(all(np.isfinite(v) for s in rep["steps"] for v in s["removal_effect"].values())))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--model", help="a local HF model folder instead of a random model of --shape")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--probes", type=int, default=130, help="probes per pass (the shipped set has 130)")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--fsdp", action="store_true", help="FSDP full_shard through accelerate (launch with torchrun)")
    ap.add_argument("--fp32", action="store_true", help="train in fp32 even where bf16 is supported")
    ap.add_argument("--bf16", action="store_true", help="train in bf16 on the CPU too (checks the bf16 path without a GPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, 3 steps, batch 2, 12 probes: checks the script runs")
    ap.add_argument("--replay", type=int, default=4, metavar="K",
                    help="also a run with SMDAConfig(replay_last_steps=K) (0: not; one process only, so not with --fsdp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape, args.steps, args.batch, args.probes, args.d_sae = "tiny", 3, 2, 12, 256
        args.replay = min(args.replay, 2)
    if args.replay < 0 or args.replay > args.steps:
        ap.error(f"--replay {args.replay}: replay between 0 and --steps ({args.steps}) steps")

    from smda_callback import ProbeSet, SMDACallback, SMDAConfig
    from smda_callback._resources import data_path
    from smda_callback.snapshot import Snapshotter
    from smda_callback.sae import resolve_hook

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if (bf16_ok or args.bf16) and not args.fp32 else torch.float32
    pairs = load_jsonl(data_path("pairs.jsonl"))
    probes = load_jsonl(data_path("probes.jsonl"))
    probes = [probes[i] for i in np.linspace(0, len(probes) - 1, min(args.probes, len(probes))).astype(int)]
    if args.model:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.model)
    else:
        tok = word_tokenizer([p["prompt"] + " " + p["response"] for p in pairs] + [p["prompt"] for p in probes])
    rows = encode_pairs(tok, pairs[: args.steps * args.batch], 256)
    say(f"{device} {dtype}: building the {args.model or args.shape} model")
    init_model = build_model(args, tok, dtype, device)
    init = {k: v.detach().cpu().clone() for k, v in init_model.state_dict().items()}  # off the device: not in its peaks
    n_params = sum(p.numel() for p in init_model.parameters())
    layer = init_model.config.num_hidden_layers // 2
    hidden = init_model.config.hidden_size
    del init_model

    def make_sae() -> RandomTopKSAE:
        return RandomTopKSAE(hidden, args.d_sae, 64 if args.d_sae >= 1024 else 16, f"blocks.{layer}.hook_resid_post")

    with tempfile.TemporaryDirectory() as tmp:
        say("training without the callback")
        bare_model, bare_t, bare_mem = train(args, tok, rows, init, dtype, device, Path(tmp) / "bare")
        bare_w = {k: v.detach().cpu() for k, v in bare_model.state_dict().items()}
        del bare_model
        smda = SMDACallback(ProbeSet.from_records(probes), make_sae(), SMDAConfig(n_features=48, scorer="first_token"),
                            output_dir=Path(tmp) / "smda_run")
        say("training with the callback")
        smda_model, smda_t, smda_mem = train(args, tok, rows, init, dtype, device, Path(tmp) / "smda", smda)
        same = all(torch.equal(bare_w[k], v.detach().cpu()) for k, v in smda_model.state_dict().items())
        run = Path(tmp) / "smda_run" / "smda"
        recs = [json.loads(line) for line in (run / "attribution.jsonl").read_text().splitlines()]
        policy = json.loads((run / "policy.json").read_text())
        credits = json.loads((run / "credits.json").read_text())
        total = np.sum([p["d"] for p in credits["pairs"]], axis=0) + np.asarray(policy["credit"]["residual_total_d"])
        tele = float(np.abs(total - (np.asarray(policy["beta_final"]) - np.asarray(policy["beta_0"]))).max())
        cb_s = [r["seconds"] for r in recs if "seconds" in r]
        split_s = [r["seconds_split"] for r in recs if "seconds_split" in r]
        probe_s = [r["seconds_probe"] for r in recs if "seconds_probe" in r]
        # X/Y in the training dtype vs an fp32 copy of the same trained weights
        say("probe pass in the training dtype against fp32")
        snap = Snapshotter(ProbeSet.from_records(probes), tok, smda.sae, resolve_hook(smda.sae, smda_model), smda.config)
        snap.features = np.asarray(policy["features"])
        a = snap.take(smda_model)
        ref_model = smda_model.float() if dtype != torch.float32 else smda_model
        b = snap.take(ref_model)
        dx = float(np.abs(a.X - b.X).max() / max(np.abs(b.X).max(), 1e-12))
        dy = float(np.abs(a.Y - b.Y).max())
        step_dx = float(np.median([np.abs(r["delta_beta_x"]).sum() for r in recs if "delta_beta_x" in r]))
        del smda_model, ref_model
        say(f"replay run ({args.replay} steps)" if args.replay else "no replay run")
        replay = replay_run(args, tok, rows, init, dtype, device, Path(tmp), make_sae, probes, bare_w)

    bare_step = float(np.median(bare_t.times[1:] or bare_t.times))
    smda_step = float(np.median(smda_t.times[1:] or smda_t.times))
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
        "shape": args.model or args.shape, "params": n_params, "lora": args.lora, "fsdp": args.fsdp,
        "batch": args.batch, "steps": args.steps, "probes": len(probes), "d_sae": args.d_sae,
        "bare_step_s": bare_step, "smda_step_s": smda_step, "callback_s": float(np.median(cb_s)),
        "callback_over_bare_step": float(np.median(cb_s)) / bare_step,
        "callback_split_s": float(np.median(split_s)), "callback_probe_s": float(np.median(probe_s)),
        "peak_mem_bare_gib": bare_mem, "peak_mem_smda_gib": smda_mem,
        "peak_mem_increase": smda_mem / bare_mem - 1.0 if bare_mem else float("nan"),
        "telescoping_error": tele, "weights_bitwise_identical": bool(same),
        "x_rel_err_vs_fp32": dx, "y_abs_err_vs_fp32": dy, "median_step_abs_delta_beta_x": step_dx,
    }
    if "replay_s_per_step" in replay:  # the replay ran
        replay["replay_s_per_step_over_bare_step"] = replay.pop("replay_s_per_step") / bare_step
    res.update(replay)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        report(res, args.json)
    return res


def report(res: dict[str, Any], json_path: str | None) -> None:
    """The results as a two-column table on stdout, and as JSON at `json_path` when given."""
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
