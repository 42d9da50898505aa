"""FIFO memory bank of unit-norm projections, identical on every rank.

Every rank enqueues the projections of the whole global batch (all-gathered once per
micro-step by the Repulsor, in global-rank order) at the same pointer, so all banks stay
bitwise identical without any broadcast. The bank holds no gradient; it only supplies
negatives to the Repulsor loss.
"""
from __future__ import annotations

import torch

BANK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class MemoryBank:
    def __init__(self, size: int, dim: int, global_batch: int, dtype: str = "fp32", device: torch.device | str = "cpu"):
        if size < 0:
            raise ValueError(f"bank size {size} is negative: use 0 for no bank")
        if size % global_batch:
            raise ValueError(f"bank size {size} is not a multiple of the global batch {global_batch} "
                             "(per micro-step): pick --bank-size as a multiple of it so the queue wraps cleanly")
        if dtype not in BANK_DTYPES:
            raise ValueError(f"bank dtype {dtype!r} is not one of {', '.join(BANK_DTYPES)}")
        self.size, self.dim, self.global_batch = size, dim, global_batch
        self.dtype = dtype
        self.queue = torch.zeros(size, dim, dtype=BANK_DTYPES[dtype], device=device)
        self.ptr = 0  # next row to overwrite
        self.filled = 0  # rows holding real projections (grows until the bank is full)

    def negatives(self) -> torch.Tensor:
        """A fp32 copy of the filled part (empty before the first enqueue). A copy, because the
        loss's backward needs these values after this step's enqueue has overwritten the queue."""
        return self.queue[: self.filled].to(torch.float32, copy=True)

    @property
    def fill_fraction(self) -> float:
        return self.filled / self.size if self.size else 0.0

    @torch.no_grad()
    def enqueue(self, batch: torch.Tensor) -> None:
        """Write this step's projections of the GLOBAL batch (every rank's, in rank order; the
        caller's all-gather, which the loss shares) at the pointer."""
        if self.size == 0:
            return
        if batch.shape != (self.global_batch, self.dim):
            raise ValueError(f"enqueue got {tuple(batch.shape)} projections, the bank expects "
                             f"({self.global_batch}, {self.dim}) per step")
        rows = self.queue[self.ptr : self.ptr + self.global_batch]
        batch = batch.to(self.queue.dtype)
        # A non-finite projection (a bad batch: train.py skips that step) must not poison the bank for the
        # next K / B steps: its row keeps the older entry. Decided on the device, without a host sync.
        rows.copy_(torch.where(torch.isfinite(batch).all(dim=1, keepdim=True), batch, rows))
        self.ptr = (self.ptr + self.global_batch) % self.size
        self.filled = min(self.size, self.filled + self.global_batch)

    def state_dict(self) -> dict:
        return {"queue": self.queue.cpu().clone(), "ptr": self.ptr, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["queue"].shape) != tuple(self.queue.shape):
            raise ValueError(f"checkpoint bank has shape {tuple(state['queue'].shape)}, this run's is "
                             f"{tuple(self.queue.shape)}: resume with the same --bank-size and --proj-dim")
        self.queue.copy_(state["queue"].to(self.queue.dtype))
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
