"""The lab's job results on disk: each written whole (a temp file, then a rename), so a job killed mid-write leaves
no half file for a resumed run to mistake for a finished one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def write_json(path: str | Path, obj: Any, default: Callable[[Any], Any] | None = None) -> None:
    """`obj` as JSON at `path`, atomically (`default` as in json.dumps)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, default=default), encoding="utf-8")
    tmp.replace(path)
