"""Several processes for one search (``accelerate launch`` / ``torchrun``): each calibrates its share of the
prompts, the statistics are summed across processes, and the first process solves and writes the files.

Launchers set RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); without them the search is one
process and nothing here talks to anyone. Backends: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import SearchError


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, count: int) -> list[int]:
        """The prompt indices this process calibrates: every world-th one, starting at its rank."""
        if count < self.world:
            raise SearchError(f"{self.world} processes need at least {self.world} calibration prompts, got {count}; "
                              "give more prompts or launch fewer processes")
        return list(range(self.rank, count, self.world))

    def device(self, device: str) -> str:
        """--device cuda means this process's own GPU."""
        return f"cuda:{self.local_rank}" if self.distributed and device == "cuda" else device

    # -- collectives (no-ops in one process) ------------------------------------------------------------------
    def sum(self, array: np.ndarray) -> np.ndarray:
        if not self.distributed:
            return array
        import torch.distributed as dist

        return _collective(array, dist.all_reduce)

    def from_first(self, array: np.ndarray) -> np.ndarray:
        """The first process's `array` (same shape on every process)."""
        if not self.distributed:
            return array
        import torch.distributed as dist

        return _collective(array, lambda tensor: dist.broadcast(tensor, src=0))

    def broadcast(self, obj):
        """rank 0's `obj` on every process."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def processes(device: str = "cpu") -> Processes:
    """This process's place among the launched ones, joining their process group on first use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            if local_rank >= torch.cuda.device_count():
                raise SearchError(f"process {rank} wants GPU {local_rank}, but this machine has "
                                  f"{torch.cuda.device_count()}; launch at most that many processes per machine")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Processes(rank, world, local_rank)


def _collective(array: np.ndarray, op) -> np.ndarray:
    """`op` applied in place to `array` as a float64 tensor on the backend's device (nccl needs CUDA tensors)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float64, device=device)
    op(tensor)
    return tensor.cpu().numpy().reshape(np.shape(array))
