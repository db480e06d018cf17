"""Kernel benchmark: block-sparse attention against dense attention, written as a table, JSON and CSV.

On CUDA: the Triton kernel (bf16) for B=1, H in {12, 24}, head dim {64, 128}, S in {8K, 32K, 75K} and density
{5, 10, 25, 50, 100}%, against dense SDPA (flash and cuDNN backends), flash-attn and xformers when installed;
TFLOP/s dense-equivalent and executed, linearity = (t_dense / t_sparse) x density with t_dense our own 100%
run, the FP8 speedup over bf16, the backward, and the mask estimation (``block_adaptive``) relative to dense
attention. On CPU (no CUDA): the ``cpu`` executor against dense SDPA at S=16384, H=4, D=64, fp32.

    python benchmarks/bench_kernels.py [--quick] [--out benchmarks/results] [--device cpu]
    dit-sparse bench kernels [--quick]          (from a source checkout installed with `pip install -e .`)
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from dit_sparse.layout import BlockLayout, Grid, num_blocks, own_block_mask
from dit_sparse.strategies import BuildContext, get_strategy
from dit_sparse.strategies.dense import full_layout

logger = logging.getLogger(__name__)

# Video grids of the benchmark's sequence lengths (frame-major tokens; 32K and 75K are Wan 480p and 720p).
GRIDS = {8: Grid(5, 30, 52), 32: Grid(21, 30, 52), 75: Grid(21, 45, 80), 16: Grid(16, 32, 32)}
ESTIMATOR = ("block_adaptive", {"tau": 0.9, "cap": 0.17, "topk": None, "min_similarity": 0.3})


def random_layout(seq: int, block_q: int, block_k: int, heads: int, density: float, device) -> BlockLayout:
    """Per head, each query block keeps round(density * NK) random key blocks, its own blocks included."""
    nq, nk = num_blocks(seq, block_q), num_blocks(seq, block_k)
    if density >= 1.0:
        return full_layout(seq, block_q, block_k, device)
    keep = max(1, round(density * nk))
    g = torch.Generator(device="cpu").manual_seed(0)
    scores = torch.rand(1, heads, nq, nk, generator=g)
    scores = scores + own_block_mask(seq, block_q, block_k).float() * 2  # own blocks rank first
    chosen = scores.topk(keep, dim=-1).indices
    mask = torch.zeros(1, heads, nq, nk, dtype=torch.bool).scatter_(-1, chosen, True)
    layout = BlockLayout.from_block_mask(mask, seq, block_q, block_k)
    return BlockLayout(seq, block_q, block_k, layout.kv_index.to(device), layout.kv_count.to(device))


def time_ms(fn: Callable, device: torch.device, budget_s: float = 1.0) -> float:
    """Median wall time of ``fn`` in ms after one warm-up (which also triggers compilation and autotuning)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=max(50, int(budget_s * 1000)), return_mode="median"))
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 2 or (time.perf_counter() - start < budget_s and len(times) < 10):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def environment(device: torch.device) -> dict:
    """Hardware and versions, stated beside every result."""
    info = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
    }
    for name in ("triton", "diffusers", "flash_attn", "xformers"):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception:  # optional packages: record absence, never fail the benchmark
            info[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), driver=_driver_version())
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def dense_baselines(q, k, v) -> dict[str, Callable]:
    """Dense attention implementations available here, each taking (B, S, H, D) tensors."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    baselines = {}
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def call(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qt, kt, vt)
            baselines[name] = call
        for module, name in (("flash_attn_interface", "flash_attn3"), ("flash_attn", "flash_attn2")):
            try:
                fn = importlib.import_module(module).flash_attn_func
                baselines[name] = lambda fn=fn: fn(q, k, v)
            except Exception:  # not installed or not built for this GPU
                pass
        try:
            from xformers.ops import memory_efficient_attention

            baselines["xformers"] = lambda: memory_efficient_attention(q, k, v)
        except Exception:  # not installed
            pass
    else:
        baselines["sdpa"] = lambda: F.scaled_dot_product_attention(qt, kt, vt)
    return baselines


def runnable(name: str, fn: Callable) -> bool:
    try:
        fn()
        return True
    except Exception as exc:  # a backend that does not support this shape or GPU is skipped, not fatal
        logger.info("baseline %s unavailable: %s", name, exc)
        return False


def bench_shape(device, heads: int, head_dim: int, grid: Grid, densities, dtype, *, backward: bool, fp8: bool,
                budget_s: float) -> list[dict]:
    """All measurements for one (H, D, S): baselines, then our executor per density."""
    from dit_sparse.executors import get_executor

    seq = grid.num_tokens
    executor = get_executor("triton" if device.type == "cuda" else "cpu", device)
    block_q, block_k = executor.block_sizes(device, head_dim)
    q, k, v = (torch.randn(1, seq, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    dense_flops = 4.0 * heads * seq * seq * head_dim
    shape = {"batch": 1, "heads": heads, "head_dim": head_dim, "seq": seq, "dtype": str(dtype).replace("torch.", "")}
    records = []

    def record(impl, density, ms, executed=None, **extra):
        executed = density if executed is None else executed
        records.append({**shape, "impl": impl, "density": density, "ms": round(ms, 4),
                        "tflops_dense_equiv": round(dense_flops / ms / 1e9, 2),
                        "tflops_executed": round(dense_flops * executed / ms / 1e9, 2), **extra})

    baseline_ms = {}
    for name, fn in dense_baselines(q, k, v).items():
        if runnable(name, fn):
            baseline_ms[name] = time_ms(fn, device, budget_s)
            record(name, 1.0, baseline_ms[name])
    # The dense yardstick of the speedup column: SDPA's flash backend on CUDA, SDPA on CPU.
    yardstick = baseline_ms.get("sdpa_flash", baseline_ms.get("sdpa"))

    strategy_name, params = ESTIMATOR
    ctx = BuildContext(grid, block_q, block_k, q, k)
    estimate_ms = time_ms(lambda: get_strategy(strategy_name).layout(params, ctx), device, budget_s)

    t_dense = None
    for density in sorted(densities, reverse=True):
        layout = random_layout(seq, block_q, block_k, heads, density, device)
        actual = layout.density()
        ms = time_ms(lambda layout=layout: executor.run(q, k, v, layout), device, budget_s)
        t_dense = ms if density >= 1.0 else t_dense
        extra = {"linearity": round(t_dense / ms * actual, 3) if t_dense else None,
                 "speedup_vs_dense_sdpa": round(yardstick / ms, 3) if yardstick else None}
        if density >= 1.0:
            extra["mask_estimation_ms"] = round(estimate_ms, 4)
            extra["mask_estimation_fraction"] = round(estimate_ms / ms, 4)
        if device.type == "cuda" and fp8:
            extra.update(_fp8_times(q, k, v, layout, ms, budget_s))
        if backward and device.type == "cuda":
            extra.update(_backward_time(q, k, v, layout, dense_flops * actual, budget_s))
        record(executor.name, actual, ms, **extra)
    return records


def _fp8_times(q, k, v, layout, bf16_ms, budget_s) -> dict:
    """FP8 forward: end to end (quantization included), the quantization alone (fused kernels and the PyTorch
    twin), and the kernel only, default and FP8 P.V variants."""
    from dit_sparse.kernels import segments
    from dit_sparse.kernels.attention import block_sparse_attention
    from dit_sparse.kernels.config import has_fp8_tensor_cores
    from dit_sparse.kernels.fp8_quant import quantize_inputs

    device = q.device
    scale = 1.0 / math.sqrt(q.shape[-1])
    total = time_ms(lambda: block_sparse_attention(q, k, v, layout, fp8=True), device, budget_s)
    out = {"fp8_total_ms": round(total, 4)}
    if not has_fp8_tensor_cores(device):
        return out
    for label, fused in (("fp8_quant_ms", True), ("fp8_quant_torch_ms", False)):
        quant = time_ms(lambda fused=fused: quantize_inputs(q, k, v, layout.block_q, layout.block_k, 0, scale,
                                                            fused=fused), device, budget_s)
        out[label] = round(quant, 4)
    idx, cnt = segments.level0_lut(layout)
    for label, pv_fp8 in (("fp8", False), ("fp8_pv8", True)):
        f = quantize_inputs(q, k, v, layout.block_q, layout.block_k, 0, scale, pv_fp8=pv_fp8)
        ms = time_ms(lambda f=f: torch.ops.dit_sparse.block_sparse_fwd_fp8(
            f.q8, f.q_scale, f.k8, f.k_scale, f.v, f.v_scale, f.lse_shift, idx, cnt, None, None, None, None,
            layout.block_q, layout.block_k, scale, q.dtype), device, budget_s)
        out[f"{label}_kernel_ms"] = round(ms, 4)
        out[f"{label}_speedup"] = round(bf16_ms / ms, 3)
    return out


def _backward_time(q, k, v, layout, executed_fwd_flops, budget_s) -> dict:
    """Backward alone (forward done once outside the timing); 2.5x the forward's FLOPs."""
    from dit_sparse.kernels.attention import block_sparse_attention

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, _ = block_sparse_attention(*leaves, layout)
    do = torch.randn_like(out)
    ms = time_ms(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True), q.device, budget_s)
    return {"bwd_ms": round(ms, 4), "bwd_tflops_executed": round(2.5 * executed_fwd_flops / ms / 1e9, 2)}


