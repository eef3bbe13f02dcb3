"""Where results go: the JSONL ledger, policy.json and TensorBoard (rank 0 only).

A sink never kills training: a failing write (read-only or full disk) is logged
once and the run goes on; the ledger is appended and flushed line by line, so a
crash leaves at most one torn last line, which readers drop.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

LEDGER = "attribution.jsonl"
POLICY = "policy.json"
CREDITS = "credits.json"
REPLAY = "replay.json"
"""The replay of the run's last steps (SMDAConfig.replay_last_steps; schema.replay_record)."""


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=_jsonable, allow_nan=True)


def read_ledger_lines(path: str | Path) -> list[dict[str, Any]]:
    """Parse a ledger, dropping a torn final line (the only kind a crash can leave)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                logger.warning("%s: dropped a torn last line (interrupted write)", path)
                continue
            raise ValueError(f"{path}:{i + 1}: corrupt ledger line") from None
    return out


PRIVATE_DIR = "_smda_private"
"""Beside smda/: `Trainer.push_to_hub` skips top-level names starting with `_`, so prompt text kept here stays local."""
PROMPTS = "prompts.json"


def private_dir(smda_dir: str | Path) -> Path:
    return Path(smda_dir).parent / PRIVATE_DIR


def _walk_pairs(obj: Any) -> Iterable[dict[str, Any]]:
    """Every dict in a record that names a pair (has a `hash`)."""
    if isinstance(obj, dict):
        if "hash" in obj:
            yield obj
        for v in obj.values():
            yield from _walk_pairs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_pairs(v)


def join_prompts(obj: Any, smda_dir: str | Path) -> Any:
    """Put the prompt text kept in the private folder back into a record read from smda/ (in place)."""
    path = private_dir(smda_dir) / PROMPTS
    if not path.exists():
        return obj
    prompts = json.loads(path.read_text(encoding="utf-8"))
    for d in _walk_pairs(obj):
        if "prompt" not in d and d["hash"] in prompts:
            d["prompt"] = prompts[d["hash"]]
    return obj


class LedgerWriter:
    """Append-only JSONL, one flushed line per record.

    `prompt_text` (SMDAConfig.prompt_text): `private` moves every pair's prompt text out of smda/ into
    `_smda_private/prompts.json` (hash → text), `ledger` keeps it in the records, `none` drops it.
    """

    def __init__(self, directory: str | Path, prompt_text: str = "private") -> None:
        self.dir = Path(directory)
        self.path = self.dir / LEDGER
        self.prompt_text = prompt_text
        self._prompts: dict[str, str] = {}
        self._failed = False

    def _scrub(self, obj: Any) -> Any:
        """A copy of `obj` with prompt text moved out (or dropped) per `prompt_text`."""
        if self.prompt_text == "ledger":
            return obj
        obj = json.loads(json.dumps(obj, default=_jsonable))
        new = False
        for d in _walk_pairs(obj):
            text = d.pop("prompt", None)
            if isinstance(text, str) and self.prompt_text == "private" and self._prompts.get(d["hash"]) != text:
                self._prompts[d["hash"]] = text
                new = True
        if new:
            self._write_private()
        return obj

    def _write_private(self) -> None:
        def do() -> None:
            priv = private_dir(self.dir)
            priv.mkdir(parents=True, exist_ok=True)
            path = priv / PROMPTS
            known = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
            known.update(self._prompts)
            tmp = priv / (PROMPTS + ".tmp")
            tmp.write_text(json.dumps(known, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, path)
        self._guard(str(private_dir(self.dir) / PROMPTS), do)

    def _guard(self, what: str, fn: Any) -> bool:
        if self._failed:
            return False
        try:
            fn()
            return True
        except OSError as exc:
            self._failed = True
            logger.error("smda: cannot write %s (%s). Training continues; further writes are skipped. "
                         "Fix the output directory's permissions or free space.", what, exc)
            return False

    def truncate_after(self, step: int) -> None:
        """On resume: keep records of steps ≤ `step`, drop the rest and any torn line."""
        def do() -> None:
            kept = [r for r in read_ledger_lines(self.path) if int(r["step"]) <= step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        if self.path.exists():
            self._guard(str(self.path), do)

    def reset(self) -> None:
        def do() -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.path.write_text("", encoding="utf-8")
        self._guard(str(self.path), do)

    def append(self, record: dict[str, Any]) -> None:
        line = dumps(self._scrub(record)) + "\n"

        def do() -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
        self._guard(str(self.path), do)

    def remove(self, name: str) -> None:
        """Remove an output of an earlier run in this folder (a missing file is fine)."""
        self._guard(name, lambda: (self.dir / name).unlink(missing_ok=True))

    def write_json(self, name: str, obj: Any) -> None:
        """Atomic write (temp file + rename) so readers never see half a file."""
        def do() -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / (name + ".tmp")
            tmp.write_text(json.dumps(self._scrub(obj), default=_jsonable, indent=1), encoding="utf-8")
            os.replace(tmp, self.dir / name)
        self._guard(name, do)


def wants_tensorboard(report_to: Any) -> bool:
    """TensorBoard custom scalars follow `TrainingArguments.report_to` (the one switch for trackers)."""
    rt = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return "tensorboard" in rt or "all" in rt


def slug(text: str, n: int = 28) -> str:
    """A tag-safe name (TensorBoard, MLflow and W&B accept [A-Za-z0-9_.-/ ])."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:n].strip("_")


