"""Train SiT by flow matching on precomputed latents, optionally with a representation regulariser.

    python train.py --data-dir DATA ...                              # one process
    torchrun --nproc_per_node=8 train.py --data-dir DATA ...         # DDP, NCCL on GPUs, gloo on CPU

Everything the run needs is in its run directory (RESULTS/EXP): config.json, log.txt,
metrics.jsonl, checkpoints/NNNNNNN.pt (atomic), sample grids and the loss curve PNG.
Time convention: t = 0 data, t = 1 noise (see loss.py). A regulariser brings its own flags,
checks, resume rules and builder through loss.py's registry: adding one does not touch this file.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoint import (CheckpointError, RunLock, checkpoints_newest_first, load_checkpoint,
                        newest_loadable_checkpoint, remove_stale_temp_files, save_checkpoint)
from dataset import (DataError, DistributedEpochSampler, LatentDataset, atomic_write_json, data_fingerprint,
                     fingerprint_mismatch, latent_scale_shift, sample_latents)
from distributed import (DistInfo, StopSignals, add_preempt_arg, barrier, cleanup, host_group, ignore_stop_signals,
                         init_distributed, is_dist)
from gmem import MemoryBankError, MemoryDataset, SnippetMemory, open_dataset_memory
from loss import (PATH_TYPES, TIME_SAMPLINGS, Context, NoRegulariser, Regulariser, add_regulariser_args,
                  build_regulariser, interpolate, needs_images, regulariser_checks, regulariser_class,
                  sample_time, velocity_loss)
from models.sit import SiT, SiT_models, build_sit, load_sit_state_dict


class TrainError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


# Flags that define the objective or the data order (--seed and --grad-accum-steps decide the order
# and the Repulsor's in-batch negatives): --resume refuses to change them. The regulariser's own
# come from its class (loss.Regulariser.must_match). A value a checkpoint did not record (None) is
# not checked.
RESUME_MUST_MATCH = ("global_batch_size", "grad_accum_steps", "seed", "path_type", "time_sampling", "reg",
                     "cond", "noise_pairs")


# ----------------------------------------------------------------------------- flags
def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_args(p.add_argument_group("run"))
    add_model_args(p.add_argument_group("model"))
    add_optimisation_args(p.add_argument_group("optimisation"))
    add_flow_matching_args(p.add_argument_group("flow matching"))
    add_regulariser_args(p)  # --reg, --reg-weight, --reg-depth, --reg-t-max, then a group per regulariser
    add_logging_args(p.add_argument_group("logging and checkpoints"))
    args = p.parse_args(argv)  # unknown flags are an error
    if args.reg_weight is None:
        args.reg_weight = regulariser_class(args.reg).default_weight
    if args.memory is not None and args.cond != "memory":
        p.error("--memory needs --cond memory")
    if args.model == "custom":
        missing = [f for f in ("depth", "hidden_size", "num_heads", "patch_size") if getattr(args, f) is None]
        if missing:
            p.error(f"--model custom needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
    validate_args(args)
    if args.exp_name is None:
        args.exp_name = default_exp_name(args)
    return args


def add_run_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--data-dir", type=str, required=True,
                   help="dataset directory written by preprocessing/encode.py")
    g.add_argument("--results-dir", type=str, default="results")
    g.add_argument("--exp-name", type=str, default=None,
                   help="run directory name (default: derived from model and regulariser)")
    g.add_argument("--resume", type=str, default="auto",
                   help="'auto': continue from the newest checkpoint in the run directory if there is one; "
                        "'none': start fresh (refuses a run directory that holds checkpoints); or a "
                        "checkpoint path")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dist-timeout-min", type=float, default=60.0,
                   help="minutes a collective may wait (ranks wait while rank 0 writes a checkpoint)")
    add_preempt_arg(g)  # SIGTERM / SIGUSR1: finish the step, checkpoint, exit with this code


def add_model_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--model", type=str, default="SiT-B/2", choices=list(SiT_models) + ["custom"],
                   help="named size; 'custom' builds from --depth/--hidden-size/--num-heads/--patch-size")
    g.add_argument("--depth", type=int, default=None, help="override the named model's depth")
    g.add_argument("--hidden-size", type=int, default=None, help="override the named model's width")
    g.add_argument("--num-heads", type=int, default=None)
    g.add_argument("--patch-size", type=int, default=None)
    g.add_argument("--qk-norm", action="store_true", help="LayerNorm on queries and keys")
    g.add_argument("--num-classes", type=int, default=None, help="default: from the data manifest")
    g.add_argument("--cond", type=str, default="class", choices=["class", "memory"],
                   help="condition on the class label, or (GMem) on the item's own memory snippet from a "
                        "bank built by preprocessing/memory.py")
    g.add_argument("--memory", type=str, default=None,
                   help="--cond memory: name of the dataset's memory bank (default: its only one)")
    g.add_argument("--cfg-prob", type=float, default=0.1,
                   help="probability of replacing the condition (label or whole snippet) by the learned null "
                        "(classifier-free guidance)")


def add_optimisation_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--global-batch-size", type=int, default=256)
    g.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--max-steps", type=int, default=400_000)
    g.add_argument("--mixed-precision", type=str, default="no", choices=["no", "bf16", "fp16"])
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="allow TF32 in CUDA matmuls and convolutions (the same default as sample_ddp.py; "
                        "--no-tf32 for true fp32; no effect on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the SiT")
    g.add_argument("--ema-decay", type=float, default=0.9999)
    g.add_argument("--max-skipped-steps", type=int, default=100,
                   help="fp16: stop after this many consecutive steps skipped for non-finite gradients "
                        "(bf16 and fp32 stop at the first non-finite step)")
    g.add_argument("--ema-warmup", action="store_true",
                   help="decay = min(ema-decay, (1 + step) / (10 + step)); needed for short runs, whose "
                        "plain EMA stays at the zero-output initialisation")


def add_flow_matching_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--path-type", type=str, default="linear", choices=PATH_TYPES)
    g.add_argument("--time-sampling", type=str, default="uniform", choices=TIME_SAMPLINGS)
    g.add_argument("--noise-pairs", action="store_true",
                   help="each image twice per batch, at two independent times and noises (so B/2 images per "
                        "step); with --reg repulsor the twin is the InfoNCE positive")


def add_logging_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--num-workers", type=int, default=4)
    g.add_argument("--log-every", type=int, default=100)
    g.add_argument("--ckpt-every", type=int, default=10_000)
    g.add_argument("--sample-every", type=int, default=0, help="EMA sample grid every N steps (0 = never)")
    g.add_argument("--sample-steps", type=int, default=50, help="Heun ODE steps for the training grids")
    g.add_argument("--report-to", type=str, default="none", choices=["none", "tensorboard", "wandb"])


def validate_args(args: argparse.Namespace) -> None:
    """One-line errors for flag values that would crash mid-run or train something meaningless
    (the regularisers' flags: their classes' checks)."""
    at_least_one = ("global_batch_size", "grad_accum_steps", "log_every", "ckpt_every", "max_skipped_steps",
                    "sample_steps")
    non_negative = ("max_steps", "sample_every", "num_workers", "weight_decay", "max_grad_norm")
    checks = [(f, getattr(args, f) >= 1, "must be at least 1") for f in at_least_one]
    checks += [(f, getattr(args, f) >= 0, "must be >= 0") for f in non_negative]
    checks += [("cfg_prob", 0 <= args.cfg_prob < 1, "must be in [0, 1)"),
               ("ema_decay", 0 <= args.ema_decay <= 1, "must be in [0, 1]"),
               ("dist_timeout_min", args.dist_timeout_min > 0, "must be > 0"),
               ("lr", args.lr > 0, "must be > 0"),
               ("adam_beta1", 0 <= args.adam_beta1 < 1, "must be in [0, 1)"),
               ("adam_beta2", 0 <= args.adam_beta2 < 1, "must be in [0, 1)")]
    checks += [(f, getattr(args, f) is None or getattr(args, f) >= 1, "must be at least 1")
               for f in ("depth", "hidden_size", "num_heads", "patch_size", "num_classes")]
    checks += regulariser_checks(args)
    for flag, ok, rule in checks:
        if not ok:
            raise TrainError(f"--{flag.replace('_', '-')} {getattr(args, flag)} {rule}")


def default_exp_name(args: argparse.Namespace) -> str:
    """Model, any size overrides and regulariser, e.g. SiT-B_2-repulsor or custom-d6-w128-h4-p4-repulsor,
    so two different experiments never continue each other's run directory by default."""
    parts = [args.model.replace("/", "_")]
    for flag, tag in (("depth", "d"), ("hidden_size", "w"), ("num_heads", "h"), ("patch_size", "p")):
        if getattr(args, flag) is not None:
            parts.append(f"{tag}{getattr(args, flag)}")
    if args.qk_norm:
        parts.append("qknorm")
    if args.cond == "memory":
        parts.append("memory" + (f"-{args.memory}" if args.memory else ""))
    if args.noise_pairs:
        parts.append("pairs")
    return "-".join(parts + [args.reg])


