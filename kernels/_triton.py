"""Triton import guard and a jit wrapper that decides compiled vs interpreted at first launch.

``triton.jit`` decides at decoration time whether a kernel is compiled or interpreted (``TRITON_INTERPRET``).
Kernels here are decorated lazily, at their first launch, so the choice follows the environment of the
process when it runs them, not whichever module happened to import this package first.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError(
        "dit_sparse.kernels needs Triton (pip install 'dit-sparse[triton]' or 'triton>=3.1'); "
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
    calls: each launch binds, in the kernel's module, their version jitted in the same mode as the kernel.
    """

    def __init__(self, fn, configs=None, key=(), helpers=()):
        self.fn = fn
        self.configs = configs
        self.key = list(key)
        self.helpers = tuple(helpers)
        self._built: dict[bool, object] = {}
        self._jitted_helpers: dict[tuple[bool, str], object] = {}

    def bind_helpers(self, mode: bool) -> None:
        """Bind the helpers jitted for ``mode`` (True: interpreted) where the kernel looks them up."""
        for helper in self.helpers:
            name = helper.__name__
            if (mode, name) not in self._jitted_helpers:
                self._jitted_helpers[mode, name] = triton.jit(helper)
            self.fn.__globals__[name] = self._jitted_helpers[mode, name]

    def build(self):
        mode = interpreting()
        self.bind_helpers(mode)
        if mode not in self._built:
            kernel = triton.jit(self.fn)
            if self.configs is not None:
                configs = self.configs()
                if mode:
                    configs = configs[:1]
                kernel = triton.autotune(configs=configs, key=self.key)(kernel)
            self._built[mode] = kernel
        return self._built[mode]

    def __getitem__(self, grid):
        return self.build()[grid]
