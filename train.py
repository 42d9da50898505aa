"""Train SiT by flow matching on precomputed latents, optionally with a representation regulariser.

    python train.py --data-dir DATA ...                              # one process
    torchrun --nproc_per_node=8 train.py --data-dir DATA ...         # DDP, NCCL on GPUs, gloo on CPU

Everything the run needs is in its run directory (RESULTS/EXP): config.json, log.txt,
metrics.jsonl, checkpoints/NNNNNNN.pt (atomic), sample grids and the loss curve PNG.
Time convention: t = 0 data, t = 1 noise (see loss.py).
"""
from __future__ import annotations

import argparse
import copy
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

from checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from dataset import DataError, DistributedEpochSampler, LatentDataset, latent_scale_shift, sample_latents
from distributed import barrier, cleanup, init_distributed, is_dist
from loss import (PATH_TYPES, REGULARISERS, TIME_SAMPLINGS, Dispersive, Regulariser, build_regulariser, interpolate,
                  sample_time, velocity_loss)
from memory_bank import BANK_DTYPES
from models.sit import SiT, SiT_models, build_sit, load_sit_state_dict


class TrainError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


# Flags that define the objective or the data order: --resume refuses to change them (the regulariser's
# only when one is used). A value a checkpoint did not record (None) is not checked.
RESUME_MUST_MATCH = ("global_batch_size", "path_type", "time_sampling", "reg")
RESUME_MUST_MATCH_REG = ("reg_weight", "reg_depth", "reg_t_max", "temperature", "proj_dim", "proj_hidden", "bank_size",
                         "bank_dtype", "reg_pool", "disp_variant", "disp_margin")


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--data-dir", type=str, required=True, help="dataset directory written by preprocessing/encode.py")
    g.add_argument("--results-dir", type=str, default="results")
    g.add_argument("--exp-name", type=str, default=None, help="run directory name (default: derived from model and regulariser)")
    g.add_argument("--resume", type=str, default="auto",
                   help="'auto': continue from the newest checkpoint in the run directory if there is one; "
                        "'none': start fresh (refuses a run directory that holds checkpoints); or a checkpoint path")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"])
    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, default="SiT-B/2", choices=list(SiT_models) + ["custom"],
                   help="named size; 'custom' builds from --depth/--hidden-size/--num-heads/--patch-size")
    g.add_argument("--depth", type=int, default=None, help="override the named model's depth")
    g.add_argument("--hidden-size", type=int, default=None, help="override the named model's width")
    g.add_argument("--num-heads", type=int, default=None)
    g.add_argument("--patch-size", type=int, default=None)
    g.add_argument("--qk-norm", action="store_true", help="LayerNorm on queries and keys")
    g.add_argument("--num-classes", type=int, default=None, help="default: from the data manifest")
    g.add_argument("--cfg-prob", type=float, default=0.1, help="label dropout probability (classifier-free guidance)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--global-batch-size", type=int, default=256)
    g.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--max-steps", type=int, default=400_000)
    g.add_argument("--mixed-precision", type=str, default="no", choices=["no", "bf16", "fp16"])
    g.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--compile", action="store_true", help="torch.compile the SiT")
    g.add_argument("--ema-decay", type=float, default=0.9999)
    g.add_argument("--ema-warmup", action="store_true",
                   help="decay = min(ema-decay, (1 + step) / (10 + step)); needed for short runs, whose plain "
                        "EMA stays at the zero-output initialisation")
    g = p.add_argument_group("flow matching")
    g.add_argument("--path-type", type=str, default="linear", choices=PATH_TYPES)
    g.add_argument("--time-sampling", type=str, default="uniform", choices=TIME_SAMPLINGS)
    g = p.add_argument_group("regulariser")
    g.add_argument("--reg", type=str, default="none", choices=list(REGULARISERS))
    g.add_argument("--reg-weight", type=float, default=None,
                   help="lambda (default: repulsor 0.1, see the README's ablation; dispersive 0.5, the paper's)")
    g.add_argument("--reg-depth", type=int, default=None,
                   help="block whose output is regularised, 1-based (default: repulsor 4 for S/B, 8 for L/XL, "
                        "depth // 3 custom; dispersive depth // 4)")
    g.add_argument("--reg-t-max", type=float, default=1.0, help="ablation: apply the term only where t <= this")
    g.add_argument("--temperature", type=float, default=0.5, help="tau (repulsor and dispersive)")
    g.add_argument("--proj-dim", type=int, default=128, help="repulsor: projection width d")
    g.add_argument("--proj-hidden", type=int, default=2048, help="repulsor: head MLP width")
    g.add_argument("--bank-size", type=int, default=65536, help="repulsor: memory bank K (0 = in-batch only)")
    g.add_argument("--bank-dtype", type=str, default="fp32", choices=list(BANK_DTYPES))
    g.add_argument("--reg-pool", type=str, default="mean", choices=["mean"], help="repulsor: token pooling")
    g.add_argument("--disp-variant", type=str, default="infonce_l2", choices=Dispersive.VARIANTS)
    g.add_argument("--disp-margin", type=float, default=1.0, help="dispersive hinge margin")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--num-workers", type=int, default=4)
    g.add_argument("--log-every", type=int, default=100)
    g.add_argument("--ckpt-every", type=int, default=10_000)
    g.add_argument("--sample-every", type=int, default=0, help="EMA sample grid every N steps (0 = never)")
    g.add_argument("--sample-steps", type=int, default=50, help="Heun ODE steps for the training grids")
    g.add_argument("--report-to", type=str, default="none", choices=["none", "tensorboard", "wandb"])
    args = p.parse_args(argv)  # unknown flags are an error
    if args.reg_weight is None:
        args.reg_weight = {"none": 0.0, "repulsor": 0.1}.get(args.reg, 0.5)
    if args.model == "custom":
        missing = [f for f in ("depth", "hidden_size", "num_heads", "patch_size") if getattr(args, f) is None]
        if missing:
            p.error(f"--model custom needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
    if args.exp_name is None:
        args.exp_name = f"{args.model.replace('/', '_')}-{args.reg}"
    return args


class TrainModule(nn.Module):
    """The SiT plus its regulariser in one module, so DDP syncs the head's gradients too.

    This is the one seam where a regulariser plugs into the training step: the SiT returns
    the hidden state of block `reg.depth` from the same forward and `reg` turns it into terms.
    """

    def __init__(self, sit: SiT, reg: Regulariser):
        super().__init__()
        self.sit, self.reg = sit, reg

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.reg.depth is None:
            return self.sit(x_t, t, y), {}
        out, hidden = self.sit(x_t, t, y, return_hidden_at=self.reg.depth)
        return out, self.reg(hidden, t)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list,
               batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], args: argparse.Namespace,
               scale: torch.Tensor, shift: torch.Tensor, amp_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """One optimizer step on this rank's share of the global batch (split in --grad-accum-steps).

    `model` is the TrainModule, DDP-wrapped when distributed. Returns the detached loss terms
    (mean over micro-batches) and grad_norm. A non-finite loss on any rank raises
    FloatingPointError on every rank before the weights change.
    """
    mean, std, labels = batch
    device = mean.device
    accum = args.grad_accum_steps
    micro = mean.shape[0] // accum
    terms_sum: dict[str, torch.Tensor] = {}
    for i in range(accum):
        sl = slice(i * micro, (i + 1) * micro)
        x = sample_latents(mean[sl], std[sl], scale, shift)  # fresh posterior sample every step
        t = sample_time(x.shape[0], args.time_sampling, device)
        x_t, target = interpolate(args.path_type, x, torch.randn_like(x), t)
        # Gradients are all-reduced once, on the last micro-batch.
        sync = model.no_sync() if isinstance(model, DDP) and i < accum - 1 else nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                pred, reg_terms = model(x_t, t, labels[sl])
            terms = {"velocity": velocity_loss(pred, target), **{k: v.float() for k, v in reg_terms.items()}}
            terms["loss"] = terms["velocity"] + args.reg_weight * terms.get("reg", 0.0)
            scaler.scale(terms["loss"] / accum).backward()
        for k, v in terms.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + v.detach() / accum
    scaler.unscale_(opt)
    grad_norm = (torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm) if args.max_grad_norm > 0
                 else torch.zeros((), device=device))
    # Every step: stop on a non-finite loss before it reaches the weights or a checkpoint.
    check = terms_sum["loss"].detach().clone()
    if is_dist():
        dist.all_reduce(check)
    if not torch.isfinite(check):
        raise FloatingPointError(f"{check.item()}")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    terms_sum["grad_norm"] = grad_norm.float().detach()
    return terms_sum


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
            raise TrainError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
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


