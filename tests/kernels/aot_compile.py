"""Compile the kernels ahead of time for GPU targets without a GPU; run as a script by test_gpu_compile.py.

By hand, ``env -u TRITON_INTERPRET python tests/kernels/aot_compile.py --dump DIR sm90-d128-fp8`` also writes
each kernel's Triton GPU IR and PTX to DIR, for reading what the compiler made of a loop without a GPU.

It must run in a process where TRITON_INTERPRET was never set: Triton decorates its own library functions at
import time, as interpreted functions when the variable is on, and those cannot be compiled. Prints one JSON
object {case: "ok" | error}. Arguments are recorded from the real launchers (no kernel runs) and specialised
the way Triton's runtime does.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from kernel_cases import qkv, random_layout
from triton import compile as triton_compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from dit_sparse.kernels import block_stats, bwd_kernel, config, fp8_quant_fused, fwd_kernel, launch, segments
from dit_sparse.kernels.fp8_quant import quantize_inputs

# record() replaces these modules' kernels with Recorders.
BLOCK_STATS_KERNEL = block_stats.block_stats_kernel
QUANTIZE_KERNEL = fp8_quant_fused.quantize_kernel

# Usable shared memory per block (bytes) by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv",
         torch.int32: "i32", torch.int8: "i8", torch.int64: "i64"}


class Recorder:
    """Stands in for a LazyKernel: records the launch arguments instead of running."""

    def __init__(self, lazy):
        # The compiled mode's function (its helpers compiled too), never the interpreter's wrapper, whatever
        # TRITON_INTERPRET says.
        self.fn = JITFunction(lazy.function(False))
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def specialise(fn: JITFunction, args, kwargs):
    """(signature, constexprs, attrs) for ASTSource, mimicking the runtime's specialisation."""
    signature, constexprs, attrs = {}, dict(kwargs), {}
    for i, (name, value) in enumerate(zip(fn.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in kwargs:
        signature[name] = "constexpr"
    return signature, constexprs, attrs


def record(cap, head_dim, dtype, *, levels=False, fp8=False, pv_fp8=False, backward=False, stats=False,
           quantize=False, tile=(0, 0), descriptors=None):
    """Record the launches of one forward (or backward, mask statistics, FP8 quantization) as issued on sm_<cap>."""
    config.capability = lambda device: divmod(cap, 10)
    recorders = {name: Recorder(getattr(mod, name)) for mod, name in (
        (fwd_kernel, "block_sparse_fwd_kernel"), (bwd_kernel, "block_sparse_bwd_dkdv_kernel"),
        (bwd_kernel, "block_sparse_bwd_dq_kernel"))}
    recorders["block_stats_kernel"] = Recorder(BLOCK_STATS_KERNEL)
    recorders["quantize_kernel"] = Recorder(QUANTIZE_KERNEL)
    owners = {"block_stats_kernel": block_stats, "quantize_kernel": fp8_quant_fused}
    for name, rec in recorders.items():
        setattr(owners.get(name, launch), name, rec)
    block_q, block_k = config.layout_block_sizes(None, head_dim)
    seq = 4 * block_q + 37
    q, k, v = qkv(1, seq, 2, head_dim, dtype=dtype)
    layout = random_layout(seq, block_q, block_k, heads=2, levels=levels)
    idx, cnt = segments.level0_lut(layout)
    lse = torch.zeros(1, 2, seq)
    if stats:
        block_stats.fused_block_stats(q, block_q)
    elif quantize:  # every variant: q with its LSE shift, centred k, v in fp8 or dequantized, pooled levels
        for pv in (False, True):
            fp8_quant_fused.fused_quantize_inputs(q, k, v, block_q, block_k, 2 if levels else 0, 0.1, pv_fp8=pv)
    elif backward:
        tidx, tcnt = segments.transposed_lut(layout)
        launch.launch_backward(q, q, k, v, lse, lse, idx, cnt, tidx, tcnt, q, q, q, block_q=block_q,
                               block_k=block_k, scale=0.1)
    elif fp8:
        f = quantize_inputs(q, k, v, block_q, block_k, 0, 0.1, pv_fp8=pv_fp8)
        launch.launch_forward(f.q8, f.k8, f.v, idx, cnt, q.clone(), lse, block_q=block_q, block_k=block_k,
                              scale=0.1, fp8=launch.Fp8Scales(f.q_scale, f.k_scale, f.v_scale),
                              block_m=tile[0], block_n=tile[1], descriptors=descriptors)
    else:
        pooled = None
        if levels:
            seg = segments.pooled_segments(layout)
            pooled = launch.Pooled(k, v, lse.flatten(), seg.start, seg.length, seg.count)
        launch.launch_forward(q, k, v, idx, cnt, q.clone(), lse, block_q=block_q, block_k=block_k, scale=0.1,
                              pooled=pooled, block_m=tile[0], block_n=tile[1], descriptors=descriptors)
    tiles = (config.backward_tiles if backward else config.forward_tiles)(None, head_dim)
    return [(rec.fn, call) for rec in recorders.values() for call in rec.calls], tiles


def compile_all(launches, tiles, cap, dump: Path | None = None, case: str = ""):
    """Compile every recorded launch; with ``dump``, write each kernel's Triton GPU IR and PTX there."""
    warps, stages = tiles.warps_stages[0]
    for i, (fn, (args, kwargs)) in enumerate(launches):
        kwargs = dict(kwargs)
        launch_warps = kwargs.pop("num_warps", warps)  # launchers that pick warps themselves pass them here
        signature, constexprs, attrs = specialise(fn, args, kwargs)
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton_compile(src, target=GPUTarget("cuda", cap, 32),
                                  options={"num_warps": launch_warps, "num_stages": stages})
        assert "cubin" in compiled.asm
        assert compiled.metadata.shared <= SHARED_LIMIT[cap], f"{fn.__name__}: {compiled.metadata.shared} bytes"
        if dump is not None:
            for kind in ("ttgir", "ptx"):
                (dump / f"{case}.{i}{fn.__name__}.{kind}").write_text(compiled.asm[kind])


CASES = {
    "sm90-d128-bf16": (90, 128, torch.bfloat16, {}),
    "sm90-d64-fp16-pooled": (90, 64, torch.float16, {"levels": True}),
    "sm90-d128-fp8": (90, 128, torch.bfloat16, {"fp8": True}),
    "sm90-d128-fp8-pv8": (90, 128, torch.bfloat16, {"fp8": True, "pv_fp8": True}),
    "sm89-d128-fp8-pv8": (89, 128, torch.float16, {"fp8": True, "pv_fp8": True}),
    "sm86-d128-bf16": (86, 128, torch.bfloat16, {}),
    "sm80-d128-bf16-pooled": (80, 128, torch.bfloat16, {"levels": True}),
    "sm90-d128-bf16-backward": (90, 128, torch.bfloat16, {"backward": True}),
    "sm80-d64-fp16-backward": (80, 64, torch.float16, {"backward": True}),
    "sm90-d128-bf16-block-stats": (90, 128, torch.bfloat16, {"stats": True}),
    "sm80-d64-fp16-block-stats": (80, 64, torch.float16, {"stats": True}),
    "sm90-d128-bf16-fp8-quantize": (90, 128, torch.bfloat16, {"quantize": True, "levels": True}),
    # sm_90 reads k and v through tensor descriptors by default; the pointer loads remain for misaligned inputs.
    "sm90-d128-bf16-pointers": (90, 128, torch.bfloat16, {"descriptors": False}),
    "sm90-d128-fp8-pointers": (90, 128, torch.bfloat16, {"fp8": True, "descriptors": False}),
    # The other tiles benchmarks/bench_tiles.py times on GPUs (the default is 128x128 on sm_90).
    "sm90-d128-bf16-tile128x64": (90, 128, torch.bfloat16, {"tile": (128, 64)}),
    "sm90-d128-fp8-pv8-tile128x64": (90, 128, torch.bfloat16, {"fp8": True, "pv_fp8": True, "tile": (128, 64)}),
    "sm90-d128-bf16-tile64x64": (90, 128, torch.bfloat16, {"tile": (64, 64)}),
    "sm90-d128-fp8-tile64x64": (90, 128, torch.bfloat16, {"fp8": True, "tile": (64, 64)}),
    "sm89-d64-fp16-fp8-quantize": (89, 64, torch.float16, {"quantize": True}),
}


def main(names, dump: Path | None = None):
    results = {}
    real_capability = config.capability
    for name in names:
        cap, head_dim, dtype, kind = CASES[name]
        try:
            launches, tiles = record(cap, head_dim, dtype, **kind)
            assert launches, "nothing was launched"
            compile_all(launches, tiles, cap, dump, name)
            results[name] = "ok"
        except Exception:  # report every case, not just the first failure
            results[name] = traceback.format_exc(limit=3)
        finally:
            config.capability = real_capability
    print(json.dumps(results))


if __name__ == "__main__":
    # python aot_compile.py [--dump DIR] [CASE ...]: DIR receives the IR and PTX, e.g. to see how the loops pipeline.
    argv, dump_dir = sys.argv[1:], None
    if argv[:1] == ["--dump"]:
        dump_dir, argv = Path(argv[1]), argv[2:]
        dump_dir.mkdir(parents=True, exist_ok=True)
    main(argv or list(CASES), dump_dir)
