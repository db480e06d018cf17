"""Kernel tests run the Triton kernels in the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before Triton is imported; tests/conftest.py sets it for the whole suite (other
folders' tests import Triton indirectly, e.g. through peft), and this file sets it again when only this folder
runs. With a GPU the same tests run compiled on CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
