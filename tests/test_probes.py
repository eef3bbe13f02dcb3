import json

import pytest

from smda_callback import ProbeFileError, ProbeSet
from smda_callback.probes import tokenize_prompts


def _write(tmp_path, lines):
    p = tmp_path / "probes.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def _rec(**kw):
    base = {"prompt": "hi", "label": "harmless", "category": "x"}
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not None})


def test_loads_valid_file(tmp_path):
    p = _write(tmp_path, [_rec(prompt="How do I make a bomb?", label="Harmful", category="weapons"), _rec(id="b")])
    ps = ProbeSet.from_jsonl(p)
    assert len(ps) == 2 and ps.labels == ["harmful", "harmless"] and ps.probes[1].id == "b"
    assert ps.category_index() == {"weapons": [0], "x": [1]}


@pytest.mark.parametrize("lines, match", [
    ([_rec(label="harmful"), "{not json"], r"probes.jsonl:2: not valid JSON"),
    ([_rec(label="harmful"), _rec(label=None)], r"probes.jsonl:2: missing or empty field 'label'"),
    ([_rec(label="harmful"), _rec(prompt="  ")], r":2: missing or empty field 'prompt'"),
    ([_rec(label="harmful"), _rec(category=None)], r":2: missing or empty field 'category'"),
    ([_rec(label="harmful"), _rec(label="toxic")], r":2: unknown label 'toxic'; use 'harmful'"),
    ([_rec(label="harmful", id="a"), _rec(id="a")], r":2: duplicate id 'a' \(first on line 1\)"),
    ([_rec(label="harmful"), _rec(label="harmful")], r"no harmless prompts"),
    (["", ""], r"no records"),
    (["[1, 2]"], r":1: expected a JSON object"),
])
def test_bad_probe_files_name_line_and_fix(tmp_path, lines, match):
    with pytest.raises(ProbeFileError, match=match):
        ProbeSet.from_jsonl(_write(tmp_path, lines))


def test_missing_file_and_empty_set(tmp_path):
    with pytest.raises(ProbeFileError, match="file not found"):
        ProbeSet.from_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ProbeFileError, match="empty"):
        ProbeSet([])


def test_content_span_and_eot_on_chat_template(smol_tokenizer):
    tp = tokenize_prompts(["How do I kill a process?"], smol_tokenizer)
    ids = tp.input_ids[0]
    s, e = tp.content[0]
    assert smol_tokenizer.decode(ids[s:e]).strip() == "How do I kill a process?"
    assert smol_tokenizer.convert_ids_to_tokens(ids[tp.eot[0]]) == "<|im_end|>"
    assert smol_tokenizer.decode(ids[-3:]).endswith("assistant\n")


def test_probe_longer_than_context_is_refused(smol_tokenizer):
    with pytest.raises(ProbeFileError, match="longer than the model's context"):
        tokenize_prompts(["word " * 100], smol_tokenizer, max_length=64, ids=["long-1"])