def tracker_scalars(record: dict[str, Any], labels: Sequence[str], n_alerts: int, top: int = 8) -> dict[str, float]:
    """The small set of numbers a user watches, for `trainer.log` (so every `report_to` backend gets them):
    refusal on harmful and harmless probes and per category, interference, alerts, the `top` largest |β| now
    (keyed by rank, so a chart keeps its lines; the label is in the key), the step's credit residual."""
    out = {"smda/refusal_harmful": float(record["refusal_harmful"]),
           "smda/refusal_harmless": float(record["refusal_harmless"]),
           "smda/interference": float(record["interference"]), "smda/alerts": float(n_alerts),
           "smda/credit_residual": float(np.abs(record["credit"]["residual_d"]).sum())}
    out.update({f"smda/refusal/{slug(c)}": float(v) for c, v in record["refusal_by_category"].items()})
    beta = np.asarray(record["beta"], dtype=np.float64)
    for j in np.argsort(-np.abs(beta), kind="mergesort")[:top]:
        out[f"smda/beta/{slug(labels[j])}"] = float(beta[j])
    return out


def layout_dict(feature_tags: Iterable[str], category_tags: Iterable[str]) -> dict[str, dict[str, list[str]]]:
    """Custom-scalars layout: panel → chart → tag regexes."""
    return {
        "Policy": {"largest coefficients β (each its own colour)": [r"smda/beta_top"],
                   "all coefficients β": [r"smda/beta/.*"], "intercept": ["smda/policy/intercept"]},
        "Categories": {"harmful categories: measured refusal": [r"smda/category/harmful"],
                       "harmless categories: measured refusal": [r"smda/category/harmless"],
                       "predicted refusal": [r"smda/predicted/.*"]},
        "Pathways": {"share of |Δβ| by pathway": ["smda/pathway/x_share", "smda/pathway/y_share"],
                     "|Δβ| per step": ["smda/pathway/abs_x", "smda/pathway/abs_y"]},
        "Interference": {"off-target share": ["smda/interference/score"], "alerts": ["smda/interference/alerts"]},
    }


