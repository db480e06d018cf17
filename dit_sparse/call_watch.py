"""Which module calls are running: how a processor set in the one-line form finds its transformer, without frames.

`pipe.transformer.set_attn_processor(SparseProcessor(plan))` hands the processor to every attention module and no
transformer to the processor: the first it learns of one is its first call, from inside an attention module, deep
in the transformer's forward. So from its construction until it binds, a processor is watched: torch's global module
hooks (`torch.nn.modules.module.register_module_forward_pre_hook` and `register_module_forward_hook`) keep, per
thread, the stack of module calls running. At its first call the processor finds on that stack the transformer
running it (`running`), binds to it and installs the transformer's own forward pre-hook, which captures every later
call's arguments.

The call already running passed its arguments before that pre-hook existed, and torch hands keyword arguments to no
hook but the module's own. So the processor runs the rest of that first forward with the family's stock attention,
and registers a forward hook on the transformer's call, which receives the call's arguments as the caller passed
them (unsplit under context parallelism) once it returns: it runs the call again, now bound, and returns that output
instead. This path is best effort in one respect: at its first call the transformer runs twice, so hooks of its own
(a diffusers cache, a counter) see two calls. `dit_sparse.apply` binds before the first call and has none of it.

The global hooks exist only while some processor waits to bind (`dit_sparse.remove` and a failed `apply` release
theirs; a processor that is collected waits no more), and do nothing inside compiled graphs.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook


class CallWatch:
    """The module calls running in each thread, kept while some processor waits to bind (module-level `WATCH`)."""

    def __init__(self):
        self._waiting = weakref.WeakSet()
        self._handles = None
        self._era = 0  # hooks started anew: stacks of an earlier era were left unbalanced, and are dropped
        self._local = threading.local()
        self._lock = threading.Lock()

    def watch(self, processor) -> None:
        """Keep the call stack until `processor` binds, is released or is collected."""
        with self._lock:
            self._waiting.add(processor)
            if self._handles is None:
                self._era += 1
                self._handles = (register_module_forward_pre_hook(self._entered),
                                 register_module_forward_hook(self._left, always_call=True))

    def release(self, processor) -> None:
        """`processor` bound, or can be called no more: it needs the stack no more."""
        self._waiting.discard(processor)
        if not self._stack():
            self._stop_if_idle()  # else when the running call returns

    def waiting(self, processor) -> bool:
        return processor in self._waiting

    @property
    def active(self) -> bool:
        """Whether the global hooks are on."""
        return self._handles is not None

    def running(self) -> list[torch.nn.Module]:
        """The module calls running in this thread, outermost first."""
        return list(self._stack())

    def _stack(self) -> list:
        local = self._local
        if getattr(local, "era", None) != self._era:
            local.era, local.calls = self._era, []
        return local.calls

    # The hooks stop themselves, outside compiled graphs only: dynamo guards on the global hooks it traces, and one
    # removed while it traces cannot be guarded on.
    def _entered(self, module, args):
        if not torch.compiler.is_compiling() and not self._stop_if_idle():
            self._stack().append(module)

    def _left(self, module, args, output):
        if torch.compiler.is_compiling():
            return
        calls = self._stack()
        for depth in range(len(calls) - 1, -1, -1):
            if calls[depth] is module:
                del calls[depth:]  # and any call above it whose hook did not run
                break
        self._stop_if_idle()

    def _stop_if_idle(self) -> bool:
        """Remove the hooks if no processor waits (a collected one is no longer in the set); whether they are off."""
        with self._lock:
            if self._handles is not None and not any(True for _ in self._waiting):
                for handle in self._handles:
                    handle.remove()
                self._handles = None
            return self._handles is None


WATCH = CallWatch()


def containing(modules: list[torch.nn.Module], module: torch.nn.Module) -> list[torch.nn.Module]:
    """Those of `modules` that hold `module` (itself included), in order."""
    return [m for m in modules if any(sub is module for sub in m.modules())]
