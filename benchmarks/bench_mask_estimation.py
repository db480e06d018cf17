"""Mask estimation's cost against dense attention, piece by piece, at a Wan 480p-sized sequence.

    python benchmarks/bench_mask_estimation.py [--heads 24] [--head-dim 128] [--seq 32] [--out FILE.json]

Times (medians; CUDA events through triton.testing.do_bench on a GPU) the block statistics of q and k with the
PyTorch twin and with the fused kernel (CUDA only), the whole `block_adaptive` and `pyramid` estimations (statistics,
ranking, guards and the layout), and dense SDPA on the same q, k, v, and prints each as a fraction of dense SDPA.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: the repository root, appended, makes `benchmarks` importable
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kernels import ESTIMATOR, GRIDS, environment, time_ms
from dit_sparse.strategies import BuildContext, get_strategy
from dit_sparse.strategies.block_stats import FUSED, block_stats, torch_block_stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=32, choices=sorted(GRIDS), help="thousands of tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    grid = GRIDS[args.seq]
    q, k, v = (torch.randn(1, grid.num_tokens, args.heads, args.head_dim, device=device, dtype=dtype)
               for _ in range(3))
    from dit_sparse.executors import get_executor

    block_q, block_k = get_executor(None, device).block_sizes(device, args.head_dim)
    block_stats(q, block_q)  # loads the fused kernel where there is one
    ctx = BuildContext(grid, block_q, block_k, q, k)
    adaptive = ESTIMATOR[1]
    pyramid = {name: p.default for name, p in get_strategy("pyramid").params.items()}
    timings = {"dense_sdpa": lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                    v.transpose(1, 2)),
               "stats_pytorch": lambda: (torch_block_stats(q, block_q), torch_block_stats(k, block_k))}
    if device.type in FUSED:
        fused = FUSED[device.type]
        timings["stats_fused"] = lambda: (fused(q, block_q), fused(k, block_k))
    timings["block_adaptive_layout"] = lambda: get_strategy("block_adaptive").layout(adaptive, ctx)
    timings["pyramid_layout"] = lambda: get_strategy("pyramid").layout(pyramid, ctx)
    ms = {name: time_ms(fn, device, 1.0) for name, fn in timings.items()}
    print(f"H={args.heads} D={args.head_dim} S={grid.num_tokens} {dtype} on {device}, blocks {block_q}x{block_k}")
    for name, value in ms.items():
        print(f"{name:<24} {value:9.3f} ms  {value / ms['dense_sdpa']:7.1%} of dense SDPA")
    if args.out:
        record = {"benchmark": "mask estimation vs dense SDPA", "environment": environment(device),
                  "shape": {"heads": args.heads, "head_dim": args.head_dim, "seq": grid.num_tokens,
                            "dtype": str(dtype).replace("torch.", ""), "block_q": block_q, "block_k": block_k},
                  "ms": ms}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
