"""Kernel tests run the Triton kernels in the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before Triton decorates a kernel; dit_sparse.kernels decorates lazily at the
first launch, and this file is imported before any test module here, so setting it now is early enough.
With a GPU the same tests run compiled on CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
