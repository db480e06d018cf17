"""The model a search runs: loading it by name, its fingerprint from the configuration alone, the calibration prompts
and the keyword arguments of its generations."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from typing import Any

import torch

from dit_sparse.adapters import adapter_for_transformer
from dit_sparse.plan import ModelFingerprint

from .errors import SearchError

# Calibration prompts of models other than tiny-shapes, when none are given.
DEFAULT_PROMPTS = [
    "a cat walking on grass",
    "waves crashing on a rocky shore at sunset",
    "a person riding a bicycle down a city street",
]


def calibration_prompts(pipe) -> list[str]:
    """The prompts a search calibrates on when none are given. tiny-shapes: four captions drawn like its training
    captions, never its held-out prompts (`dit_sparse.models.default_prompts`), which evaluations of the plan use;
    other models: DEFAULT_PROMPTS."""
    if type(pipe).__name__ == "TinyShapesPipeline":
        from dit_sparse.zoo.shapes_data import sample_attrs

        rng = random.Random(20240)
        return [sample_attrs(rng).caption for _ in range(4)]
    return list(DEFAULT_PROMPTS)


def pipeline_label(pipe) -> str:
    """How results name a model given as a loaded pipeline: where it was loaded from, else its class."""
    return getattr(pipe, "name_or_path", None) or type(pipe).__name__


def model_fingerprint(model: str) -> tuple[ModelFingerprint, list[tuple[str, int]]]:
    """Fingerprint and covered modules of a model from its configuration only (built on the meta device)."""
    import importlib

    from diffusers import DiffusionPipeline

    from dit_sparse.checks import ArgumentError
    from dit_sparse.models import TINY_SHAPES, check_model_name

    try:  # a mistyped folder (./mymodel) is one line saying so, not the hub's error about repository ids
        model = check_model_name(model, option="`model`")
    except ArgumentError as e:
        raise SearchError(str(e)) from None
    if model == TINY_SHAPES:
        from dit_sparse.zoo import WEIGHTS_DIR

        if not (WEIGHTS_DIR / "model_index.json").is_file():
            raise SearchError(f"`model` tiny-shapes: the shipped weights are missing from {WEIGHTS_DIR}; reinstall "
                              "dit-sparse or produce them with `python tools/train_tiny_shapes.py` (source checkout)")
        model = str(WEIGHTS_DIR)
    try:
        index = DiffusionPipeline.load_config(model)
        # model_index.json names (library, class): "diffusers" for stock transformers, a module path for custom
        # ones such as tiny-shapes' TinyShapesTransformer (diffusers' own loader imports it the same way)
        library, class_name = index["transformer"]
        cls = getattr(importlib.import_module(library), class_name)
        config = cls.load_config(model, subfolder="transformer")
    except (OSError, KeyError, AttributeError, TypeError, ValueError, ImportError) as e:
        raise SearchError(f"`model`: could not read the transformer configuration of {model!r}: {e}") from None
    with torch.device("meta"):
        transformer = cls.from_config(config)
    adapter = adapter_for_transformer(transformer)
    return adapter.fingerprint(transformer), adapter.covered_modules(transformer)


def load_pipeline(model: str, device: str, dtype: str, *, check_first: bool = True, failure: str = ""):
    """The pipeline of `model` (tiny-shapes, a local folder or a hub id). With `check_first`, another model's
    transformer is checked from its configuration first, so an unsupported one fails before any weight loads.
    `failure` prefixes the message when loading fails."""
    from dit_sparse.checks import ArgumentError
    from dit_sparse.models import DTYPES, TINY_SHAPES, load_model

    if check_first and model != TINY_SHAPES:
        model_fingerprint(model)
    try:
        return load_model(model, device, DTYPES[dtype])
    except (ArgumentError, FileNotFoundError) as e:
        raise SearchError(f"{failure}{e}") from None


def call_settings(pipe, *, steps: int, guidance: float | None, height: int | None, width: int | None,
                  frames: int | None, output_type: str) -> dict[str, Any]:
    """Keyword arguments of one generation with the search's settings (None: the pipeline's default)."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {"num_inference_steps": steps}
    for name, value in (("guidance_scale", guidance), ("height", height), ("width", width), ("num_frames", frames)):
        if value is not None:
            if name not in params:
                raise SearchError(f"{type(pipe).__name__} takes no {name!r}; leave that option out")
            kwargs[name] = value
    if "output_type" in params:
        kwargs["output_type"] = output_type
    return kwargs


def pipeline_runner(pipe, prompts: list[str], *, steps: int, guidance: float | None = None,
                    height: int | None = None, width: int | None = None, frames: int | None = None,
                    seed: int = 0) -> Callable[[int, Callable[[], None]], None]:
    """run(i, on_step): the i-th calibration generation (latents only, nothing decoded); returns the pipeline's
    output. ``run.counts_steps`` says whether on_step is called at the end of every step (the pipeline takes
    ``callback_on_step_end``) or only after the generation."""
    params = inspect.signature(pipe.__call__).parameters
    base = call_settings(pipe, steps=steps, guidance=guidance, height=height, width=width, frames=frames,
                         output_type="latent")

    def run(i: int, on_step: Callable[[], None]) -> None:
        kwargs = dict(base, prompt=prompts[i])
        if "callback_on_step_end" in params:
            kwargs["callback_on_step_end"] = lambda *_args: (on_step(), {})[1]
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        try:
            output = pipe(generator=generator, **kwargs)
        except ValueError as e:
            raise SearchError(f"the pipeline refused these settings: {e}") from None
        if "callback_on_step_end" not in params:
            for _ in range(steps):
                on_step()
        return output

    run.counts_steps = "callback_on_step_end" in params
    return run
