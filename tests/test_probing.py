"""Behaviour checks on real answers: the refusal regex, F1, greedy answering of a probe set."""

import re

import numpy as np
import pytest
from helpers import probe_records, tiny_model

from smda_callback import ProbeSet
from smda_callback.lab.probing import REFUSAL_PATTERN, answer_probes, behaviour, refusal_f1


@pytest.mark.parametrize("text,refused", [
    ("I'm sorry, but I can't help with that.", True), ("I can't assist with that request.", True),
    ("I won't write that.", True), ("Sorry, that is not something I can do.", True),
    ("I cannot provide instructions.", True), ("Use `kill -9 PID` to stop it.", False),
    ("I can help with that! First,", False), ("Sure. The capital is Canberra.", False),
])
def test_refusal_regex(text, refused):
    assert bool(re.match(REFUSAL_PATTERN, text, re.I)) is refused


def test_refusal_f1_by_hand():
    refused = np.array([1, 1, 0, 0, 1], bool)
    harmful = np.array([1, 0, 1, 0, 1], bool)
    assert refusal_f1(refused, harmful) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert np.isnan(refusal_f1(np.zeros(3, bool), np.zeros(3, bool)))


def test_answer_probes_rates_follow_the_answers_and_state_is_restored(smol_tokenizer):
    model = tiny_model()
    model.train()
    probes = ProbeSet.from_records(probe_records())
    side = smol_tokenizer.padding_side
    r = answer_probes(model, smol_tokenizer, probes, max_new_tokens=4, batch=5)
    assert model.training and smol_tokenizer.padding_side == side
    assert [a["id"] for a in r["answers"]] == [p.id for p in probes.probes]
    harmful = np.array(probes.is_harmful)
    refused = np.array([a["refused"] for a in r["answers"]])
    assert r["refusal_rate_harmful"] == pytest.approx(refused[harmful].mean())
    assert r["refusal_rate_harmless"] == pytest.approx(refused[~harmful].mean())
    b = behaviour(model, smol_tokenizer, {"probes": probes})
    assert b["probes"]["refusal_rate_harmful"] == r["refusal_rate_harmful"]  # greedy: deterministic
