"""Context parallelism from the command line: one process per device under torchrun, then diffusers'
`enable_parallelism` with the cp_plan the model needs.

    torchrun --nproc-per-node 4 -m dit_sparse generate --ulysses 2 --ring 2 ...
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

from .plans import context_parallel_plan
from .topology import UnsupportedParallelismError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """This process: its rank among all, their number, and the device it runs on."""

    rank: int
    world: int
    device: str

    @property
    def leads(self) -> bool:
        """Rank 0 writes files and prints; the others compute the same generation."""
        return self.rank == 0


def start(device: str, ulysses: int, ring: int) -> Launch:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); each rank takes its own GPU."""
    import torch.distributed as dist

    degree = ulysses * ring
    if "WORLD_SIZE" not in os.environ:
        raise UnsupportedParallelismError(
            f"--ulysses {ulysses} --ring {ring} needs {degree} processes, one per device: start it with "
            f"torchrun --nproc-per-node {degree} -m dit_sparse ...")
    world = int(os.environ["WORLD_SIZE"])
    if world != degree:
        raise UnsupportedParallelismError(
            f"--ulysses {ulysses} x --ring {ring} is {degree} processes, but torchrun started {world}: make "
            "--nproc-per-node the product of the two")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Launch(dist.get_rank(), world, device)


def enable(transformer, ulysses: int, ring: int, uneven: bool = False) -> None:
    """diffusers' enable_parallelism with dit-sparse's cp_plan where the model has none (or a refusal by name).
    uneven: diffusers' `ulysses_anything` / `ring_anything` split (one of the two degrees must be 1), for token
    counts the degree does not divide."""
    from diffusers import ContextParallelConfig

    plan = context_parallel_plan(transformer)
    flags = {"ulysses_anything": ulysses > 1, "ring_anything": ring > 1} if uneven else {}
    with _one_device_without_accelerators():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring, **flags),
                                       cp_plan=plan)


@contextlib.contextmanager
def _one_device_without_accelerators():
    """diffusers picks a rank's device as rank % torch.accelerator.device_count(), which is 0 on a machine without
    one (a ZeroDivisionError); the CPU device it then asks for is the same for every rank, so one is stood in."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count
