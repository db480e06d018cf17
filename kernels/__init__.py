"""Triton kernels for block-sparse attention over a ``BlockLayout`` (installed as ``dit_sparse.kernels``).

    from dit_sparse.kernels import block_sparse_attention
    out, lse = block_sparse_attention(q, k, v, layout)          # (B, S, H, D) -> (B, S, H, D), (B, H, S)

Importing this package registers the ``triton`` executor (available on CUDA devices) and the custom ops
``torch.ops.dit_sparse.block_sparse_fwd``, ``block_sparse_fwd_fp8`` and ``block_sparse_bwd``. It imports on
machines without CUDA; without Triton it raises an ImportError that says what to install.

Modules: ``fwd_kernel``/``bwd_kernel`` (Triton), ``launch`` (launchers), ``ops`` (custom ops),
``attention`` (autograd and the public function), ``segments`` (look-up tables), ``pool`` and ``fp8_quant``
(host-side pooled levels and FP8 quantization), ``config`` (tiles per GPU), ``naive`` (PyTorch twins),
``block_stats`` (fused statistics for mask estimation), ``executor`` (registration).
"""

from __future__ import annotations

# With the repository root on sys.path (``python -m pytest`` or a script run from the root), this folder is
# also importable as a top-level ``kernels`` -- the name of Hugging Face's kernels library, which transformers
# probes by importing it. Under that name stay an empty module: registering the executor and the custom ops
# a second time, or raising, would break the caller. The package proper is ``dit_sparse.kernels``.
if __name__ == "dit_sparse.kernels":
    from . import _triton  # noqa: F401  (fails early, with an install hint, when Triton is missing)
    from . import block_stats  # noqa: F401  (registers the fused mask-estimation statistics for CUDA)
    from .attention import BlockSparseAttention, block_sparse_attention
    from .config import has_fp8_tensor_cores, layout_block_sizes
    from .executor import TRITON_EXECUTOR, triton_attention

    __all__ = [
        "BlockSparseAttention", "block_sparse_attention", "has_fp8_tensor_cores", "layout_block_sizes",
        "TRITON_EXECUTOR", "triton_attention",
    ]
