"""Which dataset rows did this optimizer step train on?

Callbacks never see the batch, so a forward pre-hook on the model records the
non-pad token ids of each training micro-batch (only while armed, only for
forwards in train mode with grad on: eval and probe forwards are ignored), and
rows are matched back to the training dataset by a hash of those ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn


class PackingError(ValueError):
    pass


def content_hash(ids: Sequence[int]) -> str:
    return hashlib.sha1(np.asarray(list(ids), dtype=np.int64).tobytes()).hexdigest()[:16]


def index_dataset(dataset: Any) -> dict[str, list[int]]:
    """hash(input_ids) → row indices of a tokenised training dataset."""
    if dataset is None:
        return {}
    try:
        column = dataset["input_ids"]
    except (KeyError, TypeError, IndexError):
        try:
            column = [dataset[i]["input_ids"] for i in range(len(dataset))]
        except Exception:  # noqa: BLE001 - any dataset shape we cannot read means "no index"
            return {}
    index: dict[str, list[int]] = {}
    for i, ids in enumerate(column):
        index.setdefault(content_hash(list(ids)), []).append(i)
    return index


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

    def install(self, model: nn.Module, hook_point: Any) -> None:
        self._handles.append(model.register_forward_pre_hook(self._pre, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._post, with_kwargs=True))
        self._handles.append(hook_point.register(model, self._layer))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
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
        pos = kwargs.get("position_ids")
        if pos is not None and ids.shape[0] >= 1:
            p = pos.reshape(ids.shape[0], -1)
            if bool((p[:, 1:] < p[:, :-1]).any()):
                raise PackingError(
                    "smda: packed / padding-free batches detected (position_ids restart inside a row), so one row holds "
                    "several pairs and attribution per pair is impossible. Set `packing=False` and `padding_free=False` "
                    "in SFTConfig."
                )
        labels = kwargs.get("labels")
        mask = torch.ones_like(ids) if mask is None else mask
        self._pending = []
        for r in range(ids.shape[0]):
            keep = mask[r].bool()
            row_ids = ids[r][keep]
            lab = labels[r][keep] if labels is not None else None
            pm = (lab == -100).cpu().numpy() if lab is not None else np.ones(len(row_ids), dtype=bool)
            inputs = None
            if self.keep_inputs and labels is not None:
                inputs = {"input_ids": row_ids[None].detach().clone(), "attention_mask": torch.ones_like(row_ids)[None],
                          "labels": lab[None].detach().clone()}
            self.rows.append(CapturedRow(content_hash(row_ids.tolist()), pm, inputs))
            self._pending.append((keep, torch.as_tensor(pm)))
        self._want_hidden = True

    def _layer(self, h: torch.Tensor) -> None:
        # first call per micro-batch only (gradient checkpointing re-runs the layer in backward)
        if not self._want_hidden or not self.armed:
            return
        self._want_hidden = False
        h = h.detach()
        for r, (keep, pm) in enumerate(self._pending):
            toks = h[r][keep.to(h.device)]
            sel = pm.to(toks.device)
            sel[0] = False  # position 0 is an attention sink with an outlier norm
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
