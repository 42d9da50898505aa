"""Flow-matching loss and the representation regularisers (Repulsor, Dispersive, REPA).

Time convention, everywhere in this repository: t = 0 is data, t = 1 is noise.
    linear path:  x_t = (1 - t) x + t eps,                      v = eps - x
    cosine path:  x_t = cos(pi t / 2) x + sin(pi t / 2) eps,    v = d x_t / dt
The network predicts v. Loss math runs in fp32 even under autocast.

Regularisers plug into ONE seam of the training step: `train.py` asks the SiT for the hidden
state after block `reg.depth` and calls `reg(hidden, t, images)`, which returns a dict of named
terms with the differentiable value under "reg"; total loss = velocity + reg_weight * terms["reg"].
`images` (uint8 B x H x W x C) is passed only to a regulariser with `needs_images` (REPA): the
dataset then also returns each item's stored image, and nobody else reads image bytes.
To add a regulariser, subclass `Regulariser` and register it in `REGULARISERS`.
"""
from __future__ import annotations

import json
import math
import re
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from distributed import all_gather_cat, is_dist
from encoders import dinov2_inputs, encoder_identity, load_dinov2, looks_like_file, patch_tokens
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
    """Base class: `depth` names the block whose output it needs (1-based); None = none.
    `needs_images`: the regulariser reads each item's image (train.py then loads and passes them)."""

    depth: int | None = None
    needs_images: bool = False

    def forward(self, hidden: torch.Tensor | None, t: torch.Tensor,
                images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {}

    def diagnostics(self) -> dict[str, float]:  # health numbers read at log steps only (may sync)
        return {}

    def extra_state(self) -> dict:  # non-parameter state to checkpoint (e.g. the bank)
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


def _time_mask(t: torch.Tensor, t_max: float) -> torch.Tensor:
    return (t <= t_max).float()


PROJ_HEADS = ("centred", "standardised", "running", "mlp")


class Repulsor(Regulariser):
    """Pooled hidden state -> MLP head -> unit vector; InfoNCE-style repulsion from the other
    samples of the global batch and a FIFO memory bank of earlier steps' projections.

        L_i = logsumexp_n(<z_i, n> / tau) - log(#negatives)

    Negatives: the other samples of the global batch and the filled part of the bank (no
    gradient). Subtracting log(#negatives) turns the sum into a log-mean-exp, so values are
    comparable across bank sizes; every projection identical gives L = 1 / tau (collapse).

    Why the head centres (`head`, --proj-head): pooled block features share a large mean, so with
    a bank of stale negatives every sample gets nearly the same gradient (away from the bank's
    mean); Adam turns that rank-one gradient into one shared output direction and, after the L2
    norm, the batch collapses to a point that chases its own trail in the bank. Centring the head's
    outputs over the global batch before the L2 norm removes that shared direction:
      centred       u - mean_batch(u)                (the default)
      standardised  (u - mean_batch(u)) / std_batch(u), per dimension (BatchNorm without affine)
      running       u - running mean of u (momentum 0.9, bias-corrected; current batch included)
      mlp           u itself (the collapsing head before the fix; an ablation)
    Statistics come from the gathered GLOBAL batch (after the single all-gather), so N ranks x b
    still train exactly like 1 rank x N b. Running mean and variance are kept for every head (as
    BatchNorm does) and used in eval mode, e.g. for GMem snippets from a single image.
    batch_weight (--repulsor-batch-weight): each in-batch negative counts this many times against
    a bank negative (ablation of in-batch against bank weight; 1 = all negatives alike).

    pairs=True (train.py --noise-pairs): each rank's micro-batch is [images, same images], every
    image at two independent times and noises; the twin (row i + b/2 mod b on the same rank) is
    the positive and the loss is InfoNCE, L_i = logsumexp_{n != i}(<z_i, n> / tau) - <z_i, z_twin> / tau,
    over the twin, the rest of the global batch and the bank.

    The global batch is all-gathered ONCE per micro-step, with gradient
    (distributed.all_gather_cat); after the loss the same gathered batch is enqueued (after, so a
    sample never meets itself in the bank).
    """

    MOMENTUM = 0.9  # running statistics (the `running` head's centre; eval mode for every head)

    def __init__(self, hidden_size: int, depth: int, proj_dim: int = 128, proj_hidden: int = 2048,
                 temperature: float = 0.5, bank_size: int = 65536, bank_dtype: str = "fp32",
                 global_batch: int = 256, pool: str = "mean", t_max: float = 1.0,
                 device: torch.device | str = "cpu", pairs: bool = False, head: str = "centred",
                 batch_weight: float = 1.0):
        super().__init__()
        if pool != "mean":
            raise ValueError(f"unknown pooling {pool!r}; only 'mean' is implemented")
        if head not in PROJ_HEADS:
            raise ValueError(f"unknown projection head {head!r}; choose one of {', '.join(PROJ_HEADS)}")
        if global_batch < 2:
            raise ValueError(f"Repulsor needs a global batch (per micro-step) of at least 2, got {global_batch}: "
                             "the other samples of the batch are its first negatives")
        self.depth, self.temperature, self.t_max, self.pairs = depth, temperature, t_max, pairs
        self.head_kind, self.batch_weight = head, batch_weight
        self.head = nn.Sequential(
            nn.Linear(hidden_size, proj_hidden), nn.SiLU(),
            nn.Linear(proj_hidden, proj_hidden), nn.SiLU(),
            nn.Linear(proj_hidden, proj_dim, bias=head == "mlp"),  # a bias would only be centred away
        )
        self.register_buffer("running_mean", torch.zeros(proj_dim, device=device))
        self.register_buffer("running_var", torch.ones(proj_dim, device=device))
        self.register_buffer("running_steps", torch.zeros((), device=device))  # batches averaged so far
        self.bank = MemoryBank(bank_size, proj_dim, global_batch, bank_dtype, device)
        self._last_batch: torch.Tensor | None = None  # for the log-step diagnostics

    def _normalise(self, u: torch.Tensor) -> torch.Tensor:
        """Raw head outputs of the global batch (B x d, fp32) -> unit vectors, centred as `head_kind` says."""
        if not self.training:  # one image at a time works: the running statistics stand in for the batch
            if self.head_kind == "mlp":
                return F.normalize(u, dim=-1)
            u = u - self.running_mean
            if self.head_kind == "standardised":
                u = u / (self.running_var + 1e-5).sqrt()
            return F.normalize(u, dim=-1)
        mean, var = u.mean(0), u.var(0, unbiased=False)
        # Running statistics: a plain average over the first 1 / (1 - m) steps, then an EMA (no bias to
        # correct); a non-finite batch (a step train.py skips) leaves them alone, decided without a sync.
        ok = (torch.isfinite(mean).all() & torch.isfinite(var).all()).float()
        steps = self.running_steps + ok
        rate = ok * torch.clamp(1 / steps.clamp(min=1), min=1 - self.MOMENTUM)
        running = self.running_mean.clone()
        centre = running + rate * (mean - running)  # the running mean, the current batch included with gradient
        with torch.no_grad():
            self.running_steps.copy_(steps)
            self.running_mean.copy_(torch.where(ok > 0, centre.detach(), running))
            self.running_var.copy_(torch.where(ok > 0, self.running_var + rate * (var.detach() - self.running_var),
                                               self.running_var))
        if self.head_kind == "centred":
            u = u - mean
        elif self.head_kind == "standardised":
            u = (u - mean) / (var + 1e-5).sqrt()
        elif self.head_kind == "running":
            u = u - centre
        return F.normalize(u, dim=-1)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """B x N x D tokens -> unit projections (batch statistics in training, running ones in eval)."""
        return self._normalise(self.head(hidden.mean(dim=1)).float())

    def forward(self, hidden: torch.Tensor | None, t: torch.Tensor,
                images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        u = self.head(hidden.mean(dim=1)).float()
        b = u.shape[0]
        if self.t_max >= 1:  # t < 1 always: keep every anchor, gather u alone
            gathered, mask = all_gather_cat(u), None
        else:  # the mask rides along as an extra column: still one all-gather
            gathered = all_gather_cat(torch.cat([u, _time_mask(t, self.t_max)[:, None]], dim=1))
            gathered, mask = gathered[:, :-1], gathered[:, -1]
        batch = self._normalise(gathered)
        rank = dist.get_rank() if is_dist() else 0
        z = batch[rank * b: (rank + 1) * b]
        loss, logs = repulsor_loss(z, self.bank.negatives(), self.temperature, mask, batch=batch, pairs=self.pairs,
                                   batch_weight=self.batch_weight)
        self.bank.enqueue(batch.detach())
        self._last_batch = batch.detach()
        logs["bank_fill"] = torch.tensor(self.bank.fill_fraction)
        return {"reg": loss, **logs}

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """Read at log steps only (one host sync): the effective rank of the bank's projections (of the
        last global batch before the bank holds proj_dim rows), and of the last batch."""
        if self._last_batch is None:
            return {}
        filled = self.bank.negatives()
        source = filled if filled.shape[0] >= self.bank.dim else self._last_batch
        return {"proj_eff_rank": effective_rank(source), "batch_eff_rank": effective_rank(self._last_batch)}

    def extra_state(self) -> dict:
        return {"bank": self.bank.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "bank" in state:
            self.bank.load_state_dict(state["bank"])


def effective_rank(rows: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of an n x d matrix (Roy and Vetterli): 1 for rows on
    one line, min(n, d) for an isotropic cloud. Through the smaller Gram matrix, in float64 on the host."""
    rows = rows.float()
    return effective_rank_from_gram(rows.T @ rows if rows.shape[0] >= rows.shape[1] else rows @ rows.T)


def effective_rank_from_gram(gram: torch.Tensor) -> float:
    """effective_rank of M from its Gram matrix M M^T or M^T M (the same nonzero eigenvalues)."""
    s = torch.linalg.eigvalsh(gram.double().cpu()).clamp(min=0).sqrt()
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def repulsor_loss(z: torch.Tensor, bank: torch.Tensor, temperature: float, mask: torch.Tensor | None = None,
                  batch: torch.Tensor | None = None, pairs: bool = False, batch_weight: float = 1.0
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
    batch_weight: each in-batch negative counts this many times (log w added to its logit); the
    normaliser becomes log(w (B - 1) + K), so identical projections still give 1 / tau.
    Logs (no gradient): batch_cos_mean, the mean cosine of this rank's anchors with the other samples
    of the global batch (1 = the batch has collapsed to a point), and the bank's bank_cos_mean/max.
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
        with torch.no_grad():
            logs = {"batch_cos_mean": logits_batch.masked_fill(is_self, 0.0).sum() * temperature / (b * max(n - 1, 1))}
        logits_batch = logits_batch.masked_fill(is_self, float("-inf"))
        lse = torch.logsumexp(logits_batch, dim=1) + (math.log(batch_weight) if batch_weight != 1 else 0.0)
        if bank.shape[0]:
            bank = bank.to(z.device, torch.float32)
            logits_bank = zt @ bank.T  # b x K: one batched product against the whole bank
            lse = torch.logaddexp(lse, torch.logsumexp(logits_bank, dim=1))
            with torch.no_grad():
                logs.update(bank_cos_mean=logits_bank.mean() * temperature, bank_cos_max=logits_bank.max() * temperature)
        if pairs:
            twin = rank * b + (cols[:b] + b // 2) % b  # column of each anchor's twin in the global batch
            positive = logits_batch.gather(1, twin[:, None])[:, 0]
            per_sample = lse - positive
            logs["pair_cos"] = positive.detach().mean() * temperature
        else:
            per_sample = lse - math.log(batch_weight * (n - 1) + bank.shape[0])
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

    def forward(self, hidden: torch.Tensor | None, t: torch.Tensor,
                images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z = hidden.reshape(hidden.shape[0], -1).float()
        if self.t_max < 1:  # ablation only: boolean indexing syncs with the host; t < 1 always, so
            z = z[t <= self.t_max]  # the default t_max 1 decides in Python and never syncs
        if z.shape[0] < 2:
            return {"reg": hidden.sum() * 0.0}
        with torch.no_grad():  # uniformity of the regularised features: 1 = every sample the same direction
            u = F.normalize(z.detach(), dim=1)
            self._last_gram = u @ u.T
            n = u.shape[0]
            cos_mean = (self._last_gram.sum() - self._last_gram.diagonal().sum()) / (n * (n - 1))
        return {"reg": dispersive_loss(z, self.variant, self.temperature, self.margin), "batch_cos_mean": cos_mean}

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """At log steps: the effective rank of this rank's last batch of (normalised) features."""
        gram = getattr(self, "_last_gram", None)
        return {} if gram is None else {"batch_eff_rank": effective_rank_from_gram(gram)}


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


class REPA(Regulariser):
    """REPA (Yu et al., 2025): align the SiT's tokens after block `depth`, through a per-token MLP
    projector (hidden -> 2048 -> SiLU -> 2048 -> SiLU -> z_dim), with the patch tokens of a frozen
    pretrained encoder (DINOv2 ViT-B/14) on the clean image:

        L = mean over samples and tokens of -cos(projector(h_n), y_n)

    The encoder runs frozen, in eval mode, without gradient, under the caller's autocast. It is
    deliberately NOT a submodule: it stays outside state_dict (the checkpoint records only its id
    and hash, through train.py's arguments), DDP's parameters, the optimizer, the EMA and the
    training module's `.to()` / `.train()`. Its input: encoders.dinov2_inputs at `image_size`.
    """

    needs_images = True

    def __init__(self, hidden_size: int, depth: int, encoder: nn.Module, image_size: int,
                 proj_hidden: int = 2048, t_max: float = 1.0, pairs: bool = False):
        super().__init__()
        self.depth, self.image_size, self.t_max, self.pairs = depth, image_size, t_max, pairs
        self.z_dim = int(encoder.num_features)
        self.projector = nn.Sequential(
            nn.Linear(hidden_size, proj_hidden), nn.SiLU(),
            nn.Linear(proj_hidden, proj_hidden), nn.SiLU(),
            nn.Linear(proj_hidden, self.z_dim),
        )
        for m in self.projector:  # REPA initialises every Linear of its SiT (projectors included) this way
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        object.__setattr__(self, "encoder", encoder.eval().requires_grad_(False))  # unregistered on purpose

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 B x H x W x C images -> the encoder's patch tokens, B x N x z_dim (no gradient)."""
        dtype = next(self.encoder.parameters()).dtype  # bf16 weights in bf16 runs (also outside autocast)
        return patch_tokens(self.encoder, dinov2_inputs(images, self.image_size).to(dtype))

    def forward(self, hidden: torch.Tensor | None, t: torch.Tensor,
                images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if images is None:
            raise ValueError("REPA needs each item's image: open the dataset with images (train.py does so for "
                             "--reg repa)")
        if self.pairs:  # [images, same images] (--noise-pairs): encode each image once
            half = images.shape[0] // 2
            target = self.targets(images[:half]).repeat(2, 1, 1)
        else:
            target = self.targets(images)
        mask = _time_mask(t, self.t_max) if self.t_max < 1 else None
        return {"reg": repa_loss(self.projector(hidden), target, mask)}


def repa_loss(z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over samples and tokens of -cos(z, target), for z and target B x N x D, in fp32 (also under
    autocast). mask (B, 0 or 1): the mean over the kept samples of this rank (all samples: None)."""
    if z.shape != target.shape:
        raise ValueError(f"REPA: projected tokens {tuple(z.shape)} and encoder targets {tuple(target.shape)} differ")
    with torch.autocast(z.device.type, enabled=False):
        cos = (F.normalize(z.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1)  # B x N
        per_sample = -cos.mean(1)
        if mask is None:
            return per_sample.mean()
        mask = mask.float()
        return (per_sample * mask).sum() / mask.sum().clamp(min=1)


def repa_image_size(resolution: int, patch: int, sit_tokens: int, override: int | None = None) -> int:
    """The encoder's input size, so that it has as many patch tokens as the SiT.

    REPA's rule: 224 * (R // 256) for DINOv2-B/14, i.e. one encoder patch per 16 image pixels
    (patch * R / 16), when R is a multiple of 256: 256 px -> 224 (16 x 16 = 256 tokens, as SiT-x/2
    on 32 x 32 latents), 512 px -> 448 (1024 tokens; the position embedding is resampled at load).
    Other resolutions (e.g. small pixel-space data): patch x the SiT's grid side. `override`
    (--repa-image-size) replaces the rule. A token count that differs from the SiT's is refused.
    """
    grid = math.isqrt(sit_tokens)
    if override:
        size, why = override, "--repa-image-size"
    elif resolution % 256 == 0:
        size, why = patch * resolution // 16, f"REPA's size for {resolution} px images"
    else:
        size, why = patch * grid, f"patch {patch} x the SiT's grid side {grid}"
    if size % patch or (size // patch) ** 2 != sit_tokens:
        raise ValueError(f"REPA's encoder would see {(size // patch) ** 2} patch tokens ({size} px, {why}) but the SiT "
                         f"has {sit_tokens}: train SiT-x/2 on an f8 VAE's latents, or pass --repa-image-size "
                         f"{patch * grid} (= {patch} x {grid}) to resize the encoder's input to the SiT's grid")
    return size


def default_reg_depth(reg: str, model_name: str | None, depth: int) -> int:
    """Repulsor and REPA: block 4 for SiT-S/B, 8 for SiT-L/XL (REPA's choice), depth // 3 for custom
    sizes. Dispersive: depth // 4 (the paper's default)."""
    if reg == "dispersive":
        return max(1, depth // 4)
    if model_name is not None:
        size = model_name.split("-")[1].split("/")[0]
        return {"S": 4, "B": 4, "L": 8, "XL": 8}[size]
    return max(1, depth // 3)


def _build_none(args, hidden_size, depth, global_batch, device, **_) -> Regulariser:
    return Regulariser()


def _build_dispersive(args, hidden_size, depth, global_batch, device, **_) -> Regulariser:
    return Dispersive(depth, args.disp_variant, args.temperature, args.disp_margin, args.reg_t_max)


def _build_repulsor(args, hidden_size, depth, global_batch, device, **_) -> Regulariser:
    return Repulsor(hidden_size, depth, args.proj_dim, args.proj_hidden, args.temperature, args.bank_size,
                    args.bank_dtype, global_batch, args.reg_pool, args.reg_t_max, device,
                    pairs=args.noise_pairs, head=args.proj_head, batch_weight=args.repulsor_batch_weight)


def _build_repa(args, hidden_size, depth, global_batch, device, tokens=None, image_shape=None) -> Regulariser:
    """REPA with the encoder of --repa-encoder (hub id, local file or 'random'). Records the encoder's
    id and hash, and the resolved input size, in `args` (so config.json and checkpoints carry them
    and a resume with another encoder is refused)."""
    if tokens is None or image_shape is None:
        raise ValueError("REPA needs the SiT's token count and the data's image shape (build_regulariser's "
                         "tokens= and image_shape=)")
    try:
        config = json.loads(args.repa_encoder_config) if args.repa_encoder_config else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--repa-encoder-config is not valid JSON ({e}): pass e.g. '{{\"depth\": 1}}'") from None
    hub = args.repa_encoder != "random" and not looks_like_file(args.repa_encoder)
    found = re.search(r"patch(\d+)", args.repa_encoder) if hub else None  # e.g. vit_base_patch14_dinov2
    patch = int(config.get("patch_size") or (found.group(1) if found else 14))  # files: DINOv2's arch, 14
    size = repa_image_size(int(image_shape[0]), patch, tokens, args.repa_image_size)
    args.repa_encoder_id, args.repa_encoder_hash = encoder_identity(args.repa_encoder, args.seed)
    encoder = load_dinov2(args.repa_encoder, size, config, args.seed).to(device)
    if args.mixed_precision == "bf16":  # it runs under bf16 autocast anyway: bf16 weights halve its memory
        encoder = encoder.to(torch.bfloat16)
    if tuple(encoder.patch_embed.grid_size) != (size // patch,) * 2:
        raise ValueError(f"encoder {args.repa_encoder!r} has patch {encoder.patch_embed.patch_size[0]}, not "
                         f"{patch}: set \"patch_size\" in --repa-encoder-config")
    args.repa_image_size = size
    return REPA(hidden_size, depth, encoder, size, args.proj_hidden, args.reg_t_max, pairs=args.noise_pairs)


# name -> builder(args, hidden_size, depth_of_tap, global_batch_per_micro_step, device, tokens=, image_shape=)
# (tokens: the SiT's token count; image_shape: the data's stored H x W x C images, or None)
REGULARISERS: dict[str, Callable[..., Regulariser]] = {
    "none": _build_none,
    "dispersive": _build_dispersive,
    "repulsor": _build_repulsor,
    "repa": _build_repa,
}
_build_repa.needs_images = REPA.needs_images  # read by needs_images() before anything is built


def needs_images(name: str) -> bool:
    """Whether --reg NAME reads each item's image: train.py then opens the dataset with images (and
    refuses data without them) before building anything; every other run reads no image bytes."""
    return bool(getattr(REGULARISERS.get(name), "needs_images", False))


def build_regulariser(args, model_name: str | None, hidden_size: int, model_depth: int,
                      global_batch: int, device: torch.device | str, tokens: int | None = None,
                      image_shape: tuple[int, ...] | None = None) -> Regulariser:
    if args.reg not in REGULARISERS:
        raise ValueError(f"unknown regulariser {args.reg!r}; choose one of {', '.join(REGULARISERS)}")
    depth = args.reg_depth if args.reg_depth is not None else default_reg_depth(args.reg, model_name, model_depth)
    if args.reg != "none" and not 1 <= depth <= model_depth:
        raise ValueError(f"--reg-depth {depth} is outside 1..{model_depth} for this model")
    reg = REGULARISERS[args.reg](args, hidden_size, depth, global_batch, device, tokens=tokens,
                                 image_shape=image_shape)
    if reg.needs_images != needs_images(args.reg):
        raise ValueError(f"the builder of {args.reg!r} and its regulariser disagree on needs_images")
    return reg
