"""Loading models: the embedded tiny-shapes model or any diffusers pipeline by path or hub id, dtypes by name, model
names checked before anything loads, and what a pipeline's call defaults and patching say about its sizes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .checks import ArgumentError

logger = logging.getLogger(__name__)


TINY_SHAPES = "tiny-shapes"


DEFAULT_PROMPTS = {"TinyShapesPipeline": "a red circle moving right on a dark background"}


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def load_model(model: str, device: str, dtype: torch.dtype):
    """tiny-shapes from the package's shipped weights, or any diffusers pipeline by local path or hub id."""
    if model == TINY_SHAPES:
        from .zoo import load_tiny_shapes

        return load_tiny_shapes(device=device, dtype=dtype)
    model = check_model_name(model)
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import HFValidationError

    pipeline_cls = DiffusionPipeline
    if _is_saved_tiny_shapes(model):
        from .zoo import TinyShapesPipeline

        pipeline_cls = TinyShapesPipeline  # diffusers cannot resolve the project's own pipeline class by name
    try:
        pipe = pipeline_cls.from_pretrained(model, dtype=dtype)
    except (OSError, HFValidationError) as e:
        raise ArgumentError(f"--model: could not load {model!r}: {str(e).splitlines()[0]}") from None
    return pipe.to(device)


HUB_ID_RULE = "a hub id is owner/name, of letters, digits, '-', '_' and '.'"


def check_model_name(model: str, option: str = "--model") -> str:
    """Before anything loads: `model` must be tiny-shapes, an existing path or a hub id (owner/name). A path-like
    name that does not exist (./mymodel, ../models/x, /abs/path, ~/x, a/b/c) is a mistyped folder: one line says
    so, instead of the hub's error about repository ids. Returns the name to load (~ expanded)."""
    if model == TINY_SHAPES:
        return model
    if not model.strip():
        raise ArgumentError(f"{option}: empty model name; give tiny-shapes, a pipeline folder or a hub id")
    expanded = os.path.expanduser(model)
    if Path(expanded).exists():
        return expanded
    problem = _hub_id_problem(model)
    if problem is None:
        return model
    if _looks_like_path(model):
        raise ArgumentError(f"{option}: no such model folder {model} (and it is not a hub id: {problem})")
    raise ArgumentError(f"{option}: {model!r} is neither a local directory nor a hub id (owner/name)")


def _looks_like_path(name: str) -> bool:
    separators = {os.sep} | ({os.altsep} if os.altsep else set())
    return name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or any(sep in name for sep in separators)


def _hub_id_problem(name: str) -> str | None:
    """None for a well-formed hub id (owner/name), else what is wrong with it."""
    if name.count("/") != 1:
        return f"{HUB_ID_RULE}, with exactly one '/'"
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return f"{HUB_ID_RULE}, not starting or ending with '-' or '.'"
    return None


def tiny_shapes_weights_id(model: str) -> str | None:
    """The weights id of a tiny-shapes model (shipped or a saved copy), None for any other model.

    Results record it so that the README can flag those measured on earlier weights."""
    from .zoo.pipeline import weights_id

    if model == TINY_SHAPES:
        return weights_id()
    return weights_id(model) if _is_saved_tiny_shapes(model) else None


def _is_saved_tiny_shapes(model: str) -> bool:
    index = Path(model) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == "TinyShapesPipeline"


def check_device_and_dtype(device: str, dtype: str) -> None:
    if dtype not in DTYPES:
        raise ArgumentError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ArgumentError(f"--device: {device!r} is not a torch device (cpu, cuda or cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("--device cuda was asked for, but this machine has no CUDA GPU; use --device cpu")
    if kind == "cpu" and DTYPES[dtype] in (torch.float16, torch.bfloat16):
        logger.warning("--dtype %s on CPU: half precision is often many times slower than float32 on CPUs, and "
                       "its timings say little about a GPU", dtype)


def call_defaults(pipe) -> dict[str, Any]:
    import inspect

    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return {}
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def patch_size(transformer) -> tuple[int, int, int]:
    """(frames, rows, cols) the transformer patches together into one token."""
    config = getattr(transformer, "config", {})
    patch = config.get("patch_size", 1) if hasattr(config, "get") else 1
    if isinstance(patch, (list, tuple)):
        return tuple(int(p) for p in patch[-3:]) if len(patch) >= 3 else (1, int(patch[-2]), int(patch[-1]))
    pt = config.get("patch_size_t", 1) if hasattr(config, "get") else 1
    return int(pt or 1), int(patch or 1), int(patch or 1)


def default_prompts(pipe, count: int) -> list[str]:
    if type(pipe).__name__ == "TinyShapesPipeline":
        from .zoo.shapes_data import heldout_prompts

        return heldout_prompts()[:count]
    raise ArgumentError("--prompts FILE is needed for models other than tiny-shapes")


def add_device_arguments(parser) -> None:
    """--device and --dtype, as every command that runs a model takes them (checked by check_device_and_dtype)."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