class TensorBoardSink:
    """Lazy SummaryWriter (created on first write, like transformers' TensorBoardCallback).

    TensorBoard colours lines by run, not by tag, so series that belong in one chart with distinct
    colours (the largest coefficients, the categories) go to sub-run folders via `series`."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = str(log_dir)
        self._writer: Any = None
        self._subs: dict[str, Any] = {}
        self._failed = False

    def _open(self, log_dir: str) -> Any:
        if self._failed:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=log_dir)
        except (OSError, ImportError) as exc:
            self._failed = True
            logger.error("smda: TensorBoard disabled (%s). Install tensorboard or fix %s.", exc, self.log_dir)
            return None

    @property
    def writer(self) -> Any:
        if self._writer is None:
            self._writer = self._open(self.log_dir)
        return self._writer

    def series(self, run: str, tag: str, value: float, step: int) -> None:
        """One value of a series kept in its own sub-run `log_dir/run` (its own colour in a shared chart)."""
        if run not in self._subs:
            self._subs[run] = self._open(str(Path(self.log_dir) / run))
        w = self._subs[run]
        if w is not None and value is not None and np.isfinite(value):
            w.add_scalar(tag, float(value), step)

    def layout(self, feature_tags: list[str], category_tags: list[str]) -> None:
        if self.writer is None:
            return
        self.writer.add_custom_scalars({
            panel: {title: ["Multiline", tags] for title, tags in group.items()}
            for panel, group in layout_dict(feature_tags, category_tags).items()
        })

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            if v is not None and np.isfinite(v):
                self.writer.add_scalar(tag, float(v), step)

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        if self.writer is not None and len(values) and np.isfinite(values).all():
            self.writer.add_histogram(tag, np.asarray(values, np.float64), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def start(self, labels: Sequence[str], categories: Sequence[str], policy_text: str, step: int) -> None:
        """At baseline: the custom-scalars layout and the policy as text."""
        self.layout(list(labels), list(categories))
        self.text("smda/policy", policy_text, step)
        self.flush()

    def record(self, record: dict[str, Any], labels: Sequence[str], top: Sequence[int], category_label: dict[str, str],
               n_alerts: int, policy_text: str | None = None) -> None:
        """One ledger record as TensorBoard scalars, series, histograms (and the policy as text when given)."""
        step = record["step"]
        vals: dict[str, float] = {f"smda/beta/{slug(l)}": b for l, b in zip(labels, record["beta"])}
        vals.update({f"smda/refusal/{slug(c)}": v for c, v in record["refusal_by_category"].items()})
        vals.update({f"smda/predicted/{slug(c)}": v for c, v in record["predicted_by_category"].items()})
        ax, ay = float(np.abs(record["delta_beta_x"]).sum()), float(np.abs(record["delta_beta_y"]).sum())
        vals.update({"smda/pathway/abs_x": ax, "smda/pathway/abs_y": ay,
                     "smda/pathway/x_share": ax / (ax + ay) if ax + ay > 0 else 0.0,
                     "smda/pathway/y_share": ay / (ax + ay) if ax + ay > 0 else 0.0,
                     "smda/interference/score": record["interference"],
                     "smda/interference/alerts": float(n_alerts),
                     "smda/policy/intercept": record["intercept"],
                     "smda/health/first_order_gap": record["first_order_gap"]})
        self.scalars(vals, step)
        beta = np.asarray(record["beta"])
        for j in top:
            self.series(f"beta/{slug(labels[j])}", "smda/beta_top", float(beta[j]), step)
        for c, v in record["refusal_by_category"].items():
            self.series(f"category/{slug(c)}", f"smda/category/{category_label[c]}", v, step)
        for key in ("delta_beta", "delta_beta_x", "delta_beta_y"):
            self.histogram(f"smda/{key}", np.asarray(record[key]), step)
        if policy_text is not None:
            self.text("smda/policy", policy_text, step)
        self.flush()

    def flush(self) -> None:
        for w in (self._writer, *self._subs.values()):
            if w is not None:
                w.flush()

    def close(self) -> None:
        for w in (self._writer, *self._subs.values()):
            if w is not None:
                w.close()
        self._writer = None
        self._subs.clear()



class RunSinks:
    """Where one run's results go: the ledger, policy.json and credits.json and TensorBoard from rank 0, the
    tracker-neutral scalars through `trainer.log` from every rank (TRL's `log` gathers across ranks, and the
    integrations write from rank 0 only)."""

    def __init__(self, out: str | Path, prompt_text: str, main: bool, tensorboard: bool, trainer: Any = None,
                 log_to_trainer: bool = True, text_every: int = 50, top_beta: int = 8) -> None:
        self.main, self.trainer, self.log_to_trainer = main, trainer, log_to_trainer
        self.text_every, self.top_beta = max(int(text_every), 1), top_beta
        self.ledger = LedgerWriter(out, prompt_text)
        self.tb = TensorBoardSink(Path(out) / "tensorboard") if main and tensorboard else None

    def baseline(self, run: Any, policy: dict[str, Any], step: int) -> None:
        if not self.main:
            return
        self.ledger.reset()
        self.ledger.remove(REPLAY)  # written at train end, by this run's replay only
        self.policy(run, policy)
        if self.tb is not None:
            self.tb.start(run.labels, run.categories, run.policy_text(run.beta0, run.b0), step)
            urls = policy.get("feature_urls") or {}
            if urls:  # TensorBoard renders markdown: each policy feature links to its Neuronpedia page
                self.tb.text("smda/feature_pages", "\n".join(f"* [{lab}]({urls[str(int(j))]})" for j, lab in
                                                             zip(run.features, run.labels) if str(int(j)) in urls), step)

    def policy(self, run: Any, policy: dict[str, Any]) -> None:
        if self.main:
            self.ledger.write_json(POLICY, policy)
            self.ledger.write_json(CREDITS, run.credits_record())

    def step(self, record: dict[str, Any], run: Any, logging_steps: int, last: bool) -> None:
        step = record["step"]
        if self.main:
            self.ledger.append(record)
            if self.tb is not None and "beta" in record:
                top = np.argsort(-np.abs(run.beta0), kind="mergesort")[:self.top_beta]
                text = run.policy_text(np.asarray(record["beta"]), record["intercept"]) if step % self.text_every == 0 else None
                cat_label = {p.category: p.label for p in run.probes.probes}
                self.tb.record(record, run.labels, top, cat_label, run.alerts.n_alerts, text)
            if step % self.text_every == 0:
                self.ledger.write_json(CREDITS, run.credits_record())
        if ("beta" in record and self.log_to_trainer and self.trainer is not None
                and (step % max(int(logging_steps or 1), 1) == 0 or last or record.get("halted"))):
            self.trainer.log(tracker_scalars(record, run.labels, run.alerts.n_alerts, self.top_beta))

    def resume(self, step: int) -> None:
        """A run resumed at `step`: the ledger keeps the records up to it."""
        if self.main:
            self.ledger.truncate_after(step)
            self.ledger.remove(REPLAY)

    def close(self, run: Any, policy: dict[str, Any], step: int) -> None:
        if not self.main:
            return
        self.policy(run, policy)
        if self.tb is not None:
            self.tb.text("smda/policy", run.policy_text(run.beta(), run.b0), step)
            self.tb.close()
