"""dit_sparse.search: calibrate a model on prompts, pick a strategy per layer and head under a fidelity budget with
a measured cost model, write a plan (``dit-sparse search``).

    from dit_sparse.search import search
    result = search("tiny-shapes", target_speedup=2.0, out="tiny.plan.json")
    result.plan, result.solution.metrics, result.paths

Lower-level pieces: :func:`calibrate` (statistics from any run of a pipeline or transformer),
:func:`~dit_sparse.search.solver.solve` (a plan from statistics, a cost model and a budget),
:class:`CalibrationStats` (saved and reloaded to solve again without calibrating).
"""

from .api import (
    SearchResult,
    calibrate,
    model_fingerprint,
    output_paths,
    pipeline_runner,
    probe,
    read_prompts,
    search,
)
from .calibration import CalibrationObserver
from .candidates import Candidate, default_candidates
from .cost import CostModel, flop_cost, measure_cost
from .errors import SearchError
from .solver import Budget, BudgetError, InfeasibleBudget, Solution, solve
from .stats import CalibrationStats, StatsError

__all__ = [
    "Budget", "BudgetError", "CalibrationObserver", "CalibrationStats", "Candidate", "CostModel", "InfeasibleBudget",
    "SearchError", "SearchResult", "Solution", "StatsError", "calibrate", "default_candidates", "flop_cost",
    "measure_cost", "model_fingerprint", "output_paths", "pipeline_runner", "probe", "read_prompts", "search",
    "solve",
]
