"""Two-rank worker for tests/test_regularisers.py (launched with torchrun, gloo on the CPU).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_bank_worker.py OUT_DIR

Every rank
  1. all-gathers its own, recognisable vectors (value = (step, rank, row)) and enqueues the
     global batch into a MemoryBank for several steps, past a wrap-around, and saves the bank
     after STEPS_PARTIAL and STEPS steps;
  2. computes `repulsor_loss` on its slice of a shared random global batch against a shared
     bank, backpropagates through the differentiable gather, and saves the loss and the gradient
     (also with pairs=True, the noise-pair positive);
  3. trains a DDP-wrapped TrainModule (tiny SiT + Repulsor) for DDP_STEPS micro-steps on its
     slice of a shared global batch, per configuration in DDP_CONFIGS, counting the Python-level
     all_gather / all_reduce calls, and saves the (DDP-averaged) gradients and the bank.
The test compares the saved files with single-process references on the concatenated batch.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from distributed import all_gather_cat, cleanup, init_distributed  # noqa: E402
from loss import Context, Repulsor, repulsor_loss, velocity_loss  # noqa: E402
from memory_bank import MemoryBank  # noqa: E402
from models.sit import build_sit  # noqa: E402
from train import TrainModule  # noqa: E402

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

# repulsor_loss(pairs=True) check: each rank's rows are [images, same images]
PAIR_LOCAL = 4

# DDP check: 2 ranks x DDP_LOCAL vs 1 process x 2 DDP_LOCAL
DDP_LOCAL = 3
DDP_STEPS = 2  # the second step meets the first step's batch in the bank
DDP_REG_WEIGHT = 1.0
DDP_CONFIGS = {  # name: (bank size, rows pre-filled, t_max, projection head)
    "nobank": (0, 0, 1.0, "standardised"),
    "bank": (12, 6, 1.0, "standardised"),  # step 1 fills it, step 2 wraps; statistics of the GLOBAL batch
    "bank_mask": (12, 6, 0.5, "standardised"),
    "bank_centred": (12, 6, 1.0, "centred"),
    "bank_running": (12, 6, 1.0, "running"),
    "bank_mlp": (12, 6, 1.0, "mlp"),
}


def bank_vectors(step: int, rank: int) -> torch.Tensor:
    """LOCAL_BATCH x DIM rows (step, rank, row): every vector is unique and names its origin."""
    return torch.tensor([[float(step), float(rank), float(i)] for i in range(LOCAL_BATCH)])


def loss_inputs(world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same global batch, bank and (global) mask on every rank (seeded)."""
    g = torch.Generator().manual_seed(LOSS_SEED)
    z = F.normalize(torch.randn(world * LOSS_LOCAL_BATCH, LOSS_DIM, generator=g), dim=1)
    bank = F.normalize(torch.randn(LOSS_BANK, LOSS_DIM, generator=g), dim=1)
    mask = torch.tensor([1.0, 0.0, 1.0] + [1.0] * (LOSS_LOCAL_BATCH * (world - 1)))  # unequal counts per rank
    return z, bank, mask


