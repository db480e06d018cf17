"""Triton import guard and a jit wrapper that decides compiled vs interpreted at first launch.

``triton.jit`` decides at decoration time whether a kernel is compiled or interpreted (``TRITON_INTERPRET``).
Kernels here are decorated lazily, at their first launch, so the choice follows the environment of the
process when it runs them, not whichever module happened to import this package first.
"""

from __future__ import annotations

import types

from dit_sparse.extras import MissingExtra, install_command

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise MissingExtra(  # an ImportError
        f"dit_sparse.kernels needs Triton: {install_command('triton')} (or pip install 'triton>=3.1'); "
        "without it use the 'cpu' or 'reference' executor"
    ) from exc

__all__ = ["triton", "tl", "interpreting", "LazyKernel"]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


class LazyKernel:
    """A Triton kernel decorated with ``triton.jit`` (and optionally ``triton.autotune``) at first launch.

    ``configs`` is a callable returning the autotune configs; under the interpreter only the first is kept
    because ``triton.autotune`` with several configs fails there. ``helpers`` are plain functions the kernel
    calls (and that call one another); they are jitted in the kernel's own mode and seen only by copies of the
    kernel and helper functions made for that mode, so the module that defines them keeps its plain functions.
    """

    def __init__(self, fn, configs=None, key=(), helpers=()):
        self.fn = fn
        self.configs = configs
        self.key = list(key)
        self.helpers = tuple(helpers)
        self._built: dict[bool, object] = {}
        self._functions: dict[bool, types.FunctionType] = {}

    def function(self, mode: bool) -> types.FunctionType:
        """The kernel's Python function with its helpers jitted for ``mode`` (True: interpreted) in its globals."""
        if not self.helpers:
            return self.fn
        if mode not in self._functions:
            # One scope for the kernel and its helpers, filled after the copies exist: Triton resolves a called
            # name in it when it compiles, so a helper calling a helper finds the jitted one.
            scope = dict(self.fn.__globals__)
            scope.update({helper.__name__: triton.jit(_in_scope(helper, scope)) for helper in self.helpers})
            self._functions[mode] = _in_scope(self.fn, scope)
        return self._functions[mode]

    def build(self):
        mode = interpreting()
        if mode not in self._built:
            kernel = triton.jit(self.function(mode))
            if self.configs is not None:
                configs = self.configs()
                if mode:
                    configs = configs[:1]
                kernel = triton.autotune(configs=configs, key=self.key)(kernel)
            self._built[mode] = kernel
        return self._built[mode]

    def __getitem__(self, grid):
        return self.build()[grid]


def _in_scope(fn: types.FunctionType, scope: dict) -> types.FunctionType:
    """A copy of `fn` whose global names resolve in `scope`."""
    return types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