# ----------------------------------------------------------------------------- the step
class TrainModule(nn.Module):
    """The SiT plus its regulariser in one module, so DDP syncs the regulariser's gradients too.

    The one seam where a regulariser plugs into the training step: forward(ctx) runs the SiT on
    ctx.x_t (with the tokens of block `reg.depth` from the same pass when it has one), completes the
    loss.Context (prediction, hidden state, null-condition mask, the SiT and its EMA) and returns
    (prediction, reg(ctx)). `ema`, when given, is attached like REPA's frozen encoder: outside
    parameters, state_dict, .to()/.train() and DDP; regularisers reach it through ctx.hidden_at.
    """

    def __init__(self, sit: SiT, reg: Regulariser, ema: SiT | None = None):
        super().__init__()
        self.sit, self.reg = sit, reg
        object.__setattr__(self, "ema", ema)  # unregistered on purpose

    def forward(self, ctx: Context) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The null-condition mask is drawn here, with the SiT's own RNG call, so the context knows it.
        drop = self.sit.condition_drop(ctx.x_t.shape[0], ctx.x_t.device)
        if self.reg.depth is None:
            pred, hidden = self.sit(ctx.x_t, ctx.t, ctx.y, drop=drop), None
        else:
            pred, hidden = self.sit(ctx.x_t, ctx.t, ctx.y, return_hidden_at=self.reg.depth, drop=drop)
        ctx = dataclasses.replace(ctx, pred=pred, hidden=hidden, drop=drop, sit=self.sit, ema=self.ema)
        return pred, self.reg(ctx)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, applied: torch.Tensor | None = None) -> None:
    """ema += (1 - decay) (model - ema); `applied` (0-d, 1 or 0) keeps the EMA still on a skipped step
    without a host sync."""
    ema_params, params = list(ema.parameters()), [p.detach() for p in model.parameters()]
    if applied is None:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    else:  # a device tensor times a Python float: no host-to-device copy (which would sync the stream)
        torch._foreach_lerp_(ema_params, params, [applied * (1.0 - decay)] * len(ema_params))


def reg_active(args: argparse.Namespace, step: int) -> bool:
    """Whether the step after `step` trains the regulariser: --reg-until N stops it after step N (0: never)."""
    return args.reg_until == 0 or step < args.reg_until


