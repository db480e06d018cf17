"""dit-sparse: per-layer, per-head sparse attention plans for diffusers diffusion transformers.

    from dit_sparse import SparsePlan, SparseProcessor
    pipe.transformer.set_attn_processor(SparseProcessor(SparsePlan.load("plan.json")))
"""

from .adapters import UnsupportedModelError, supported_transformers
from .api import AlreadyAppliedError, apply, in_noise_units, noise_levels, remove, summary
from .layout import BlockLayout, Grid
from .parallel.plans import context_parallel_plan
from .parallel.topology import UnsupportedParallelismError
from .plan import HeadStrategy, PlanError, Schedule, SparsePlan
from .processor import PlanMismatchError, SparseProcessor, UnknownStepError

__version__ = "0.1.0"

__all__ = [
    "AlreadyAppliedError", "BlockLayout", "Grid", "HeadStrategy", "PlanError", "PlanMismatchError", "Schedule",
    "SparsePlan", "SparseProcessor", "UnknownStepError", "UnsupportedModelError", "UnsupportedParallelismError",
    "apply", "context_parallel_plan", "in_noise_units", "noise_levels", "remove", "summary", "supported_transformers",
]
