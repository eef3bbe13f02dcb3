"""Load an SAE the sae-lens ways and map its hook to a Hugging Face decoder layer."""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


from ._resources import data_path

logger = logging.getLogger(__name__)

_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")

SAESpec = Any  # an sae_lens.SAE, a directory, or (release, sae_id)


def embedded_sae_dir() -> Path:
    """The SAE shipped with the package for SmolLM2-135M-Instruct."""
    return data_path("sae")


def load_sae(spec: SAESpec) -> Any:
    """An sae-lens `SAE` from an object, a local folder or a `(release, sae_id)` pair.

    Only safetensors weights are read (pickle files can execute code).
    """
    if isinstance(spec, nn.Module) and callable(getattr(spec, "encode", None)) and hasattr(spec, "cfg"):
        return spec  # an sae-lens SAE, or any module with the same encode/decode/W_enc/cfg surface
    from sae_lens import SAE

    if isinstance(spec, SAE):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(s, str) for s in spec):
        release, sae_id = spec
        return SAE.from_pretrained(release, sae_id, device="cpu")
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if path.is_file():
            if path.suffix.lower() in PICKLE_SUFFIXES:
                raise ValueError(
                    f"{path}: refusing to load a pickle-format file ({path.suffix}); pickle can run arbitrary code. "
                    "Save the SAE with sae-lens (`sae.save_model(dir)`), which writes cfg.json + sae_weights.safetensors, "
                    "and pass that folder."
                )
            raise ValueError(f"{path}: pass the SAE's folder (with cfg.json and sae_weights.safetensors), not a file.")
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such SAE folder.")
        if not (path / "cfg.json").exists() or not (path / "sae_weights.safetensors").exists():
            found = sorted(p.name for p in path.iterdir())[:8]
            raise ValueError(
                f"{path}: an sae-lens folder needs cfg.json and sae_weights.safetensors (found {found}). "
                "Only safetensors are loaded."
            )
        return SAE.load_from_disk(str(path), device="cpu")
    raise TypeError(
        f"SAE given as {type(spec).__name__}: pass an sae_lens.SAE, a folder for SAE.load_from_disk, "
        "or a (release, sae_id) tuple for SAE.from_pretrained."
    )


def load_feature_labels(spec: SAESpec, d_sae: int) -> list[str]:
    """`f123 tok/tok/…` names when the SAE folder carries feature_labels.json, else `f123`."""
    labels = {}
    if isinstance(spec, (str, Path)) and (Path(spec) / "feature_labels.json").exists():
        labels = json.loads((Path(spec) / "feature_labels.json").read_text())
    return [f"f{j} {labels[str(j)]}" if str(j) in labels else f"f{j}" for j in range(d_sae)]


def hook_name(sae: Any) -> str:
    meta = getattr(sae.cfg, "metadata", None)
    name = getattr(meta, "hook_name", None) if meta is not None else None
    if name is None:
        name = getattr(sae.cfg, "hook_name", None)
    if not name:
        raise ValueError("The SAE's config has no hook_name; set sae.cfg.metadata.hook_name (e.g. 'blocks.12.hook_resid_post').")
    return str(name)


def base_model(model: nn.Module) -> nn.Module:
    """Unwrap PEFT/DDP wrappers to the transformers model that owns the layers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder block list (`model.model.layers` for Llama/Qwen/Gemma, `transformer.h` for GPT-2)."""
    model = base_model(model)
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and (n is None or len(obj) == n):
            return obj
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and n is not None and len(mod) == n:
            return mod
    raise ValueError(f"Could not find the decoder layers of {type(model).__name__}; supported: HF causal LMs with model.layers.")


@dataclass
class HookPoint:
    """Where the SAE reads: the output of layer L (resid_post) or its input (resid_pre)."""

    layer: int
    kind: str  # "post" | "pre"
    name: str

    def register(self, model: nn.Module, fn: Callable[[torch.Tensor], None]) -> Any:
        block = decoder_layers(model)[self.layer]
        if self.kind == "post":
            def post(_m: Any, _args: Any, out: Any) -> None:
                fn(out[0] if isinstance(out, tuple) else out)
            return block.register_forward_hook(post)

        def pre(_m: Any, args: Any, kwargs: Any) -> None:
            fn(args[0] if args else kwargs["hidden_states"])
        return block.register_forward_pre_hook(pre, with_kwargs=True)


def _meta(sae: Any, key: str) -> Any:
    meta = getattr(sae.cfg, "metadata", None)
    value = getattr(meta, key, None) if meta is not None else None
    return value if value is not None else getattr(sae.cfg, key, None)