def ema_decay(args: argparse.Namespace, step: int) -> float:
    return min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay


def make_optimizer(params: list, args: argparse.Namespace) -> torch.optim.AdamW:
    """Fused AdamW on every device (CPU too): its kernel takes `found_inf`, which is how a non-finite
    step is skipped on the device, without a host sync."""
    return torch.optim.AdamW(params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                             weight_decay=args.weight_decay, fused=True)


# What made a step non-finite, in the order of the flags train_step returns; the first one names the cause.
NONFINITE_KINDS = ("input", "loss", "grad")


def train_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list,
               batch: tuple[torch.Tensor, ...], args: argparse.Namespace,
               scale: torch.Tensor, shift: torch.Tensor, amp_dtype: torch.dtype | None
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimizer step on this rank's share of the global batch (split in --grad-accum-steps).

    `model` is the TrainModule, DDP-wrapped when distributed; `opt` comes from make_optimizer.
    Returns the detached loss terms (mean over micro-batches, plus grad_norm) and a bool tensor
    of NONFINITE_KINDS flags, identical on every rank. When any flag is set, the update is skipped
    on the device (weights and optimizer state untouched) and nothing is read back to the host:
    the caller accumulates the flags and reads them only at logging and checkpoint steps.
    `batch` is (mean, std, labels), plus the uint8 images when the regulariser needs them (REPA).
    """
    mean, std, labels, *rest = batch
    images = rest[0] if rest else None
    device = mean.device
    accum = args.grad_accum_steps
    micro = mean.shape[0] // accum
    terms_sum: dict[str, torch.Tensor] = {}
    for i in range(accum):
        sl = slice(i * micro, (i + 1) * micro)
        x = sample_latents(mean[sl], std[sl], scale, shift)  # fresh posterior sample every step
        y = labels[sl]
        pixels = None if images is None else images[sl]
        if args.noise_pairs:  # [images, same images]: one clean sample, two times and noises (loss.Repulsor)
            x, y = torch.cat([x, x]), torch.cat([y, y])
            pixels = None if pixels is None else torch.cat([pixels, pixels])
        t = sample_time(x.shape[0], args.time_sampling, device)
        noise = torch.randn_like(x)
        x_t, target = interpolate(args.path_type, x, noise, t)
        ctx = Context(x=x, noise=noise, t=t, x_t=x_t, target=target, y=y, images=pixels,
                      path_type=args.path_type)
        # Gradients are all-reduced once, on the last micro-batch.
        sync = model.no_sync() if isinstance(model, DDP) and i < accum - 1 else nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                pred, reg_terms = model(ctx)
            terms = {"velocity": velocity_loss(pred, target), **{k: v.float() for k, v in reg_terms.items()}}
            terms["loss"] = terms["velocity"] + args.reg_weight * terms.get("reg", 0.0)
            scaler.scale(terms["loss"] / accum).backward()
        for k, v in terms.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + v.detach() / accum
    scaler.unscale_(opt)  # fp16: true gradients (and the scaler's own overflow record); a no-op otherwise
    grad_norm = (torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm) if args.max_grad_norm > 0
                 else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    finite_input = torch.isfinite(mean).all() & torch.isfinite(std).all()
    if labels.is_floating_point():  # memory snippets
        finite_input = finite_input & torch.isfinite(labels).all()
    nonfinite = torch.stack([~finite_input,
                             ~torch.isfinite(terms_sum["loss"]), ~torch.isfinite(grad_norm)]).float()
    if is_dist():  # a bad step on one rank is skipped on all of them
        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
    opt.found_inf = (nonfinite.amax() > 0).float()  # exactly 0 or 1: the fused kernel skips the update at 1
    opt.step()
    del opt.found_inf
    scaler.update()  # fp16: back off the loss scale after an overflow
    opt.zero_grad(set_to_none=True)
    terms_sum["grad_norm"] = grad_norm.float().detach()
    return terms_sum, nonfinite.bool()


class NonFiniteGuard:
    """Counts skipped (non-finite) steps on the device; `check` reads them at logging/checkpoint steps.

    bf16/fp32 runs stop at the first non-finite step; fp16 runs skip overflowing steps as GradScaler
    does and stop after --max-skipped-steps in a row. A non-finite input batch always stops the run.
    Skipped steps never reach the weights, the EMA or a checkpoint, since `check` runs before every save.
    """

    def __init__(self, device: torch.device, fp16: bool, max_consecutive: int):
        self.fp16, self.max_consecutive = fp16, max_consecutive
        self.first = torch.zeros(len(NONFINITE_KINDS), dtype=torch.long, device=device)  # first step per kind
        # current streak, longest streak and where it began, total skipped
        self.streak, self.longest, self.longest_start, self.skipped = (
            torch.zeros((), dtype=torch.long, device=device) for _ in range(4))

    def record(self, step: int, flags: torch.Tensor) -> torch.Tensor:
        """Add one step's flags; returns 1 if the step was applied, 0 if it was skipped (on the device)."""
        bad = flags.any()
        self.first = torch.where(flags & (self.first == 0), step, self.first)
        self.streak = (self.streak + 1) * bad
        longer = self.streak > self.longest
        self.longest_start = torch.where(longer, step + 1 - self.streak, self.longest_start)
        self.longest = torch.maximum(self.longest, self.streak)
        self.skipped = self.skipped + bad
        return (~bad).float()

    def check(self, args: argparse.Namespace, ckpt_dir: str) -> int:
        """Raise TrainError if the run must stop; else return the number of skipped steps so far (a host
        sync)."""
        *first, longest, longest_start, skipped = torch.cat(
            [self.first, torch.stack([self.longest, self.longest_start, self.skipped])]).tolist()
        if not skipped:
            return 0
        untouched = f"the step was skipped and the last checkpoint in {ckpt_dir} is untouched"
        if first[0]:
            raise TrainError(f"the input batch of step {first[0]} holds non-finite latents: bad data in "
                             f"{args.data_dir} (re-run preprocessing to rewrite it); {untouched}")
        if not self.fp16:
            step, kind = min((s, k) for k, s in zip(NONFINITE_KINDS, first) if s)
            what = ("loss is non-finite" if kind == "loss"
                    else "gradient norm is non-finite with a finite loss")
            raise TrainError(f"{what} at step {step} (--mixed-precision {args.mixed_precision}): "
                             f"{untouched}; lower --lr, or try --mixed-precision no")
        if longest >= self.max_consecutive:
            raise TrainError(f"{longest} fp16 steps in a row were non-finite, from step {longest_start}: the "
                             f"loss scale does not recover; {untouched}; try --mixed-precision bf16 or lower "
                             "--lr")
        return skipped


