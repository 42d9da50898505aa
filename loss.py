"""Flow-matching loss and the representation regularisers (Repulsor, Dispersive).

Time convention, everywhere in this repository: t = 0 is data, t = 1 is noise.
    linear path:  x_t = (1 - t) x + t eps,                      v = eps - x
    cosine path:  x_t = cos(pi t / 2) x + sin(pi t / 2) eps,    v = d x_t / dt
The network predicts v. Loss math runs in fp32 even under autocast.

Regularisers plug into ONE seam of the training step: `train.py` asks the SiT for the hidden
state after block `reg.depth` and calls `reg(hidden, t)`, which returns a dict of named terms
with the differentiable value under "reg"; total loss = velocity + reg_weight * terms["reg"].
To add a regulariser, subclass `Regulariser` and register it in `REGULARISERS`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from distributed import all_gather_cat, is_dist
from memory_bank import MemoryBank

PATH_TYPES = ("linear", "cosine")  # with path_coefficients: the only definition of the paths (samplers use it)
TIME_SAMPLINGS = ("uniform", "lognormal")


# ----------------------------------------------------------------------------- flow matching
def path_coefficients(path_type: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha_t, sigma_t and their time derivatives, for x_t = alpha_t x + sigma_t eps.

    The single definition of the interpolation paths: training (interpolate), the samplers and
    their score conversion (samplers.path_at, in float64) all call this, so a new path is added
    here and in PATH_TYPES only. t: a tensor of times; the coefficients keep its dtype and shape.
    """
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t),
                -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t))
    raise ValueError(f"unknown path type {path_type!r}; choose one of {', '.join(PATH_TYPES)}")


