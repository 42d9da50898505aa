"""Flow-matching loss and the representation regularisers (Repulsor, Dispersive, REPA).

Time convention, everywhere in this repository: t = 0 is data, t = 1 is noise.
    linear path:  x_t = (1 - t) x + t eps,                      v = eps - x
    cosine path:  x_t = cos(pi t / 2) x + sin(pi t / 2) eps,    v = d x_t / dt
The network predicts v. Loss math runs in fp32 even under autocast.

Regularisers plug into ONE seam of the training step: for every micro-batch train.py fills a
`Context` (clean latent, noise, t, x_t, condition, velocity prediction and target, the tokens of
block `reg.depth` from the same forward pass, the images if asked for, and a no-grad handle on the
EMA and online SiT) and calls `reg(ctx)`, which returns a dict of named terms with the
differentiable value under "reg"; total loss = velocity + reg_weight * terms["reg"].
A regulariser class also owns its command line: its flags, their checks, which of them a resume
may not change, its default block and its builder (the hooks of `Regulariser`). To add one,
subclass `Regulariser` and `register` it (docs/adding_an_objective.md); train.py is not edited.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from distributed import all_gather_cat, is_dist
from encoders import (DEFAULT_DINOV2, dinov2_inputs, encoder_identity, load_dinov2, looks_like_file,
                      patch_tokens)
from memory_bank import BANK_DTYPES, MemoryBank
from models.sit import SiT, SiTConfig

PATH_TYPES = ("linear", "cosine")  # with path_coefficients: the only definition of the paths (samplers too)
TIME_SAMPLINGS = ("uniform", "lognormal")


# ----------------------------------------------------------------------------- flow matching
def path_coefficients(path_type: str, t: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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


def sample_time(n: int, time_sampling: str, device: torch.device | str,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """t in (0, 1): uniform, or lognormal (sigma = exp(N(0, 1)), t = sigma / (1 + sigma))."""
    if time_sampling == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if time_sampling == "lognormal":
        sigma = torch.randn(n, device=device, generator=generator).exp()
        return sigma / (1 + sigma)
    raise ValueError(f"unknown time sampling {time_sampling!r}; choose one of {', '.join(TIME_SAMPLINGS)}")


def interpolate(path_type: str, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) for data x, noise and per-sample t (shape B)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    t = t if t.dtype == torch.float64 else t.float()  # float64 stays float64 (samplers), else fp32
    alpha, sigma, d_alpha, d_sigma = (c.view(shape) for c in path_coefficients(path_type, t))
    return alpha * x + sigma * noise, d_alpha * x + d_sigma * noise


def velocity_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32."""
    return (pred.float() - target.float()).pow(2).mean()