# ----------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """The facts of a run that its set-up, logging and checkpoint helpers share."""

    args: argparse.Namespace
    info: DistInfo
    run_dir: str
    ckpt_dir: str
    log: RunLogger
    manifest: dict
    memory: SnippetMemory | None
    model_config: dict


def main(args: argparse.Namespace) -> int:
    """Train; returns the exit status: 0, or --preempt-exit-code after a stop on SIGTERM / SIGUSR1."""
    with StopSignals() as stop:
        return run_training(args, stop)


def run_training(args: argparse.Namespace, stop: StopSignals) -> int:
    info = init_distributed(args.device, args.dist_timeout_min)
    stop_group = host_group(args.dist_timeout_min)  # the per-step stop flag: host only, never the GPU stream
    device, world = info.device, info.world_size
    per_image, micro_batch = batch_split(args, world)
    if device.type == "cuda":  # set both ways: the process may have inherited either setting
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    dataset, manifest, memory = open_data(args)
    run_dir, ckpt_dir, lock = open_run_dir(args, info)
    log = RunLogger(run_dir, info.is_main)
    resume_path, ckpt = choose_checkpoint(args, ckpt_dir, info, log)

    sit, ema, reg, train_module = build_training_module(args, manifest, memory, info)
    params = [p for p in train_module.parameters() if p.requires_grad]
    opt = make_optimizer(params, args)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    scale, shift = (v.to(device) for v in latent_scale_shift(manifest))
    run = Run(args, info, run_dir, ckpt_dir, log, manifest, memory, sit.config.to_dict())
    parts = dict(sit=sit, ema=ema, reg=reg, opt=opt, scaler=scaler)
    step = start_step(run, ckpt, resume_path, parts)
    del ckpt
    if args.compile:
        sit.compile()  # in place: state-dict keys stay plain

    def wrap(module: nn.Module) -> nn.Module:
        # Wrapped after loading: DDP's construction broadcasts rank 0's weights, so every rank starts equal.
        return (DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)  # gradients live in the all-reduce buckets: no copy, less memory
                if world > 1 else module)

    ddp, plain = wrap(train_module), None  # plain: the SiT alone, once --reg-until has passed
    if info.is_main:  # written once the lock is held and the resume checks passed: it describes the weights
        atomic_write_json(os.path.join(run_dir, "config.json"), {**run_record(run), "world_size": world})
        trim_metrics(run_dir, step)
    log_start(run, dataset, sit, reg, micro_batch)

    # The sampler and loader count images; with --noise-pairs train_step doubles each micro-batch.
    sampler = DistributedEpochSampler(len(dataset), args.global_batch_size // per_image, world, info.rank,
                                      args.seed)
    loader_kwargs = dict(batch_size=micro_batch * args.grad_accum_steps // per_image, drop_last=True,
                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                         # Workers stay up across epochs (the sampler runs in this process, so
                         # set_epoch still decides each epoch's order; the dataset draws no randomness).
                         persistent_workers=args.num_workers > 0,
                         # Own generator: a new loader iterator must not draw from the global RNG,
                         # or a resumed run (which starts one mid-epoch) would diverge.
                         generator=torch.Generator().manual_seed(args.seed),
                         worker_init_fn=ignore_stop_signals)  # a scheduler signals the workers too
    loader = DataLoader(dataset, sampler=sampler, **loader_kwargs)
    tracker = make_tracker(args, run_dir) if info.is_main else None
    grid_fn = (make_sample_grid_fn(args, ema, manifest, run_dir, device) if args.sample_every and info.is_main
               else None)
    guard = NonFiniteGuard(device, fp16=args.mixed_precision == "fp16",
                           max_consecutive=args.max_skipped_steps)

    window: list[dict] = []
    t_window = time.time()
    pbar = tqdm(total=args.max_steps, initial=step, disable=not info.is_main, dynamic_ncols=True,
                desc="train")
    train_module.train()
    stopped_by = 0  # the stop signal all ranks agreed on
    while step < args.max_steps and not stopped_by:
        epoch, start = divmod(step, sampler.steps_per_epoch)
        sampler.set_epoch(epoch, start)
        for batch in loader:  # (mean, std, labels[, images])
            if plain is None and not reg_active(args, step):
                # After --reg-until the step runs the SiT without the regulariser: its parameters get no
                # gradient (AdamW then leaves them and their state alone; checkpoints still hold them), and
                # DDP, rebuilt around the SiT only, waits for no gradient of theirs.
                plain = TrainModule(sit, NoRegulariser(), ema).train()
                ddp = wrap(plain)
                log(f"step {step}: --reg-until {args.reg_until} passed, the regulariser {args.reg} is off")
            batch = tuple(v.to(device, non_blocking=True) for v in batch)
            step_terms, nonfinite = train_step(ddp, opt, scaler, params, batch, args, scale, shift, amp_dtype)
            step += 1
            applied = guard.record(step, nonfinite)
            decay = ema_decay(args, step)
            update_ema(ema, sit, decay, applied)
            window.append(step_terms)
            pbar.update(1)
            stopped_by = agreed_stop(stop, stop_group)
            is_log_step = step % args.log_every == 0 or step == args.max_steps or stopped_by > 0
            is_ckpt_step = step % args.ckpt_every == 0 or step == args.max_steps or stopped_by > 0
            if is_log_step or is_ckpt_step:  # the only host reads of the non-finite flags
                try:
                    skipped = guard.check(args, ckpt_dir)
                except TrainError:
                    pbar.close()
                    raise
            if is_log_step:
                metrics = log_metrics(run, window, reg if plain is None else plain.reg, step, t_window, tracker,
                                      ema_decay=decay, skipped_steps=skipped)
                pbar.set_postfix(loss=f"{metrics['loss']:.4f}", steps_s=f"{metrics['steps_per_s']:.2f}")
                window, t_window = [], time.time()
            t_pause = time.time()
            if is_ckpt_step:
                save_training_state(run, parts, step, epoch, sampler.steps_per_epoch)
            if grid_fn is not None and step % args.sample_every == 0 and not stopped_by:
                grid_fn(step)
            t_window += time.time() - t_pause  # keep steps/s about training, not saving or sampling
            if step >= args.max_steps or stopped_by:
                break
    pbar.close()
    preempted = stopped_by > 0 and step < args.max_steps
    if preempted:
        log(f"stopped by {stop.why(stopped_by)} at step {step}: saved {os.path.join(ckpt_dir, f'{step:07d}.pt')}; "
            f"run the same command to resume (exit status {args.preempt_exit_code})")
    else:
        log(f"done: {step} steps; checkpoints in {ckpt_dir}")
    cleanup()
    if lock is not None:
        lock.release()
    return args.preempt_exit_code if preempted else 0


