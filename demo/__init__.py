"""dit_sparse.demo: the Gradio page of `dit-sparse demo` (dense and sparse generation side by side).

Importing this package does not import gradio; `build_app` and `launch_app` do, when first used::

    from dit_sparse.demo import build_app, launch_app
    launch_app(build_app(model="tiny-shapes"), port=7860)
"""

from __future__ import annotations

__all__ = ["build_app", "launch_app", "DemoBackend", "DemoError", "add_demo_parser"]


def __getattr__(name: str):
    if name in ("build_app", "launch_app"):
        from . import app

        return getattr(app, name)
    if name == "DemoBackend":
        from .backend import DemoBackend

        return DemoBackend
    if name == "DemoError":
        from .inputs import DemoError

        return DemoError
    if name == "add_demo_parser":
        from .cli import add_demo_parser

        return add_demo_parser
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
