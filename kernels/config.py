"""Block sizes and launch settings per GPU generation.

Two levels of blocking meet here. The *layout* blocks (block_q, block_k) are what strategies build masks on;
the *kernel tiles* (BLOCK_M, BLOCK_N) are what one Triton program multiplies at a time. A layout block must be
a whole number of kernel tiles (block_q % BLOCK_M == 0, block_k % BLOCK_N == 0) so that every tile of a query
block shares one look-up-table row and no key tile straddles two key blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import interpreting, triton

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


@dataclass(frozen=True)
class Tiles:
    """Kernel tile sizes and the autotune space over warps and pipeline stages."""

    block_m: int
    block_n: int
    warps_stages: tuple[tuple[int, int], ...]


def capability(device) -> tuple[int, int]:
    """(major, minor) compute capability; (0, 0) for a CPU device (the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def has_fp8_tensor_cores(device) -> bool:
    """FP8 e4m3 tensor-core MMA exists from Ada (sm_89) and Hopper (sm_90) on."""
    return capability(device) >= (8, 9)


def layout_block_sizes(device, head_dim: int) -> tuple[int, int]:
    """(block_q, block_k) the strategies should build layouts with for the Triton executor on ``device``."""
    major, _ = capability(device)
    if major >= 9:
        return (128, 128)
    if major >= 8:
        return (128, 64)
    # Older GPUs, and the interpreter (major 0), where numpy is most efficient on few, large tiles.
    return (64, 64)


def forward_tiles(device, head_dim: int) -> Tiles:
    """Forward tiles; the warps/stages pairs are autotuned on GPU (the first one is used in the interpreter)."""
    major, minor = capability(device)
    if major == 0:
        return Tiles(64, 64, ((4, 1),))
    if major >= 9:
        # Hopper: 128x128 at every head dim, as FlashAttention-3 does at 128. Two warpgroups hold the 128x128 fp32
        # scores and output; at head dim 128 three stages of k and v (64 KB each) plus q just fit shared memory.
        return Tiles(128, 128, ((8, 2), (8, 3), (4, 2)))
    if major == 8 and minor == 0:
        return Tiles(128, 64, ((4, 3), (8, 3), (4, 4), (8, 2)))
    if major == 8:
        # sm_86/sm_89 have ~100 KB of shared memory per SM: smaller query tiles at head dim 128.
        return Tiles(128 if head_dim <= 64 else 64, 64, ((4, 2), (4, 3), (8, 2)))
    return Tiles(64, 32, ((4, 2), (4, 1)))


def tensor_descriptors(device) -> bool:
    """Whether the forward reads full-resolution k and v through tensor descriptors (TMA): on Hopper only, the
    generation whose copies they were designed for and where Triton pipelines them."""
    return capability(device)[0] == 9


# Generations where the FP8 forward is measured slower than 16 bits, with the measurement; the executor runs plans'
# FP8 heads in 16 bits there (different numerics from the FP8 emulation plans are calibrated with).
FP8_SLOWER = {
    (9, 0): "on an H200 the FP8 kernel ran at 0.77-0.89x of bf16 (32,760 tokens, 24 heads, head dim 128; "
            "benchmarks/results/gpu-2026-12-04): only q.k runs in e4m3 and quantizing q, k, v adds a pass over each",
}


def fp8_pays(device) -> bool:
    """Whether the executor should run a plan's FP8 heads in FP8 on ``device`` (else in 16 bits)."""
    return capability(device) not in FP8_SLOWER


def fp8_note(device) -> str | None:
    """For a plan summary: why FP8 heads run in 16 bits on ``device``, or None where they run in FP8."""
    why = FP8_SLOWER.get(capability(device))
    if why is None:
        return None
    major, minor = capability(device)
    return (f"FP8 heads run in bf16/fp16 on sm_{major}{minor}, not in FP8 (plans are calibrated with FP8 numerics, "
            f"so the output differs slightly): {why}")


def backward_tiles(device, head_dim: int) -> Tiles:
    """Backward tiles (dk/dv and dq kernels share them)."""
    major, _ = capability(device)
    if major == 0:
        return Tiles(64, 64, ((4, 1),))
    if major >= 9:
        # 64-row operands on both kernels' dots keep them on wgmma (a 32-row key tile falls back to mma.sync).
        return Tiles(64, 64, ((8, 2), (4, 2), (8, 3)))
    if major >= 8:
        return Tiles(64, 64 if head_dim <= 64 else 32, ((4, 2), (8, 2), (4, 3)))
    return Tiles(32, 32, ((4, 1), (4, 2)))


def fit_tile(preferred: int, block: int, name: str) -> int:
    """The largest power of two <= ``preferred`` (and >= 16) that divides the layout ``block``."""
    tile = min(preferred, triton.next_power_of_2(block))
    while tile >= 16 and block % tile:
        tile //= 2
    if tile < 16:
        raise ValueError(
            f"layout {name}={block} is not a multiple of 16; the Triton kernels need layout blocks that are whole "
            f"numbers of 16-token tiles (use the executor's block_sizes())"
        )
    return tile


def check_head_dim(head_dim: int) -> None:
    if head_dim % 16 or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"the Triton block-sparse kernels support head dims that are multiples of 16 in "
            f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}"
        )


def autotune_configs(tiles: Tiles) -> list:
    """triton.Config list over (warps, stages); tile sizes are fixed by the layout, not tuned."""
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in tiles.warps_stages]


__all__ = [
    "Tiles", "capability", "has_fp8_tensor_cores", "layout_block_sizes", "forward_tiles", "backward_tiles",
    "tensor_descriptors", "fp8_pays", "fp8_note", "fit_tile", "check_head_dim", "autotune_configs", "interpreting",
]
