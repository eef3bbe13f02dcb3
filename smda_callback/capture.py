"""Which dataset rows did this optimizer step train on?

Callbacks never see the batch, so a forward pre-hook on the model records the
non-pad token ids of each training micro-batch (only while armed, only for
forwards in train mode with grad on: eval and probe forwards are ignored), and
rows are matched back to the training dataset by a hash of those ids.

Packed and padding-free rows (TRL's `bfd` packing) hold several pairs; each segment
(found where `position_ids` restart) is a pair of its own, hashed on its own ids.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn


logger = logging.getLogger(__name__)


class PackingError(ValueError):
    """A batch layout whose rows cannot be split into pairs (packing that cuts sequences, `wrapped`)."""


def content_hash(ids: Sequence[int]) -> str:
    return hashlib.sha1(np.asarray(list(ids), dtype=np.int64).tobytes()).hexdigest()[:16]


def is_packed(dataset: Any) -> bool:
    """A dataset TRL packed (its rows hold several pairs; `seq_lengths` gives their lengths)."""
    return "seq_lengths" in (getattr(dataset, "column_names", None) or [])


def hash_index(column: Iterable[Sequence[int]], rows: Iterable[int]) -> dict[str, list[int]]:
    """content hash of each row's token ids → the row numbers that hold those ids."""
    index: dict[str, list[int]] = {}
    for ids, row in zip(column, rows):
        index.setdefault(content_hash(list(ids)), []).append(int(row))
    return index


def index_dataset(dataset: Any) -> dict[str, list[int]]:
    """hash(input_ids) → row indices of a tokenised training dataset ({} for a packed one: its rows are not pairs)."""
    if dataset is None:
        return {}
    if is_packed(dataset):
        logger.info("smda: packed dataset; pairs are credited by content hash. smda.bind(trainer, pairs=<the dataset "
                    "before packing>) names them (label, category, prompt).")
        return {}
    try:
        column = dataset["input_ids"]
    except (KeyError, TypeError, IndexError):
        try:
            column = [dataset[i]["input_ids"] for i in range(len(dataset))]
        except Exception:  # noqa: BLE001 - any dataset shape we cannot read means "no index"
            return {}
    return hash_index(column, count())


def check_packing(args: Any) -> None:
    """Refuse the one packing layout that cannot be attributed."""
    if getattr(args, "packing", False) and getattr(args, "packing_strategy", "bfd") == "wrapped":
        raise PackingError("smda: packing_strategy='wrapped' cuts pairs mid-sequence, so no row segment is one pair. "
                           "Use packing_strategy='bfd' (each pair stays whole) or packing=False.")


def index_unpacked(trainer: Any, pairs: Any) -> dict[str, list[int]]:
    """hash → row of `pairs` (the dataset before packing), tokenised by the trainer's own preparation without
    packing, so packed segments can be named. Best effort: {} when the trainer cannot prepare it."""
    prepare = getattr(trainer, "_prepare_dataset", None)  # TRL SFTTrainer
    if prepare is None or pairs is None:
        return {}
    try:
        tagged = pairs.add_column("_smda_row", list(range(len(pairs))))
        prepared = prepare(tagged, trainer.processing_class, trainer.args, False, None, "smda pair index")
    except Exception as exc:  # noqa: BLE001 - naming pairs is best effort; credit by hash goes on
        logger.warning("smda: could not tokenise `pairs` the way the trainer does (%s: %s); packed pairs are credited "
                       "by content hash without names.", type(exc).__name__, exc)
        return {}
    return hash_index(prepared["input_ids"], prepared["_smda_row"])


def segments(position_ids: torch.Tensor | None, n: int) -> list[tuple[int, int]]:
    """[start, end) of each sequence in a row: one, or one per restart of `position_ids` (packed / padding-free rows)."""
    if position_ids is None or n < 2:
        return [(0, n)]
    starts = [0] + (torch.nonzero(position_ids[1:] <= position_ids[:-1]).flatten() + 1).tolist()
    return list(zip(starts, starts[1:] + [n]))


def row_meta_of(dataset: Any) -> Any:
    """`row_meta` bound to `dataset`, the per-pair metadata the records carry (None without a dataset)."""
    return (lambda i: row_meta(dataset, i)) if dataset is not None else None