def run(device=None, *, quick: bool = False, out_dir: str | os.PathLike | None = "benchmarks/results",
        heads=None, head_dims=None, seqs_k=None, densities=None, backward: bool = True, fp8: bool = True,
        budget_s: float | None = None) -> list[dict]:
    """Run the benchmark; returns the records and, with ``out_dir``, writes JSON and CSV there.

    Defaults follow the device: the full CUDA sweep, or the CPU comparison. ``seqs_k`` picks from GRIDS
    (thousands of tokens).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        from dit_sparse.kernels import executor  # noqa: F401  (registers "triton")

        heads = heads or ([24] if quick else [12, 24])
        head_dims = head_dims or ([128] if quick else [64, 128])
        seqs_k = seqs_k or ([32] if quick else [8, 32, 75])
        densities = densities or [0.05, 0.10, 0.25, 0.50, 1.0]
        dtype, budget_s = torch.bfloat16, budget_s or 0.5
    else:
        heads, head_dims, seqs_k = heads or [4], head_dims or [64], seqs_k or [16]
        densities = densities or ([0.125, 1.0] if quick else [0.0625, 0.125, 0.25, 0.5, 1.0])
        dtype, budget_s, backward, fp8 = torch.float32, budget_s or 2.0, False, False
    records = []
    for s in seqs_k:
        for h in heads:
            for d in head_dims:
                logger.info("benchmarking H=%d D=%d S=%d", h, d, GRIDS[s].num_tokens)
                records += bench_shape(device, h, d, GRIDS[s], densities, dtype, backward=backward, fp8=fp8,
                                       budget_s=budget_s)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    env = environment(device)
    if out_dir is not None:
        write(records, env, Path(out_dir))
        plot(records, env, Path(out_dir))
    return records


def write(records: list[dict], env: dict, out_dir: Path) -> tuple[Path, Path]:
    """kernels-<device>.json (environment + records) and .csv (records) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = (env.get("gpu") or "cpu").lower().replace(" ", "-")
    json_path, csv_path = out_dir / f"kernels-{tag}.json", out_dir / f"kernels-{tag}.csv"
    json_path.write_text(json.dumps({"benchmark": "bench kernels", "environment": env, "records": records}, indent=1))
    # The table's columns first, in its order, then the rest alphabetically.
    order = {c: i for i, c in enumerate(_TABLE)}
    columns = sorted({key for rec in records for key in rec}, key=lambda c: (order.get(c, len(order)), c))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    return json_path, csv_path


