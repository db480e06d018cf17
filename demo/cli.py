"""`dit-sparse demo`: serve the Gradio page. `add_demo_parser(subparsers)` registers the command (gradio is
imported only when the command runs)."""

from __future__ import annotations

import argparse
import sys

from ..extras import MissingExtra, require
from ..models import add_device_arguments


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
    add_device_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link")
    p.set_defaults(func=run_demo)


def check_host(host: str) -> str | None:
    """What is wrong with --host (None when it is an address of this machine, or a name that resolves to one), so
    that a bad host is blamed before the model loads, not the port after it."""
    import errno
    import ipaddress
    import re
    import socket

    if not host.strip():
        return "--host is empty; give an address to listen on, e.g. 127.0.0.1 or 0.0.0.0"
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        if re.fullmatch(r"[0-9.]+", host) or ":" in host:
            return (f"--host {host} is not a valid IP address (IPv4 is four numbers 0-255, e.g. 127.0.0.1; "
                    "0.0.0.0 listens on every interface)")
        try:
            addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})
        except (socket.gaierror, UnicodeError, OSError) as e:
            return f"--host {host} is neither an IP address nor a name this machine can resolve ({e})"
    problem = None
    for address in addresses:  # listening needs an address of this machine: bind to it on a free port to see
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((address, 0))
            return None
        except OSError as e:
            problem = e
    if isinstance(problem, OSError) and problem.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine (use 127.0.0.1, or 0.0.0.0 for every interface)"
    return f"--host {host}: cannot listen on it ({problem})"


def run_demo(args) -> int:
    if not 1 <= args.port <= 65535:  # gradio would fail with a traceback; 0 would serve on a port we cannot name
        print(f"error: --port must be a TCP port in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    host_problem = check_host(args.host)
    if host_problem is not None:
        print(f"error: {host_problem}", file=sys.stderr)
        return 2
    require("demo", what="dit-sparse demo")  # gradio for the page, matplotlib for its pictures
    from .app import build_app, launch_app
    from .inputs import DemoError

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
