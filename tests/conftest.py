"""Root of the test suite: imported before any test module.

Kernel tests run the Triton kernels in the CPU interpreter when there is no GPU. TRITON_INTERPRET has to be set
before anything imports Triton (peft does, for example, when the distillation tests load it), because Triton reads
it once; tests/kernels/conftest.py alone would be too late when other folders are collected first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
