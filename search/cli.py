"""`dit-sparse search`: registered into the main CLI by ``add_search_parser(subparsers)``.

The flags are the fields of SearchConfig and ScheduleSearchConfig (`--dense-first` sets `dense_first`). The library
names a setting in its messages as the field in backquotes; this command words it as the flag (`worded`), in
errors and in the progress lines it prints."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from dataclasses import fields
from pathlib import Path

from dit_sparse.models import add_device_arguments


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
    add_device_arguments(p)
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
    from .api import search
    from .config import SearchConfig

    if args.out is not None and Path(args.out).is_dir():  # found before calibrating, not when writing the plan
        return _refused(f"--out {args.out} is a directory; --out takes the plan's file path (e.g. "
                        f"{Path(args.out) / 'model.plan.json'}), the report and statistics go beside it")
    if args.reuse_schedule:
        return _run_reuse_schedule(args)
    grid_flags = [f"--grid-{name}" for name in _GRID_FLAGS if getattr(args, f"grid_{name}") is not None]
    if grid_flags:
        return _refused(f"{', '.join(grid_flags)}: the --grid-* flags apply only to --reuse-schedule; add "
                        "--reuse-schedule or leave them out")
    result = _ran(args.quiet, lambda: search(args.model, SearchConfig(**_settings(args, SearchConfig))))
    if result is None:
        return 2
    if not result.paths:  # another process of a multi-process search: the first one reports
        return 0
    m = result.solution.metrics
    e2e = m["end_to_end_speedup"]
    return _reported(result, f"predicted: relative L2 error {m['relative_l2_error']:.4f}, density "
                             f"{m['density']:.1%} in sparse steps, attention {m['attention_speedup']:.2f}x"
                             + (f", end to end {e2e:.2f}x" if e2e else ""))


# The --grid-* flags, in the order of ScheduleGrid's fields.
_GRID_FLAGS = ("first", "last", "refresh", "order")


def _whole_numbers(text: str) -> tuple[int, ...]:
    values = _comma_separated_ints(text, "whole numbers such as 2,3,4")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _run_reuse_schedule(args) -> int:
    from .config import ScheduleSearchConfig, SearchConfig
    from .schedule import ScheduleGrid
    from .schedule_search import search_reuse_schedule

    shared = {f.name for f in fields(ScheduleSearchConfig)}
    ignored = [f.name for f in fields(SearchConfig) if f.name not in shared and getattr(args, f.name) != f.default]
    if ignored:
        return _refused(f"--reuse-schedule searches the schedule alone; {', '.join(map(flag, ignored))} belong to "
                        "the per-head search (leave them out)")

    def run():
        grid = ScheduleGrid(*(getattr(args, f"grid_{name}") for name in _GRID_FLAGS))
        return search_reuse_schedule(args.model, ScheduleSearchConfig(**_settings(args, ScheduleSearchConfig),
                                                                      grid=grid))

    result = _ran(args.quiet, run)
    if result is None:
        return 2
    m = result.solution.metrics
    return _reported(result, f"predicted: executed density {m['executed_density']:.1%}, attention of the covered "
                             f"modules {m['attention_speedup']:.2f}x")


def _refused(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _ran(quiet: bool, run):
    """run()'s result with its progress on stderr, or None once the error it raised is printed as one line."""
    with _progress_on_stderr(quiet):
        try:
            return run()
        except _errors() as e:
            _refused(worded(str(e)))
            return None


def _reported(result, predicted: str) -> int:
    print(result.solution.binding)
    print(predicted)
    for kind, path in result.paths.items():
        print(f"wrote {kind}: {path}")
    return 0


def _settings(args, config_class) -> dict:
    """The configuration fields of `config_class` from the command line (its flags are named after them)."""
    given = {f.name: getattr(args, f.name) for f in fields(config_class) if hasattr(args, f.name)}
    return dict(given, progress=not args.quiet)


def _errors() -> tuple[type[Exception], ...]:
    """What a search reports as one line and exit status 2."""
    from dit_sparse.adapters import UnsupportedModelError
    from dit_sparse.atomic import WriteError
    from dit_sparse.plan import PlanError
    from dit_sparse.processor import PlanMismatchError

    from .errors import SearchError

    return SearchError, PlanError, UnsupportedModelError, PlanMismatchError, FileNotFoundError, WriteError


# -- the library's words for settings, as flags ---------------------------------------------------------------------
def flag(name: str) -> str:
    """The flag of a configuration field (dense_first -> --dense-first)."""
    return "--" + name.replace("_", "-")


def _setting_names() -> set[str]:
    from .config import ScheduleSearchConfig, SearchConfig

    return {f.name for config in (SearchConfig, ScheduleSearchConfig) for f in fields(config)} | {"model",
                                                                                                   "reuse_schedule"}


def worded(text: str) -> str:
    """`text` with every setting the library names in backquotes (`dense_first`) worded as its flag."""
    names = _setting_names()
    return re.sub(r"`([a-z_]+)`", lambda m: flag(m[1]) if m[1] in names else m[0], text)


class _FlagWording(logging.Formatter):
    """The progress logger's lines as the command has always printed them: warnings prefixed "warning: ",
    settings worded as flags."""

    def format(self, record: logging.LogRecord) -> str:
        text = worded(record.getMessage())
        return f"warning: {text}" if record.levelno >= logging.WARNING else text


@contextlib.contextmanager
def _progress_on_stderr(quiet: bool):
    """While a search runs, its progress lines and warnings (dit_sparse.search.progress) go to stderr, unless
    --quiet or this is not the first of several launched processes; never on to the root logger's handler."""
    from .progress import PROGRESS

    if quiet or int(os.environ.get("RANK", "0")) != 0:
        handler = logging.NullHandler()  # else logging's last resort would print the warnings
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_FlagWording())
    PROGRESS.addHandler(handler)
    saved = PROGRESS.level, PROGRESS.propagate
    PROGRESS.setLevel(logging.INFO)
    PROGRESS.propagate = False
    try:
        yield
    finally:
        PROGRESS.setLevel(saved[0])
        PROGRESS.propagate = saved[1]
        PROGRESS.removeHandler(handler)
