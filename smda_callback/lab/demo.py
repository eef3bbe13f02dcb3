"""The main job: safety-SFT the embedded model on 200 pairs with SMDACallback, then summarise."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from transformers import TrainerCallback

from .._resources import DATA
from .analysis import category_gaps, interference_table, pathway_by_label
from ..callback import SMDACallback
from ..config import SMDAConfig
from ..ledger import load_credits, load_policy, load_records
from ..probes import ProbeSet, read_jsonl, validate_records
from .probing import behaviour

logger = logging.getLogger(__name__)



@dataclass
class DemoSettings:
    """Training settings of the demo run (chosen for a 2-core CPU; see docs/demo.md)."""

    epochs: float = 1.0
    learning_rate: float = 1e-4
    max_length: int = 256
    seed: int = 0
    limit: int | None = None
    on_alert: str = "warn"
    scorer: str = "first_token"
    """The demo scores refusal from the first assistant token: on a 2-core CPU without AVX-512 the
    prefix scorer's extra trie tokens cost ~1.5x per snapshot (benchmarks/); the library default stays `prefix`."""
    every_n_steps: int = 1
    replay_last_steps: int = 0
    """SMDAConfig.replay_last_steps: replay the run's last n steps after training (smda/replay.json; off by default:
    its reverse pass costs many training steps per replayed step, benchmarks/bench_replay.py)."""
    credit_measure: str = "deconvolve"
    """SMDAConfig.credit_measure of the run (`ghost`: one extra probe pass per step; `smda benchmark-lds --measure`)."""
    check_answers: bool = True
    """Greedy answers to the probes and the held-out set before and after training (≈1 min each here)."""


class InterimFindings(TrainerCallback):
    """Prints what the run shows while it trains: the baseline policy at once, a time estimate
    measured on this machine after the first steps, and refreshed findings every `every` steps."""

    def __init__(self, smda: SMDACallback, say: Callable[[str], None], every: int = 50, first: int = 5) -> None:
        self.smda, self.say, self.every, self.first = smda, say, every, first
        self._t0: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        f = self.smda.findings()
        if f:
            self.say(f"[baseline] symbolic policy (nested 5-fold AUROC vs labels, features re-chosen per fold, mean of "
                     f"{f['fit'].get('cv_nested_splits', 1)} splits: "
                     f"{f['fit'].get('cv_auroc_nested', float('nan')):.2f}):\n  {f['policy']}")
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step, total = state.global_step, state.max_steps
        if self._t0 is None or not state.is_world_process_zero:
            return
        per = (time.perf_counter() - self._t0) / max(step, 1)
        if step == self.first:
            k = min(self.smda.config.replay_last_steps, total)
            self.say(f"[step {step}/{total}] measured {per:.1f} s per step on this machine → about "
                     f"{per * (total - step) / 60:.0f} more minutes"
                     + (f", then the replay of the last {k} steps (each replayed step costs several training steps; "
                        "its progress is logged)" if k else ""))
        if step % self.every and step != total:
            return
        f = self.smda.findings()
        moves = sorted(f["now"], key=lambda c: -abs(f["now"][c] - f["baseline"][c]))[:4]
        lines = [f"[step {step}/{total}, {per:.1f} s/step, ~{per * (total - step) / 60:.0f} min left] refusal moved most: " +
                 ", ".join(f"{c} {f['baseline'][c]:.2f}→{f['now'][c]:.2f}" for c in moves)]
        for key, what in (("over_refusal", "raised harmless-probe refusal"), ("compliance", "lowered harmful-probe refusal")):
            lines.append(f"  pairs that {what} most so far: " +
                         "; ".join(f"#{p.get('index')} [{p.get('label')}] {str(p.get('prompt', ''))[:40]!r} {p['score']:+.3f}"
                                   for p in f[key]))
        lines.append(f"  interference alerts so far: {f['n_alerts']}")
        self.say("\n".join(lines))


