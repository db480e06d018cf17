"""`dit-sparse` command line: generate, bench, search and demo."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from .extras import MissingExtra, require
from .models import add_device_arguments
from .plan import PlanError

NUM_PROMPTS_DEFAULT = 8


class NotACheckoutError(Exception):
    """A command that runs from the repository's source checkout (benchmarks/, tools/) in a non-editable install."""


def checkout_root() -> Path:
    """Where an editable install (`pip install -e .`) has its repository: the folder above the dit_sparse package."""
    return Path(__file__).resolve().parent.parent


def checkout_module(name: str, what: str = "dit-sparse bench"):
    """A module of the source checkout that is not installed with the package, e.g. "benchmarks.bench_speed".

    The repository root is appended to sys.path, never prepended: its kernels/ folder must not stand in for an
    installed `kernels` library. Raises NotACheckoutError (one line) where the checkout is not there."""
    root = checkout_root()
    folder = root / name.partition(".")[0]
    if not ((root / "pyproject.toml").is_file() and (folder / "__init__.py").is_file()):
        raise NotACheckoutError(f"{what} runs from a source checkout: clone the repository and `pip install -e .` "
                                f"there (this installation has no {folder})")
    if str(root) not in sys.path:
        sys.path.append(str(root))
    module = importlib.import_module(name)
    if Path(module.__file__).resolve().parent != folder:
        raise NotACheckoutError(f"{what}: `{name}` is {module.__file__}, not the checkout's (another installed "
                                f"package is named {folder.name})")
    return module


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate dense and sparse with the same seed and compare them")
    p.add_argument("--prompt", default=None, help="text prompt (tiny-shapes: colour, shape, motion, background)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--plan", default=None,
                   help="a plan file, a strategy name for a uniform plan (e.g. diagonal, block_adaptive), or 'default'")
    p.add_argument("--model", default="tiny-shapes",
                   help="tiny-shapes, or a local diffusers pipeline directory / hub id")
    add_device_arguments(p)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--executor", default=None, help="reference, cpu or triton (default: best for the device)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed generations each way, interleaved; the report keeps the fastest of each (default 2)")
    p.add_argument("--out", default="out/generate",
                   help="folder for the videos and report.json (checked for writing before any work; each file is "
                        "written as soon as it exists)")
    p.add_argument("--ulysses", type=int, default=1,
                   help="context parallelism: Ulysses degree (run under torchrun, one process per device)")
    p.add_argument("--ring", type=int, default=1,
                   help="context parallelism: ring degree (processes = ulysses x ring)")
    p.add_argument("--force", action="store_true",
                   help="run a size the estimate says is too large for the device (on CPU: more than 65,536 video "
                        "tokens, or dense attention larger than the free memory); refused by default")
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    from .generate import GenerateConfig, format_report, run_generate

    cfg = GenerateConfig(prompt=args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance, plan=args.plan,
                         model=args.model, device=args.device, dtype=args.dtype, height=args.height,
                         width=args.width, frames=args.frames, out=args.out, executor=args.executor,
                         repeats=args.repeats, force=args.force, ulysses=args.ulysses, ring=args.ring)
    report = run_generate(cfg)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0  # under torchrun every rank computes the same generation; rank 0 reports it
    print(format_report(report))
    if args.out:
        print(f"wrote {args.out}/dense.mp4, sparse.mp4, side_by_side.mp4 and report.json")
    return 0


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    k = bench.add_parser("kernels", help="attention kernels against dense SDPA (CUDA: the Triton kernels, needs "
                                          "dit-sparse[triton]; CPU: the cpu executor)")
    k.add_argument("--out", default="benchmarks/results")
    k.add_argument("--quick", action="store_true", help="fewer sizes")
    k.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    k.set_defaults(func=_bench_kernels)
    e = bench.add_parser("e2e", help="end-to-end generation: dense vs plans, speed and fidelity")
    e.add_argument("--model", default="tiny-shapes")
    e.add_argument("--plans", nargs="+", default=["default"],
                   help="'default', plan files, or uniform strategies like 'diagonal:window=[1,0.25,0.25]'")
    e.add_argument("--prompts", default=None, help="file with one prompt per line (default: tiny-shapes held-out)")
    e.add_argument("--num-prompts", type=int, default=NUM_PROMPTS_DEFAULT)
    e.add_argument("--seeds", type=int, nargs="+", default=[0])
    e.add_argument("--steps", type=int, default=None)
    add_device_arguments(e)
    e.add_argument("--ceiling", action="store_true",
                   help="also time a run with every covered attention head skipped: the speedup no plan can beat on "
                        "this model and machine (its video is meaningless; fidelity not reported)")
    e.add_argument("--force", action="store_true",
                   help="run a model whose default size the estimate says is too large for the device (on CPU: "
                        "more than 65,536 video tokens, or dense attention larger than the free memory)")
    e.add_argument("--out", default="out/bench-e2e",
                   help="folder for results.json (rewritten after every prompt and seed, so that a late fault keeps "
                        "what was measured), results.md and speedup_vs_psnr.png")
    e.set_defaults(func=_bench_e2e)
    sp = bench.add_parser("speed", help="transformer forwards of a real architecture with random weights")
    sp.add_argument("--arch", default="wan2.1-1.3b", help="wan2.1-1.3b, wan2.1-14b, cogvideox-5b or hunyuanvideo")
    sp.add_argument("--plans", nargs="+", default=["diagonal:window=[1,0.125,0.125]"])
    sp.add_argument("--frames", type=int, default=None)
    sp.add_argument("--height", type=int, default=None)
    sp.add_argument("--width", type=int, default=None)
    sp.add_argument("--layers", type=int, default=None, help="fewer layers than the published config (CPU)")
    sp.add_argument("--repeats", type=int, default=3,
                    help="timed forwards per configuration, best kept; eager, in interleaved rounds of dense and "
                         "each plan")
    add_device_arguments(sp)
    sp.add_argument("--ulysses", type=int, default=1,
                    help="context parallelism: Ulysses degree (run under torchrun, one process per device)")
    sp.add_argument("--ring", type=int, default=1, help="context parallelism: ring degree")
    sp.add_argument("--compile", action="store_true",
                    help="time dense and every plan under torch.compile (the same for both)")
    sp.add_argument("--out", default="out/bench-speed")
    sp.set_defaults(func=_bench_speed)