def row_meta(dataset: Any, i: int) -> dict[str, Any]:
    """label / category / id / the user's prompt text of a dataset row, best effort (the hash and index are the record)."""
    try:
        row = dataset[int(i)]
    except Exception:  # noqa: BLE001 - any dataset we cannot index gives no metadata
        return {}
    if not hasattr(row, "get"):
        return {}
    out = {k: row[k] for k in ("label", "category", "id") if k in row and isinstance(row[k], (str, int))}
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        prompt = " ".join(m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user")
    if isinstance(prompt, str):
        out["prompt"] = prompt
    return out


@dataclass
class CapturedRow:
    hash: str
    prompt_mask: np.ndarray  # which of the row's tokens are prompt (label -100)
    inputs: dict[str, torch.Tensor] | None = None
    """The row's own input_ids/attention_mask/labels (kept only when `keep_inputs`: the split inside a step needs them)."""
    step: int | None = None
    slope: float | None = None


@dataclass
class PairCapture:
    """Forward pre-hook recording training rows; also keeps each row's prompt
    activations at the SAE hook (from the training forward itself, no extra pass)."""

    rows: list[CapturedRow] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    armed: bool = False
    _handles: list[Any] = field(default_factory=list)
    _pending: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    _want_hidden: bool = False
    losses: list[float] = field(default_factory=list)
    keep_inputs: bool = False
    window_start: int | None = None
    """First optimizer step of the open window (a window closes at each snapshot)."""
    tagged: int = 0
    """Rows already tagged with their optimizer step."""

    def open(self, global_step: int) -> None:
        """A training step begins: open a window if none is open, record rows from here."""
        if self.window_start is None:
            self.reset()
            self.window_start = global_step + 1
        self.armed = True

    def untagged(self) -> list[CapturedRow]:
        return self.rows[self.tagged:]

    def tag(self, t: int) -> list[CapturedRow]:
        """The rows of optimizer step t (those captured since the last tag)."""
        rows = self.untagged()
        for r in rows:
            r.step = t
        self.tagged = len(self.rows)
        return rows

    def close(self, global_step: int) -> list[int]:
        """The window [first step, last step] ends at this snapshot."""
        window, self.window_start = [self.window_start or global_step, global_step], None
        return window

    def install(self, model: nn.Module, hook_point: Any) -> None:
        self._handles.append(model.register_forward_pre_hook(self._pre, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._post, with_kwargs=True))
        self._handles.append(hook_point.register(model, self._layer))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.tagged = 0
        self.rows.clear()
        self.hidden.clear()
        self.losses.clear()

    def _active(self, module: nn.Module) -> bool:
        return self.armed and module.training and torch.is_grad_enabled()

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._active(module):
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None or mask.dim() != 2 else mask
        pos = kwargs.get("position_ids")
        pos = pos.reshape(ids.shape[0], -1) if pos is not None and pos.numel() == ids.numel() else None
        labels = kwargs.get("labels")
        self._pending = []
        for r in range(ids.shape[0]):
            keep = mask[r].bool()
            row_ids = ids[r][keep]
            lab = labels[r][keep] if labels is not None else None
            for s, e in segments(pos[r][keep] if pos is not None else None, len(row_ids)):
                seg_lab = lab[s:e] if lab is not None else None
                if seg_lab is not None and bool((seg_lab == -100).all()):
                    continue  # padding after a padding-free batch, or a pair with no loss token: nothing trained
                self._add(row_ids[s:e], seg_lab, (r, keep, s, e))
        self._want_hidden = True

    def _add(self, row_ids: torch.Tensor, lab: torch.Tensor | None, where: tuple[int, torch.Tensor, int, int]) -> None:
        """One pair: a whole row, or one segment of a packed / padding-free row."""
        pm = (lab == -100).cpu().numpy() if lab is not None else np.ones(len(row_ids), dtype=bool)
        inputs = None
        if self.keep_inputs and lab is not None:
            inputs = {"input_ids": row_ids[None].detach().clone(), "attention_mask": torch.ones_like(row_ids)[None],
                      "labels": lab[None].detach().clone()}
        self.rows.append(CapturedRow(content_hash(row_ids.tolist()), pm, inputs))
        self._pending.append((where, torch.as_tensor(pm)))

    def _layer(self, h: torch.Tensor) -> None:
        # first call per micro-batch only (gradient checkpointing re-runs the layer in backward)
        if not self._want_hidden or not self.armed:
            return
        self._want_hidden = False
        h = h.detach()
        kept: dict[int, torch.Tensor] = {}  # a packed row holds many segments: gather its tokens once
        for (r, keep, s, e), pm in self._pending:
            if r not in kept:
                kept[r] = h[r][keep.to(h.device)]
            toks = kept[r][s:e]
            sel = pm.to(toks.device)
            sel[0] = False  # a sequence's position 0 is an attention sink with an outlier norm
            if not sel.any():
                sel = torch.ones(len(toks), dtype=torch.bool, device=toks.device)
                sel[0] = len(toks) == 1
            self.hidden.append(toks[sel].float().cpu())

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if not self._active(module):
            return
        loss = getattr(out, "loss", None)
        if loss is not None:
            self.losses.append(float(loss.detach()))