# ----------------------------------------------------------------------------- the seam
@dataclass
class Context:
    """What a regulariser sees of one micro-step. train.train_step fills the inputs, TrainModule the
    model's part; every field may be None outside training (tests build partial contexts)."""

    x: torch.Tensor | None = None  # clean latents as the model sees them (scaled), B x C x H x W
    noise: torch.Tensor | None = None  # eps, same shape
    t: torch.Tensor | None = None  # B times in (0, 1): 0 data, 1 noise
    x_t: torch.Tensor | None = None  # interpolate(path_type, x, noise, t)[0], the SiT's input
    target: torch.Tensor | None = None  # the velocity target
    y: torch.Tensor | None = None  # the condition: labels (B, int) or memory snippets (B x m)
    images: torch.Tensor | None = None  # uint8 B x H x W x C, only for a regulariser with needs_images
    path_type: str = "linear"
    pred: torch.Tensor | None = None  # the SiT's velocity prediction (with gradient)
    hidden: torch.Tensor | None = None  # tokens after block reg.depth, B x N x D, same pass (with gradient)
    drop: torch.Tensor | None = None  # B bool: where the null condition replaced y (None: nowhere)
    sit: nn.Module | None = None  # the online SiT (not DDP-wrapped); see hidden_at
    ema: nn.Module | None = None  # its EMA (train.py attaches one; None where a script did not)

    @torch.no_grad()
    def hidden_at(self, x_t: torch.Tensor, t: torch.Tensor, depth: int, model: str = "ema",
                  y: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens after block `depth` of the EMA ("ema") or online ("online") SiT at (x_t, t), without
        gradient, running only blocks 1..depth (under the step's autocast). The condition defaults to
        the student's (ctx.y with its null-condition mask ctx.drop); no random condition dropout."""
        if model not in ("ema", "online"):
            raise ValueError(f"model {model!r}: choose 'ema' or 'online'")
        net = self.ema if model == "ema" else self.sit
        if net is None:
            raise ValueError(f"no {model} model in the context: build TrainModule(sit, reg, ema) as train.py "
                             "does")
        if y is None:
            y, drop = self.y, self.drop if drop is None else drop
        if drop is None:  # an explicit mask: the pass draws no random numbers
            drop = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        return net.hidden_at(x_t, t, y, depth, drop=drop)


# ----------------------------------------------------------------------------- regularisers
def _block_rule(model_name: str | None, depth: int) -> int:
    """REPA's block: 4 for SiT-S/B, 8 for SiT-L/XL; depth // 3 for custom sizes."""
    if model_name is not None:
        return {"S": 4, "B": 4, "L": 8, "XL": 8}[model_name.split("-")[1].split("/")[0]]
    return max(1, depth // 3)


class Regulariser(nn.Module):
    """Base class of the regularisers: a module (its parameters train with the SiT and are
    checkpointed) plus the class-level hooks that own its command line.

    Instance: `depth` names the block whose tokens arrive as ctx.hidden (1-based); `forward(ctx)`
    returns named terms, the differentiable one under "reg" (the rest are logged as metrics).
    Class hooks, read through the registry (REGULARISERS) by train.py, demo.py and the benchmarks:
      name            --reg NAME
      add_args(group) declares the flags this class owns (a flag shared with a class registered
                      earlier is declared there once, and only listed here)
      checks(args)    (flag, ok, rule) triples: train.py turns a failed one into a one-line error
      must_match      args a resume may not change (the generic reg_weight, reg_depth and reg_t_max
                      are inherited); free_to_change: flags it may change. Every flag the class
                      declares must be in one of them (register() refuses the class otherwise)
      legacy_defaults the value of a must-match flag for checkpoints written before it existed
      set_by          must-match values that build() derives from a flag's weights rather than a flag
                      holds (REPA: repa_encoder_hash from --repa-encoder): the flag, for the resume refusal
      default_depth   its block when --reg-depth is not given (None: --reg-depth is required)
      build(...)      the instance for this run, given the built SiT (check blocks against it)
    Also: default_weight (--reg-weight when not given), needs_block (takes ctx.hidden; the default)
    and needs_images (train.py then loads each item's image and passes it as ctx.images).
    """

    name = ""
    needs_block = True
    needs_images = False
    default_weight = 0.5  # --reg-weight when not given
    must_match: tuple[str, ...] = ("reg_weight", "reg_depth", "reg_t_max")
    free_to_change: tuple[str, ...] = ()
    legacy_defaults: dict = {}
    set_by: dict = {}
    depth: int | None = None

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        pass

    @classmethod
    def checks(cls, args: argparse.Namespace) -> list[tuple[str, bool, str]]:
        return []

    @classmethod
    def default_depth(cls, model_name: str | None, depth: int) -> int | None:
        """The block for a SiT of `depth` blocks; model_name: its named size ("SiT-B/2"), or None for a
        custom or depth-overridden one."""
        return None

    @classmethod
    def build(cls, args: argparse.Namespace, model: SiT, depth: int | None, global_batch: int,
              device: torch.device | str, image_shape: tuple[int, ...] | None = None) -> Regulariser:
        """`model` is the built SiT (read it; do not keep it as an attribute, which would register it
        twice), `depth` the resolved block, `global_batch` the global batch of one micro-step,
        `image_shape` the data's stored images (H, W, C) or None."""
        raise NotImplementedError(f"regulariser {cls.name!r} has no build()")

    @classmethod
    def collapse_level(cls, args: dict) -> float | None:
        """The value of "reg" once the representation has collapsed, marked on the loss curve (None: none)."""
        return None

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> str:  # a line for the run's log at start
        return ""

    def diagnostics(self) -> dict[str, float]:  # health numbers read at log steps only (may sync)
        return {}

    def extra_state(self) -> dict:  # non-parameter state to checkpoint (e.g. the bank)
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class NoRegulariser(Regulariser):
    """--reg none: plain SiT. Its generic flags mean nothing, so a resume may change them."""

    name = "none"
    needs_block = False
    default_weight = 0.0
    must_match = ()
    free_to_change = Regulariser.must_match

    @classmethod
    def build(cls, args, model, depth, global_batch, device, image_shape=None) -> Regulariser:
        return cls()

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        return {}


def _time_mask(t: torch.Tensor, t_max: float) -> torch.Tensor:
    return (t <= t_max).float()


PROJ_HEADS = ("standardised", "centred", "running", "mlp")


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
    norm, the batch collapses to a point that chases its own trail in the bank. Normalising the head's
    outputs over the global batch before the L2 norm removes that shared direction:
      standardised  (u - mean_batch(u)) / std_batch(u), per dimension (BatchNorm without affine; the
                    default: every dimension keeps unit variance, so the projections cannot shrink
                    onto a few directions, which plain centring allows: bank effective rank ~4 of 128)
      centred       u - mean_batch(u)
      running       u - running mean of u (momentum 0.9; the current batch included)
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
    name = "repulsor"
    default_weight = 0.1  # the README's ablation
    must_match = Regulariser.must_match + ("temperature", "proj_dim", "proj_hidden", "bank_size",
                                           "bank_dtype", "reg_pool", "proj_head", "repulsor_batch_weight")
    legacy_defaults = {"proj_head": "mlp"}  # checkpoints from before --proj-head trained the uncentred head

    @classmethod
    def add_args(cls, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--temperature", type=float, default=0.5, help="tau (repulsor and dispersive)")
        g.add_argument("--proj-dim", type=int, default=128, help="repulsor: projection width d")
        g.add_argument("--proj-hidden", type=int, default=2048,
                       help="repulsor: head MLP width; repa: projector width")
        g.add_argument("--bank-size", type=int, default=65536,
                       help="repulsor: memory bank K (0 = in-batch only)")
        g.add_argument("--bank-dtype", type=str, default="fp32", choices=list(BANK_DTYPES))
        g.add_argument("--reg-pool", type=str, default="mean", choices=["mean"],
                       help="repulsor: token pooling")
        g.add_argument("--proj-head", type=str, default="standardised", choices=PROJ_HEADS,
                       help="repulsor: how head outputs are centred over the global batch before the L2 norm "
                            "(mlp: not at all, the head that collapses; see loss.Repulsor)")
        g.add_argument("--repulsor-batch-weight", type=float, default=1.0,
                       help="repulsor: weight of each in-batch negative against a bank negative (ablation)")

    @classmethod
    def checks(cls, args: argparse.Namespace) -> list[tuple[str, bool, str]]:
        return [("temperature", args.temperature > 0, "must be > 0"),
                ("proj_dim", args.proj_dim >= 1, "must be at least 1"),
                ("proj_hidden", args.proj_hidden >= 1, "must be at least 1"),
                ("bank_size", args.bank_size >= 0, "must be >= 0"),
                ("repulsor_batch_weight", args.repulsor_batch_weight > 0, "must be > 0")]

    @classmethod
    def default_depth(cls, model_name: str | None, depth: int) -> int:
        return _block_rule(model_name, depth)

    @classmethod
    def build(cls, args, model, depth, global_batch, device, image_shape=None) -> Regulariser:
        return cls(model.config.hidden_size, depth, args.proj_dim, args.proj_hidden, args.temperature,
                   args.bank_size, args.bank_dtype, global_batch, args.reg_pool, args.reg_t_max, device,
                   pairs=args.noise_pairs, head=args.proj_head, batch_weight=args.repulsor_batch_weight)

    @classmethod
    def collapse_level(cls, args: dict) -> float | None:
        """Every projection identical gives 1 / tau (the pair loss has no fixed collapse value)."""
        return None if args.get("noise_pairs") else 1 / args["temperature"]

    def __init__(self, hidden_size: int, depth: int, proj_dim: int = 128, proj_hidden: int = 2048,
                 temperature: float = 0.5, bank_size: int = 65536, bank_dtype: str = "fp32",
                 global_batch: int = 256, pool: str = "mean", t_max: float = 1.0,
                 device: torch.device | str = "cpu", pairs: bool = False, head: str = "standardised",
                 batch_weight: float = 1.0):
        super().__init__()
        if pool != "mean":
            raise ValueError(f"unknown pooling {pool!r}; only 'mean' is implemented")
        if head not in PROJ_HEADS:
            raise ValueError(f"unknown projection head {head!r}; choose one of {', '.join(PROJ_HEADS)}")
        if global_batch < 2:
            raise ValueError(f"Repulsor needs a global batch (per micro-step) of at least 2, got "
                             f"{global_batch}: the other samples of the batch are its first negatives")
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
        centre = running + rate * (mean - running)  # the running mean, this batch included with gradient
        with torch.no_grad():
            self.running_steps.copy_(steps)
            self.running_mean.copy_(torch.where(ok > 0, centre.detach(), running))
            var_next = self.running_var + rate * (var.detach() - self.running_var)
            self.running_var.copy_(torch.where(ok > 0, var_next, self.running_var))
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

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        t = ctx.t
        u = self.head(ctx.hidden.mean(dim=1)).float()
        b = u.shape[0]
        if self.t_max >= 1:  # t < 1 always: keep every anchor, gather u alone
            gathered, mask = all_gather_cat(u), None
        else:  # the mask rides along as an extra column: still one all-gather
            gathered = all_gather_cat(torch.cat([u, _time_mask(t, self.t_max)[:, None]], dim=1))
            gathered, mask = gathered[:, :-1], gathered[:, -1]
        batch = self._normalise(gathered)
        rank = dist.get_rank() if is_dist() else 0
        z = batch[rank * b: (rank + 1) * b]
        loss, logs = repulsor_loss(z, self.bank.negatives(), self.temperature, mask, batch=batch,
                                   pairs=self.pairs, batch_weight=self.batch_weight)
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
        # (not one_hot: it checks values on the host)
        is_self = cols[None, :] == cols[rank * b: (rank + 1) * b, None]
        with torch.no_grad():
            cos_sum = logits_batch.masked_fill(is_self, 0.0).sum() * temperature
            logs = {"batch_cos_mean": cos_sum / (b * max(n - 1, 1))}
        logits_batch = logits_batch.masked_fill(is_self, float("-inf"))
        lse = torch.logsumexp(logits_batch, dim=1) + (math.log(batch_weight) if batch_weight != 1 else 0.0)
        if bank.shape[0]:
            bank = bank.to(z.device, torch.float32)
            logits_bank = zt @ bank.T  # b x K: one batched product against the whole bank
            lse = torch.logaddexp(lse, torch.logsumexp(logits_bank, dim=1))
            with torch.no_grad():
                logs.update(bank_cos_mean=logits_bank.mean() * temperature,
                            bank_cos_max=logits_bank.max() * temperature)
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
    name = "dispersive"
    # --temperature is declared by Repulsor, the first registered regulariser that uses it
    must_match = Regulariser.must_match + ("temperature", "disp_variant", "disp_margin")

    @classmethod
    def add_args(cls, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--disp-variant", type=str, default="infonce_l2", choices=cls.VARIANTS)
        g.add_argument("--disp-margin", type=float, default=1.0, help="dispersive hinge margin")

    @classmethod
    def default_depth(cls, model_name: str | None, depth: int) -> int:
        return max(1, depth // 4)  # the paper's default

    @classmethod
    def build(cls, args, model, depth, global_batch, device, image_shape=None) -> Regulariser:
        return cls(depth, args.disp_variant, args.temperature, args.disp_margin, args.reg_t_max)

    def __init__(self, depth: int, variant: str = "infonce_l2", temperature: float = 0.5,
                 margin: float = 1.0, t_max: float = 1.0):
        super().__init__()
        if variant not in self.VARIANTS:
            raise ValueError(f"unknown dispersive variant {variant!r}; choose one of "
                             f"{', '.join(self.VARIANTS)}")
        self.depth, self.variant, self.temperature, self.margin = depth, variant, temperature, margin
        self.t_max = t_max

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        hidden, t = ctx.hidden, ctx.t
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
        return {"reg": dispersive_loss(z, self.variant, self.temperature, self.margin),
                "batch_cos_mean": cos_mean}

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """At log steps: the effective rank of this rank's last batch of (normalised) features."""
        gram = getattr(self, "_last_gram", None)
        return {} if gram is None else {"batch_eff_rank": effective_rank_from_gram(gram)}


def dispersive_loss(z: torch.Tensor, variant: str, temperature: float = 0.5,
                    margin: float = 1.0) -> torch.Tensor:
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

    name = "repa"
    needs_images = True
    must_match = Regulariser.must_match + ("proj_hidden", "repa_encoder_hash", "repa_encoder_config",
                                           "repa_image_size")  # --proj-hidden: Repulsor's
    free_to_change = ("repa_encoder",)  # a moved file or another id of the same weights: the hash decides
    set_by = {"repa_encoder_hash": "repa_encoder"}

    @classmethod
    def add_args(cls, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--repa-encoder", type=str, default=DEFAULT_DINOV2,
                       help="repa: frozen DINOv2 encoder: timm hub id, local weights file, or 'random' "
                            "(a control)")
        g.add_argument("--repa-encoder-config", type=str, default=None,
                       help="repa: JSON of timm.create_model overrides, e.g. a tiny test ViT "
                            "'{\"embed_dim\": 32, \"depth\": 1, \"num_heads\": 2}'")
        g.add_argument("--repa-image-size", type=int, default=None,
                       help="repa: encoder input size (default: REPA's 224 * R / 256 for R px images, "
                            "R a multiple of 256; else encoder patch x the SiT's grid side); its tokens must "
                            "equal the SiT's")
        # Filled in by build() and recorded with the run: the encoder's identity.
        g.set_defaults(repa_encoder_id=None, repa_encoder_hash=None)

    @classmethod
    def checks(cls, args: argparse.Namespace) -> list[tuple[str, bool, str]]:
        size = args.repa_image_size
        return [("repa_image_size", size is None or size >= 1, "must be at least 1")]

    @classmethod
    def default_depth(cls, model_name: str | None, depth: int) -> int:
        return _block_rule(model_name, depth)

    @classmethod
    def build(cls, args, model, depth, global_batch, device, image_shape=None) -> Regulariser:
        """REPA with the encoder of --repa-encoder (hub id, local file or 'random'). Records the encoder's
        id and hash, and the resolved input size, in `args` (so config.json and checkpoints carry them
        and a resume with another encoder is refused)."""
        if image_shape is None:
            raise ValueError("REPA needs the data's image shape (build_regulariser's image_shape=)")
        try:
            config = json.loads(args.repa_encoder_config) if args.repa_encoder_config else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"--repa-encoder-config is not valid JSON ({e}): pass e.g. "
                             f"'{{\"depth\": 1}}'") from None
        hub = args.repa_encoder != "random" and not looks_like_file(args.repa_encoder)
        found = re.search(r"patch(\d+)", args.repa_encoder) if hub else None  # e.g. vit_base_patch14_dinov2
        patch = int(config.get("patch_size") or (found.group(1) if found else 14))  # files: DINOv2's arch, 14
        size = repa_image_size(int(image_shape[0]), patch, model_tokens(model), args.repa_image_size)
        args.repa_encoder_id, args.repa_encoder_hash = encoder_identity(args.repa_encoder, args.seed)
        encoder = load_dinov2(args.repa_encoder, size, config, args.seed).to(device)
        if args.mixed_precision == "bf16":  # it runs under bf16 autocast anyway: bf16 weights halve memory
            encoder = encoder.to(torch.bfloat16)
        if tuple(encoder.patch_embed.grid_size) != (size // patch,) * 2:
            raise ValueError(f"encoder {args.repa_encoder!r} has patch {encoder.patch_embed.patch_size[0]}, "
                             f"not {patch}: set \"patch_size\" in --repa-encoder-config")
        args.repa_image_size = size
        reg = cls(model.config.hidden_size, depth, encoder, size, args.proj_hidden, args.reg_t_max,
                  pairs=args.noise_pairs)
        reg.encoder_id, reg.encoder_hash = args.repa_encoder_id, args.repa_encoder_hash
        return reg

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

    def describe(self) -> str:
        name = getattr(self, "encoder_id", None) or "an encoder"
        return (f"frozen encoder {name} ({getattr(self, 'encoder_hash', None)}), input {self.image_size} px "
                f"-> {self.z_dim}-d patch tokens; not trained, not checkpointed")

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        hidden, t, images = ctx.hidden, ctx.t, ctx.images
        if images is None:
            raise ValueError("REPA needs each item's image: open the dataset with images (train.py does so "
                             "for --reg repa)")
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
        raise ValueError(f"REPA: projected tokens {tuple(z.shape)} and encoder targets {tuple(target.shape)} "
                         "differ")
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
        raise ValueError(f"REPA's encoder would see {(size // patch) ** 2} patch tokens ({size} px, {why}) "
                         f"but the SiT has {sit_tokens}: train SiT-x/2 on an f8 VAE's latents, or pass "
                         f"--repa-image-size {patch * grid} (= {patch} x {grid}) to resize the encoder's input "
                         "to the SiT's grid")
    return size


# ----------------------------------------------------------------------------- encoder-free rivals
def _masked_mean(per_sample: torch.Tensor, t: torch.Tensor, t_max: float) -> torch.Tensor:
    """Mean over this rank's samples, or over those with t <= t_max (--reg-t-max < 1)."""
    if t_max >= 1:
        return per_sample.mean()
    mask = _time_mask(t, t_max)
    return (per_sample * mask).sum() / mask.sum().clamp(min=1)


def _sra_blocks(depth: int) -> tuple[int, int]:
    """SRA's (student, teacher) blocks for a SiT of `depth` blocks: 8 and 20 of SiT-XL's 28, scaled."""
    student = max(1, round(depth * 8 / 28))
    return student, min(depth, max(student + 1, round(depth * 20 / 28)))


SRA_COS_OVER = ("tokens", "features")


class SRA(Regulariser):
    """Self-representation alignment (SRA, arXiv 2505.02831): the online SiT's tokens after an early block
    (ctx.hidden, block `depth`), through a projector, are pulled towards the EMA SiT's tokens after a
    later block (`teacher_depth`) on the same image, noise and condition at a lower noise level,
        t_teacher = clamp(t - gap * u, 0, 1),  u ~ U(0, 1) per sample (SRA's "dynamic interval").
    The teacher pass runs without gradient and only up to its block (ctx.hidden_at on the EMA); the EMA
    is not a parameter, so it stays out of the optimizer, DDP and the regulariser's checkpoint.

    Loss 1 - cos, averaged. SRA's code takes the cosine over dim 1 of (B, tokens, features), i.e. over
    the tokens of each feature channel (`cos_over="tokens"`, the default, as the published runs
    trained); "features" is the per-token cosine REPA uses. Projector: SRA's head,
    Linear(D, 2D) -> SiLU -> Linear(2D, D) (--sra-proj-hidden sets the middle width).
    """

    name = "sra"
    default_weight = 0.5  # SRA's weight for the cosine loss
    must_match = Regulariser.must_match + ("sra_teacher_depth", "sra_t_gap", "sra_proj_hidden", "sra_cos_over")

    @classmethod
    def add_args(cls, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--sra-teacher-depth", type=int, default=None,
                       help="sra: EMA block aligned to (default: 20 of SiT-XL's 28, scaled: round(depth * 20 / 28))")
        g.add_argument("--sra-t-gap", type=float, default=0.2,
                       help="sra: the EMA sees t - gap * U(0, 1), clamped at 0 (SRA's --t-max)")
        g.add_argument("--sra-proj-hidden", type=int, default=None,
                       help="sra: projector width (default: 2 x the SiT's hidden size, SRA's head)")
        g.add_argument("--sra-cos-over", type=str, default="tokens", choices=list(SRA_COS_OVER),
                       help="sra: cosine over each channel's tokens (SRA's code) or each token's features")

    @classmethod
    def checks(cls, args: argparse.Namespace) -> list[tuple[str, bool, str]]:
        return [("sra_t_gap", 0 <= args.sra_t_gap <= 1, "must be in [0, 1]"),
                ("sra_proj_hidden", args.sra_proj_hidden is None or args.sra_proj_hidden >= 1, "must be at least 1"),
                ("sra_teacher_depth", args.sra_teacher_depth is None or args.sra_teacher_depth >= 1,
                 "must be at least 1")]

    @classmethod
    def default_depth(cls, model_name: str | None, depth: int) -> int:
        return _sra_blocks(depth)[0]

    @classmethod
    def build(cls, args, model, depth, global_batch, device, image_shape=None) -> Regulariser:
        n = model.config.depth
        teacher = args.sra_teacher_depth or _sra_blocks(n)[1]
        if not depth < teacher <= n:
            raise ValueError(f"--sra-teacher-depth {teacher} must be after the student's block {depth} and at most "
                             f"{n} for this model: pass --sra-teacher-depth in {depth + 1}..{n}")
        hidden = model.config.hidden_size
        return cls(hidden, depth, teacher, args.sra_t_gap, args.sra_proj_hidden or 2 * hidden, args.sra_cos_over,
                   args.reg_t_max)

    def __init__(self, hidden_size: int, depth: int, teacher_depth: int, gap: float = 0.2,
                 proj_hidden: int | None = None, cos_over: str = "tokens", t_max: float = 1.0):
        super().__init__()
        if cos_over not in SRA_COS_OVER:
            raise ValueError(f"cos_over {cos_over!r}: choose one of {', '.join(SRA_COS_OVER)}")
        self.depth, self.teacher_depth, self.gap, self.cos_over, self.t_max = depth, teacher_depth, gap, cos_over, t_max
        proj_hidden = proj_hidden or 2 * hidden_size
        self.proj = nn.Sequential(nn.Linear(hidden_size, proj_hidden), nn.SiLU(), nn.Linear(proj_hidden, hidden_size))
        for m in self.proj:  # SiT initialises every Linear this way (SRA's head is inside its SiT)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def describe(self) -> str:
        return (f"block {self.depth} -> projector -> EMA block {self.teacher_depth} at t - {self.gap:g} U(0, 1); "
                f"cosine over {self.cos_over}")

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        # One draw from the global RNG on the step's device: part of the checkpointed RNG state.
        t_teacher = (ctx.t - self.gap * torch.rand(ctx.t.shape, device=ctx.t.device)).clamp(0, 1)
        x_teacher, _ = interpolate(ctx.path_type, ctx.x, ctx.noise, t_teacher)  # same image and noise, less noise
        target = ctx.hidden_at(x_teacher, t_teacher, self.teacher_depth, model="ema")
        per_sample = sra_loss(self.proj(ctx.hidden), target, self.cos_over)
        return {"reg": _masked_mean(per_sample, ctx.t, self.t_max)}


def sra_loss(z: torch.Tensor, target: torch.Tensor, cos_over: str = "tokens") -> torch.Tensor:
    """Per-sample mean of 1 - cos(z, target) for B x N x D tokens, in fp32: the cosine over the N tokens of
    each channel ("tokens", SRA's code) or over the D features of each token ("features")."""
    if z.shape != target.shape:
        raise ValueError(f"SRA: projected tokens {tuple(z.shape)} and teacher tokens {tuple(target.shape)} differ")
    with torch.autocast(z.device.type, enabled=False):
        dim = 1 if cos_over == "tokens" else 2
        cos = F.cosine_similarity(z.float(), target.float(), dim=dim)  # B x D or B x N
        return (1 - cos).mean(1)


class DeltaFM(Regulariser):
    """Contrastive flow matching (ΔFM, arXiv 2506.05350): push each prediction away from another sample's
    velocity target,
        reg = -mean_i mean_elements (pred_i - target_j(i))^2,   j(i) uniform over this rank's batch minus i,
    so the total is the velocity MSE minus lambda (--reg-weight, ΔFM's 0.05) times the same error towards a
    negative. No parameters and no block. The negatives are drawn from the global RNG on the step's
    device (checkpointed, so a resume is exact). Under --noise-pairs a negative may be the twin (the same
    image at another time and noise), whose target differs.
    """

    name = "deltafm"
    needs_block = False
    default_weight = 0.05  # ΔFM's README (--contrastive-weight 0.05)
    must_match = Regulariser.must_match

    @classmethod
    def build(cls, args, model, depth, global_batch, device, image_shape=None) -> Regulariser:
        return cls(args.reg_t_max)

    def __init__(self, t_max: float = 1.0):
        super().__init__()
        self.t_max = t_max

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        b = ctx.pred.shape[0]
        if b < 2:
            raise ValueError("--reg deltafm needs at least 2 samples per rank and micro-batch for a negative: raise "
                             "--global-batch-size or lower --grad-accum-steps")
        others = (torch.arange(b, device=ctx.pred.device) + torch.randint(1, b, (b,), device=ctx.pred.device)) % b
        neg = deltafm_negative_error(ctx.pred, ctx.target, others)
        return {"reg": -_masked_mean(neg, ctx.t, self.t_max)}


def deltafm_negative_error(pred: torch.Tensor, target: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over elements of (pred_i - target_others[i])^2, in fp32."""
    return (pred.float() - target.float()[others]).pow(2).flatten(1).mean(1)


# ----------------------------------------------------------------------------- the registry
REGULARISERS: dict[str, type[Regulariser]] = {}  # --reg NAME -> class, in registration order


def register(cls: type[Regulariser]) -> type[Regulariser]:
    """Make `cls` a --reg choice (its flags, checks, resume rules and builder come with it)."""
    if not (isinstance(cls, type) and issubclass(cls, Regulariser)) or not cls.__dict__.get("name"):
        raise ValueError(f"{cls!r} is not a Regulariser subclass with its own `name`")
    if REGULARISERS.get(cls.name, cls) is not cls:
        raise ValueError(f"regulariser {cls.name!r} is registered already "
                         f"({REGULARISERS[cls.name].__name__})")
    problems = flag_problems(cls)
    if problems:
        raise ValueError(f"regulariser {cls.name!r}: {'; '.join(problems)}")
    REGULARISERS[cls.name] = cls
    return cls


def declared_flags(cls: type[Regulariser]) -> list[str]:
    """The argument names (dest) that cls.add_args declares."""
    group = argparse.ArgumentParser(add_help=False).add_argument_group(cls.name)
    cls.add_args(group)
    return [action.dest for action in group._group_actions]


def flag_problems(cls: type[Regulariser]) -> list[str]:
    """Flags of cls (its own and the generic ones) that are neither must-match on resume nor free to
    change: forgetting the list would let a resume change the objective silently."""
    listed = set(cls.must_match) | set(cls.free_to_change)
    flags = list(Regulariser.must_match) + declared_flags(cls)
    problems = [f"--{f.replace('_', '-')} is in neither must_match nor free_to_change" for f in flags
                if f not in listed]
    problems += [f"legacy default for {k!r}, which is not in must_match" for k in cls.legacy_defaults
                 if k not in cls.must_match]
    problems += [f"set_by {k!r}: not in must_match, or --{v.replace('_', '-')} is not its flag"
                 for k, v in cls.set_by.items() if k not in cls.must_match or v not in flags]
    return problems


def regulariser_class(name: str) -> type[Regulariser]:
    if name not in REGULARISERS:
        raise ValueError(f"unknown regulariser {name!r}; choose one of {', '.join(REGULARISERS)}")
    return REGULARISERS[name]


def add_regulariser_args(parser: argparse.ArgumentParser) -> None:
    """The generic regulariser flags, then one group per registered regulariser."""
    g = parser.add_argument_group("regulariser")
    g.add_argument("--reg", type=str, default="none", choices=list(REGULARISERS))
    weights = ", ".join(f"{n} {c.default_weight:g}" for n, c in REGULARISERS.items() if n != "none")
    g.add_argument("--reg-weight", type=float, default=None, help=f"lambda (default: {weights})")
    g.add_argument("--reg-depth", type=int, default=None,
                   help="block whose output is regularised, 1-based (default: the regulariser's: repulsor "
                        "and repa 4 for S/B, 8 for L/XL, depth // 3 custom; dispersive depth // 4; sra "
                        "round(depth * 8 / 28))")
    g.add_argument("--reg-t-max", type=float, default=1.0,
                   help="ablation: apply the term only where t <= this")
    g.add_argument("--reg-until", type=int, default=0,
                   help="stop the regulariser after this step (0 = never), as HASTE stops REPA; a resume may "
                        "change it")
    for name, cls in REGULARISERS.items():
        cls.add_args(parser.add_argument_group(name))


def regulariser_checks(args: argparse.Namespace) -> list[tuple[str, bool, str]]:
    """(flag, ok, rule) for the generic flags and every registered regulariser's own."""
    checks = [("reg_t_max", 0 < args.reg_t_max <= 1, "must be in (0, 1]"),
              ("reg_until", args.reg_until >= 0, "must be >= 0 (0 = never stop)")]
    for cls in REGULARISERS.values():
        checks += cls.checks(args)
    return checks


def default_reg_depth(reg: str, model_name: str | None, depth: int) -> int:
    """The block --reg REG uses without --reg-depth on a SiT of `depth` blocks (model_name: a named size, or
    None for a custom or depth-overridden one), e.g. Repulsor and REPA 4 for SiT-S/B, 8 for L/XL,
    depth // 3 custom; Dispersive depth // 4."""
    block = regulariser_class(reg).default_depth(model_name, depth)
    if block is None:
        raise ValueError(f"--reg {reg} declares no default block: pass --reg-depth")
    return block


def needs_images(name: str) -> bool:
    """Whether --reg NAME reads each item's image: train.py then opens the dataset with images (and
    refuses data without them) before building anything; every other run reads no image bytes."""
    return regulariser_class(name).needs_images


def model_tokens(model: SiT) -> int:
    return (model.config.input_size // model.config.patch_size) ** 2


def build_regulariser(args: argparse.Namespace, model: SiT, global_batch: int, device: torch.device | str,
                      *legacy, image_shape: tuple[int, ...] | None = None, tokens: int | None = None
                      ) -> Regulariser:
    """The regulariser of --reg for the built SiT `model` (its block checked against the model's depth).
    global_batch: the global batch of one micro-step; image_shape: the data's stored images (H, W, C).
    The named size for the default block comes from args (--model, unless --depth overrides it).

    The older call, build_regulariser(args, model_name, hidden_size, depth, global_batch, device,
    tokens=, image_shape=), still works: its builder sees a stand-in with the model's config only.
    """
    if isinstance(model, nn.Module):
        if legacy or tokens is not None:
            raise TypeError("build_regulariser(args, model, global_batch, device, image_shape=None)")
        named = None if args.model == "custom" or args.depth is not None else args.model
    else:  # the older call (args, model_name, hidden_size, depth, global_batch, device): no SiT, its config
        if len(legacy) != 2:
            raise TypeError("build_regulariser(args, model, global_batch, device, image_shape=None)")
        named, hidden_size, depth, (global_batch, device) = model, global_batch, device, legacy
        side = math.isqrt(tokens) if tokens else 1
        model = argparse.Namespace(config=SiTConfig(hidden_size=hidden_size, depth=depth, input_size=side,
                                                    patch_size=1))
    cls = regulariser_class(args.reg)
    depth = None
    if cls.needs_block:
        n = model.config.depth
        depth = args.reg_depth if args.reg_depth is not None else default_reg_depth(args.reg, named, n)
        if not 1 <= depth <= n:
            raise ValueError(f"--reg-depth {depth} is outside 1..{n} for this model")
    reg = cls.build(args, model, depth, global_batch, device, image_shape=image_shape)
    if reg.depth != depth:
        raise ValueError(f"the builder of {args.reg!r} made a regulariser of block {reg.depth}, not {depth}")
    return reg


for _cls in (NoRegulariser, Dispersive, Repulsor, REPA, SRA, DeltaFM):
    register(_cls)
