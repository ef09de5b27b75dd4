"""Multi-process training under `torchrun`: DDP over gloo (CPU) or NCCL (CUDA).

Every process draws the same global batch from the same seeded generator and keeps its own slice,
so N processes see exactly the batch one process would; DDP averages the gradients. Only rank 0
writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def slice(self, batch: int) -> slice:
        """This process's rows of a global batch."""
        per_rank = batch // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def wait_for_all(self) -> None:
        """Block until every process gets here (nothing in a single process)."""
        if self.distributed:
            dist.barrier()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over processes (the value itself in a single process)."""
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value)
        return value


def init_world(device: str) -> World:
    """Join the process group that torchrun describes through its environment (a single process otherwise)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        torch.cuda.set_device(world.local_rank)  # one GPU per process
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return world


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
