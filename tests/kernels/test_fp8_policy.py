"""Where plans' FP8 heads run in FP8: a per-generation table (kernels/config.py), visible in the plan summary."""

import dataclasses

import pytest
import torch
from kernel_cases import qkv, random_layout
from tiny_models import tiny_wan

import dit_sparse
from dit_sparse import SparsePlan
from dit_sparse.executors import EXECUTORS, get_executor, register_executor
from dit_sparse.kernels import config
from dit_sparse.kernels.attention import block_sparse_attention
from dit_sparse.kernels.executor import TRITON_EXECUTOR, triton_attention


def on_capability(monkeypatch, cap):
    monkeypatch.setattr(config, "capability", lambda device: cap)


@pytest.mark.parametrize("cap, pays", [((9, 0), False), ((8, 9), True), ((8, 0), True), ((0, 0), True)])
def test_fp8_pays_only_where_not_measured_slower(cap, pays, monkeypatch):
    on_capability(monkeypatch, cap)
    assert config.fp8_pays("cpu") is pays
    note = config.fp8_note("cpu")
    if pays:
        assert note is None
    else:
        assert "sm_90" in note and "0.77-0.89x" in note and "calibrated" in note


def test_triton_executor_runs_fp8_heads_in_16_bits_on_hopper(monkeypatch, device):
    q, k, v = qkv(1, 200, 2, 32, device=device, k_offset=1.0, seed=1)
    layout = random_layout(200, 64, 64, heads=2, seed=1, device=device)
    fp8_out, _ = block_sparse_attention(q, k, v, layout, fp8=True)
    sixteen_out, sixteen_lse = block_sparse_attention(q, k, v, layout)
    on_capability(monkeypatch, (9, 0))
    out, lse = triton_attention(q, k, v, layout, fp8=True)
    assert torch.equal(out, sixteen_out) and torch.equal(lse, sixteen_lse)
    assert not torch.equal(out, fp8_out)


def test_plan_summary_says_how_fp8_heads_run(monkeypatch):
    # The Triton executor needs CUDA; a CPU stand-in carrying its fp8_note shows the summary's line.
    stand_in = register_executor(dataclasses.replace(get_executor("cpu"), name="fp8-note-test", priority=-1,
                                                     fp8_note=TRITON_EXECUTOR.fp8_note))
    try:
        model = tiny_wan()
        fp8_plan = SparsePlan.uniform(model, "diagonal", window=[0, 1, 1], fp8=True)
        on_capability(monkeypatch, (9, 0))
        dit_sparse.apply(model, fp8_plan, executor=stand_in.name)
        assert "note: FP8 heads run in bf16/fp16 on sm_90" in dit_sparse.summary(model)
        dit_sparse.remove(model)
        dit_sparse.apply(model, SparsePlan.uniform(model, "diagonal", window=[0, 1, 1]), executor=stand_in.name)
        assert "FP8" not in dit_sparse.summary(model)  # no fp8 heads, no note
        dit_sparse.remove(model)
        on_capability(monkeypatch, (8, 9))
        dit_sparse.apply(model, fp8_plan, executor=stand_in.name)
        assert "note:" not in dit_sparse.summary(model)  # FP8 runs as FP8 there
        dit_sparse.remove(model)
    finally:
        EXECUTORS.pop(stand_in.name)
