"""Where results go: the JSONL ledger, policy.json and TensorBoard (rank 0 only).

A sink never kills training: a failing write (read-only or full disk) is logged
once and the run goes on; the ledger is appended and flushed line by line, so a
crash leaves at most one torn last line, which readers drop.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

logger = logging.getLogger(__name__)

LEDGER = "attribution.jsonl"
POLICY = "policy.json"
CREDITS = "credits.json"


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


class LedgerWriter:
    """Append-only JSONL, one flushed line per record."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.path = self.dir / LEDGER
        self._failed = False

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
        line = dumps(record) + "\n"

        def do() -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
        self._guard(str(self.path), do)

    def write_json(self, name: str, obj: Any) -> None:
        """Atomic write (temp file + rename) so readers never see half a file."""
        def do() -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / (name + ".tmp")
            tmp.write_text(json.dumps(obj, default=_jsonable, indent=1), encoding="utf-8")
            os.replace(tmp, self.dir / name)
        self._guard(name, do)


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

