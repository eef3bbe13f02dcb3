"""Packing and padding-free: each segment of a packed row is its own pair, credited as in the unpacked run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smda_callback import ProbeSet, SMDACallback, SMDAConfig
from smda_callback.capture import PackingError, PairCapture, content_hash, segments
from smda_callback.ledger import load_credits

from helpers import pair_records, probe_records, tiny_model, tiny_sae


def test_segments_split_where_positions_restart():
    assert segments(None, 5) == [(0, 5)]
    assert segments(torch.tensor([0, 1, 2, 0, 1, 0, 1, 2]), 8) == [(0, 3), (3, 5), (5, 8)]
    assert segments(torch.tensor([0, 1, 2, 3]), 4) == [(0, 4)]


def test_capture_records_one_row_per_packed_segment():
    """A padding-free batch (one flat row, positions restart, padded at the end) gives one row per pair, hashed
    like the same pair alone, with its own prompt mask and inputs; the padding is no pair."""
    a, b = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([11, 12, 13, 14])
    la, lb = torch.tensor([-100, -100, 7, 8, 9]), torch.tensor([-100, -100, -100, 14])
    ids = torch.cat([a, b, torch.tensor([0, 0])])[None]
    labels = torch.cat([la, lb, torch.tensor([-100, -100])])[None]
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0]])
    cap = PairCapture(armed=True, keep_inputs=True)
    model = torch.nn.Linear(1, 1)
    model.train()
    cap._pre(model, (), {"input_ids": ids, "labels": labels, "position_ids": pos})
    assert [r.hash for r in cap.rows] == [content_hash(a.tolist()), content_hash(b.tolist())]
    assert cap.rows[1].prompt_mask.tolist() == [True, True, True, False]
    assert torch.equal(cap.rows[0].inputs["labels"][0], la)
    h = torch.arange(11, dtype=torch.float32)[None, :, None].expand(1, 11, 3)
    cap._layer(h)
    # prompt tokens of each segment, its own position 0 left out
    assert [x[:, 0].tolist() for x in cap.hidden] == [[1.0], [6.0, 7.0]]


def test_wrapped_packing_is_refused_with_the_fix(tmp_path, smol_tokenizer):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cb = SMDACallback(ProbeSet.from_records(probe_records()), tiny_sae(), SMDAConfig(n_features=8))
    args = SFTConfig(output_dir=str(tmp_path), packing=True, packing_strategy="wrapped", max_length=64, max_steps=1,
                     use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=tiny_model(), args=args, train_dataset=Dataset.from_list(pair_records(4)),
                         processing_class=smol_tokenizer, callbacks=[cb])
    with pytest.raises(PackingError, match="packing_strategy='bfd'"):
        trainer.train()


def _train(tmp_path, tok, data, raw, packed: bool, max_length: int, steps: int):
    from trl import SFTConfig, SFTTrainer

    # P("I") at the first answer position: ~1e-5 on the random model, so a step moves Y far above fp32 rounding
    # (the default three-token prefix is ~1e-10 there, and its per-step change sits at rounding level)
    config = SMDAConfig(n_features=8, scorer="first_token", refusal_openings=("I",))
    cb = SMDACallback(ProbeSet.from_records(probe_records()), tiny_sae(), config)
    args = SFTConfig(output_dir=str(tmp_path), packing=packed, max_length=max_length, max_steps=steps,
                     per_device_train_batch_size=1 if packed else 2, train_sampling_strategy="sequential",
                     learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                     logging_steps=1)
    trainer = SFTTrainer(model=tiny_model(), args=args, train_dataset=data, processing_class=tok, callbacks=[cb])
    cb.bind(trainer, pairs=raw if packed else None)
    trainer.train()
    return trainer, {p["hash"]: p for p in load_credits(tmp_path)["pairs"]}


def test_packed_run_credits_every_pair_as_the_unpacked_run(tmp_path, smol_tokenizer):
    """bfd packing with two pairs per packed row (padding-free) against the same pairs two to a padded batch:
    same pairs, same credit up to float error, and every packed pair named through bind(pairs=...)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    raw = Dataset.from_list(pair_records(6))
    probe = SFTTrainer(model=tiny_model(), args=SFTConfig(output_dir=str(tmp_path / "len"), use_cpu=True, report_to=[],
                                                          max_length=512), train_dataset=raw, processing_class=smol_tokenizer)
    lengths = [len(x) for x in probe.train_dataset["input_ids"]]
    assert 2 * max(lengths) < 3 * min(lengths)  # so a bin of 2·max holds exactly two pairs
    M = 2 * max(lengths)
    trainer_p, packed = _train(tmp_path / "packed", smol_tokenizer, raw, raw, True, M, 3)
    bins = trainer_p.train_dataset["seq_lengths"]
    assert [len(b) for b in bins] == [2, 2, 2]
    # the unpacked reference trains the same pairs two to a step, in the packed run's order
    by_hash = {content_hash(list(ids)): i for i, ids in enumerate(probe.train_dataset["input_ids"])}
    order, flat = [], trainer_p.train_dataset["input_ids"]
    for row, lens in zip(flat, bins):
        start = 0
        for n in lens:
            order.append(by_hash[content_hash(list(row[start:start + n]))])
            start += n
    _, unpacked = _train(tmp_path / "unpacked", smol_tokenizer, raw.select(order), None, False, M, 3)
    assert set(packed) == set(unpacked) and len(packed) == 6
    for h, p in packed.items():
        assert p["label"] == unpacked[h]["label"] and p["category"] == unpacked[h]["category"]  # named through bind(pairs=...)
    d_p = np.array([packed[h]["d"] for h in packed])
    d_u = np.array([unpacked[h]["d"] for h in packed])
    assert (np.abs(d_u).sum(axis=1) > 0).all()
    # two fp32 batch layouts (one flat row vs a padded batch) round differently, and Adam's first steps turn
    # rounding in near-zero gradient entries into ±lr updates: the error scales with the run's largest credit,
    # not with each pair's own (measured 0.4 % of it on an AVX-512 CPU; a pair credited 1 % of the largest
    # failed a per-pair tolerance on CI). So: the whole credit matrix within 2 % of its largest entry.
    scale = np.abs(d_u).max()
    assert np.abs(d_p - d_u).max() <= 2e-2 * scale, (np.abs(d_p - d_u).max() / scale, d_p, d_u)
    # and not trivially: the pairs' credits differ from one another by far more than that tolerance
    assert np.abs(d_u - d_u.mean(axis=0)).max() > 0.2 * scale