def agreed_stop(stop: StopSignals, group) -> int:
    """The stop signal any rank has received (0: none), the same value on every rank: a 4-byte
    all-reduce (MAX) on the host gloo group, once per step. Every rank makes it after every step, so
    all of them stop after the same step, also when the signal reached one rank only; being a CPU
    tensor on gloo it never waits for the GPU."""
    flag = torch.tensor([stop.signum], dtype=torch.int32)
    if group is not None:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag[0])


def batch_split(args: argparse.Namespace, world: int) -> tuple[int, int]:
    """(samples per image, samples per rank and micro-step); refuses a global batch that does not split."""
    per_image = 2 if args.noise_pairs else 1
    if args.global_batch_size % (world * args.grad_accum_steps * per_image):
        raise TrainError(f"--global-batch-size {args.global_batch_size} is not divisible by world size "
                         f"{world} x --grad-accum-steps {args.grad_accum_steps}"
                         + (" x 2 (--noise-pairs)" if args.noise_pairs else ""))
    return per_image, args.global_batch_size // (world * args.grad_accum_steps)


def open_data(args: argparse.Namespace) -> tuple[torch.utils.data.Dataset, dict, SnippetMemory | None]:
    """The dataset (with images only for a regulariser that reads them: other runs read no image bytes),
    its manifest, and for --cond memory the bank whose row i conditions item i (GMem)."""
    dataset = LatentDataset(args.data_dir, with_images=needs_images(args.reg))
    manifest = dataset.manifest
    c, h, w = manifest["latent_shape"]
    if h != w:
        raise DataError(f"the data holds non-square {h}x{w} latents; SiT needs square inputs")
    if (args.num_classes or manifest["num_classes"]) < manifest["num_classes"]:
        raise DataError(f"--num-classes {args.num_classes} is below the data's {manifest['num_classes']} "
                        "classes: drop the flag (the manifest's count is the default)")
    memory = None
    if args.cond == "memory":
        memory = open_dataset_memory(args.data_dir, args.memory)
        dataset = MemoryDataset(dataset, memory)
    return dataset, manifest, memory


def build_training_module(args: argparse.Namespace, manifest: dict, memory: SnippetMemory | None,
                          info: DistInfo) -> tuple[SiT, SiT, Regulariser, TrainModule]:
    """The SiT, its EMA and the regulariser, joined in a TrainModule. Built under the run seed; training
    randomness is reseeded per rank afterwards, so adding a regulariser never changes the SiT's init or
    data order."""
    c, h, _ = manifest["latent_shape"]
    torch.manual_seed(args.seed)
    sit = build_sit(None if args.model == "custom" else args.model, depth=args.depth,
                    hidden_size=args.hidden_size, num_heads=args.num_heads, patch_size=args.patch_size,
                    input_size=h, in_channels=c, num_classes=args.num_classes or manifest["num_classes"],
                    class_dropout_prob=args.cfg_prob, qk_norm=args.qk_norm or None, cond=args.cond,
                    memory_dim=memory.dim if memory else 0)
    sit = sit.to(info.device)
    reg = main_first(info, lambda: build_regulariser(  # REPA's hub encoder: one download, then the cache
        args, sit, args.global_batch_size // args.grad_accum_steps, info.device,
        image_shape=manifest.get("image_shape")).to(info.device))
    ema = copy.deepcopy(sit).requires_grad_(False).eval()
    return sit, ema, reg, TrainModule(sit, reg, ema)


