"""What distillation needs to know about a teacher pipeline's kind: a registry keyed by pipeline class name.

Per kind: the shape of the transformer's input for a video size (the student samples in that space), the call
arguments that set the size, the default training and validation prompts, and an optional task check of a
generated clip (tiny-shapes: does it show the caption).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class PipelineKindError(ValueError):
    pass


@dataclass(frozen=True)
class PipelineKind:
    name: str
    default_size: tuple[int, int, int]  # frames, height, width
    sample_shape: Callable  # (pipe, frames, height, width) -> (C, F', H', W') of the transformer's input
    training_prompts: Callable[[], list[str]] | None = None
    validation_prompts: Callable[[], list[str]] | None = None
    check: Callable | None = None  # (frames (T, H, W, 3) in [0, 1], prompt) -> bool


KINDS: dict[str, PipelineKind] = {}


def register_kind(kind: PipelineKind) -> PipelineKind:
    KINDS[kind.name] = kind
    return kind


def kind_of(pipe) -> PipelineKind:
    name = type(pipe).__name__
    if name not in KINDS:
        raise PipelineKindError(f"distillation does not know {name} pipelines yet (known: {', '.join(sorted(KINDS))}); "
                                f"register a PipelineKind in dit_sparse.distill.pipelines")
    return KINDS[name]


def _tiny_shapes_shape(pipe, frames, height, width):
    return (pipe.transformer.config.out_channels, frames, height, width)  # in_channels may hold coordinates


def _tiny_train_prompts():
    from dit_sparse.zoo.shapes_data import TRAIN_COMBOS

    return [a.caption for a in TRAIN_COMBOS]


def _tiny_val_prompts():
    from dit_sparse.zoo.shapes_data import heldout_prompts

    return heldout_prompts()[::12][:4]


def _tiny_check(frames, prompt) -> bool:
    from dit_sparse.zoo.checker import check_clip

    return bool(check_clip(frames, prompt).ok)


def _wan_shape(pipe, frames, height, width):
    t, s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    return (pipe.transformer.config.in_channels, (frames - 1) // t + 1, height // s, width // s)


register_kind(PipelineKind("TinyShapesPipeline", (8, 32, 32), _tiny_shapes_shape, _tiny_train_prompts,
                           _tiny_val_prompts, _tiny_check))
register_kind(PipelineKind("WanPipeline", (81, 480, 832), _wan_shape))
