"""Forward kernel tiles, one at a time: where the dense path and FP8 lose to SDPA and to bf16 (issue: kernels).

    python benchmarks/bench_tiles.py [--heads 24] [--head-dim 128] [--seq 32] [--densities 1.0 0.1]
                                     [--tiles 128x64 128x128 64x64] [--out FILE.json]

For each kernel tile (BLOCK_M x BLOCK_N; warps and stages autotuned per tile, the winner recorded), each density
and each variant (16-bit; FP8 q.k with 16-bit P.V; FP8 on both dots, on GPUs with FP8 tensor cores), times the
forward kernel alone (inputs quantized once, beforehand) beside the dense baselines of the same run (the kernel
benchmark's: SDPA flash and cuDNN, flash-attn and xformers where installed). The layout blocks stay the
executor's (128 x 128 on sm_90), so tiles must divide them. On CPU (Triton's interpreter) it runs a tiny fp32
shape, only to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: the repository root, appended, makes `benchmarks` importable
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kernels import GRIDS, dense_baselines, environment, random_layout, runnable, time_ms
from dit_sparse.kernels import segments
from dit_sparse.kernels.config import has_fp8_tensor_cores, layout_block_sizes
from dit_sparse.kernels.fp8_quant import quantize_inputs
from dit_sparse.kernels.fwd_kernel import block_sparse_fwd_kernel
from dit_sparse.kernels.launch import Fp8Scales, launch_forward


def parse_tile(text: str) -> tuple[int, int]:
    try:
        m, n = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a tile is BLOCK_MxBLOCK_N, e.g. 128x64; got {text!r}") from None
    return m, n


def variants(q, k, v, block_q: int, block_k: int, scale: float, fp8: bool) -> dict:
    """name -> (q, k, v, Fp8Scales or None) as the forward launcher takes them."""
    out = {str(q.dtype).replace("torch.", ""): (q, k, v, None)}
    if fp8:
        for name, pv_fp8 in (("fp8", False), ("fp8_pv8", True)):
            f = quantize_inputs(q, k, v, block_q, block_k, 0, scale, pv_fp8=pv_fp8)
            out[name] = (f.q8, f.k8, f.v, Fp8Scales(f.q_scale, f.k_scale, f.v_scale))
    return out


def best_config() -> str | None:
    """The autotuner's choice for the last launch (warps, stages), where it recorded one."""
    kernel = block_sparse_fwd_kernel.build()
    config = getattr(kernel, "best_config", None)
    return None if config is None else f"warps={config.num_warps} stages={config.num_stages}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=32, choices=sorted(GRIDS), help="thousands of tokens")
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--tiles", type=parse_tile, nargs="+", default=[(128, 64), (128, 128), (64, 64)])
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="also write the records as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    heads, dim, seq = args.heads, args.head_dim, GRIDS[args.seq].num_tokens
    if not cuda:  # the interpreter: a tiny shape that only checks the script runs
        heads, dim, seq = 2, 32, 200
    block_q, block_k = layout_block_sizes(device, dim)
    scale = 1.0 / math.sqrt(dim)
    q, k, v = (torch.randn(1, seq, heads, dim, device=device, dtype=dtype) for _ in range(3))
    fp8 = has_fp8_tensor_cores(device)

    baselines = {name: fn for name, fn in dense_baselines(q, k, v).items() if runnable(name, fn)}
    reference_ms = {name: time_ms(fn, device, args.budget) for name, fn in baselines.items()}
    dense_ms = next(iter(reference_ms.values()))

    inputs = variants(q, k, v, block_q, block_k, scale, fp8)
    out, lse = torch.empty_like(q), torch.empty(1, heads, seq, device=device, dtype=torch.float32)
    records = []
    print(f"H={heads} D={dim} S={seq} {dtype} on {device}, layout blocks {block_q}x{block_k}; "
          + ", ".join(f"{name} {ms:.3f} ms" for name, ms in reference_ms.items()))
    print(f"{'tile':>8} {'density':>8} {'variant':>9} {'ms':>9} {'x dense':>8} {'x 16-bit':>8}  config")
    for density in args.densities:
        layout = random_layout(seq, block_q, block_k, heads, density, device)
        idx, cnt = segments.level0_lut(layout)
        actual = layout.density()
        for block_m, block_n in args.tiles:
            if block_q % block_m or block_k % block_n:
                print(f"{block_m}x{block_n}: does not divide the layout blocks {block_q}x{block_k}; skipped")
                continue
            base_ms = None  # the 16-bit variant's, first in the dict
            for name, (vq, vk, vv, scales) in inputs.items():
                def run(vq=vq, vk=vk, vv=vv, scales=scales, idx=idx, cnt=cnt, block_m=block_m, block_n=block_n):
                    launch_forward(vq, vk, vv, idx, cnt, out, lse, block_q=block_q, block_k=block_k,
                                   scale=scale, fp8=scales, block_m=block_m, block_n=block_n)
                ms = time_ms(run, device, args.budget)
                base_ms = base_ms or ms
                record = {"tile": f"{block_m}x{block_n}", "density": round(actual, 4), "variant": name,
                          "ms": round(ms, 4), "speedup_vs_dense": round(dense_ms / ms, 3),
                          "speedup_vs_16bit": round(base_ms / ms, 3), "config": best_config()}
                records.append(record)
                print(f"{record['tile']:>8} {actual:8.1%} {name:>9} {ms:9.3f} {record['speedup_vs_dense']:7.2f}x "
                      f"{record['speedup_vs_16bit']:7.2f}x  {record['config'] or '-'}")
    if args.out:
        result = {"benchmark": "forward kernel tiles", "environment": environment(device),
                  "shape": {"heads": heads, "head_dim": dim, "seq": seq, "dtype": str(dtype).replace("torch.", ""),
                            "block_q": block_q, "block_k": block_k},
                  "dense_ms": reference_ms, "records": records}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
