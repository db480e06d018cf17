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


def nearest_class_name(transformer_type: type, names) -> str | None:
    """The nearest class in the MRO whose name is in `names`: a subclass of a supported transformer (one that adds
    input channels, say) keeps its attention modules, so what serves its parent serves it."""
    return next((c.__name__ for c in transformer_type.__mro__ if c.__name__ in names), None)


def _registered_name(transformer_type: type) -> str | None:
    return nearest_class_name(transformer_type, ADAPTERS)


def has_adapter(module: torch.nn.Module) -> bool:
    return _registered_name(type(module)) is not None


def adapter_for_transformer(transformer: torch.nn.Module) -> ModelAdapter:
    name = _registered_name(type(transformer))
    if name is None:
        raise UnsupportedModelError(
            f"dit-sparse has no adapter for {type(transformer).__name__}; "
            f"supported transformers: {', '.join(supported_transformers())}"
        )
    return ADAPTERS[name]


from . import cogvideox, flux, hunyuan_video, ltx_video, mochi, pixart, sd3, wan  # noqa: E402,F401 (they register)

__all__ = ["ADAPTERS", "ModelAdapter", "UnsupportedModelError", "adapter_for_transformer", "has_adapter",
           "nearest_class_name", "register_adapter", "supported_transformers"]
