"""Model adapter registry, keyed by transformer class name."""

from __future__ import annotations

import torch

from .base import ModelAdapter

ADAPTERS: dict[str, ModelAdapter] = {}


def register_adapter(adapter_cls: type[ModelAdapter]) -> type[ModelAdapter]:
    adapter = adapter_cls()
    for name in adapter.transformer_classes:
        ADAPTERS[name] = adapter
    return adapter_cls


def supported_transformers() -> list[str]:
    return sorted(ADAPTERS)


class UnsupportedModelError(TypeError):
    pass


def adapter_for_transformer(transformer: torch.nn.Module) -> ModelAdapter:
    name = type(transformer).__name__
    if name not in ADAPTERS:
        raise UnsupportedModelError(
            f"dit-sparse has no adapter for {name}; supported transformers: {', '.join(supported_transformers())}"
        )
    return ADAPTERS[name]


from . import cogvideox, flux, hunyuan_video, ltx_video, mochi, pixart, sd3, wan  # noqa: E402,F401 (they register)

__all__ = ["ADAPTERS", "ModelAdapter", "UnsupportedModelError", "adapter_for_transformer", "register_adapter",
           "supported_transformers"]