def start_step(run: Run, ckpt: dict | None, resume_path: str | None, parts: dict) -> int:
    """Restore `parts` from the checkpoint and return its step, or seed this rank's training randomness
    and return 0; every rank must be at the same step."""
    args, rank, world = run.args, run.info.rank, run.info.world_size
    step = 0
    if ckpt is not None:
        step = restore_training_state(ckpt, resume_path, args, run.manifest, parts, world, rank,
                                      run.info.device, run.log, run.memory)
        run.log(f"resumed from {resume_path} at step {step}")
    else:
        torch.manual_seed(args.seed * world + rank)
        np.random.seed(args.seed * world + rank)
        random.seed(args.seed * world + rank)
    resumed = set(gather_objects((resume_path, step)))
    if len(resumed) > 1:
        raise TrainError(f"ranks resumed at different steps ({sorted(resumed)}): the checkpoint directory "
                         "must be the same shared storage on every node")
    return step


def log_start(run: Run, dataset, sit: SiT, reg: Regulariser, micro_batch: int) -> None:
    args, world, memory = run.args, run.info.world_size, run.memory
    n_params = sum(p.numel() for p in sit.parameters())
    n_reg = sum(p.numel() for p in reg.parameters())
    run.log(f"run dir {run.run_dir}; {world} process(es) on {run.info.device.type}; SiT "
            f"{n_params / 1e6:.2f}M parameters"
            + (f" + regulariser {args.reg} {n_reg / 1e6:.2f}M (training only)" if args.reg != "none" else ""))
    if reg.describe():
        run.log(f"{args.reg}: {reg.describe()}")
    c, h, w = run.manifest["latent_shape"]
    run.log(f"data: {len(dataset)} items {c}x{h}x{w}, {sit.config.num_classes} classes; global batch "
            f"{args.global_batch_size} = {world} x {args.grad_accum_steps} x {micro_batch}"
            + (f" ({micro_batch // 2} images, each at 2 noise levels)" if args.noise_pairs else "")
            + (f"; conditioned on memory {memory.path} ({memory.dim}-d, {memory.meta['encoder']})"
               if memory else ""))


