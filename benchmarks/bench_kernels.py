"""Kernel benchmark script; the implementation lives in ``dit_sparse.kernels.bench`` so the CLI can reuse it.

    python benchmarks/bench_kernels.py [--quick] [--out benchmarks/results] [--device cpu]

CUDA: Triton block-sparse kernel vs SDPA (flash, cuDNN), flash-attn and xformers; CPU: the ``cpu`` executor
vs dense SDPA at S=16384, H=4, D=64, fp32. Writes kernels-<device>.json and .csv and prints a table.
"""

from dit_sparse.kernels.bench import main, run, table  # noqa: F401  (re-exported for callers of this module)

if __name__ == "__main__":
    raise SystemExit(main())
