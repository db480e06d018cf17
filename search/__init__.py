"""dit_sparse.search: calibrate a model on prompts, pick a strategy per layer and head under a fidelity budget with
a measured cost model, write a plan (``dit-sparse search``).

    from dit_sparse.search import SearchConfig, search
    result = search("tiny-shapes", SearchConfig(target_speedup=2.0, out="tiny.plan.json"))
    result.plan, result.solution.metrics, result.paths

`SearchConfig` holds every setting, checked when it is made; `search_reuse_schedule(model, ScheduleSearchConfig(
min_psnr=...))` searches the schedule of a uniform `reuse` plan instead. Progress lines go to the
``dit_sparse.search.progress`` logger.

Lower-level pieces: :func:`calibrate` (statistics from any run of a pipeline or transformer, with
:class:`CalibrationOptions`), :func:`~dit_sparse.search.solver.solve` (a plan from statistics, a cost model and a
budget), :class:`CalibrationStats` (saved and reloaded to solve again without calibrating).
"""

from .api import SearchResult, search
from .calibration import CalibrationObserver
from .calibration_run import CalibrationOptions, calibrate, probe
from .candidates import Candidate, default_candidates
from .config import RunSettings, ScheduleSearchConfig, SearchConfig
from .cost import CostModel, flop_cost, measure_cost
from .errors import BudgetError, SearchError
from .files import output_paths, read_prompts
from .pipeline import model_fingerprint, pipeline_runner
from .schedule import ScheduleGrid
from .schedule_search import search_reuse_schedule
from .solver import Budget, InfeasibleBudget, Solution, solve
from .stats import CalibrationStats, StatsError

__all__ = [
    "Budget", "BudgetError", "CalibrationObserver", "CalibrationOptions", "CalibrationStats", "Candidate",
    "CostModel", "InfeasibleBudget", "RunSettings", "ScheduleGrid", "ScheduleSearchConfig", "SearchConfig",
    "SearchError", "SearchResult", "Solution", "StatsError", "calibrate", "default_candidates", "flop_cost",
    "measure_cost", "model_fingerprint", "output_paths", "pipeline_runner", "probe", "read_prompts", "search",
    "search_reuse_schedule", "solve",
]
