"""Reading a tiny-shapes training checkpoint (tools/train_tiny_shapes.py writes OUT/checkpoint.pt): the EMA
pipeline it holds, to measure a run while it trains (dit_sparse.zoo.conditioning --checkpoint) or to export it."""

from __future__ import annotations

from pathlib import Path

import torch

from .model import TinyShapesConfig, build_pipeline


def ema_pipeline(config: dict, ema_state: dict):
    """A tiny-shapes pipeline holding a run's EMA weights (what export saves and monitoring measures)."""
    pipe = build_pipeline(TinyShapesConfig(**config))
    pipe.transformer.load_state_dict(ema_state["transformer"])
    pipe.text_encoder.load_state_dict(ema_state["text_encoder"])
    return pipe


def read_checkpoint(path: str | Path) -> dict:
    """A training checkpoint's state, or a clear exit when the file is missing or is not one."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"no training checkpoint at {path} (train_tiny_shapes writes OUT/checkpoint.pt)")
    st = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(st, dict) or not {"config", "ema", "step"} <= set(st):
        raise SystemExit(f"{path} is not a train_tiny_shapes checkpoint (no config, ema and step)")
    return st


def load_checkpoint(path: str | Path) -> tuple:
    """(EMA pipeline, checkpoint dict) of a training checkpoint, to measure a run while it trains."""
    st = read_checkpoint(path)
    return ema_pipeline(st["config"], st["ema"]), st
