"""`dit-sparse demo`: serve the Gradio page. `add_demo_parser(subparsers)` registers the command (gradio is
imported only when the command runs)."""

from __future__ import annotations

import argparse
import sys

from ..extras import MissingExtra, require


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="a web page running dense and sparse side by side (needs dit-sparse[demo])",
                              description=DESCRIPTION)
    _add_arguments(p)
    return p


DESCRIPTION = ("Serve the dit-sparse demo page: dense and sparse generation with the same seed, side by side, with "
               "timings, fidelity and the plan.")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-shapes",
                   help="tiny-shapes (default), or a local diffusers pipeline directory / hub id")
    p.add_argument("--plan", default=None,
                   help="a plan file (offered first on the page), a strategy name (the page starts on a uniform plan "
                        "of it), or 'default'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    if not 1 <= args.port <= 65535:  # gradio would fail with a traceback; 0 would serve on a port we cannot name
        print(f"error: --port must be a TCP port in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    require("demo", what="dit-sparse demo")  # gradio for the page, matplotlib for its pictures
    from .app import build_app, launch_app
    from .backend import DemoError

    try:
        app = build_app(model=args.model, plan=args.plan, device=args.device, dtype=args.dtype)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"dit-sparse demo: http://{args.host}:{args.port}/  (Ctrl+C stops it)", flush=True)
    try:
        launch_app(app, host=args.host, port=args.port, share=args.share)
    except OSError as e:
        print(f"error: could not serve on {args.host}:{args.port}: {e}; pass another --port", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dit_sparse.demo [options]`: the same as `dit-sparse demo [options]`."""
    parser = argparse.ArgumentParser(prog="python -m dit_sparse.demo", description=DESCRIPTION)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MissingExtra as e:  # as dit_sparse.cli.main does
        print(f"error: {e}", file=sys.stderr)
        return 2
