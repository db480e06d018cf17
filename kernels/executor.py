"""The ``triton`` executor: block-sparse attention on the Triton kernels, chosen by default on CUDA."""

from __future__ import annotations

import torch

from dit_sparse.executors import Executor, register_executor

from .attention import block_sparse_attention
from .config import layout_block_sizes


def _available(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def triton_attention(q, k, v, layout, *, scale: float | None = None, fp8: bool = False):
    """q, k, v: (B, S, H, D). Returns out (B, S, H, D) in q's dtype and lse (B, H, S) fp32."""
    return block_sparse_attention(q, k, v, layout, scale=scale, fp8=fp8)


TRITON_EXECUTOR = register_executor(
    Executor(
        name="triton",
        run=triton_attention,
        block_sizes=layout_block_sizes,
        available=_available,
        priority=10,
    )
)
