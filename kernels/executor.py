"""The ``triton`` executor: block-sparse attention on the Triton kernels, chosen by default on CUDA.

Importing this module registers the executor, the fused mask-estimation statistics for CUDA and the custom ops
``torch.ops.dit_sparse.block_sparse_fwd``, ``block_sparse_fwd_fp8`` and ``block_sparse_bwd``.
``dit_sparse.executors`` imports it on CUDA machines. Without Triton the import raises an ImportError that says what
to install.

``dit_sparse.kernels`` has no ``__init__.py`` on purpose: the source folder ``kernels/`` at the repository root must
not be a regular top-level package, or ``import kernels`` from the root would find it instead of Hugging Face's
``kernels`` library, which transformers imports.
"""

from __future__ import annotations

import torch

from dit_sparse.executors import Executor, register_executor

from . import (
    _triton,  # noqa: F401  (fails early, with an install hint, when Triton is missing)
    block_stats,  # noqa: F401  (registers the fused mask-estimation statistics for CUDA)
)
from .attention import block_sparse_attention
from .config import fp8_note, fp8_pays, layout_block_sizes


def _available(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def triton_attention(q, k, v, layout, *, scale: float | None = None, fp8: bool = False):
    """q, k, v: (B, S, H, D). Returns out (B, S, H, D) in q's dtype and lse (B, H, S) fp32.

    ``fp8`` heads run in 16 bits where FP8 is measured slower (``config.fp8_pays``; the plan summary says so).
    """
    return block_sparse_attention(q, k, v, layout, scale=scale, fp8=fp8 and fp8_pays(q.device))


TRITON_EXECUTOR = register_executor(
    Executor(
        name="triton",
        run=triton_attention,
        block_sizes=layout_block_sizes,
        available=_available,
        priority=10,
        fp8_note=fp8_note,
    )
)
