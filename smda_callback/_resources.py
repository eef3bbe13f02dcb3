"""Where the package's own data lives (probes, pairs, the embedded SAE): found in one place."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def data_path(*parts: str) -> Path:
    """A file or folder shipped under `smda_callback/data/`."""
    return DATA.joinpath(*parts)
