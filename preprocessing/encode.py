#!/usr/bin/env python
"""Encode images once into latent shards (the format of dataset.py); train from them many times.

    torchrun --nproc_per_node=8 preprocessing/encode.py --data-path /data/imagenet/train \
        --resolution 256 --out data/imagenet256                      # SD-VAE latents, all GPUs
    python preprocessing/encode.py --dataset fashion-mnist --split train --vae none \
        --resolution 32 --out data/fmnist-train                      # pixels, CPU demo

Item list: sorted and independent of the number of ranks. Shard i holds items
[i * S, (i + 1) * S) of it (S = --shard-size); rank r encodes the shards with i % world == r.
Every shard is written atomically (dataset.write_shard), followed by `meta.json` (its count,
skipped files and channel sums); a shard counts as done only once both exist, so a rerun with
the same arguments skips finished shards and a killed job resumes where it stopped. Rank 0
writes manifest.json last, after every shard is present and its count verified. Unreadable
images are skipped and listed in the manifest (shards may then hold fewer than S items); the
output is identical for any number of ranks.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # `python /path/to/preprocessing/encode.py` (any working directory, or torchrun) puts preprocessing/
    # itself on sys.path, where its images.py would shadow other modules; the imports below need the
    # repository root instead.
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))

import argparse
import contextlib
import glob
import json
import math
import shutil
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataset import (IMAGE_PAIRS, MANIFEST, DataError, atomic_write_json, image_manifest_fields, make_manifest,
                     shard_complete, shard_name, write_manifest, write_shard)
from distributed import (DistInfo, Preempted, StopSignals, add_preempt_arg, any_rank, barrier, ignore_stop_signals,
                         init_distributed, run_stoppable)
from preprocessing.images import FashionMNISTSource, ImageError, ImageFolderSource

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
RUN_FILE = "run.json"      # settings of the run that owns this directory (resume guard)
META_FILE = "meta.json"    # per-shard sidecar, written after the shard's arrays
STOP_EXIT_CODE = 3         # --stop-after-shards (simulated crash)
STOP_FILE = ".stop"        # a rank got SIGTERM / SIGUSR1: every rank stops (removed by the rerun)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SHARD_SIZE = 10_000    # default cap: resume granularity of about 1 % of ImageNet
SHARD_BYTES = 256 << 20    # default: keep one shard's mean + std under 256 MiB of RAM


class StopAfterShards(Exception):
    """Raised by --stop-after-shards to simulate a job that dies halfway."""


# ----------------------------------------------------------------------------- arguments

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=("folder", "fashion-mnist"), default="folder",
                   help="folder: ImageFolder layout under --data-path; fashion-mnist: the Debian package "
                        "dataset-fashion-mnist (or --data-path, or torchvision's downloader when online)")
    p.add_argument("--data-path", default=None,
                   help="image folder (ROOT/<class>/<image>); for fashion-mnist an optional directory "
                        "holding the *-ubyte(.gz) files")
    p.add_argument("--split", choices=("train", "test"), default=None, help="fashion-mnist split; train when omitted")
    p.add_argument("--out", required=True, help="output dataset directory (created; reruns resume in it)")
    p.add_argument("--resolution", type=int, default=256, help="square image size fed to the encoder")
    p.add_argument("--vae", default=DEFAULT_VAE,
                   help="diffusers AutoencoderKL: hub id or local directory; 'none' stores pixels in [-1, 1]")
    p.add_argument("--latent-scale", type=float, default=None,
                   help="override the manifest's latent_scale (default: the VAE's scaling_factor; 1 for none)")
    p.add_argument("--latent-shift", type=float, default=None,
                   help="override the manifest's latent_shift (default: the VAE's shift_factor or 0)")
    p.add_argument("--flip", action="store_true",
                   help="also store a horizontally flipped copy of every image (item 2k+1 mirrors item 2k)")
    p.add_argument("--store-images", action="store_true",
                   help="also keep each item's ADM-cropped uint8 image in its shard (image.npy; with --flip one "
                        "image per mirrored pair, which the flipped item reads mirrored): needed by train.py "
                        "--reg repa, whose encoder sees pixels")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call, per rank")
    p.add_argument("--shard-size", type=int, default=0,
                   help=f"source images per shard; 0 = min({MAX_SHARD_SIZE}, what fits {SHARD_BYTES >> 20} MiB)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (smoke tests)")
    p.add_argument("--workers", type=int, default=-1,
                   help="image-decoding DataLoader workers per rank; -1 = min(8, cores per rank - 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="encoder precision: fp32 (as REPA and EDM2; TF32 allowed on GPU) or bf16/fp16 autocast "
                        "(faster on GPU, but the posterior moments then come out of a half-precision layer)")
    p.add_argument("--stop-after-shards", type=int, default=None,
                   help="testing / resume drills only: each rank exits with code 3 after writing this many shards")
    add_preempt_arg(p)
    args = p.parse_args(argv)
    if args.dataset == "folder":
        if not args.data_path:
            p.error("--data-path is required with --dataset folder")
        if args.split is not None:
            p.error("--split only applies to --dataset fashion-mnist")
    elif args.split is None:
        args.split = "train"
    for name in ("resolution", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.shard_size < 0 or (args.limit is not None and args.limit < 1):
        p.error("--shard-size must be >= 0 and --limit >= 1")
    return args


# ----------------------------------------------------------------------------- encoder

def load_vae(name: str, device: torch.device) -> Any:
    """AutoencoderKL from a hub id or a local directory (a pipeline directory with vae/ works too)."""
    looks_local = os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1
    path = os.path.expanduser(name)
    if looks_local and not os.path.isdir(path):
        raise DataError(f"VAE directory {name!r} does not exist: pass a diffusers AutoencoderKL directory "
                        f"(save_pretrained), a hub id such as {DEFAULT_VAE}, or --vae none")
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise DataError(f"cannot import diffusers ({e}): pip install -r requirements.txt, or use --vae none") from None
    kwargs = {}
    if looks_local and not os.path.isfile(os.path.join(path, "config.json")) \
            and os.path.isfile(os.path.join(path, "vae", "config.json")):
        kwargs["subfolder"] = "vae"
    try:
        # low_cpu_mem_usage=False: the default wants `accelerate` and warns without it.
        vae = AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False, **kwargs)
    except Exception as e:  # offline hub, missing weights, wrong class: one actionable line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"cannot load AutoencoderKL from {name!r} ({type(e).__name__}: {msg}): check the hub id "
                        "and network access, or pass a local directory written by save_pretrained") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_downsample(vae: Any) -> int:
    # One 2x downsample between consecutive encoder blocks (diffusers' vae_scale_factor).
    return 2 ** (len(vae.config.block_out_channels) - 1)


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """--dtype name -> torch dtype. encode.py defaults to fp32 on every device: under bf16 autocast the
    posterior mean and log-variance come straight out of a bf16 conv (about 1.5 % error on std).
    "auto" (bf16 on GPU, fp16 without bf16 support, fp32 elsewhere) remains for other scripts."""
    if name == "auto":
        if device is None or device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise DataError(f"unknown --dtype {name!r}: choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def allow_tf32(device: torch.device, dtype: torch.dtype) -> bool:
    """fp32 on a GPU: let convolutions and matmuls use TF32 tensor cores (10-bit mantissa, far closer
    to fp32 than bf16's 7 bits), as REPA does. Process-wide; returns whether TF32 is on."""
    if device.type != "cuda" or dtype != torch.float32:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


class Encoder:
    """uint8 N x H x W x C images -> fp32 (mean, std) N x C' x H' x W' on the CPU."""

    def __init__(self, vae: Any, device: torch.device, dtype: torch.dtype):
        self.vae, self.device, self.dtype = vae, device, dtype

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # uint8 travels to the GPU (4x less traffic than fp32); scaling happens there.
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        if self.vae is None:
            return x.cpu(), None
        want = self.vae.config.in_channels
        if x.shape[1] != want:
            if x.shape[1] != 1:
                raise DataError(f"images have {x.shape[1]} channels, the VAE expects {want}")
            x = x.expand(-1, want, -1, -1)  # grayscale into an RGB encoder: replicate
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast:
            moments = self.vae.encode(x).latent_dist.parameters
        # Posterior from the raw moments in fp32 (same clamp as diffusers), so std is not
        # rounded through bf16 before it is stored in fp16.
        mean, logvar = moments.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise DataError(f"the VAE produced NaN/inf under {str(self.dtype).split('.')[-1]}: rerun with --dtype fp32")
        return mean.cpu(), std.cpu()


# ----------------------------------------------------------------------------- data loading

class _Items(Dataset):
    """Index -> (index, image or None, label, error); decoding runs in DataLoader workers."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, int, str | None]:
        try:
            return index, self.source.load(index), self.source.label(index), None
        except ImageError as e:
            return index, None, self.source.label(index), str(e)


def _collate(samples: list) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    ok = [s for s in samples if s[1] is not None]
    images = torch.from_numpy(np.stack([s[1] for s in ok])) if ok else None
    return images, [s[2] for s in ok], [(s[0], s[3]) for s in samples if s[1] is None]


def build_source(args: argparse.Namespace) -> Any:
    if args.dataset == "fashion-mnist":
        return FashionMNISTSource(args.split, args.resolution, args.data_path, args.limit)
    return ImageFolderSource(args.data_path, args.resolution, args.limit)


# ----------------------------------------------------------------------------- shard bookkeeping

def shard_range(index: int, shard_size: int, total: int) -> tuple[int, int]:
    return index * shard_size, min((index + 1) * shard_size, total)


def read_meta(out: str, index: int) -> dict | None:
    """The shard's sidecar if the shard is complete, else None."""
    if not shard_complete(out, index):
        return None
    try:
        with open(os.path.join(out, shard_name(index), META_FILE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # died between the shard rename and the sidecar: encode it again


def channel_sums(mean: np.ndarray, std: np.ndarray | None, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel sum of mean and of mean^2 + std^2 (float64, from the stored fp16 values);
    E over eps of z and z^2 follows from these, so the manifest stats are exact and cheap."""
    c = mean.shape[1]
    s1, s2 = np.zeros(c), np.zeros(c)
    for start in range(0, len(mean), chunk):
        m = mean[start:start + chunk].astype(np.float64)
        s1 += m.sum(axis=(0, 2, 3))
        s2 += (m * m).sum(axis=(0, 2, 3))
        if std is not None:
            s = std[start:start + chunk].astype(np.float64)
            s2 += (s * s).sum(axis=(0, 2, 3))
    return s1.tolist(), s2.tolist()


def check_paths(args: argparse.Namespace) -> None:
    """Refuse an --out inside the image folder up front: the next run would list it as a class folder
    (shards hold no images) and fail."""
    if args.dataset != "folder" or not args.data_path:
        return
    data, out = os.path.realpath(args.data_path), os.path.realpath(args.out)
    if out == data or out.startswith(data.rstrip(os.sep) + os.sep):
        raise DataError(f"--out {args.out!r} is inside --data-path {args.data_path!r}: the next run would read the "
                        "output as a class folder; pass an --out outside the input folder")


def refuse_other_settings(run_path: str, config: dict, error: type[DataError], elsewhere: str) -> None:
    """An interrupted run's RUN_FILE resumes only with the same settings (shared with preprocessing/memory.py)."""
    out = os.path.dirname(run_path)
    try:
        with open(run_path) as f:
            old = json.load(f)["config"]
    except (OSError, ValueError, KeyError):
        raise error(f"{run_path} is unreadable: delete {out!r} (or pass {elsewhere}) and rerun") from None
    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if diff:
        raise error(f"{out!r} holds a run with different settings ({', '.join(diff)} changed): pass the same "
                    f"arguments to resume, or {elsewhere}")


def refuse_old_image_layout(run_path: str, config: dict) -> None:
    """An interrupted --flip --store-images run of an older encoder wrote one image per item; this one
    writes one per pair (image_layout "pair"), so its shards would not mix."""
    try:
        with open(run_path) as f:
            old = json.load(f)["config"]
    except (OSError, ValueError, KeyError):
        return  # refuse_other_settings names the unreadable file
    if old.get("store_images") and old.get("flip") and "image_layout" not in old and config.get("image_layout"):
        raise DataError(f"{os.path.dirname(run_path)!r} holds an interrupted --flip --store-images run of an older "
                        "encoder, which stored a full mirrored image per flipped item; this one stores one image "
                        "per pair: pass a fresh --out, or finish that run with the code that started it")


def check_output(out: str, config: dict, info: DistInfo) -> None:
    """Create --out, prove it writable, and refuse to mix with a run that used other settings."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{info.rank}-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise DataError(f"output directory {out!r} is not writable ({e.strerror or e}): pass a writable --out") from None
    run_path = os.path.join(out, RUN_FILE)
    if os.path.isfile(run_path):
        refuse_old_image_layout(run_path, config)
        refuse_other_settings(run_path, config, DataError, "a fresh --out")
    elif os.path.exists(os.path.join(out, MANIFEST)) or glob.glob(os.path.join(out, "shard-*")):
        raise DataError(f"{out!r} already holds a dataset not written by this encoder run: pass a fresh --out")


# ----------------------------------------------------------------------------- main work

def encode_shards(source: Any, encoder: Encoder, out: str, todo: list[int], shard_size: int,
                  latent_shape: tuple[int, ...], args: argparse.Namespace, info: DistInfo,
                  stop: StopSignals | None = None) -> int:
    """Encode this rank's unfinished shards; returns the number of source images read. Once `stop` is
    requested (SIGTERM / SIGUSR1 on any rank) it returns after the current batch, dropping the shard
    in flight (a rerun encodes it)."""
    stop = stop or StopSignals()
    image_shape = (args.resolution, args.resolution, source.channels)
    n = len(source)
    batches: list[list[int]] = []
    per_shard: list[int] = []
    for i in todo:  # batches never cross shards, so batch contents do not depend on the world size
        start, end = shard_range(i, shard_size, n)
        chunk = [list(range(b, min(b + args.batch_size, end))) for b in range(start, end, args.batch_size)]
        batches += chunk
        per_shard.append(len(chunk))
    if not batches:
        return 0
    workers = args.workers
    if workers < 0:
        workers = min(8, max(0, (os.cpu_count() or 1) // info.world_size - 1))
    loader = DataLoader(_Items(source), batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                        pin_memory=info.device.type == "cuda", prefetch_factor=4 if workers else None,
                        worker_init_fn=ignore_stop_signals)  # a scheduler signals the workers too
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, unit="img", disable=not info.is_main, dynamic_ncols=True, smoothing=0.05,
               desc=f"encode rank 0/{info.world_size}" if info.world_size > 1 else "encode",
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    it = iter(loader)
    written = 0
    for shard, nb in zip(todo, per_shard):
        means, stds, labels, pixels, skipped = [], [], [], [], []
        for _ in range(nb):
            if stop.requested():
                bar.close()
                return total
            images, labs, bad = next(it)
            for index, err in bad:
                skipped.append(dict(index=index, path=source.describe(index), error=err))
                tqdm.write(f"warning: skipping unreadable image {source.describe(index)} ({err})", file=sys.stderr)
            if images is not None:
                mean, std = encoder(images)
                lab = torch.tensor(labs, dtype=torch.int64)
                if args.flip:  # item 2k is the image, 2k+1 its mirror (encoded, not mirrored latents)
                    fmean, fstd = encoder(images.flip(2))
                    mean = torch.stack([mean, fmean], 1).flatten(0, 1)
                    std = None if std is None else torch.stack([std, fstd], 1).flatten(0, 1)
                    lab = lab.repeat_interleave(2)
                if args.store_images:  # the very pixels the latents came from; with --flip one per pair
                    pixels.append(images)  # (row k: item 2k; item 2k+1 reads it mirrored, image_layout "pair")
                means.append(mean.half())
                stds.append(None if std is None else std.half())
                labels.append(lab)
            bar.update(len(labs) + len(bad))
        if means:
            mean = torch.cat(means).numpy()
            std = None if encoder.vae is None else torch.cat(stds).numpy()
            lab = torch.cat(labels).numpy()
            image = torch.cat(pixels).numpy() if args.store_images else None
        else:  # every image of this shard was unreadable: an empty shard keeps the numbering
            mean, std, lab = np.zeros((0, *latent_shape), np.float16), None, np.zeros(0, np.int64)
            image = np.zeros((0, *image_shape), np.uint8) if args.store_images else None
        if tuple(mean.shape[1:]) != tuple(latent_shape):
            raise DataError(f"encoder output {tuple(mean.shape[1:])} differs from the expected latent shape "
                            f"{tuple(latent_shape)}: check --resolution against the VAE")
        s1, s2 = channel_sums(mean, std)
        start, end = shard_range(shard, shard_size, n)
        meta = dict(shard=shard, start=start, end=end, count=int(len(lab)), images=end - start - len(skipped),
                    skipped=skipped, sum=s1, sumsq=s2, elements_per_channel=int(len(lab)) * math.prod(latent_shape[1:]))
        try:
            write_shard(out, shard, mean, std, lab, image, image_pairs=args.flip)
            # The sidecar goes in after the rename: a shard without it is redone on resume.
            atomic_write_json(os.path.join(out, shard_name(shard), META_FILE), meta)
        except OSError as e:
            raise DataError(f"cannot write {shard_name(shard)} to {out!r} ({e.strerror or e}): free disk space or "
                            "pass a writable --out; rerunning resumes") from None
        written += 1
        if args.stop_after_shards is not None and written >= args.stop_after_shards:
            bar.close()
            raise StopAfterShards(f"rank {info.rank}: stopping after {written} shards (--stop-after-shards)")
    bar.close()
    return total


def finalize(out: str, num_shards: int, latent_shape: tuple[int, ...], source: Any, scale: float, shift: float,
             extra: dict) -> dict:
    """Rank 0, after every rank finished: merge the sidecars and write manifest.json last."""
    metas = []
    for i in range(num_shards):
        meta = read_meta(out, i)
        if meta is None:
            raise DataError(f"{shard_name(i)} in {out!r} is missing or incomplete after encoding (did a rank "
                            "fail?): rerun the same command to resume")
        metas.append(meta)
    counts = [m["count"] for m in metas]
    skipped = [s for m in metas for s in m["skipped"]]
    if sum(counts) == 0:
        raise DataError(f"none of the {len(source)} images could be read (first error: {skipped[0]['error']}): "
                        "check the input files")
    elements = sum(m["elements_per_channel"] for m in metas)
    raw_mean = np.sum([m["sum"] for m in metas], axis=0) / elements
    raw_sq = np.sum([m["sumsq"] for m in metas], axis=0) / elements
    # Scaled training latents z = (mean + std * eps - shift) * scale, moments taken over eps too.
    ch_mean = (raw_mean - shift) * scale
    ch_std = np.sqrt(np.maximum(raw_sq - raw_mean ** 2, 0.0)) * abs(scale)
    manifest = make_manifest(
        count=sum(counts), latent_shape=latent_shape, num_classes=len(source.class_names), shard_counts=counts,
        class_names=source.class_names, latent_scale=scale, latent_shift=shift, source=source.description,
        image_count=sum(m["images"] for m in metas), num_skipped=len(skipped), skipped=skipped,
        channel_mean=ch_mean.tolist(), channel_std=ch_std.tolist(), **extra)
    write_manifest(out, manifest)
    # Leftovers of killed writers (write_shard / atomic_write_* name them after their pid).
    for tmp in glob.glob(os.path.join(out, ".shard-*.tmp-*")) + glob.glob(os.path.join(out, "*.tmp-*")):
        shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else os.remove(tmp)
    return manifest


def run(args: argparse.Namespace, argv: Sequence[str], stop: StopSignals | None = None) -> dict | None:
    """The whole job on this rank; returns the manifest on rank 0. Raises Preempted after a stop
    (SIGTERM / SIGUSR1, see `encode_shards`)."""
    stop = stop or StopSignals()
    t0 = time.time()
    check_paths(args)
    info = init_distributed(args.device)
    say = print if info.is_main else (lambda *a, **k: None)
    source = build_source(args)
    if len(source) == 0:
        raise DataError("the input has no images")
    vae = None
    if args.vae != "none":
        if not info.is_main:
            barrier()  # rank 0 downloads into the hub cache first; the others then read the cache
        try:
            vae = load_vae(args.vae, info.device)
        finally:
            if info.is_main:
                barrier()
    dtype = resolve_dtype(args.dtype)
    tf32 = allow_tf32(info.device, dtype)
    if vae is None:
        latent_shape = (source.channels, args.resolution, args.resolution)
        scale, shift = 1.0, 0.0
    else:
        f = vae_downsample(vae)
        if args.resolution % f:
            raise DataError(f"--resolution {args.resolution} is not divisible by the VAE's downsampling factor {f}: "
                            f"use a multiple of {f} (e.g. {max(f, args.resolution // f * f)})")
        latent_shape = (vae.config.latent_channels, args.resolution // f, args.resolution // f)
        scale = float(vae.config.scaling_factor)
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    scale = scale if args.latent_scale is None else args.latent_scale
    shift = shift if args.latent_shift is None else args.latent_shift
    copies = 2 if args.flip else 1
    # Bytes a source image holds in RAM while its shard is assembled: fp16 mean + std of each of its
    # items, and its uint8 image (once, also with --flip).
    source_bytes = copies * 4 * math.prod(latent_shape) + (args.resolution ** 2 * source.channels
                                                           if args.store_images else 0)
    shard_size = args.shard_size or max(1, min(MAX_SHARD_SIZE, SHARD_BYTES // source_bytes))
    n = len(source)
    num_shards = math.ceil(n / shard_size)

    vae_id = os.path.abspath(os.path.expanduser(args.vae)) if os.path.isdir(os.path.expanduser(args.vae)) else args.vae
    # Everything that changes shard contents; a resume must match it exactly.
    config = dict(source=source.description, items=n, items_sha256=source.fingerprint(), resolution=args.resolution,
                  vae=vae_id, flip=args.flip, shard_size=shard_size, dtype=str(dtype).split(".")[-1],
                  latent_shape=list(latent_shape))  # not the batch size: resuming with a smaller one is fine
    if args.store_images:  # only when set: an older run.json (no such key) still resumes without it
        config["store_images"] = True
        if args.flip:  # one image per mirrored pair (older runs stored one per item: not resumed)
            config["image_layout"] = IMAGE_PAIRS
    out = args.out
    check_output(out, config, info)
    stop.marker = os.path.join(out, STOP_FILE)
    if info.is_main:
        stop.clear_marker()  # left by a stopped run: this one resumes
    barrier()  # every rank checked the old run.json before rank 0 replaces it
    if info.is_main:
        atomic_write_json(os.path.join(out, RUN_FILE), dict(config=config))
    mine = [i for i in range(num_shards) if i % info.world_size == info.rank]
    todo = [i for i in mine if read_meta(out, i) is None]
    say(f"encode: {n} images from {source.description} -> {out}: {num_shards} shards of {shard_size}, "
        f"latent {'x'.join(map(str, latent_shape))}, vae {args.vae}, {config['dtype']}{' (TF32)' if tf32 else ''} "
        f"on {info.device}, {info.world_size} rank(s)", flush=True)
    if len(todo) < len(mine):
        say(f"resume: rank 0 skips {len(mine) - len(todo)} completed shards", flush=True)
    if getattr(source, "ignored", None):
        say(f"warning: ignoring {len(source.ignored)} non-image files in class folders "
            f"(e.g. {source.ignored[0]}); they are listed in the manifest", file=sys.stderr)
    encoder = Encoder(vae, info.device, dtype)
    t1 = time.time()
    done = encode_shards(source, encoder, out, todo, shard_size, latent_shape, args, info, stop)
    dt = time.time() - t1
    if done and not stop.requested():
        print(f"rank {info.rank}: encoded {done} images in {dt:.1f} s ({done / max(dt, 1e-9):.1f} img/s)", flush=True)
    if any_rank(stop.requested()):  # also the barrier before rank 0 merges the shards
        finished = sum(read_meta(out, i) is not None for i in range(num_shards)) if info.is_main else 0
        raise Preempted(f"stopped by {stop.why()}: {finished} of {num_shards} shards are complete in {out}; run "
                        "the same command to resume" if info.is_main else "")
    if not info.is_main:
        return None
    extra = dict(vae=args.vae, flip=args.flip, resolution=args.resolution, shard_size=shard_size,
                 items_per_image=copies, encoder_dtype=config["dtype"], encoder_tf32=tf32,
                 source_sha256=config["items_sha256"],
                 vae_config=None if vae is None else {k: v for k, v in dict(vae.config).items() if not k.startswith("_")},
                 ignored_files=list(getattr(source, "ignored", [])), argv=list(argv), args=vars(args))
    if args.store_images:
        extra.update(image_manifest_fields((args.resolution, args.resolution, source.channels), pairs=args.flip))
    if isinstance(source, FashionMNISTSource):
        extra["source_path"] = source.path
    manifest = finalize(out, num_shards, latent_shape, source, scale, shift, extra)
    say(f"done: {manifest['count']} items ({manifest['image_count']} images, {manifest['num_skipped']} skipped"
        f"{', listed in manifest.json' if manifest['num_skipped'] else ''}) in {num_shards} shards, "
        f"{time.time() - t0:.1f} s; channel mean {np.round(manifest['channel_mean'], 4).tolist()}, "
        f"std {np.round(manifest['channel_std'], 4).tolist()}", flush=True)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        return run_stoppable(run, args, argv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except StopAfterShards as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        return STOP_EXIT_CODE
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: other ranks may be gone after an error


if __name__ == "__main__":
    sys.exit(main())