def _from_hf_module(sae: Any, model: nn.Module) -> tuple[int, str, str] | None:
    """sae-lens' `hf_hook_name` (the HF module whose output the SAE reads, e.g. `model.layers.12`) → decoder layer."""
    hf = _meta(sae, "hf_hook_name")
    if not hf:
        return None
    modules = dict(base_model(model).named_modules())
    target = modules.get(str(hf))
    if target is None:
        raise ValueError(f"The SAE's hf_hook_name {hf!r} names no module of {type(base_model(model)).__name__}; "
                         "this SAE belongs to another model architecture.")
    for i, block in enumerate(decoder_layers(model)):
        if block is target:
            return i, "post", str(hf)
    raise ValueError(f"The SAE's hf_hook_name {hf!r} is not a decoder layer's output; smda reads the residual stream "
                     "(the output of a decoder layer). Use a residual-stream SAE.")


def resolve_hook(sae: Any, model: nn.Module) -> HookPoint:
    """Map the SAE's hook to the model's layer, checking width and range: `blocks.L.hook_resid_post|pre`
    (TransformerLens names), else sae-lens' `hf_hook_name` (an HF module path such as `model.layers.12`)."""
    name = _meta(sae, "hook_name")
    m = _HOOK.match(str(name)) if name else None
    if m:
        layer, kind = int(m.group(1)), m.group(2)
    else:
        found = _from_hf_module(sae, model)
        if found is None:
            if not name:
                raise ValueError("The SAE's config has no hook_name nor hf_hook_name; set sae.cfg.metadata.hook_name "
                                 "(e.g. 'blocks.12.hook_resid_post').")
            raise ValueError(
                f"SAE hook {name!r} is not supported: smda reads the residual stream, 'blocks.L.hook_resid_post' or "
                "'blocks.L.hook_resid_pre' (or an hf_hook_name naming a decoder layer). Use an SAE trained on the residual stream."
            )
        layer, kind, name = found
    layers = decoder_layers(model)
    if layer >= len(layers):
        raise ValueError(f"SAE hook {name!r} needs layer {layer}, but the model has only {len(layers)} decoder layers (0..{len(layers) - 1}); this SAE belongs to another model.")
    hidden = getattr(base_model(model).config, "hidden_size", None)
    d_in = int(sae.cfg.d_in)
    if hidden is not None and d_in != hidden:
        raise ValueError(f"SAE width mismatch: the SAE reads d_in={d_in} but the model's hidden size is {hidden}; use an SAE trained on this model.")
    meta = getattr(sae.cfg, "metadata", None)
    sae_model = getattr(meta, "model_name", None) if meta is not None else None
    model_name = str(getattr(base_model(model).config, "_name_or_path", "") or "")
    if sae_model and model_name and _family(sae_model) and _family(model_name) and _family(sae_model) != _family(model_name):
        warnings.warn(f"The SAE was trained on {sae_model!r} but the model looks like {model_name!r}; features may not mean what their labels say.", stacklevel=2)
    return HookPoint(layer, kind, name)


def sae_identity(sae: Any, spec: SAESpec = None) -> dict[str, Any]:
    """What names this SAE outside the run: release, sae_id, Neuronpedia id, model, hooks, local folder."""
    out: dict[str, Any] = {k: _meta(sae, k) for k in ("release", "sae_id", "neuronpedia_id", "model_name", "hook_name",
                                                      "hf_hook_name")}
    if isinstance(spec, tuple) and len(spec) == 2:
        out["release"], out["sae_id"] = spec
    if isinstance(spec, (str, Path)):
        out["path"] = str(Path(spec).resolve())
    out["d_in"], out["d_sae"] = int(sae.cfg.d_in), int(sae.cfg.d_sae)
    return {k: (v if isinstance(v, (int, float, str)) or v is None else str(v)) for k, v in out.items()}


NEURONPEDIA = "https://www.neuronpedia.org"


def feature_url(identity: dict[str, Any] | None, feature: int) -> str | None:
    """The feature's Neuronpedia page when the SAE has a Neuronpedia id (a link only; nothing is fetched)."""
    npid = (identity or {}).get("neuronpedia_id")
    return f"{NEURONPEDIA}/{npid}/{int(feature)}" if npid else None


def _family(name: str) -> str:
    low = name.lower()
    for fam in ("smollm", "llama", "gemma", "qwen", "mistral", "gpt2", "pythia", "phi"):
        if fam in low:
            return fam
    return ""


def fve_warning(fve: float | None, threshold: float) -> str | None:
    """The warning for an SAE that reconstructs this model's activations poorly (None when it does not)."""
    if fve is None or fve >= threshold:
        return None
    return (f"the SAE explains only {fve:.2f} of the variance of this model's hook activations on the probes (warning "
            f"below {threshold:.2f}): it was probably trained on another model or layer (a base-model SAE on an instruct "
            "model is the usual cause), so its features may not mean what their labels say")
