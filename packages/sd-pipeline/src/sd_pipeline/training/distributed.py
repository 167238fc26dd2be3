"""Data parallelism under ``torchrun``, with torch's own engine: which process this is, where it
computes, and how its trained models are wrapped.

- **DDP** (the default with more than one process): every rank holds the whole model;
  :class:`~torch.nn.parallel.DistributedDataParallel` all-reduces the gradients in buckets while
  the backward pass is still running, and skips the exchange on the micro-steps of gradient
  accumulation (``no_sync``). The ranks' weights stay identical, so only rank 0 writes files.
- **FSDP** (``fsdp``, fine-tuning): ``torch.distributed.fsdp.fully_shard`` (FSDP2) shards the
  parameters, gradients and optimizer state over the ranks; each block of the model is gathered
  just before it runs. Its training state is a sharded ``torch.distributed.checkpoint``.

Started by ``torchrun`` (single node, or ``--nnodes N --rdzv-backend c10d`` across nodes): the
environment says the rank, the world size and the rank on this node (``LOCAL_RANK``), which picks
the GPU. gloo on the CPU, NCCL on CUDA. Nothing here sends a tensor by hand.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Dist", "init", "shard", "train_device", "wrap_ddp"]


@dataclass
class Dist:
    """This process's place in the group: ``rank`` of ``world`` (0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    grouped: bool = False  # whether a process group exists (always under torchrun and FSDP)

    @property
    def main(self) -> bool:
        """Whether this process writes the files (rank 0)."""
        return self.rank == 0

    def mean(self, value: float) -> float:
        """The mean of a number over the processes (the same on every rank)."""
        if self.world == 1:
            return value
        import torch.distributed as td

        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        td.all_reduce(t)
        return t.item() / self.world

    def gather(self, value: torch.Tensor) -> list[torch.Tensor]:
        """``value`` from every rank, in rank order."""
        if self.world == 1:
            return [value]
        import torch.distributed as td

        value = value.to(_collective_device())
        out = [torch.zeros_like(value) for _ in range(self.world)]
        td.all_gather(out, value)
        return [t.cpu() for t in out]

    def barrier(self) -> None:
        """Wait until every process gets here (rank 0's files are complete after it)."""
        if self.world > 1:
            import torch.distributed as td

            td.barrier()


def _collective_device() -> torch.device:
    """NCCL exchanges CUDA tensors only; gloo CPU ones."""
    import torch.distributed as td

    if td.is_initialized() and td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(device: str, need_group: bool = False) -> Dist:
    """Join the process group that torchrun describes in the environment (if any).

    ``need_group``: make a group of one when run without torchrun (FSDP needs a group even alone,
    so that a sharded run can continue in a single process and the reverse).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1 and not need_group:
        return Dist()
    import torch.distributed as td

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(_local_device(device, local, world))
    if not td.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if world <= 1 and "MASTER_ADDR" not in os.environ:
            td.init_process_group(backend, store=td.HashStore(), rank=0, world_size=1)
        else:
            td.init_process_group(backend)
    return Dist(td.get_rank(), td.get_world_size(), local, grouped=True)


def _local_device(device: str, local_rank: int, world: int) -> torch.device:
    if world > 1 and device.startswith("cuda"):
        return torch.device("cuda", local_rank)  # one GPU per process on each node
    return torch.device(device)


def train_device(device: str, dist: Dist) -> str:
    """Where this rank computes: ``cuda:LOCAL_RANK`` for CUDA under torchrun, else ``device``."""
    return str(_local_device(device, dist.local_rank, dist.world))


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` under DDP: bucketed all-reduce of its gradients, overlapping the backward."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # broadcast_buffers off: the buffers (position ids, schedule tables) are constants, equal on
    # every rank already; the parameters are broadcast from rank 0 once, here.
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP gathers one at a time: each block of the model's ModuleLists, inner ones
    before the blocks that hold them (FSDP shards bottom-up: a parameter belongs to the
    innermost sharded module)."""
    out = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            out.extend(b for b in module if any(p.requires_grad for p in b.parameters()))
    return out[::-1]


def shard(root: nn.Module, parts: list[nn.Module], mixed_precision: str) -> None:
    """FSDP2 over ``parts`` (their blocks first, then each part, then ``root``), in place.

    Mixed precision: the gathered weights are cast to bf16/fp16 for compute; gradients are
    reduced, and the sharded master weights kept, in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if mixed_precision != "no":
        half = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        # cast_forward_inputs off: a UNet's float timesteps must not be rounded to half
        # precision before its sinusoidal embedding (autocast casts what matmuls see).
        policy = MixedPrecisionPolicy(half, torch.float32, cast_forward_inputs=False)
    seen: set[int] = set()
    for part in parts:
        with torch.no_grad():  # FSDP shards plain (row-major) tensors only, not channels-last
            for p in part.parameters():
                if not p.is_contiguous():
                    p.data = p.data.contiguous()
        for block in blocks(part):
            if id(block) not in seen:
                seen.add(id(block))
                fully_shard(block, mp_policy=policy)
        fully_shard(part, mp_policy=policy)
    fully_shard(root, mp_policy=policy)


def accumulating(model: nn.Module, last: bool):
    """A micro-step: gradients are exchanged on the last one only (DDP's ``no_sync``). FSDP
    reduce-scatters every micro-step, which keeps only a shard of each gradient in memory."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()