def check_manifest_matches(config: dict, manifest: dict) -> None:
    c, h, w = manifest["latent_shape"]
    if (config["in_channels"], config["input_size"], config["input_size"]) != (c, h, w):
        raise DataError(f"the data holds {c}x{h}x{w} latents but the checkpoint's model takes "
                        f"{config['in_channels']}x{config['input_size']}x{config['input_size']}: "
                        "train on matching data or start a new run")
    if config["num_classes"] < manifest["num_classes"]:
        raise DataError(f"the data has {manifest['num_classes']} classes but the model {config['num_classes']}: "
                        "drop --num-classes or set it to at least the manifest's")


def main(args: argparse.Namespace) -> None:
    info = init_distributed(args.device)
    device, rank, world = info.device, info.rank, info.world_size
    if args.global_batch_size % (world * args.grad_accum_steps):
        raise TrainError(f"--global-batch-size {args.global_batch_size} is not divisible by world size {world} "
                         f"x --grad-accum-steps {args.grad_accum_steps}")
    micro_batch = args.global_batch_size // (world * args.grad_accum_steps)
    if args.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    dataset = LatentDataset(args.data_dir)
    manifest = dataset.manifest
    c, h, w = manifest["latent_shape"]
    if h != w:
        raise DataError(f"the data holds non-square {h}x{w} latents; SiT needs square inputs")
    num_classes = args.num_classes or manifest["num_classes"]
    if num_classes < manifest["num_classes"]:
        raise DataError(f"--num-classes {num_classes} is below the data's {manifest['num_classes']} classes: "
                        "drop the flag (the manifest's count is the default)")

    run_dir = os.path.join(args.results_dir, args.exp_name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if info.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
    barrier()
    log = RunLogger(run_dir, info.is_main)

    resume_path = None
    if args.resume == "auto":
        resume_path = latest_checkpoint(ckpt_dir)
    elif args.resume == "none":
        if latest_checkpoint(ckpt_dir):
            raise TrainError(f"{run_dir} already holds checkpoints: use --resume auto to continue it, "
                             "or another --exp-name")
    else:
        resume_path = args.resume
    ckpt = load_checkpoint(resume_path) if resume_path else None
    if ckpt is not None and not {"model_config", "opt", "rng"} <= set(ckpt):
        raise CheckpointError(f"{resume_path} is not a train.py checkpoint (no optimizer/RNG state): "
                              "it can be sampled from, not resumed")

    # Model and regulariser are built under the run seed; training randomness is reseeded
    # per rank afterwards, so adding a regulariser never changes the SiT's init or data order.
    torch.manual_seed(args.seed)
    name = None if args.model == "custom" else args.model
    sit = build_sit(name, depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads,
                    patch_size=args.patch_size, input_size=h, in_channels=c, num_classes=num_classes,
                    class_dropout_prob=args.cfg_prob, qk_norm=args.qk_norm or None).to(device)
    model_config = sit.config.to_dict()
    if ckpt is not None:
        check_manifest_matches(ckpt["model_config"], manifest)
        if ckpt["model_config"] != model_config:
            diff = ", ".join(f"{k}={v}" for k, v in ckpt["model_config"].items() if model_config.get(k) != v)
            raise CheckpointError(f"checkpoint {resume_path} was trained with a different model ({diff}): "
                                  "resume with its flags")
    named_size = name if args.depth is None else None  # an overridden depth gets the custom default block
    reg = build_regulariser(args, named_size, sit.config.hidden_size, sit.config.depth,
                            args.global_batch_size // args.grad_accum_steps, device).to(device)
    ema = copy.deepcopy(sit).requires_grad_(False).eval()
    train_module = TrainModule(sit, reg)
    if args.compile:
        sit.compile()  # in place: state-dict keys stay plain
    ddp = DDP(train_module, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else train_module

    params = [p for p in train_module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.weight_decay, fused=device.type == "cuda")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    scale, shift = latent_scale_shift(manifest)
    scale, shift = scale.to(device), shift.to(device)

    step = 0
    if ckpt is not None:
        for key in RESUME_MUST_MATCH + (RESUME_MUST_MATCH_REG if args.reg != "none" else ()):
            if ckpt["args"].get(key) is not None and ckpt["args"][key] != getattr(args, key):
                raise CheckpointError(f"checkpoint {resume_path} was trained with --{key.replace('_', '-')} "
                                      f"{ckpt['args'][key]} (now {getattr(args, key)}): resume with the same value")
        load_sit_state_dict(sit, ckpt["model"], log=log)
        load_sit_state_dict(ema, ckpt["ema"], log=log)
        reg.load_state_dict(ckpt["regulariser"])
        reg.load_extra_state(ckpt.get("reg_extra", {}))
        opt.load_state_dict(ckpt["opt"])
        for group in opt.param_groups:  # load_state_dict restores the old hyperparameters: the flags win
            group.update(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay)
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank], device)
        else:
            log(f"checkpoint has RNG states of {len(ckpt['rng'])} ranks, this run has {world}: reseeding "
                "(the run continues but not bit-exactly)")
            torch.manual_seed(args.seed * world + rank + step)
        log(f"resumed from {resume_path} at step {step}")
    else:
        torch.manual_seed(args.seed * world + rank)
        np.random.seed(args.seed * world + rank)
        random.seed(args.seed * world + rank)
    del ckpt

    if info.is_main:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"args": vars(args), "model_config": model_config, "world_size": world,
                       "data": manifest_for_sampling(manifest)}, f, indent=2)
    n_params = sum(p.numel() for p in sit.parameters())
    n_reg = sum(p.numel() for p in reg.parameters())
    log(f"run dir {run_dir}; {world} process(es) on {device.type}; SiT {n_params / 1e6:.2f}M parameters"
        + (f" + regulariser {args.reg} {n_reg / 1e6:.2f}M (training only)" if args.reg != "none" else ""))
    log(f"data: {len(dataset)} items {c}x{h}x{w}, {num_classes} classes; global batch {args.global_batch_size} "
        f"= {world} x {args.grad_accum_steps} x {micro_batch}")
    tracker = make_tracker(args, run_dir) if info.is_main else None

    sampler = DistributedEpochSampler(len(dataset), args.global_batch_size, world, rank, args.seed)
    loader_kwargs = dict(batch_size=micro_batch * args.grad_accum_steps, drop_last=True, num_workers=args.num_workers,
                         pin_memory=device.type == "cuda", persistent_workers=False,
                         # Own generator: a new loader iterator must not draw from the global RNG,
                         # or a resumed run (which starts one mid-epoch) would diverge.
                         generator=torch.Generator().manual_seed(args.seed))
    grid_fn = make_sample_grid_fn(args, ema, manifest, run_dir, device) if (args.sample_every and info.is_main) else None

    window: list[dict] = []
    t_window = time.time()
    pbar = tqdm(total=args.max_steps, initial=step, disable=not info.is_main, dynamic_ncols=True, desc="train")
    train_module.train()
    while step < args.max_steps:
        epoch, start = divmod(step, sampler.steps_per_epoch)
        sampler.set_epoch(epoch, start)
        for mean, std, labels in DataLoader(dataset, sampler=sampler, **loader_kwargs):
            mean, std, labels = (v.to(device, non_blocking=True) for v in (mean, std, labels))
            try:
                step_terms = train_step(ddp, opt, scaler, params, (mean, std, labels), args, scale, shift, amp_dtype)
            except FloatingPointError as e:
                pbar.close()
                raise TrainError(f"loss is {e} at step {step + 1}: stopping; the last good checkpoint in "
                                 f"{ckpt_dir} is untouched (lower --lr, or try --mixed-precision no)") from None
            step += 1
            decay = min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay
            update_ema(ema, sit, decay)
            window.append(step_terms)
            pbar.update(1)

            if step % args.log_every == 0 or step == args.max_steps:
                keys = sorted(set().union(*window))  # e.g. bank stats appear once the bank has entries
                avg = torch.stack([torch.stack([w_[k].float().to(device) for w_ in window if k in w_]).mean()
                                   for k in keys])
                if is_dist():
                    dist.all_reduce(avg)
                    avg /= world
                elapsed = time.time() - t_window
                metrics = {k: avg[j].item() for j, k in enumerate(keys)}
                metrics.update(step=step, steps_per_s=len(window) / elapsed,
                               samples_per_s=len(window) * args.global_batch_size / elapsed, ema_decay=decay)
                if info.is_main:
                    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                    if tracker:
                        tracker(step, {k: v for k, v in metrics.items() if k != "step"})
                    pbar.set_postfix(loss=f"{metrics['loss']:.4f}", steps_s=f"{metrics['steps_per_s']:.2f}")
                    log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
                window, t_window = [], time.time()

            if step % args.ckpt_every == 0 or step == args.max_steps:
                t_ckpt = time.time()
                rngs = gather_objects(rng_state(device))
                if info.is_main:
                    path = os.path.join(ckpt_dir, f"{step:07d}.pt")
                    save_checkpoint(path, {
                        "model": sit.state_dict(), "ema": ema.state_dict(),
                        "regulariser": reg.state_dict(), "reg_extra": reg.extra_state(),
                        "opt": opt.state_dict(), "scaler": scaler.state_dict(), "step": step, "rng": rngs,
                        "data_position": {"epoch": epoch, "step_in_epoch": step - epoch * sampler.steps_per_epoch,
                                          "steps_per_epoch": sampler.steps_per_epoch},
                        "args": vars(args), "model_config": model_config, "data": manifest_for_sampling(manifest),
                    })
                    log(f"saved checkpoint {path}")
                    plot_loss_curve(run_dir)
                barrier()
                t_window += time.time() - t_ckpt  # keep steps/s about training, not saving
            if grid_fn is not None and step % args.sample_every == 0:
                t_grid = time.time()
                grid_fn(step)
                t_window += time.time() - t_grid
            if step >= args.max_steps:
                break
    pbar.close()
    log(f"done: {step} steps; checkpoints in {ckpt_dir}")
    cleanup()


