"""The kernels compiled on a CUDA GPU, in fp16/bf16, with flash-attention's rule: the kernel's error against an
fp32 reference may be at most twice that of PyTorch's own SDPA run in the same low precision."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import qkv, random_layout

from dit_sparse.executors import get_executor
from dit_sparse.executors.reference import extended_keys, reference_attention, token_mask
from dit_sparse.fp8 import sqnr_db
from dit_sparse.kernels import attention, config
from dit_sparse.kernels.attention import block_sparse_attention

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (kernels compile for sm_80+)"),
]
DTYPES = [torch.float16, torch.bfloat16]


def sdpa_in(dtype, q, k, v, layout):
    """PyTorch's SDPA in ``dtype`` over the same keys (pooled ones with their +ln(n)): the yardstick's error."""
    b, s, h, d = q.shape
    k_ext, v_ext, bias = extended_keys(k.float(), v.float(), layout.max_level)
    mask = torch.where(token_mask(layout, b, h), bias, float("-inf")).to(dtype)
    out = F.scaled_dot_product_attention(q.to(dtype).transpose(1, 2), k_ext.to(dtype).transpose(1, 2),
                                         v_ext.to(dtype).transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def budget(ours, theirs, ref):
    """2x PyTorch's error, plus a hair for cases where that error is exactly zero."""
    return (ours.float() - ref).abs().max().item(), 2 * (theirs.float() - ref).abs().max().item() + 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("levels", [False, True])
def test_forward_error_within_twice_sdpa(dtype, head_dim, levels):
    seq = 1000 + head_dim  # ragged against every block size
    block_q, block_k = config.layout_block_sizes("cuda", head_dim)
    q, k, v = qkv(2, seq, 3, head_dim, device="cuda", seed=head_dim)
    layout = random_layout(seq, block_q, block_k, batch=2, heads=3, density=0.4, levels=levels, device="cuda")
    ref_out, ref_lse = reference_attention(q, k, v, layout)
    out, lse = block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), layout)
    err, allowed = budget(out, sdpa_in(dtype, q, k, v, layout), ref_out)
    assert out.dtype == dtype and err <= allowed
    assert (lse - ref_lse).abs().max() <= 0.05


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_error_within_twice_sdpa(dtype):
    seq, d = 1100, 128
    block_q, block_k = config.layout_block_sizes("cuda", d)
    q, k, v = qkv(2, seq, 2, d, device="cuda", seed=3)
    layout = random_layout(seq, block_q, block_k, batch=2, heads=2, density=0.3, device="cuda")
    do = torch.randn_like(q)

    def grads(fn, dtype_):
        leaves = [x.detach().to(dtype_).requires_grad_() for x in (q, k, v)]  # fresh leaves, q/k/v untouched
        (fn(*leaves) * do.to(dtype_)).sum().backward()
        return [x.grad.float() for x in leaves]

    ref = grads(lambda *a: reference_attention(*a, layout)[0], torch.float32)
    ours = grads(lambda *a: block_sparse_attention(*a, layout)[0], dtype)
    theirs = grads(lambda *a: sdpa_in(dtype, *a, layout), dtype)
    for name, a, b, r in zip("qkv", ours, theirs, ref):
        err, allowed = budget(a, b, r)
        assert err <= allowed, f"d{name}: {err} > {allowed}"


def test_fp8_on_gpu():
    q, k, v = qkv(1, 2048, 4, 128, device="cuda", k_offset=1.0, seed=5)
    layout = random_layout(2048, *config.layout_block_sizes("cuda", 128), heads=4, density=0.5, device="cuda")
    ref_out, ref_lse = reference_attention(q, k, v, layout)
    out, lse = block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, fp8=True)
    assert sqnr_db(ref_out, out) >= 25.0
    assert (lse - ref_lse).abs().max() <= 0.2


@pytest.mark.skipif(not torch.cuda.is_available() or not config.has_fp8_tensor_cores("cuda"), reason="needs sm_89+")
# 1999: the last key tile reads v's padding rows; 16384: 128 key tiles accumulated in the FP8 MMA's adder.
@pytest.mark.parametrize("seq", [2048, 1999, 16384])
def test_fp8_pv_path_close_to_the_emulation(seq):
    from test_fp8_kernel import run_fp8

    q, k, v = qkv(1, seq, 4, 128, device="cuda", k_offset=1.0, seed=6)
    layout = random_layout(seq, *config.layout_block_sizes("cuda", 128), heads=4, density=0.5, device="cuda")
    ref_out, _ = reference_attention(q, k, v, layout)
    emu_out, _ = reference_attention(q, k, v, layout, fp8=True)
    scale = 1 / math.sqrt(128)
    out, _, _ = run_fp8(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, scale, pv_fp8=True)
    assert sqnr_db(ref_out, out) >= sqnr_db(ref_out, emu_out) - 3.0


@pytest.mark.skipif(not torch.cuda.is_available() or config.has_fp8_tensor_cores("cuda"), reason="needs < sm_89")
def test_fp8_fallback_warns(caplog, monkeypatch):
    monkeypatch.setattr(attention, "_warned_fp8_fallback", False)
    q, k, v = qkv(1, 256, 1, 64, device="cuda", dtype=torch.float16)
    with caplog.at_level(logging.WARNING):
        block_sparse_attention(q, k, v, random_layout(256, 64, 64, device="cuda"), fp8=True)
    assert "FP8 tensor cores" in caplog.text


def test_executor_is_default_and_compiles_fullgraph():
    executor = get_executor(None, "cuda")
    assert executor.name == "triton"
    q, k, v = qkv(1, 1000, 2, 64, device="cuda", dtype=torch.bfloat16)
    layout = random_layout(1000, *executor.block_sizes(torch.device("cuda"), 64), heads=2, device="cuda")
    from dit_sparse.kernels import segments

    idx, cnt = segments.level0_lut(layout)

    def attend(q, k, v):
        out, lse = torch.ops.dit_sparse.block_sparse_fwd(q, k, v, idx, cnt, None, None, None, None, None, None,
                                                         layout.block_q, layout.block_k, 0.125)
        return out * 2, lse

    out, _ = torch.compile(attend, fullgraph=True)(q, k, v)
    ref, _ = executor.run(q, k, v, layout)
    assert (out - 2 * ref).abs().max() == 0
