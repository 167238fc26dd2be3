"""Data parallelism under ``torchrun``: which process this is, and the few collectives used.

Every rank computes the same steps on its share of each batch; gradients are averaged in one
flat all-reduce, so the ranks' weights stay identical and only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Dist", "init"]


@dataclass
class Dist:
    """This process's place in the group: ``rank`` of ``world`` (0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes the files (rank 0)."""
        return self.rank == 0

    def all_average_(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` (in place) over the processes, in one flat all-reduce."""
        if self.world == 1 or not tensors:
            return
        import torch.distributed as td

        flat = torch.cat([t.reshape(-1) for t in tensors])
        td.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def mean(self, value: float) -> float:
        """The mean of a number over the processes (the same on every rank)."""
        if self.world == 1:
            return value
        import torch.distributed as td

        t = torch.tensor([value], dtype=torch.float64)
        td.all_reduce(t)
        return t.item() / self.world

    def gather(self, value: torch.Tensor) -> list[torch.Tensor]:
        """``value`` from every rank, in rank order."""
        if self.world == 1:
            return [value]
        import torch.distributed as td

        out = [torch.zeros_like(value) for _ in range(self.world)]
        td.all_gather(out, value)
        return out

    def barrier(self) -> None:
        """Wait until every process gets here (rank 0's files are complete after it)."""
        if self.world > 1:
            import torch.distributed as td

            td.barrier()


def init(device: str) -> Dist:
    """Join the process group that torchrun describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(td.get_rank(), td.get_world_size())