def plot(records: list[dict], env: dict, out_dir: Path) -> Path | None:
    """kernels-<device>.png: speedup over dense SDPA against density, one line per shape (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not installed; no plot")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    shapes = sorted({(r["heads"], r["head_dim"], r["seq"]) for r in records})
    for h, d, s in shapes:
        points = sorted((r["density"], r["speedup_vs_dense_sdpa"]) for r in records
                        if (r["heads"], r["head_dim"], r["seq"]) == (h, d, s) and r.get("speedup_vs_dense_sdpa"))
        if points:
            ax.plot(*zip(*points), marker="o", label=f"H={h} D={d} S={s}")
    grid = [x / 100 for x in range(3, 101)]
    ax.plot(grid, [1 / x for x in grid], color="grey", linestyle=":", label="linear (1 / density)")
    ax.set(xscale="log", yscale="log", xlabel="density", ylabel="speedup over dense SDPA",
           title=f"block-sparse attention on {env.get('gpu') or env.get('cpu')}")
    ax.legend(fontsize=7)
    tag = (env.get("gpu") or "cpu").lower().replace(" ", "-")
    path = out_dir / f"kernels-{tag}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


_TABLE = ["heads", "head_dim", "seq", "impl", "density", "ms", "tflops_dense_equiv", "tflops_executed", "linearity",
          "speedup_vs_dense_sdpa"]


def table(records: list[dict], env: dict | None = None) -> str:
    """Human-readable table of the records (and optional columns when present)."""
    extra = [c for c in ("mask_estimation_fraction", "fp8_quant_ms", "fp8_speedup", "fp8_pv8_speedup", "bwd_ms",
                         "bwd_tflops_executed") if any(c in r for r in records)]
    cols = _TABLE + extra
    rows = [[_fmt(r.get(c)) for c in cols] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = []
    if env:
        lines.append(", ".join(f"{k}={env[k]}" for k in ("gpu", "cpu", "cpu_threads", "torch", "triton", "cuda",
                                                         "driver") if env.get(k) is not None))
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and CSV results")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (CUDA: H=24, D=128, S=32K)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--heads", type=int, nargs="*")
    parser.add_argument("--head-dims", type=int, nargs="*")
    parser.add_argument("--seqs", type=int, nargs="*", choices=sorted(GRIDS), help="thousands of tokens")
    parser.add_argument("--densities", type=float, nargs="*")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--no-fp8", action="store_true")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is an existing file; --out takes a folder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.no_grad() if args.no_backward else nullcontext():
        records = run(device, quick=args.quick, out_dir=args.out, heads=args.heads, head_dims=args.head_dims,
                      seqs_k=args.seqs, densities=args.densities, backward=not args.no_backward,
                      fp8=not args.no_fp8)
    print(table(records, environment(device)))  # the CLI's output, not library logging
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