def log_metrics(run: Run, window: list[dict], reg: Regulariser, step: int, t_window: float, tracker,
                **extra) -> dict:
    """The window's mean loss terms over steps and ranks, the regulariser's diagnostics, speed and
    `extra`: one metrics.jsonl row, the tracker and log.txt (rank 0)."""
    args, device = run.args, run.info.device
    keys = sorted(set().union(*window))  # e.g. bank stats appear once the bank has entries
    avg = torch.stack([torch.stack([w[k].float().to(device) for w in window if k in w]).mean() for k in keys])
    if is_dist():
        dist.all_reduce(avg)
        avg /= run.info.world_size
    metrics = {k: avg[j].item() for j, k in enumerate(keys)}
    metrics.update(reg.diagnostics())  # e.g. the effective rank of the Repulsor's projections
    elapsed = time.time() - t_window  # the diagnostics' time included: steps/s is what the run gets
    metrics.update(step=step, steps_per_s=len(window) / elapsed,
                   samples_per_s=len(window) * args.global_batch_size / elapsed, **extra)
    if run.info.is_main:
        with open(os.path.join(run.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if tracker:
            tracker(step, {k: v for k, v in metrics.items() if k != "step"})
        run.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return metrics


def run_record(run: Run) -> dict:
    """What config.json and every checkpoint say about the run: arguments, model, data and memory bank."""
    return {"args": vars(run.args), "model_config": run.model_config,
            "data": manifest_for_sampling(run.manifest), "data_fingerprint": data_fingerprint(run.manifest),
            "memory": run.memory.describe() if run.memory else None}


def save_training_state(run: Run, parts: dict, step: int, epoch: int, steps_per_epoch: int) -> None:
    """checkpoints/STEP.pt from rank 0 (every rank's RNG state gathered), then the loss curve."""
    rngs = gather_objects(rng_state(run.info.device))
    if run.info.is_main:
        path = os.path.join(run.ckpt_dir, f"{step:07d}.pt")
        save_checkpoint(path, {
            "model": parts["sit"].state_dict(), "ema": parts["ema"].state_dict(),
            "regulariser": parts["reg"].state_dict(), "reg_extra": parts["reg"].extra_state(),
            "opt": parts["opt"].state_dict(), "scaler": parts["scaler"].state_dict(), "step": step,
            "rng": rngs, "data_position": {"epoch": epoch, "step_in_epoch": step - epoch * steps_per_epoch,
                                           "steps_per_epoch": steps_per_epoch},
            **run_record(run),
        })
        run.log(f"saved checkpoint {path}")
        try:  # a picture is never worth stopping a run for
            plot_loss_curve(run.run_dir)
        except Exception as e:  # noqa: BLE001
            run.log(f"warning: loss curve not plotted ({type(e).__name__}: {e})")
    barrier()


# ----------------------------------------------------------------------------- resume and helpers
def check_manifest_matches(config: dict, manifest: dict) -> None:
    c, h, w = manifest["latent_shape"]
    if (config["in_channels"], config["input_size"], config["input_size"]) != (c, h, w):
        raise DataError(f"the data holds {c}x{h}x{w} latents but the checkpoint's model takes "
                        f"{config['in_channels']}x{config['input_size']}x{config['input_size']}: "
                        "train on matching data or start a new run")
    if config["num_classes"] < manifest["num_classes"]:
        raise DataError(f"the data has {manifest['num_classes']} classes but the model "
                        f"{config['num_classes']}: drop --num-classes or set it to at least the manifest's")


def open_run_dir(args: argparse.Namespace, info) -> tuple[str, str, RunLock | None]:
    """Create RUN/checkpoints, take the run lock (rank 0) and clear stale temporary files of crashed
    writes."""
    run_dir = os.path.join(args.results_dir, args.exp_name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")

    taken: dict[str, RunLock] = {}

    def take() -> None:
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
            probe = os.path.join(ckpt_dir, f".write-test-{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise TrainError(f"cannot write to {ckpt_dir} ({e.strerror}): pass a writable "
                             "--results-dir") from None
        taken["lock"] = RunLock(run_dir)
        taken["lock"].acquire()
        remove_stale_temp_files(ckpt_dir)

    on_main_then_share(info, take)
    return run_dir, ckpt_dir, taken.get("lock")


def choose_checkpoint(args: argparse.Namespace, ckpt_dir: str, info, log) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from, chosen by rank 0 and loaded by every rank from that one path.

    Ranks on other nodes may list the directory differently (node-local disks, a cached NFS
    listing), so they never pick on their own. With --resume auto an unreadable newest file is
    skipped (and left in place) in favour of the newest one that loads.
    """
    picked: dict[str, dict] = {}

    def pick() -> str | None:
        if args.resume == "none":
            if checkpoints_newest_first(ckpt_dir):
                raise TrainError(f"{ckpt_dir} already holds checkpoints: use --resume auto to continue the "
                                 "run, or another --exp-name")
            return None
        if args.resume != "auto":
            picked["ckpt"] = load_checkpoint(args.resume, fix="pass another --resume PATH, or --resume auto for the "
                                                          "run's newest readable checkpoint")
            return args.resume
        path, ckpt = newest_loadable_checkpoint(ckpt_dir, log)
        if path is None and checkpoints_newest_first(ckpt_dir):
            raise CheckpointError(f"no checkpoint in {ckpt_dir} can be read (see the lines above): pass "
                                  "--resume PATH, or move them away to start afresh")
        if path is not None:
            picked["ckpt"] = ckpt
        return path

    path = on_main_then_share(info, pick)
    if path is None:
        return None, None
    ckpt, error = picked.get("ckpt"), None
    if not info.is_main:
        try:
            ckpt = load_checkpoint(path, fix=None)
        except CheckpointError as e:  # e.g. a node that does not see the file: every rank must stop, not hang
            error = f"rank {info.rank}: {e}"
    errors = [e for e in gather_objects(error) if e]
    if errors:
        raise CheckpointError(f"not every rank can read the checkpoint rank 0 chose (put checkpoints on "
                              f"storage every node sees): {errors[0]}")
    if not {"model_config", "opt", "rng"} <= set(ckpt):
        raise CheckpointError(f"{path} is not a train.py checkpoint (no optimizer/RNG state): "
                              "it can be sampled from, not resumed")
    return path, ckpt


def restore_training_state(ckpt: dict, path: str, args: argparse.Namespace, manifest: dict, parts: dict,
                           world: int, rank: int, device: torch.device, log,
                           memory: SnippetMemory | None) -> int:
    """Check that `ckpt` continues this run (model, objective, data) and load every piece of state
    into `parts` (sit, ema, reg, opt, scaler). Returns the step to continue from."""
    check_manifest_matches(ckpt["model_config"], manifest)
    model_config = parts["sit"].config.to_dict()
    if ckpt["model_config"] != model_config:
        diff = ", ".join(f"{k}={v}" for k, v in ckpt["model_config"].items() if model_config.get(k) != v)
        raise CheckpointError(f"checkpoint {path} was trained with a different model ({diff}): resume with "
                              "its flags")
    reg_class = regulariser_class(args.reg)
    trained = {**reg_class.legacy_defaults, **ckpt["args"]}  # flags added after the checkpoint was written
    for key in RESUME_MUST_MATCH + reg_class.must_match:
        if trained.get(key) is not None and trained[key] != getattr(args, key, None):
            source = reg_class.set_by.get(key)  # a value derived from a flag's weights (REPA's encoder hash)
            if source is not None:
                flag = "--" + source.replace("_", "-")
                raise CheckpointError(f"checkpoint {path} was trained with {flag} {trained.get(source)} ({key} "
                                      f"{trained[key]}), now {flag} {getattr(args, source, None)} ("
                                      f"{getattr(args, key, None)}): resume with {flag} {trained.get(source)} (or "
                                      "another copy of the same weights)")
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"checkpoint {path} was trained with {flag} {trained[key]} "
                                  f"(now {getattr(args, key, None)}): resume with the same value")
    if "data_fingerprint" in ckpt:
        diff = fingerprint_mismatch(ckpt["data_fingerprint"], data_fingerprint(manifest))
        if diff:
            raise CheckpointError(f"checkpoint {path} was trained on other data than {args.data_dir} "
                                  f"({diff}): resume with its --data-dir, or start a new run with another "
                                  "--exp-name")
    trained_on = (ckpt.get("memory") or {}).get("fingerprint")
    if memory is not None and trained_on is not None and trained_on != memory.fingerprint:
        raise MemoryBankError(f"checkpoint {path} was trained with memory bank {ckpt['memory']['path']} "
                              f"(fingerprint {trained_on}), this run opened {memory.path} "
                              f"({memory.fingerprint}): resume with the bank it was trained with "
                              "(--memory NAME)")
    load_sit_state_dict(parts["sit"], ckpt["model"], log=log)
    load_sit_state_dict(parts["ema"], ckpt["ema"], log=log)
    parts["reg"].load_state_dict(ckpt["regulariser"])
    parts["reg"].load_extra_state(ckpt.get("reg_extra", {}))

    opt = parts["opt"]
    # load_state_dict restores every option the checkpoint was written with: the flags win for the
    # hyperparameters, and the implementation (fused, foreach, capturable) follows this run's device.
    options = ("lr", "betas", "weight_decay", "fused", "foreach", "capturable", "differentiable")
    keep = [{k: g[k] for k in options if k in g} for g in opt.param_groups]
    opt.load_state_dict(ckpt["opt"])
    for group, values in zip(opt.param_groups, keep):
        group.update(values)

    scaler = parts["scaler"]
    if scaler.is_enabled() and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    elif scaler.is_enabled():
        log(f"checkpoint {path} was trained without fp16: starting a fresh fp16 loss scale")

    step = ckpt["step"]
    if len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank], device)
    else:
        log(f"checkpoint has RNG states of {len(ckpt['rng'])} ranks, this run has {world}: reseeding "
            "(the run continues but not bit-exactly)")
        torch.manual_seed(args.seed * world + rank + step)
    return step


def trim_metrics(run_dir: str, step: int) -> None:
    """Keep the metrics.jsonl rows up to `step`: after a resume (or a crash before the first checkpoint)
    the steps past it are trained again and must not be logged twice. Drops a partial last line."""
    from plots import read_jsonl

    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, path)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_objects(obj) -> list:
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj):
    """Rank 0's value of obj on every rank (obj itself without a process group)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main_then_share(info, fn):
    """Run fn() on rank 0 only and give every rank its result; an error on rank 0 is raised on every
    rank (as the same one-line error), so no rank waits forever in a collective."""
    result = error = None
    if info.is_main:
        try:
            result = fn()
        except (TrainError, DataError, CheckpointError) as e:
            error = e
    result, error = broadcast_from_main((result, error))  # exceptions pickle: the same one on every rank
    if error is not None:
        raise error
    return result


def main_first(info, fn):
    """fn() on rank 0, then on the other ranks once it succeeded (so hub weights are downloaded once,
    into the cache the others read); an error on rank 0 is raised on every rank, as the same one line.
    Every rank calls fn with the same RNG state, so what it initialises is identical on every rank."""
    result = error = None
    if info.is_main:
        try:
            result = fn()
        except (TrainError, DataError, CheckpointError, ValueError) as e:
            error = e
    error = broadcast_from_main(error)
    if error is not None:
        raise error
    return result if info.is_main else fn()


class RunLogger:
    """log.txt + stdout on rank 0; silent elsewhere."""

    def __init__(self, run_dir: str, active: bool):
        self.active = active
        self.file = open(os.path.join(run_dir, "log.txt"), "a") if active else None

    def __call__(self, msg: str) -> None:
        if self.active:
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
            tqdm.write(line)
            self.file.write(line + "\n")
            self.file.flush()


def make_tracker(args, run_dir: str):
    """Optional TensorBoard / W&B writer: only imported when asked for."""
    if args.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainError("--report-to tensorboard needs the tensorboard package: pip install "
                             "tensorboard") from None
        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        return lambda step, metrics: [writer.add_scalar(k, v, step) for k, v in metrics.items()]
    if args.report_to == "wandb":
        try:
            import wandb
        except ImportError:
            raise TrainError("--report-to wandb needs the wandb package: pip install wandb") from None
        wandb.init(project="repulsor-sit", name=args.exp_name, config=vars(args), dir=run_dir)
        return lambda step, metrics: wandb.log(metrics, step=step)
    return None


def manifest_for_sampling(manifest: dict) -> dict:
    """The manifest fields a checkpoint needs so sampling can decode without the data."""
    keys = ("vae", "latent_scale", "latent_shift", "latent_shape", "num_classes", "class_names", "source",
            "flip")
    return {k: manifest.get(k) for k in keys}


def plot_loss_curve(run_dir: str) -> str | None:
    """loss_curve.png from metrics.jsonl (velocity and total loss, and the regulariser and its health if any),
    with the regulariser's collapse level marked (the Repulsor's 1 / tau: every projection identical)."""
    from plots import plot_metrics

    config = os.path.join(run_dir, "config.json")
    args = json.load(open(config))["args"] if os.path.isfile(config) else {}
    collapse = regulariser_class(args["reg"]).collapse_level(args) if args else None
    return plot_metrics(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "loss_curve.png"),
                        reg_collapse=collapse)


def make_sample_grid_fn(args, ema: SiT, manifest: dict, run_dir: str, device: torch.device):
    """EMA sample grids with fixed noise and labels, or snippets for --cond memory (images 0..63 of
    sample_ddp.py's default set for --seed: the same bank rows), so grids from different steps are
    comparable; Heun ODE, no guidance."""
    from samplers import SamplingSetup, load_vae, write_sample_grid

    scale, shift = latent_scale_shift(manifest)
    # The run's own bank, as sample_ddp.py opens it from the checkpoint (same rows for a seed).
    memory = open_dataset_memory(args.data_dir, args.memory) if ema.config.cond == "memory" else None
    setup = SamplingSetup(model=ema, vae=manifest["vae"], scale=scale.to(device), shift=shift.to(device),
                          num_classes=ema.config.num_classes, path_type=args.path_type,
                          latent_shape=tuple(manifest["latent_shape"]), memory=memory)
    vae = load_vae(manifest["vae"], device)

    def grid(step: int) -> None:
        write_sample_grid(setup, vae, os.path.join(run_dir, "samples", f"{step:07d}.png"), num_images=64,
                          seed=args.seed, mode="ode", heun=True, num_steps=args.sample_steps, device=device)

    return grid


if __name__ == "__main__":
    try:
        sys.exit(main(get_args()))
    except (TrainError, DataError, CheckpointError, ValueError) as e:
        if os.environ.get("REPULSOR_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
