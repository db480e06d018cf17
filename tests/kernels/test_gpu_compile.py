"""Ahead-of-time compilation of every kernel variant for real GPU targets, on a machine without a GPU.

Triton compiles to PTX and cubin (with its bundled ptxas) for any target without a device, so type errors,
illegal FP8 dot shapes and shared-memory overflows show up in CI, not first on a user's GPU. The compilation
runs in a subprocess without TRITON_INTERPRET (see aot_compile.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from aot_compile import CASES  # noqa: E402


@pytest.fixture(scope="module")
def results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(HERE / "aot_compile.py")], env=env, cwd=HERE, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_compile_for_gpu_targets(results, case):
    assert results[case] == "ok", results[case]