def _bench_e2e(args) -> int:
    from .checks import ArgumentError, check_out_folder
    from .evaluation import run_e2e
    from .inputs import read_text_file

    results = checkout_module("benchmarks.bench_e2e")
    check_out_folder(args.out)
    prompts = None
    if args.prompts:
        text = read_text_file(args.prompts, "--prompts", "a text file with one prompt per line")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ArgumentError(f"--prompts {args.prompts}: the file has no prompts")
        if len(prompts) < args.num_prompts and args.num_prompts != NUM_PROMPTS_DEFAULT:
            logging.getLogger(__name__).warning("--prompts %s has %d prompts, fewer than --num-prompts %d: using "
                                                "them all", args.prompts, len(prompts), args.num_prompts)
    out = Path(args.out)
    result = run_e2e(args.model, args.plans, prompts, args.num_prompts, args.seeds, args.steps, args.device, args.dtype,
                     ceiling=args.ceiling, on_partial=lambda partial: results.write_results_json(partial, out),
                     force=args.force)
    results.write_results(result, out)
    print(results.markdown_table(result))
    print(f"wrote {args.out}/results.json, results.md, speedup_vs_psnr.png")
    return 0


def _bench_speed(args) -> int:
    from .atomic import write_json
    from .checks import ArgumentError, check_out_folder, check_sizes
    from .models import DTYPES, check_device_and_dtype

    speed = checkout_module("benchmarks.bench_speed")
    if args.arch not in speed.ARCHITECTURES:
        raise ArgumentError(f"--arch must be one of {', '.join(speed.ARCHITECTURES)}, got {args.arch!r}")
    check_device_and_dtype(args.device, args.dtype)
    check_sizes(height=args.height, width=args.width, frames=args.frames)
    check_out_folder(args.out)
    result = speed.run_speed(args.arch, args.plans, args.frames, args.height, args.width, args.layers, args.repeats,
                       args.device, DTYPES[args.dtype], out=Path(args.out), compile=args.compile,
                       ulysses=args.ulysses, ring=args.ring)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0  # under torchrun, rank 0 writes and reports
    write_json(Path(args.out) / "results.json", result, finite=True)
    for row in result["results"]:
        kernel = f"{row['kernel_seconds']:.3f}s" if row.get("kernel_seconds") is not None else "n/a"
        print(f"{row['plan']:<40} forward {row['seconds']:.3f}s ({row['speedup']:.2f}x)  attention modules "
              f"{row['attention_seconds']:.3f}s  attention kernels {kernel}  density {row['executed_density']:.1%}")
    print("fidelity is not measured in speed-only mode (random weights)")
    return 0


def _bench_kernels(args) -> int:
    import torch

    from .checks import check_out_folder
    from .models import check_device_and_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device_and_dtype(device, "float32")
    check_out_folder(args.out)
    if torch.device(device).type == "cuda":  # the Triton kernels; on CPU the cpu executor needs no extra
        require("triton", what="dit-sparse bench kernels on CUDA")
    bench = checkout_module("benchmarks.bench_kernels")
    return bench.main(["--out", args.out, "--device", device] + (["--quick"] if args.quick else []))


class _Errors:
    """Bad input, a missing extra (MissingExtra: names its pip install command) or a result file that cannot be
    written (WriteError) ends with one clear line and exit status 2, never a traceback."""

    @staticmethod
    def known():
        from .adapters import UnsupportedModelError
        from .api import AlreadyAppliedError
        from .atomic import WriteError
        from .checks import ArgumentError
        from .executors import ExecutorError
        from .inputs import InputFileError
        from .processor import PlanMismatchError

        # WriteError: a result file could not be written (a full or read-only disk), named with the reason
        return (PlanError, ArgumentError, UnsupportedModelError, PlanMismatchError, AlreadyAppliedError,
                ExecutorError, MissingExtra, FileNotFoundError, WriteError, InputFileError, NotACheckoutError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dit-sparse", description="sparse attention for diffusers DiTs")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub)
    from .demo.cli import add_demo_parser
    from .distill.cli import add_distill_parser
    from .search.cli import add_search_parser

    add_search_parser(sub)
    add_distill_parser(sub)
    add_demo_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except _Errors.known() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
