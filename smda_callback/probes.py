"""Labelled probe prompts: load, validate, chat-template and tokenise once."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

LABELS = ("harmful", "harmless")
REQUIRED = ("prompt", "label", "category")


class ProbeFileError(ValueError):
    """A probe or pair file that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Probe:
    id: str
    prompt: str
    label: str
    category: str
    edgy: bool = False

    @property
    def harmful(self) -> bool:
        return self.label == "harmful"


@dataclass
class TokenizedProbes:
    """Token ids per probe plus the positions pooling may use.

    `content[i]` = (start, end) of the user's own text, `eot[i]` = the first token
    after it (end of user turn), the last prompt token is `len(input_ids[i]) - 1`.
    """

    input_ids: list[list[int]]
    content: list[tuple[int, int]]
    eot: list[int]


def validate_records(records: Iterable[dict[str, Any]], source: str, extra_required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Check a list of JSON records; error messages carry the 1-based line number."""
    out: list[dict[str, Any]] = []
    ids: dict[str, int] = {}
    for line_no, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise ProbeFileError(f"{source}:{line_no}: expected a JSON object, got {type(rec).__name__}.")
        for key in (*REQUIRED, *extra_required):
            if key not in rec or rec[key] is None or (isinstance(rec[key], str) and not rec[key].strip()):
                raise ProbeFileError(
                    f"{source}:{line_no}: missing or empty field '{key}'. Every record needs "
                    f"{', '.join(repr(k) for k in (*REQUIRED, *extra_required))}."
                )
        label = str(rec["label"]).strip().lower()
        if label not in LABELS:
            raise ProbeFileError(
                f"{source}:{line_no}: unknown label {rec['label']!r}; use 'harmful' (a safe model refuses) "
                "or 'harmless' (it should answer)."
            )
        rid = str(rec.get("id", f"{line_no - 1}"))
        if rid in ids:
            raise ProbeFileError(f"{source}:{line_no}: duplicate id {rid!r} (first on line {ids[rid]}); ids must be unique.")
        ids[rid] = line_no
        out.append({**rec, "id": rid, "label": label, "category": str(rec["category"]).strip()})
    if not out:
        raise ProbeFileError(f"{source}: no records; a probe set needs harmful and harmless prompts.")
    return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read JSONL, reporting the line number of the first bad line."""
    path = Path(path)
    if not path.exists():
        raise ProbeFileError(f"{path}: file not found.")
    records = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ProbeFileError(f"{path}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
    return records


@dataclass
class ProbeSet:
    """A fixed set of labelled prompts the policy is fitted on.

    Held out from training: it measures the model, it does not teach it.
    """

    probes: list[Probe]
    _cache: dict[int, TokenizedProbes] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.probes:
            raise ProbeFileError("ProbeSet is empty; give at least one harmful and one harmless prompt.")
        counts = Counter(p.label for p in self.probes)
        missing = [lab for lab in LABELS if counts[lab] == 0]
        if missing:
            raise ProbeFileError(
                f"ProbeSet has no {missing[0]} prompts; feature selection and the policy fit need both labels."
            )

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]], source: str = "<records>") -> "ProbeSet":
        recs = validate_records(list(records), source)
        return cls([
            Probe(id=r["id"], prompt=str(r["prompt"]), label=r["label"], category=r["category"], edgy=bool(r.get("edgy", False)))
            for r in recs
        ])

    @classmethod
    def from_jsonl(cls, path: str | Path) -> "ProbeSet":
        return cls.from_records(read_jsonl(path), source=str(path))

    def __len__(self) -> int:
        return len(self.probes)

    @property
    def labels(self) -> list[str]:
        return [p.label for p in self.probes]

    @property
    def categories(self) -> list[str]:
        return [p.category for p in self.probes]

    @property
    def is_harmful(self) -> list[bool]:
        return [p.harmful for p in self.probes]

    def category_index(self) -> dict[str, list[int]]:
        idx: dict[str, list[int]] = {}
        for i, p in enumerate(self.probes):
            idx.setdefault(p.category, []).append(i)
        return idx

    def tokenize(self, tokenizer: Any, max_length: int | None = None) -> TokenizedProbes:
        """Chat-template and tokenise once per tokenizer (cached)."""
        key = id(tokenizer)
        if key not in self._cache:
            self._cache[key] = tokenize_prompts([p.prompt for p in self.probes], tokenizer, max_length, [p.id for p in self.probes])
        return self._cache[key]


def render_prompt(tokenizer: Any, prompt: str) -> str:
    """The text the model sees for a user turn, ending where the assistant starts."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return f"User: {prompt}\nAssistant:"


def tokenize_prompts(prompts: Sequence[str], tokenizer: Any, max_length: int | None = None, ids: Sequence[str] | None = None) -> TokenizedProbes:
    """Tokenise rendered prompts and locate the user's content tokens by character offsets."""
    all_ids, content, eot = [], [], []
    for i, prompt in enumerate(prompts):
        text = render_prompt(tokenizer, prompt)
        start_char = text.rfind(prompt)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(enc["input_ids"])
        if max_length is not None and len(input_ids) > max_length:
            name = ids[i] if ids is not None else str(i)
            raise ProbeFileError(
                f"probe {name!r} is {len(input_ids)} tokens after chat templating, longer than the model's "
                f"context ({max_length}); shorten it or drop it from the probe file."
            )
        offsets = enc["offset_mapping"]
        end_char = start_char + len(prompt)
        toks = [t for t, (a, b) in enumerate(offsets) if b > start_char and a < end_char and b > a]
        if start_char < 0 or not toks:
            s, e = 1, len(input_ids)
        else:
            s, e = toks[0], toks[-1] + 1
        all_ids.append(input_ids)
        content.append((s, e))
        eot.append(min(e, len(input_ids) - 1))
    return TokenizedProbes(all_ids, content, eot)
