"""The fused FP8 quantization kernels against the PyTorch quantization, bit for bit, on odd, ragged shapes."""

import pytest
import torch
from kernel_cases import qkv

from dit_sparse.fp8 import fp8_scale
from dit_sparse.kernels.config import has_fp8_tensor_cores
from dit_sparse.kernels.fp8_quant import FP8, channel_scales, quantize_inputs
from dit_sparse.kernels.fp8_quant_fused import launch_quantize


@pytest.fixture
def device(device):
    if device.type == "cuda" and not has_fp8_tensor_cores(device):
        pytest.skip("the fused FP8 quantization compiles for GPUs with FP8 (sm_89+) only")
    return device

CASES = [  # batch, seq, heads, head dim, block_q, block_k, pooled levels: ragged tiles, head dims not powers of 2
    (2, 63, 3, 32, 64, 64, 0),
    (1, 200, 2, 72, 64, 32, 0),
    (2, 317, 2, 64, 128, 64, 2),
    (1, 130, 1, 16, 64, 64, 1),
]


def _inputs(batch, seq, heads, dim, device, dtype, seed):
    q, k, v = qkv(batch, seq, heads, dim, device=device, seed=seed, k_offset=1.5)
    # Spread magnitudes over many binades (subnormal e4m3 values included) and make a zero channel in v.
    spread = torch.logspace(-3, 1, dim, device=device)
    v = v * spread
    v[..., 0] = 0
    return (q * 3).to(dtype), (k * spread.flip(0)).to(dtype), v.to(dtype)


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == FP8:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    assert torch.equal(a, b), f"{(a != b).sum().item()} of {a.numel()} elements differ"


@pytest.mark.parametrize("pv_fp8", [False, True])
@pytest.mark.parametrize("batch, seq, heads, dim, block_q, block_k, levels", CASES)
def test_fused_writes_the_bits_of_the_pytorch_quantization(batch, seq, heads, dim, block_q, block_k, levels, pv_fp8,
                                                            device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = _inputs(batch, seq, heads, dim, device, dtype, seed=seq)
    args = (q, k, v, block_q, block_k, levels, 0.125)
    ours = quantize_inputs(*args, pv_fp8=pv_fp8, fused=True)
    ref = quantize_inputs(*args, pv_fp8=pv_fp8, fused=False)
    for name in ("q8", "q_scale", "k8", "k_scale", "v", "v_scale"):
        _same_bits(getattr(ours, name), getattr(ref, name))
    assert ours.v.stride() == ref.v.stride()  # pv_fp8: (B, H, D, S_ext) memory, as the kernel reads it
    torch.testing.assert_close(ours.lse_shift, ref.lse_shift, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantized_v_rounds_like_pytorch_in_16_bits(dtype, device):
    q, k, v = _inputs(2, 200, 3, 48, device, dtype, seed=5)
    args = (q, k, v, 64, 64, 1, 0.2)
    ours, ref = quantize_inputs(*args, fused=True), quantize_inputs(*args, fused=False)
    assert ours.v.dtype == dtype
    _same_bits(ours.v, ref.v)
    _same_bits(ours.k8, ref.k8)


def test_strided_input_and_output(device):
    x = qkv(2, 150, 4, 32, device=device, seed=2)[0][:, :, ::2]  # every other head
    assert not x.is_contiguous()
    row_scale = torch.full((2, 2, 150), float("nan"), device=device)
    out = torch.empty(2, 2, 32, 150, device=device, dtype=FP8).permute(0, 3, 1, 2)
    launch_quantize(x, out, tile=64, row_scale=row_scale)
    ref = quantize_inputs(x, x, x, 64, 64, 0, 1.0, fused=False)
    _same_bits(out.contiguous(), ref.q8)
    _same_bits(row_scale, ref.q_scale)


def _e4m3_edge_values(device):
    """Every e4m3 value, the midpoints between neighbours (ties) and one fp32 ulp either side, +-0, fp32
    subnormals and values past 448."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid)].unique()
    mid = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1)])
    extra = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 2.0**-10, 447.9, 448.0, 460.0, 464.0, 1e6, -1e6])
    return torch.cat([grid, near, extra]).to(device)


def test_rounding_matches_pytorch_casts_on_edge_values(device):
    values = _e4m3_edge_values(device)
    n = values.numel()
    x = values.view(1, n, 1, 1)
    out = torch.empty(1, n, 1, 1, device=device, dtype=FP8)
    launch_quantize(x, out, tile=64, channel_scale=torch.ones(1, 1, 1, device=device))
    _same_bits(out.flatten(), values.clamp(-448, 448).to(FP8))


def test_nan_input_stays_nan(device):
    if device.type != "cuda":
        pytest.skip("needs CUDA: Triton's interpreter casts a NaN to a finite e4m3 value")
    q = qkv(1, 64, 1, 16, device=device)[0].clone()
    q[0, 5, 0, 3] = float("nan")
    out = torch.empty_like(q, dtype=FP8)
    launch_quantize(q, out, tile=64, channel_scale=torch.ones(1, 1, 16, device=device))
    assert torch.isnan(out[0, 5, 0, 3].float()) and torch.isfinite(out.float()).sum() == q.numel() - 1


def test_channel_scales_come_from_the_max_magnitude(device):
    v = qkv(2, 77, 3, 24, device=device, seed=4)[2].to(torch.bfloat16)
    assert torch.equal(channel_scales(v), fp8_scale(v.float().abs().amax(dim=1)))


def test_bad_arguments_are_refused(device):
    x = qkv(1, 64, 1, 16, device=device)[0]
    out = torch.empty(1, 64, 1, 16, device=device, dtype=FP8)
    scale = torch.ones(1, 1, 64, device=device)
    with pytest.raises(ValueError, match="exactly one"):
        launch_quantize(x, out, tile=64)
    with pytest.raises(ValueError, match="exactly one"):
        launch_quantize(x, out, tile=64, row_scale=scale, channel_scale=torch.ones(1, 1, 16, device=device))
    with pytest.raises(ValueError, match="per-channel"):
        launch_quantize(x, out.float(), tile=64, row_scale=scale)
    with pytest.raises(ValueError, match="contiguous along the sequence"):
        launch_quantize(x, out, tile=64, row_scale=torch.ones(1, 1, 128, device=device)[..., ::2])
