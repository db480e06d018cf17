"""`dit-sparse` command line: generate, bench (search, distill and demo come with their packages)."""

from __future__ import annotations

import argparse
import logging
import sys

from .plan import PlanError


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate dense and sparse with the same seed and compare them")
    p.add_argument("--prompt", default=None, help="text prompt (tiny-shapes: colour, shape, motion, background)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--plan", default=None,
                   help="a plan file, a strategy name for a uniform plan (e.g. diagonal, block_adaptive), or 'default'")
    p.add_argument("--model", default="tiny-shapes", help="tiny-shapes, or a local diffusers pipeline directory / hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--executor", default=None, help="reference, cpu or triton (default: best for the device)")
    p.add_argument("--out", default="out/generate", help="folder for the videos and report.json")
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    from .generate import GenerateConfig, format_report, run_generate

    cfg = GenerateConfig(prompt=args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance, plan=args.plan,
                         model=args.model, device=args.device, dtype=args.dtype, height=args.height,
                         width=args.width, frames=args.frames, out=args.out, executor=args.executor)
    report = run_generate(cfg)
    print(format_report(report))
    if args.out:
        print(f"wrote {args.out}/dense.mp4, sparse.mp4, side_by_side.mp4 and report.json")
    return 0


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    k = bench.add_parser("kernels", help="attention kernels against dense SDPA (CPU: the cpu executor)")
    k.add_argument("--out", default="benchmarks/results")
    k.add_argument("--quick", action="store_true", help="fewer sizes")
    k.set_defaults(func=_bench_kernels)


def _bench_kernels(args) -> int:
    try:
        from dit_sparse.kernels import bench
    except ImportError as e:
        print(f"error: the kernel benchmark is not available: {e}", file=sys.stderr)
        return 2
    return bench.main(["--out", args.out] + (["--quick"] if args.quick else []))


class _Errors:
    """Bad input ends with one clear line and exit status 2, never a traceback."""

    @staticmethod
    def known():
        from .adapters import UnsupportedModelError
        from .api import AlreadyAppliedError
        from .generate import GenerateError
        from .processor import PlanMismatchError

        return (PlanError, GenerateError, UnsupportedModelError, PlanMismatchError, AlreadyAppliedError,
                FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dit-sparse", description="sparse attention for diffusers DiTs")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except _Errors.known() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
