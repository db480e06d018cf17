"""`dit-sparse search`: registered into the main CLI by ``add_search_parser(subparsers)``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _comma_separated_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None


def _layers(text: str) -> tuple[int, ...]:
    return _comma_separated_ints(text.replace(" ", ""), "layer indices")


def add_search_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "search", help="calibrate on prompts and search a per-head sparse plan under a fidelity budget",
        description="Run the model densely on a few prompts, measure what every candidate strategy would do to "
                    "every head, time the candidates on this machine, and write the fastest plan within the "
                    "budget, with a report (markdown + PNG) and the statistics (to re-solve with --stats).")
    p.add_argument("--model", default=None,
                   help="tiny-shapes (default), a local diffusers pipeline directory, or a hub id")
    p.add_argument("--prompts", default=None, help="text file with one calibration prompt per line")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    budget = p.add_argument_group("budget (default: --max-error 0.1)")
    budget.add_argument("--max-error", type=float, default=None,
                        help="largest relative L2 error of attention outputs (mean over layers), e.g. 0.1")
    budget.add_argument("--target-density", type=float, default=None,
                        help="largest mean fraction of attention work of the covered heads in sparse steps")
    budget.add_argument("--target-speedup", type=float, default=None,
                        help="smallest predicted attention speedup over a whole generation")
    budget.add_argument("--allow-closest", action="store_true",
                        help="when the budget cannot be met, write the closest plan instead of failing")
    budget.add_argument("--min-psnr", type=float, default=None, metavar="DB",
                        help="generate the calibration prompts dense and with candidate plans and keep the fastest "
                             "plan whose mean PSNR against dense reaches DB (tightens --max-error and lengthens "
                             "the dense warm-up as needed)")
    budget.add_argument("--pick-by-psnr", action="store_true",
                        help="with --target-density / --target-speedup: solve the target under several error "
                             "models, generate the calibration prompts with each plan and keep the highest mean "
                             "PSNR against dense")
    budget.add_argument("--reuse-schedule", action="store_true",
                        help="with --min-psnr: search only the schedule of a uniform `reuse` plan (dense first and "
                             "last steps, refresh interval, forecast order), fastest first, checked end to end; no "
                             "calibration statistics")
    grid = p.add_argument_group("schedule grid of --reuse-schedule (defaults: dense first 1..max(6, 15% of the "
                                "steps), dense last 0..3, refresh every 2..max(5, steps/8), orders 2,1)")
    grid.add_argument("--grid-first", type=_whole_numbers, default=None, metavar="N,N",
                      help="dense first steps to try, e.g. 4,5,6")
    grid.add_argument("--grid-last", type=_whole_numbers, default=None, metavar="N,N",
                      help="dense last steps to try, e.g. 1,2")
    grid.add_argument("--grid-refresh", type=_whole_numbers, default=None, metavar="K,K",
                      help="refresh intervals to try, e.g. 3,4,5")
    grid.add_argument("--grid-order", type=_whole_numbers, default=None, metavar="O,O",
                      help="forecast orders to try, in order of preference: 2 second-order, 1 linear, 0 hold")
    p.add_argument("--dense-first", type=float, default=0.2, help="fraction of the first steps that stay dense")
    p.add_argument("--dense-layers", type=_layers, default=(), help="comma-separated layers that stay dense")
    p.add_argument("--stats", default=None,
                   help="statistics file of an earlier search: solve again without calibrating")
    p.add_argument("--out", default=None,
                   help="plan path (default out/search/<model>.plan.json); report and statistics go beside it (its "
                        "folder is checked for writing before any work; the statistics are written before solving)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--cost", choices=("measured", "flop"), default="measured",
                   help="time candidates on this machine (cached) or use a FLOP model")
    p.add_argument("--cache-dir", default=None, help="cost-table cache (default ~/.cache/dit_sparse)")
    p.add_argument("--calib-steps", type=int, default=5, help="denoising steps sampled for calibration")
    p.add_argument("--refresh-interval", type=int, default=None, metavar="K",
                   help="steps between refreshes of dynamic layouts and re-scale statistics (default 5; calibration "
                        "measures the errors for this interval, so with --stats it must match the statistics)")
    p.add_argument("--layer-weights", choices=("sensitivity", "none"), default="sensitivity",
                   help="weight each layer's attention error by its measured effect on the output (default), or not")
    p.add_argument("--step-weights", choices=("none", "sensitivity"), default="none",
                   help="average the sampled steps' errors alike (default), or weight each by the measured effect of "
                        "a perturbation at that step on the generated result")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the cores not already busy, from the load average)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or estimates")
    p.set_defaults(func=run_search)


def run_search(args) -> int:
    from dit_sparse.adapters import UnsupportedModelError
    from dit_sparse.atomic import WriteError
    from dit_sparse.plan import PlanError
    from dit_sparse.processor import PlanMismatchError

    from .api import search
    from .errors import SearchError

    def echo(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr)

    if args.out is not None and Path(args.out).is_dir():  # found before calibrating, not when writing the plan
        print(f"error: --out {args.out} is a directory; --out takes the plan's file path (e.g. "
              f"{Path(args.out) / 'model.plan.json'}), the report and statistics go beside it", file=sys.stderr)
        return 2
    if args.reuse_schedule:
        return _run_reuse_schedule(args, echo)
    grid_flags = [f"--grid-{name}" for name in _GRID_FLAGS if getattr(args, f"grid_{name}") is not None]
    if grid_flags:
        print(f"error: {', '.join(grid_flags)}: the --grid-* flags apply only to --reuse-schedule; add "
              "--reuse-schedule or leave them out", file=sys.stderr)
        return 2
    try:
        result = search(
            args.model, args.prompts, height=args.height, width=args.width, frames=args.frames, steps=args.steps,
            guidance=args.guidance, max_error=args.max_error, target_density=args.target_density,
            target_speedup=args.target_speedup, dense_first=args.dense_first, dense_layers=args.dense_layers,
            stats=args.stats, out=args.out, device=args.device, dtype=args.dtype, allow_closest=args.allow_closest,
            cost=args.cost, cache_dir=args.cache_dir, calib_steps=args.calib_steps,
            refresh_interval=args.refresh_interval, seed=args.seed, threads=args.threads,
            layer_weights=args.layer_weights, min_psnr=args.min_psnr, pick_by_psnr=args.pick_by_psnr,
            step_weights=args.step_weights, progress=not args.quiet, echo=echo)
    except (SearchError, PlanError, UnsupportedModelError, PlanMismatchError, FileNotFoundError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not result.paths:  # another process of a multi-process search: the first one reports
        return 0
    m = result.solution.metrics
    e2e = m["end_to_end_speedup"]
    print(f"{result.solution.binding}")
    print(f"predicted: relative L2 error {m['relative_l2_error']:.4f}, density {m['density']:.1%} in sparse steps, "
          f"attention {m['attention_speedup']:.2f}x" + (f", end to end {e2e:.2f}x" if e2e else ""))
    for kind, path in result.paths.items():
        print(f"wrote {kind}: {path}")
    return 0


# Options of the per-head search that a schedule search has no use for, with their defaults.
_PER_HEAD_ONLY = {"max_error": None, "target_density": None, "target_speedup": None, "pick_by_psnr": False,
                  "dense_first": 0.2, "dense_layers": (), "stats": None, "cost": "measured", "cache_dir": None,
                  "calib_steps": 5, "refresh_interval": None, "layer_weights": "sensitivity", "step_weights": "none"}


# The --grid-* flags, in the order of ScheduleGrid's fields.
_GRID_FLAGS = ("first", "last", "refresh", "order")


def _whole_numbers(text: str) -> tuple[int, ...]:
    values = _comma_separated_ints(text, "whole numbers such as 2,3,4")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _run_reuse_schedule(args, echo) -> int:
    from dit_sparse.adapters import UnsupportedModelError
    from dit_sparse.atomic import WriteError
    from dit_sparse.plan import PlanError

    from .api import search_reuse_schedule
    from .errors import SearchError
    from .schedule import ScheduleGrid

    ignored = [name for name, default in _PER_HEAD_ONLY.items() if getattr(args, name) != default]
    if ignored:
        flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
        print(f"error: --reuse-schedule searches the schedule alone; {flags} belong to the per-head search "
              "(leave them out)", file=sys.stderr)
        return 2
    try:
        grid = ScheduleGrid(*(getattr(args, f"grid_{name}") for name in _GRID_FLAGS))
        result = search_reuse_schedule(
            args.model, args.prompts, min_psnr=args.min_psnr, grid=grid, height=args.height, width=args.width,
            frames=args.frames, steps=args.steps, guidance=args.guidance, out=args.out, device=args.device,
            dtype=args.dtype, allow_closest=args.allow_closest, seed=args.seed, progress=not args.quiet,
            threads=args.threads, echo=echo)
    except (SearchError, PlanError, UnsupportedModelError, FileNotFoundError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = result.solution.metrics
    print(result.solution.binding)
    print(f"predicted: executed density {m['executed_density']:.1%}, attention of the covered modules "
          f"{m['attention_speedup']:.2f}x")
    for kind, path in result.paths.items():
        print(f"wrote {kind}: {path}")
    return 0