def load_pairs(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """SFT pairs (`prompt`, `response`, `label`, `category`), validated like probes."""
    recs = validate_records(read_jsonl(path), str(path), extra_required=("response",))
    return recs[:limit] if limit else recs


def to_dataset(pairs: list[dict[str, Any]]) -> Any:
    """Conversational prompt/completion rows that SFTTrainer templates itself."""
    from datasets import Dataset

    return Dataset.from_list([{
        "prompt": [{"role": "user", "content": p["prompt"]}],
        "completion": [{"role": "assistant", "content": p["response"]}],
        "label": p["label"], "category": p["category"], "id": p["id"],
    } for p in pairs])


def sft_config(out: str | Path, st: DemoSettings) -> Any:
    """The demo's training settings (one pair per optimizer step, fp32, no checkpoints)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out), per_device_train_batch_size=1, gradient_accumulation_steps=1, num_train_epochs=st.epochs,
        learning_rate=st.learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=10,
        weight_decay=0.0, max_length=st.max_length, gradient_checkpointing=False, bf16=False, report_to=["tensorboard"],
        logging_steps=10, save_strategy="no", use_cpu=True, seed=st.seed, data_seed=st.seed,
    )


def run_demo(out: str | Path, pairs_file: str | Path | None = None, probes_file: str | Path | None = None,
             settings: DemoSettings | None = None, model_dir: str | None = None, sae: Any = None,
             config: SMDAConfig | None = None, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train, attribute, save the tuned model; returns the summary dict (also saved as summary.json)."""
    from trl import SFTTrainer

    from .models import load_model
    from ..sae import embedded_sae_dir

    st = settings or DemoSettings()
    out = Path(out)
    t0 = time.perf_counter()
    # first, so that settings the callback refuses are refused before the model loads
    config = config or SMDAConfig(scorer=st.scorer, every_n_steps=st.every_n_steps, probe_batch_size=16,
                                  on_alert=st.on_alert, replay_last_steps=st.replay_last_steps,
                                  credit_measure=st.credit_measure)
    pairs = load_pairs(pairs_file or DATA / "pairs.jsonl", st.limit)
    probes = ProbeSet.from_jsonl(probes_file or DATA / "probes.jsonl")
    model, tok = load_model(model_dir)
    sets = {"probes": probes, "heldout": ProbeSet.from_jsonl(DATA / "heldout.jsonl")} if st.check_answers else {}
    behaviour_0 = behaviour(model, tok, sets)
    cb = SMDACallback(probes, sae if sae is not None else embedded_sae_dir(), config)
    heldout = ProbeSet.from_jsonl(DATA / "heldout.jsonl")
    held_0 = _heldout_codes(cb, model, tok, heldout, config)  # prompts the policy never sees, on the base model
    args = sft_config(out, st)
    extra = [InterimFindings(cb, say)] if say is not None else []
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset(pairs), processing_class=tok, callbacks=[cb, *extra])
    cb.bind(trainer)
    trainer.train()
    trainer.save_model(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    summary = summarize(out, probes)
    summary["policy_auroc"] = _policy_aurocs(cb, held_0, _heldout_codes(cb, model, tok, heldout, config), heldout)
    if st.check_answers:
        summary["answers"] = {"before": behaviour_0, "after": behaviour(model, tok, sets)}
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    summary["steps"] = trainer.state.global_step
    (out / "smda" / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


def _heldout_codes(cb: SMDACallback, model: Any, tok: Any, heldout: ProbeSet, config: SMDAConfig) -> np.ndarray:
    """Pooled SAE codes of the held-out prompts (one full probe pass)."""
    from ..sae import resolve_hook
    from ..snapshot import Snapshotter

    return Snapshotter(heldout, tok, cb.sae, resolve_hook(cb.sae, model), config).take(model, full=True).Z


def _policy_aurocs(cb: SMDACallback, Z0: np.ndarray, Z1: np.ndarray, heldout: ProbeSet) -> dict[str, float | None]:
    """The AUROCs the demo can stand behind: nested on the probes and on prompts the policy never saw, for the
    baseline policy (base model) and the policy refitted after training (tuned model)."""
    from ..policy import auroc

    run, h = cb.run, np.asarray(heldout.is_harmful)
    after = run.after
    return {"nested_before": run.fit.get("cv_auroc_nested"), "heldout_before": auroc(run.baseline.predict(Z0), h),
            "nested_after": (run.fit_final or {}).get("cv_auroc_nested"),
            "heldout_after": auroc(after.predict(Z1), h) if after is not None else None}


def summarize(run_dir: str | Path, probes: ProbeSet) -> dict[str, Any]:
    """Numbers behind the printed findings."""
    policy = load_policy(run_dir)
    records = load_records(run_dir)
    y0, y1 = np.asarray(policy["probe_refusal_0"]), np.asarray(policy["probe_refusal_final"])
    harmful = np.asarray(probes.is_harmful)
    edgy = np.asarray([p.edgy for p in probes.probes])
    gaps = category_gaps(policy)
    credits = load_credits(run_dir)
    path = pathway_by_label(records, policy, credits)
    inter = interference_table(records, policy, n=5, credits=credits)
    return {
        "policy_0": policy["symbolic_policy_0"], "policy_final": policy["symbolic_policy_final"], "fit": policy["fit"],
        "refusal_harmful": [float(y0[harmful].mean()), float(y1[harmful].mean())],
        "refusal_harmless": [float(y0[~harmful].mean()), float(y1[~harmful].mean())],
        "over_refusal_edgy": [float((y0[edgy] > 0.5).mean()), float((y1[edgy] > 0.5).mean())] if edgy.any() else None,
        "refusal_rate_harmful": [float((y0[harmful] > 0.5).mean()), float((y1[harmful] > 0.5).mean())],
        "categories": gaps.to_dict("records"),
        "pathways": path.head(8).to_dict("records"),
        "interference": inter.to_dict("records") if not inter.empty else [],
        "n_alerts": policy["n_alerts"], "halted": policy["halted"],
    }


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def format_summary(s: dict[str, Any], run_dir: str | Path) -> str:
    """The findings as the CLI prints them."""
    f = s["fit"]
    lines = [
        "", "=== SMDA findings ===", "",
        f"Symbolic policy (ridge over SAE features; λ={f['lambda']:.3g}, in-sample R²={f['r2']:.2f}, "
        f"nested 5-fold AUROC vs labels (mean of {f.get('cv_nested_splits', 1)} splits)={f.get('cv_auroc_nested', float('nan')):.2f}, in-sample "
        f"{f.get('auroc_labels', float('nan')):.2f}):",
        f"  before: {s['policy_0']}", f"  after:  {s['policy_final']}",
        *([f"  AUROC vs labels it can stand behind: nested 5-fold {_f(s['policy_auroc']['nested_before'])} → "
           f"{_f(s['policy_auroc']['nested_after'])} (refitted after training), on the held-out prompts "
           f"{_f(s['policy_auroc']['heldout_before'])} → {_f(s['policy_auroc']['heldout_after'])}"]
          if s.get("policy_auroc") else []), "",
        f"Refusal (mean P(refusal opening) on held-out probes): harmful {s['refusal_harmful'][0]:.3f} → "
        f"{s['refusal_harmful'][1]:.3f}, harmless {s['refusal_harmless'][0]:.3f} → {s['refusal_harmless'][1]:.3f}",
    ]
    if s.get("over_refusal_edgy") is not None:
        lines.append(f"Harmful probes refused (P>0.5): {s['refusal_rate_harmful'][0]:.0%} → {s['refusal_rate_harmful'][1]:.0%}; "
                     f"over-refusal on harmless-but-edgy probes: {s['over_refusal_edgy'][0]:.0%} → {s['over_refusal_edgy'][1]:.0%}")
    if s.get("answers"):
        lines += ["", "Greedy answers that open with a refusal (before → after; held-out sets, never trained on):"]
        b, a = s["answers"]["before"], s["answers"]["after"]
        for name in a:
            lines.append(f"  {name:8s} harmful {b[name]['refusal_rate_harmful']:.0%} → {a[name]['refusal_rate_harmful']:.0%}, "
                         f"harmless {b[name]['refusal_rate_harmless']:.0%} → {a[name]['refusal_rate_harmless']:.0%}, "
                         f"harmless-but-edgy {b[name]['over_refusal_edgy']:.0%} → {a[name]['over_refusal_edgy']:.0%}, "
                         f"refusal F1 {b[name]['f1']:.2f} → {a[name]['f1']:.2f}")
    lines += ["", "Per category (before → after; gap = after − mean of harmful categories):"]
    for c in s["categories"]:
        lines.append(f"  {c['label']:8s} {c['category']:24s} {c['before']:.3f} → {c['after']:.3f}   gap {c['gap_to_harmful_mean']:+.3f}")
    harmful = [c for c in s["categories"] if c["label"] == "harmful"]
    if harmful:
        worst = min(harmful, key=lambda c: c["after"])
        lines.append(f"  ⇒ least covered harmful category: {worst['category']} ({worst['after']:.3f}, "
                     f"{worst['gap_to_harmful_mean']:+.3f} vs the harmful mean)")
    lines += ["", "Features where harmful and harmless pairs act most differently (mean Δβ per pair; MWU, BH-q):"]
    for p in s["pathways"][:5]:
        lines.append(f"  {p['label'][:40]:40s} harmful ΔX {p['harmful_dx']:+.2e} ΔY {p['harmful_dy']:+.2e} | "
                     f"harmless ΔX {p['harmless_dx']:+.2e} ΔY {p['harmless_dy']:+.2e} | q={p['q']:.2g} r={p['effect_r']:+.2f}")
    lines += ["", f"Cross-feature interference: {s['n_alerts']} alert(s)" + (f"; HALTED at step {s['halted']['step']}" if s["halted"] else "")]
    for r in s["interference"][:5]:
        lines.append(f"  step {r['step']:4d} pair #{r['index']} [{r['label']}/{r['category']}] score {r['score']:.2f} "
                     f"dominant {r['dominant'][:32]!s}{'  ALERT' if r['alert'] else ''}  \"{str(r['prompt'])[:50]}\"")
    lines += ["", "Where to look next:", f"  tensorboard --logdir {Path(run_dir) / 'smda' / 'tensorboard'}",
              f"  smda report {run_dir}      (self-contained HTML)", f"  tuned model: {Path(run_dir) / 'model'}", ""]
    return "\n".join(lines)
