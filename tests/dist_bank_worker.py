"""Two-rank worker for tests/test_regularisers.py (launched with torchrun, gloo on the CPU).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_bank_worker.py OUT_DIR

Every rank
  1. enqueues its own, recognisable vectors (value = (step, rank, row)) into a MemoryBank for
     several steps, past a wrap-around, and saves the bank after STEPS_PARTIAL and STEPS steps;
  2. computes `repulsor_loss` on its slice of a shared random global batch against a shared
     bank, backpropagates to its local projections, and saves the loss and the gradient.
The test compares the saved files with single-process references.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from distributed import cleanup, init_distributed  # noqa: E402
from loss import repulsor_loss  # noqa: E402
from memory_bank import MemoryBank  # noqa: E402

LOCAL_BATCH = 2
DIM = 3
BANK_STEPS = 3  # bank holds 3 global batches
STEPS_PARTIAL = 2
STEPS = 5  # > BANK_STEPS: the queue wraps around

# repulsor_loss check
LOSS_LOCAL_BATCH = 3
LOSS_DIM = 5
LOSS_BANK = 7
LOSS_TAU = 0.3
LOSS_SEED = 1234


def bank_vectors(step: int, rank: int) -> torch.Tensor:
    """LOCAL_BATCH x DIM rows (step, rank, row): every vector is unique and names its origin."""
    return torch.tensor([[float(step), float(rank), float(i)] for i in range(LOCAL_BATCH)])


def loss_inputs(world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same global batch, bank and mask on every rank (seeded)."""
    g = torch.Generator().manual_seed(LOSS_SEED)
    z = F.normalize(torch.randn(world * LOSS_LOCAL_BATCH, LOSS_DIM, generator=g), dim=1)
    bank = F.normalize(torch.randn(LOSS_BANK, LOSS_DIM, generator=g), dim=1)
    mask = torch.tensor([1.0, 0.0, 1.0] * world)[: world * LOSS_LOCAL_BATCH]
    return z, bank, mask


def main(out_dir: str) -> None:
    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size
    assert world == 2 and dist.is_initialized(), "launch with torchrun --nproc_per_node=2"

    bank = MemoryBank(BANK_STEPS * LOCAL_BATCH * world, DIM, LOCAL_BATCH * world)
    for step in range(STEPS):
        bank.enqueue(bank_vectors(step, rank))
        if step + 1 == STEPS_PARTIAL:
            torch.save({"negatives": bank.negatives(), "fill": bank.fill_fraction, **bank.state_dict()},
                       os.path.join(out_dir, f"bank_partial_rank{rank}.pt"))
    torch.save(bank.state_dict(), os.path.join(out_dir, f"bank_rank{rank}.pt"))

    z, neg_bank, mask = loss_inputs(world)
    sl = slice(rank * LOSS_LOCAL_BATCH, (rank + 1) * LOSS_LOCAL_BATCH)
    local = z[sl].clone().requires_grad_(True)
    loss, _ = repulsor_loss(local, neg_bank, LOSS_TAU, mask[sl])
    loss.backward()
    local_full = z[sl].clone().requires_grad_(True)
    loss_nomask, _ = repulsor_loss(local_full, neg_bank, LOSS_TAU)
    torch.save({"loss": loss.detach(), "grad": local.grad.clone(), "loss_nomask": loss_nomask.detach()},
               os.path.join(out_dir, f"loss_rank{rank}.pt"))
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