def pair_inputs(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global batch (world blocks of PAIR_LOCAL rows) and bank on every rank (seeded)."""
    g = torch.Generator().manual_seed(LOSS_SEED + 1)
    z = F.normalize(torch.randn(world * PAIR_LOCAL, LOSS_DIM, generator=g), dim=1)
    return z, F.normalize(torch.randn(LOSS_BANK, LOSS_DIM, generator=g), dim=1)


def ddp_module(config: str) -> TrainModule:
    """The same tiny SiT + Repulsor on every rank and in the single-process reference."""
    bank_size, prefill, t_max, head = DDP_CONFIGS[config]
    torch.manual_seed(0)
    sit = build_sit(depth=2, hidden_size=32, num_heads=2, patch_size=4, input_size=8, in_channels=2,
                    num_classes=3, class_dropout_prob=0.0)
    with torch.no_grad():  # leave adaLN-Zero so every SiT weight gets a gradient
        for p in sit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reg = Repulsor(32, depth=1, proj_dim=8, proj_hidden=16, temperature=0.3, bank_size=bank_size,
                   global_batch=2 * DDP_LOCAL, t_max=t_max, head=head)
    if prefill:
        queue = torch.zeros(bank_size, 8)
        queue[:prefill] = F.normalize(torch.randn(prefill, 8), dim=1)
        reg.bank.load_state_dict({"queue": queue, "ptr": prefill, "filled": prefill})
    return TrainModule(sit, reg)


def ddp_inputs(step: int) -> tuple[torch.Tensor, ...]:
    """x_t, t, y, target of the global batch at `step`; t has anchors above t_max 0.5 on rank 0 only."""
    g = torch.Generator().manual_seed(100 + step)
    n = 2 * DDP_LOCAL
    t = torch.tensor([0.2, 0.7, 0.9, 0.1, 0.3, 0.4])
    return (torch.randn(n, 2, 8, 8, generator=g), t, torch.randint(0, 3, (n,), generator=g),
            torch.randn(n, 2, 8, 8, generator=g))


def ddp_step(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    x_t, t, y, target = inputs
    pred, terms = module(Context(x_t=x_t, t=t, y=y))
    (velocity_loss(pred, target) + DDP_REG_WEIGHT * terms["reg"]).backward()


def run_ddp(config: str, rank: int, out_dir: str) -> None:
    module = ddp_module(config)
    ddp = DDP(module)
    sl = slice(rank * DDP_LOCAL, (rank + 1) * DDP_LOCAL)
    calls = {"all_gather": 0, "all_reduce": 0}
    originals = {name: getattr(dist, name) for name in calls}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    grads = []
    for step in range(DDP_STEPS):
        for name in calls:
            setattr(dist, name, counting(name))
        try:
            ddp_step(ddp, tuple(v[sl] for v in ddp_inputs(step)))
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
        grads.append({k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None})
        module.zero_grad(set_to_none=True)
    torch.save({"grads": grads, "bank": module.reg.bank.state_dict(), "calls": calls},
               os.path.join(out_dir, f"ddp_{config}_rank{rank}.pt"))


def main(out_dir: str) -> None:
    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size
    assert world == 2 and dist.is_initialized(), "launch with torchrun --nproc_per_node=2"

    bank = MemoryBank(BANK_STEPS * LOCAL_BATCH * world, DIM, LOCAL_BATCH * world)
    for step in range(STEPS):
        bank.enqueue(all_gather_cat(bank_vectors(step, rank)))
        if step + 1 == STEPS_PARTIAL:
            torch.save({"negatives": bank.negatives(), "fill": bank.fill_fraction, **bank.state_dict()},
                       os.path.join(out_dir, f"bank_partial_rank{rank}.pt"))
    torch.save(bank.state_dict(), os.path.join(out_dir, f"bank_rank{rank}.pt"))

    z, neg_bank, mask = loss_inputs(world)
    sl = slice(rank * LOSS_LOCAL_BATCH, (rank + 1) * LOSS_LOCAL_BATCH)
    local = z[sl].clone().requires_grad_(True)
    loss, _ = repulsor_loss(local, neg_bank, LOSS_TAU, mask)
    loss.backward()
    local_full = z[sl].clone().requires_grad_(True)
    loss_nomask, _ = repulsor_loss(local_full, neg_bank, LOSS_TAU)
    torch.save({"loss": loss.detach(), "grad": local.grad.clone(), "loss_nomask": loss_nomask.detach()},
               os.path.join(out_dir, f"loss_rank{rank}.pt"))

    zp, bank_p = pair_inputs(world)
    local = zp[rank * PAIR_LOCAL:(rank + 1) * PAIR_LOCAL].clone().requires_grad_(True)
    loss, _ = repulsor_loss(local, bank_p, LOSS_TAU, pairs=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": local.grad.clone()}, os.path.join(out_dir, f"pairs_rank{rank}.pt"))

    for config in DDP_CONFIGS:
        run_ddp(config, rank, out_dir)
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
