"""dit-sparse: per-layer, per-head sparse attention plans for diffusers diffusion transformers.

    from dit_sparse import SparsePlan, SparseProcessor
    pipe.transformer.set_attn_processor(SparseProcessor(SparsePlan.load("plan.json")))
"""

from .adapters import UnsupportedModelError, supported_transformers
from .api import AlreadyAppliedError, apply, remove, summary
from .layout import BlockLayout, Grid
from .plan import HeadStrategy, PlanError, Schedule, SparsePlan
from .processor import PlanMismatchError, SparseProcessor

__version__ = "0.1.0"

__all__ = [
    "AlreadyAppliedError", "BlockLayout", "Grid", "HeadStrategy", "PlanError", "PlanMismatchError", "Schedule",
    "SparsePlan", "SparseProcessor", "UnsupportedModelError", "apply", "remove", "summary", "supported_transformers",
]
