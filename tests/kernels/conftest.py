"""Kernel tests run the Triton kernels in the CPU interpreter when there is no GPU (TRITON_INTERPRET is set in
tests/conftest.py, which pytest loads first even when only this folder runs). With a GPU the same tests run
compiled on CUDA.
"""

import pytest
import torch


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
