"""Custom ops (registration, fake implementations, torch.compile graph capture) and the executor registry."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import qkv, random_layout
from torch._subclasses.fake_tensor import FakeTensorMode

import dit_sparse.kernels.executor as kernels_executor
from dit_sparse.executors import EXECUTORS, get_executor
from dit_sparse.executors.reference import reference_attention
from dit_sparse.kernels import naive, segments


def op_args(q, k, v, layout):
    idx, cnt = segments.level0_lut(layout)
    return (q, k, v, idx, cnt, None, None, None, None, None, None, layout.block_q, layout.block_k, 0.25)


def test_custom_ops_are_registered():
    for name in ("block_sparse_fwd", "block_sparse_fwd_fp8", "block_sparse_bwd"):
        assert hasattr(torch.ops.dit_sparse, name)


def test_forward_op_matches_its_twin(device):
    q, k, v = qkv(2, 63, 2, 16, device=device)
    args = op_args(q, k, v, random_layout(63, 32, 32, batch=2, heads=2, device=device))
    out, lse = torch.ops.dit_sparse.block_sparse_fwd(*args)
    twin_out, twin_lse = naive.block_sparse_fwd(*args)
    assert (out - twin_out).abs().max() <= 1e-4 and (lse - twin_lse).abs().max() <= 1e-4


def test_fake_implementations_give_shapes_without_running():
    with FakeTensorMode():
        q = torch.empty(2, 317, 3, 64, dtype=torch.bfloat16)
        idx = torch.empty(1, 1, 5, 5, dtype=torch.int32)
        cnt = torch.empty(1, 1, 5, dtype=torch.int32)
        out, lse = torch.ops.dit_sparse.block_sparse_fwd(q, q, q, idx, cnt, None, None, None, None, None, None,
                                                         64, 64, 0.125)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        assert lse.shape == (2, 3, 317) and lse.dtype == torch.float32
        grads = torch.ops.dit_sparse.block_sparse_bwd(q, q, q, q, q, lse, None, idx, cnt, idx, cnt, 64, 64, 0.125)
        assert all(g.shape == q.shape for g in grads)
        q8 = torch.empty(2, 317, 3, 64, dtype=torch.float8_e4m3fn)
        out, lse = torch.ops.dit_sparse.block_sparse_fwd_fp8(
            q8, lse, q8, lse, q, lse, lse, idx, cnt, None, None, None, None, 64, 64, 0.125, torch.float16)
        assert out.dtype == torch.float16 and lse.shape == (2, 3, 317)


def test_opcheck_forward(device):
    q, k, v = qkv(1, 63, 1, 16, device=device)
    torch.library.opcheck(torch.ops.dit_sparse.block_sparse_fwd.default,
                          op_args(q, k, v, random_layout(63, 64, 64, device=device)),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_through_the_public_function(device):
    # Graph capture (aot_eager: no code generation) must not break on the kernels, forward or backward.
    q, k, v = qkv(1, 63, 2, 16, device=device)
    layout = random_layout(63, 32, 32, heads=2, device=device)

    def attend(q, k, v):
        out, lse = kernels_executor.block_sparse_attention(q * 1.0, k, v, layout)
        return out + 1.0, lse

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = compiled(*leaves)
    (out.square().sum() + lse.sum()).backward()
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference_attention(*ref, layout)
    ((ref_out + 1.0).square().sum() + ref_lse.sum()).backward()
    assert (out - 1.0 - ref_out).abs().max() <= 1e-4 and (lse - ref_lse).abs().max() <= 1e-4
    for a, b in zip(leaves, ref):
        assert (a.grad - b.grad).norm() / b.grad.norm() <= 1e-3


def test_triton_executor_is_registered_for_cuda():
    executor = EXECUTORS["triton"]
    assert executor is kernels_executor.TRITON_EXECUTOR
    assert executor.priority > EXECUTORS["cpu"].priority
    assert not executor.available(torch.device("cpu"))
    assert get_executor(None, "cpu").name == "cpu"
    block_q, block_k = executor.block_sizes(torch.device("cpu"), 64)
    assert block_q % 16 == 0 and block_k % 16 == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_executor_is_the_default_on_cuda():
    assert get_executor(None, "cuda").name == "triton"


def test_import_guards_in_a_fresh_interpreter():
    # 1. With the repository root on sys.path, `import kernels` (the name transformers probes for Hugging Face's
    #    library) must not find the kernels source folder: it has no __init__.py, so it is at most a namespace
    #    portion, which any installed regular package of that name outranks; and it registers nothing.
    # 2. Without Triton (an install without the [triton] extra) the import fails with an install hint.
    root = Path(__file__).resolve().parents[2]
    code = (
        f"import sys; sys.path.insert(0, {str(root)!r})\n"
        "import kernels; from dit_sparse.executors import EXECUTORS\n"
        "print('regular', getattr(kernels, '__file__', None) is not None, 'triton' in EXECUTORS)\n"
        "print('origin', getattr(kernels, '__file__', None))\n"
        "for m in [m for m in sys.modules if 'kernels' in m]: del sys.modules[m]\n"
        "sys.modules['triton'] = None\n"
        "try:\n    import dit_sparse.kernels.executor\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "False" == out.stdout.split("regular ", 1)[1].split()[1], out.stdout + out.stderr[-2000:]
    origin = out.stdout.split("origin ", 1)[1].split("\n", 1)[0]
    assert not origin.startswith(str(root / "kernels")), origin
    assert "needs Triton" in out.stdout, out.stderr[-2000:]