def manifest_for_sampling(manifest: dict) -> dict:
    """The manifest fields a checkpoint needs so sampling can decode without the data."""
    keys = ("vae", "latent_scale", "latent_shift", "latent_shape", "num_classes", "class_names", "source", "flip")
    return {k: manifest.get(k) for k in keys}


def plot_loss_curve(run_dir: str) -> str | None:
    """loss_curve.png from metrics.jsonl (velocity and total loss, and the regulariser if any)."""
    from plots import plot_metrics

    return plot_metrics(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "loss_curve.png"))


def make_sample_grid_fn(args, ema: SiT, manifest: dict, run_dir: str, device: torch.device):
    """EMA sample grids with fixed noise and labels (images 0..63 of sample_ddp.py's set for
    --seed), so grids from different steps are comparable; Heun ODE, no guidance."""
    from samplers import SamplingSetup, load_vae, write_sample_grid

    scale, shift = latent_scale_shift(manifest)
    setup = SamplingSetup(model=ema, vae=manifest["vae"], scale=scale.to(device), shift=shift.to(device),
                          num_classes=ema.config.num_classes, path_type=args.path_type,
                          latent_shape=tuple(manifest["latent_shape"]))
    vae = load_vae(manifest["vae"], device)

    def grid(step: int) -> None:
        write_sample_grid(setup, vae, os.path.join(run_dir, "samples", f"{step:07d}.png"), num_images=64,
                          seed=args.seed, mode="ode", heun=True, num_steps=args.sample_steps, device=device)

    return grid


if __name__ == "__main__":
    try:
        main(get_args())
    except (TrainError, DataError, CheckpointError, ValueError) as e:
        if os.environ.get("REPULSOR_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