def sample_time(n: int, time_sampling: str, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """t in (0, 1): uniform, or lognormal (sigma = exp(N(0, 1)), t = sigma / (1 + sigma))."""
    if time_sampling == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if time_sampling == "lognormal":
        sigma = torch.randn(n, device=device, generator=generator).exp()
        return sigma / (1 + sigma)
    raise ValueError(f"unknown time sampling {time_sampling!r}; choose one of {', '.join(TIME_SAMPLINGS)}")


def interpolate(path_type: str, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) for data x, noise and per-sample t (shape B)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    t = t if t.dtype == torch.float64 else t.float()  # float64 stays float64 (samplers), else fp32
    alpha, sigma, d_alpha, d_sigma = (c.view(shape) for c in path_coefficients(path_type, t))
    return alpha * x + sigma * noise, d_alpha * x + d_sigma * noise


def velocity_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32."""
    return (pred.float() - target.float()).pow(2).mean()


# ----------------------------------------------------------------------------- regularisers
class Regulariser(nn.Module):
    """Base class: `depth` names the block whose output it needs (1-based); None = none."""

    depth: int | None = None

    def forward(self, hidden: torch.Tensor | None, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def extra_state(self) -> dict:  # non-parameter state to checkpoint (e.g. the bank)
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


def _time_mask(t: torch.Tensor, t_max: float) -> torch.Tensor:
    return (t <= t_max).float()


class Repulsor(Regulariser):
    """Pooled hidden state -> MLP head -> unit vector; InfoNCE-style repulsion from the other
    samples of the global batch and a FIFO memory bank of earlier steps' projections.

        L_i = logsumexp_n(<z_i, n> / tau) - log(#negatives)

    Negatives: the other samples of the global batch and the filled part of the bank (no
    gradient). Subtracting log(#negatives) turns the sum into a log-mean-exp, so values are
    comparable across bank sizes.

    pairs=True (train.py --noise-pairs): each rank's micro-batch is [images, same images], every
    image at two independent times and noises; the twin (row i + b/2 mod b on the same rank) is
    the positive and the loss is InfoNCE, L_i = logsumexp_{n != i}(<z_i, n> / tau) - <z_i, z_twin> / tau,
    over the twin, the rest of the global batch and the bank.

    The global batch is all-gathered ONCE per micro-step, with
    gradient (distributed.all_gather_cat), so N ranks x b train exactly like 1 rank x N b;
    after the loss the same gathered batch is enqueued (after, so a sample never meets itself
    in the bank).
    """

    def __init__(self, hidden_size: int, depth: int, proj_dim: int = 128, proj_hidden: int = 2048,
                 temperature: float = 0.5, bank_size: int = 65536, bank_dtype: str = "fp32",
                 global_batch: int = 256, pool: str = "mean", t_max: float = 1.0,
                 device: torch.device | str = "cpu", pairs: bool = False):
        super().__init__()
        if pool != "mean":
            raise ValueError(f"unknown pooling {pool!r}; only 'mean' is implemented")
        if global_batch < 2:
            raise ValueError(f"Repulsor needs a global batch (per micro-step) of at least 2, got {global_batch}: "
                             "the other samples of the batch are its first negatives")
        self.depth, self.temperature, self.t_max, self.pairs = depth, temperature, t_max, pairs
        self.head = nn.Sequential(
            nn.Linear(hidden_size, proj_hidden), nn.SiLU(),
            nn.Linear(proj_hidden, proj_hidden), nn.SiLU(),
            nn.Linear(proj_hidden, proj_dim),
        )
        self.bank = MemoryBank(bank_size, proj_dim, global_batch, bank_dtype, device)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(hidden.mean(dim=1)).float(), dim=-1)

    def forward(self, hidden: torch.Tensor | None, t: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.project(hidden)
        if self.t_max >= 1:  # t < 1 always: keep every anchor, gather z alone
            batch, mask = all_gather_cat(z), None
        else:  # the mask rides along as an extra column: still one all-gather
            gathered = all_gather_cat(torch.cat([z, _time_mask(t, self.t_max)[:, None]], dim=1))
            batch, mask = gathered[:, :-1], gathered[:, -1]
        loss, logs = repulsor_loss(z, self.bank.negatives(), self.temperature, mask, batch=batch, pairs=self.pairs)
        self.bank.enqueue(batch.detach())
        logs["bank_fill"] = torch.tensor(self.bank.fill_fraction)
        return {"reg": loss, **logs}

    def extra_state(self) -> dict:
        return {"bank": self.bank.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "bank" in state:
            self.bank.load_state_dict(state["bank"])


def repulsor_loss(z: torch.Tensor, bank: torch.Tensor, temperature: float, mask: torch.Tensor | None = None,
                  batch: torch.Tensor | None = None, pairs: bool = False
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Repulsor loss of this rank's unit vectors z (b x d, the anchors) against the global batch
    and `bank`. fp32 even under autocast.

    batch: the global batch, all_gather_cat(z) (gathered here when None); z sits at rows
    rank * b. Its gradient reaches every rank's z through the gather's backward.
    mask: anchor weights for the GLOBAL batch (length B, rank order; None = all ones). The
    value is sum_local(m l) * (B / b) / sum_global(m): its mean over ranks, what DDP optimises,
    is the masked mean over the global batch, as on one process holding all of it.
    pairs: row i's positive is row (i + b/2) mod b of the same rank (see Repulsor); the term is
    InfoNCE (the positive's logit subtracted) instead of the log-mean-exp over negatives.
    The batch and bank blocks get separate logsumexps joined by logaddexp: no concatenated
    b x (B + K) logits and one division by tau on z, not on the logits.
    """
    with torch.autocast(z.device.type, enabled=False):
        z = z.float()
        batch = all_gather_cat(z) if batch is None else batch.float()
        b, n = z.shape[0], batch.shape[0]
        if pairs and b % 2:
            raise ValueError(f"noise pairs need an even batch per rank and micro-step, got {b}")
        rank = dist.get_rank() if is_dist() else 0
        zt = z / temperature
        logits_batch = zt @ batch.T  # b x B
        cols = torch.arange(n, device=z.device)
        is_self = cols[None, :] == cols[rank * b: (rank + 1) * b, None]  # (not one_hot: it checks values on the host)
        logits_batch = logits_batch.masked_fill(is_self, float("-inf"))
        lse = torch.logsumexp(logits_batch, dim=1)
        logs = {}
        if bank.shape[0]:
            bank = bank.to(z.device, torch.float32)
            logits_bank = zt @ bank.T  # b x K: one batched product against the whole bank
            lse = torch.logaddexp(lse, torch.logsumexp(logits_bank, dim=1))
            with torch.no_grad():
                logs = {"bank_cos_mean": logits_bank.mean() * temperature, "bank_cos_max": logits_bank.max() * temperature}
        if pairs:
            twin = rank * b + (cols[:b] + b // 2) % b  # column of each anchor's twin in the global batch
            positive = logits_batch.gather(1, twin[:, None])[:, 0]
            per_sample = lse - positive
            logs["pair_cos"] = positive.detach().mean() * temperature
        else:
            per_sample = lse - math.log(n - 1 + bank.shape[0])
        if mask is None:
            return per_sample.mean(), logs
        mask = mask.to(z.device, torch.float32)
        local = mask[rank * b: (rank + 1) * b]
        return (per_sample * local).sum() * (n / b) / mask.sum().clamp(min=1), logs


class Dispersive(Regulariser):
    """Dispersive Loss (Wang and He, 2025): in-batch, on the flattened hidden state of one
    block, no head, no extra parameters. Uses this rank's batch (as the official code).

    Variants (z_i = flattened hidden state of sample i, d = its number of features):
      infonce_l2   log mean_{i,j} exp(-||z_i - z_j||^2 / (d tau)), diagonal included (official)
      infonce_cos  log mean_{i,j} exp(cos(z_i, z_j) / tau), diagonal included
      hinge        mean_{i != j} max(0, margin - ||z_i - z_j||^2 / d)^2
      covariance   (1/d) sum_{m != n} C_mn^2, C = covariance of the batch-centred features
                   (VICReg-style; computed through the B x B Gram matrix, never d x d)
    """

    VARIANTS = ("infonce_l2", "infonce_cos", "hinge", "covariance")

    def __init__(self, depth: int, variant: str = "infonce_l2", temperature: float = 0.5,
                 margin: float = 1.0, t_max: float = 1.0):
        super().__init__()
        if variant not in self.VARIANTS:
            raise ValueError(f"unknown dispersive variant {variant!r}; choose one of {', '.join(self.VARIANTS)}")
        self.depth, self.variant, self.temperature, self.margin, self.t_max = depth, variant, temperature, margin, t_max

    def forward(self, hidden: torch.Tensor | None, t: torch.Tensor) -> dict[str, torch.Tensor]:
        z = hidden.reshape(hidden.shape[0], -1).float()
        if self.t_max < 1:  # ablation only: boolean indexing syncs with the host; t < 1 always, so
            z = z[t <= self.t_max]  # the default t_max 1 decides in Python and never syncs
        if z.shape[0] < 2:
            return {"reg": hidden.sum() * 0.0}
        return {"reg": dispersive_loss(z, self.variant, self.temperature, self.margin)}


def dispersive_loss(z: torch.Tensor, variant: str, temperature: float = 0.5, margin: float = 1.0) -> torch.Tensor:
    """The four Dispersive Loss variants on flattened features z (B x d), in fp32 (also under autocast)."""
    with torch.autocast(z.device.type, enabled=False):
        return _dispersive_fp32(z.float(), variant, temperature, margin)


def _dispersive_fp32(z: torch.Tensor, variant: str, temperature: float, margin: float) -> torch.Tensor:
    n, d = z.shape
    off_diag = ~torch.eye(n, dtype=torch.bool, device=z.device)
    if variant in ("infonce_l2", "hinge"):
        sq = z.pow(2).sum(1)
        dist2 = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp(min=0) / d
        dist2 = dist2.masked_fill(~off_diag, 0.0)  # exact zeros on the diagonal
        if variant == "infonce_l2":
            return torch.logsumexp((-dist2 / temperature).reshape(-1), 0) - math.log(n * n)
        # Mean over i != j without boolean indexing (a device->host sync on GPUs).
        return F.relu(margin - dist2).pow(2).masked_fill(~off_diag, 0.0).sum() / (n * (n - 1))
    if variant == "infonce_cos":
        u = F.normalize(z, dim=1)
        return torch.logsumexp((u @ u.T / temperature).reshape(-1), 0) - math.log(n * n)
    if variant == "covariance":
        zc = z - z.mean(0, keepdim=True)
        gram = zc @ zc.T / (n - 1)  # ||C||_F^2 = ||Zc Zc^T||_F^2 / (n-1)^2
        var = zc.pow(2).sum(0) / (n - 1)  # diagonal of C
        return (gram.pow(2).sum() - var.pow(2).sum()) / d
    raise ValueError(f"unknown dispersive variant {variant!r}")


def default_reg_depth(reg: str, model_name: str | None, depth: int) -> int:
    """Repulsor: block 4 for SiT-S/B, 8 for SiT-L/XL (REPA's choice), depth // 3 for custom sizes.
    Dispersive: depth // 4 (the paper's default)."""
    if reg == "dispersive":
        return max(1, depth // 4)
    if model_name is not None:
        size = model_name.split("-")[1].split("/")[0]
        return {"S": 4, "B": 4, "L": 8, "XL": 8}[size]
    return max(1, depth // 3)


def _build_none(args, hidden_size, depth, global_batch, device) -> Regulariser:
    return Regulariser()


def _build_dispersive(args, hidden_size, depth, global_batch, device) -> Regulariser:
    return Dispersive(depth, args.disp_variant, args.temperature, args.disp_margin, args.reg_t_max)


def _build_repulsor(args, hidden_size, depth, global_batch, device) -> Regulariser:
    return Repulsor(hidden_size, depth, args.proj_dim, args.proj_hidden, args.temperature, args.bank_size,
                    args.bank_dtype, global_batch, args.reg_pool, args.reg_t_max, device,
                    pairs=args.noise_pairs)


# name -> builder(args, hidden_size, depth_of_tap, global_batch_per_micro_step, device)
REGULARISERS: dict[str, Callable[..., Regulariser]] = {
    "none": _build_none,
    "dispersive": _build_dispersive,
    "repulsor": _build_repulsor,
}


def build_regulariser(args, model_name: str | None, hidden_size: int, model_depth: int,
                      global_batch: int, device: torch.device | str) -> Regulariser:
    if args.reg not in REGULARISERS:
        raise ValueError(f"unknown regulariser {args.reg!r}; choose one of {', '.join(REGULARISERS)}")
    depth = args.reg_depth if args.reg_depth is not None else default_reg_depth(args.reg, model_name, model_depth)
    if args.reg != "none" and not 1 <= depth <= model_depth:
        raise ValueError(f"--reg-depth {depth} is outside 1..{model_depth} for this model")
    return REGULARISERS[args.reg](args, hidden_size, depth, global_batch, device)
