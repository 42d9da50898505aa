"""torch.distributed set-up shared by train.py, sample_ddp.py and preprocessing/.

Same code for `python script.py` (no process group), torchrun on CPU (gloo) and torchrun
on GPUs (NCCL): the backend follows the device.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_min: float = 60.0) -> DistInfo:
    """Init the process group when launched by torchrun; pick cuda:LOCAL_RANK when available.

    timeout_min: how long a collective may wait before the job fails. Explicit, because ranks wait in
    a barrier while rank 0 writes a checkpoint (about 10 GB for SiT-XL/2 with EMA and AdamW moments)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None,
                                timeout=datetime.timedelta(minutes=timeout_min))
    return DistInfo(rank, world, local_rank, dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_dist():
        dist.barrier()


class _AllGatherCat(torch.autograd.Function):
    """all_gather in rank order whose backward hands every rank the gradient of ALL ranks'
    losses with respect to its own rows: all_reduce(sum) of the incoming gradient, then this
    rank's slice. Under DDP (which averages over ranks) this makes a loss over the gathered
    batch train exactly like the same loss on one process holding the whole batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce is in place: own the buffer
        dist.all_reduce(grad)
        return grad[ctx.rows]


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (same shape on every rank) from every rank in rank order; x itself without a
    group. Differentiable: see _AllGatherCat. Every rank must call it (and run its backward)."""
    if not is_dist():
        return x
    return _AllGatherCat.apply(x)


def cleanup() -> None:
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()
