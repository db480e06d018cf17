"""tiny-shapes: the embedded default text-to-video DiT (procedural data, checker, pipeline); it is trained by
tools/train_tiny_shapes.py in the source checkout."""

from .model import TinyShapesConfig, build_pipeline
from .pipeline import WEIGHTS_DIR, TinyShapesPipeline, TinyShapesPipelineOutput, load_tiny_shapes

__all__ = [
    "TinyShapesConfig",
    "TinyShapesPipeline",
    "TinyShapesPipelineOutput",
    "WEIGHTS_DIR",
    "build_pipeline",
    "load_tiny_shapes",
]
