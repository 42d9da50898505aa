#!/usr/bin/env python
"""Build GMem's memory bank: one L2-normalised fp16 snippet per item of a latent dataset.

    torchrun --nproc_per_node=8 preprocessing/memory.py --data-dir data/imagenet256 --encoder dinov2
    python preprocessing/memory.py --data-dir data/fmnist-train \
        --encoder sit:results/demo/checkpoints/0001600.pt          # encoder-free, from our own SiT

The bank goes to DATA_DIR/memory-<name>/ (format: gmem.py); row i belongs to dataset item i, so a
flipped copy (item 2k+1 when the dataset has flips) gets the snippet of the flipped image.

Encoders
  dinov2     DINOv2 ViT-B/14 (timm `vit_base_patch14_dinov2`) class token after the final norm, 768-d,
             as GMem. Input: the dataset's own ADM-cropped image (re-read from the images the dataset
             was encoded from, the same sources as encode.py), grey replicated to RGB, /255, ImageNet
             mean/std, bicubic resize to --image-size (224); the position embedding is resampled to
             that size once at load. --dinov2-weights: hub id (default), local weights file, or
             `random` (tests and controls).
  sit:CKPT   encoder-free: the EMA weights of one of our training checkpoints, on the clean latent
             (posterior mean, scaled as in training) at t = --sit-t (default 0, the data end of the
             path: the snippet sees the image itself, no noise), with the null condition (drop mask)
             so the snippet does not encode the label by construction. Token-mean of the hidden state
             after the regulariser's block, through the Repulsor head when the checkpoint has one
             (dim = proj-dim); otherwise the pooled hidden state (dim = hidden size) after
             --sit-depth (default: the regulariser's block, or Repulsor's default block).

Multi-rank and resumable like encode.py: items are cut into chunks of --chunk-size, rank r encodes
the chunks with c % world == r, each chunk is written atomically, a rerun with the same arguments
skips finished chunks, and rank 0 joins them and writes memory.json last. The output does not
depend on the number of ranks.
"""
from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `python preprocessing/memory.py` puts only preprocessing/ on the path
    sys.path.insert(0, _ROOT)

import argparse
import contextlib
import json
import math
import re
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import gmem
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from dataset import DataError, LatentDataset, atomic_write_json, data_fingerprint, latent_scale_shift, read_manifest
from distributed import (DistInfo, Preempted, StopSignals, add_preempt_arg, any_rank, barrier, ignore_stop_signals,
                         init_distributed, run_stoppable)
from encoders import (DEFAULT_DINOV2, DINOV2_ARCH, IMAGENET_MEAN, IMAGENET_STD,  # noqa: F401 (re-exported)
                      dinov2_inputs, load_dinov2, looks_like_file)
from gmem import MemoryBankError
from loss import Repulsor, default_reg_depth, interpolate
from preprocessing.encode import refuse_other_settings, resolve_dtype
from preprocessing.images import FashionMNISTSource, ImageError, ImageFolderSource
from samplers import image_seed

RUN_FILE = "run.json"      # settings of the build that owns the bank directory (resume guard)
STOP_EXIT_CODE = 3         # --stop-after-chunks (simulated crash)
STOP_FILE = ".stop"        # a rank got SIGTERM / SIGUSR1: every rank stops (removed by the rerun)


class StopAfterChunks(Exception):
    """Raised by --stop-after-chunks to simulate a job that dies halfway."""


# ----------------------------------------------------------------------------- arguments

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", required=True, help="latent dataset (output of preprocessing/encode.py)")
    p.add_argument("--encoder", required=True, help="dinov2, or sit:CKPT (a train.py checkpoint)")
    p.add_argument("--name", default=None,
                   help="bank name: DATA_DIR/memory-NAME (default: dinov2, or sit-<run>-<step>)")
    p.add_argument("--out", default=None, help="bank directory (overrides --name's location)")
    p.add_argument("--batch-size", type=int, default=64, help="items per encoder call, per rank")
    p.add_argument("--chunk-size", type=int, default=4096, help="items per resumable chunk")
    p.add_argument("--workers", type=int, default=-1,
                   help="DataLoader workers per rank; -1 = min(8, cores per rank - 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="encoder autocast dtype; auto = bf16 on GPU (fp16 without bf16 support), fp32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="random dinov2 weights; sit noise when --sit-t > 0")
    g = p.add_argument_group("dinov2")
    g.add_argument("--dinov2-weights", default=DEFAULT_DINOV2,
                   help="timm hub id, a local weights file (timm or original DINOv2 layout), or 'random'")
    g.add_argument("--dinov2-config", default=None,
                   help="JSON of timm.create_model overrides, e.g. a tiny test ViT "
                        "'{\"embed_dim\": 32, \"depth\": 1, \"num_heads\": 2}'")
    g.add_argument("--image-size", type=int, default=224, help="DINOv2 input size (bicubic resize)")
    g.add_argument("--data-path", default=None,
                   help="images the dataset was encoded from, if they moved (default: from its manifest)")
    g = p.add_argument_group("sit:CKPT")
    g.add_argument("--sit-t", type=float, default=0.0, help="time of the encoder pass (0 = clean latent)")
    g.add_argument("--sit-depth", type=int, default=None, help="block to pool (default: the regulariser's)")
    g.add_argument("--sit-weights", choices=("ema", "model"), default="ema")
    p.add_argument("--stop-after-chunks", type=int, default=None,
                   help="testing / resume drills only: each rank exits with code 3 after writing this many chunks")
    add_preempt_arg(p)
    args = p.parse_args(argv)
    kind = args.encoder.split(":", 1)[0]
    if kind not in ("dinov2", "sit") or (kind == "sit") != (":" in args.encoder) or args.encoder == "sit:":
        p.error(f"--encoder {args.encoder!r}: use dinov2 or sit:CKPT")
    for name in ("batch_size", "chunk_size", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.sit_t < 1.0:
        p.error("--sit-t must be in [0, 1)")
    return args


# ----------------------------------------------------------------------------- dinov2

def source_from_manifest(manifest: dict, data_path: str | None) -> Any:
    """The image source a dataset was encoded from (encode.py's arguments in its manifest)."""
    enc = manifest.get("args")
    if not isinstance(enc, dict) or "dataset" not in enc:
        raise DataError("the dataset's manifest has no image-source arguments (not written by "
                        "preprocessing/encode.py): the dinov2 encoder needs the images; use --encoder sit:CKPT")
    path = data_path or enc.get("data_path")
    if enc["dataset"] == "fashion-mnist":
        source = FashionMNISTSource(enc.get("split") or "train", enc["resolution"], path, enc.get("limit"))
    else:
        source = ImageFolderSource(path, enc["resolution"], enc.get("limit"))
    want = manifest.get("source_sha256")
    if want and source.fingerprint() != want:
        raise DataError(f"the images at {source.description} differ from those the dataset was encoded from "
                        "(item-list hash mismatch): pass --data-path pointing at the original images")
    return source


def dataset_items(manifest: dict, num_source: int) -> list[tuple[int, bool]]:
    """(source image index, flipped) of every dataset item, in item order: encode.py keeps source
    order, drops the skipped (unreadable) images, and with flip puts the mirror right after."""
    skipped = {int(s["index"]) for s in manifest.get("skipped") or []}
    flips = (False, True) if manifest.get("flip") else (False,)
    items = [(i, f) for i in range(num_source) if i not in skipped for f in flips]
    if len(items) != manifest["count"]:
        raise DataError(f"the image source gives {len(items)} items but the dataset has {manifest['count']}: "
                        "pass --data-path pointing at the images the dataset was encoded from")
    return items


class _SourceImages(Dataset):
    """Source index -> (image uint8 H x W x C or None, error); decoding runs in DataLoader workers."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, str | None]:
        try:
            return self.source.load(index), None
        except ImageError as e:
            return None, str(e)


def _collate_images(samples: list) -> list:
    return samples


class DinoEncoder:
    kind = "dinov2"

    def __init__(self, args: argparse.Namespace, manifest: dict, device: torch.device, dtype: torch.dtype):
        try:
            config = json.loads(args.dinov2_config) if args.dinov2_config else {}
        except json.JSONDecodeError as e:
            raise DataError(f"--dinov2-config is not valid JSON ({e}): pass e.g. '{{\"depth\": 1}}'") from None
        self.source = source_from_manifest(manifest, args.data_path)
        self.items = dataset_items(manifest, len(self.source))
        self.num_items = len(self.items)
        self.model = load_dinov2(args.dinov2_weights, args.image_size, config, args.seed,
                                 config_flag="--dinov2-config").to(device)
        self.device, self.dtype, self.image_size = device, dtype, args.image_size
        self.dim = int(self.model.num_features)
        weights = args.dinov2_weights
        self.encoder_id = os.path.abspath(os.path.expanduser(weights)) if looks_like_file(weights) else weights
        self.settings = dict(arch=DINOV2_ARCH, config=config, image_size=args.image_size, resize="bicubic",
                             mean=IMAGENET_MEAN, std=IMAGENET_STD, token="class (after final norm)",
                             crop="adm center crop at the dataset resolution", resolution=self.source.resolution,
                             source=self.source.description, source_sha256=manifest.get("source_sha256"),
                             flip=bool(manifest.get("flip")), dtype=str(dtype).split(".")[-1],
                             seed=args.seed if weights == "random" else None)
        self.dataset = _SourceImages(self.source)
        self.collate = _collate_images

    def batches(self, start: int, end: int, batch_size: int) -> list[list[int]]:
        """Source-image batches for items [start, end); chunks never split an image from its mirror."""
        srcs = list(dict.fromkeys(src for src, _ in self.items[start:end]))
        per = max(1, batch_size // (2 if self.settings["flip"] else 1))
        return [srcs[b:b + per] for b in range(0, len(srcs), per)]

    @torch.inference_mode()
    def __call__(self, indices: list[int], loaded: list) -> torch.Tensor:
        for src, (image, err) in zip(indices, loaded):
            if image is None:  # it was readable when the dataset was encoded
                raise DataError(f"image {self.source.describe(src)} is now unreadable ({err}): restore the images "
                                "the dataset was encoded from")
        images = torch.from_numpy(np.stack([image for image, _ in loaded]))
        if self.settings["flip"]:  # item 2k is the image, 2k+1 its mirror, as in encode.py
            images = torch.stack([images, images.flip(2)], 1).flatten(0, 1)
        x = dinov2_inputs(images.to(self.device), self.image_size)
        with _autocast(self.device, self.dtype):
            tokens = self.model.forward_features(x)
        return tokens[:, 0].float()


# ----------------------------------------------------------------------------- sit:CKPT

def sit_block_and_head(ckpt: dict, model_depth: int, depth: int | None) -> tuple[int, Repulsor | None]:
    """The block to pool and, for a Repulsor checkpoint, its head (weights from ckpt["regulariser"])."""
    args = ckpt.get("args") or {}
    reg = args.get("reg", "none")
    reg_block = args.get("reg_depth")
    if reg_block is None:  # train.py's rule: a named model with its own depth gets the named default block
        name = args.get("model")
        named = None if name in (None, "custom") or args.get("depth") is not None else name
        reg_block = default_reg_depth(reg if reg in ("repulsor", "dispersive") else "repulsor", named, model_depth)
    depth = reg_block if depth is None else depth
    if not 1 <= depth <= model_depth:
        raise CheckpointError(f"--sit-depth {depth} is outside 1..{model_depth} for this checkpoint's model")
    state = {k: v for k, v in (ckpt.get("regulariser") or {}).items() if k.startswith(("head.", "running_"))}
    if reg != "repulsor" or not state or depth != reg_block:
        return depth, None  # the head was trained on the regulariser's block only
    hidden, proj_hidden, proj_dim = state["head.0.weight"].shape[1], state["head.0.weight"].shape[0], \
        state["head.4.weight"].shape[0]
    # Checkpoints from before --proj-head hold the uncentred head (with a last bias, no running statistics).
    kind = args.get("proj_head") or "mlp"
    head = Repulsor(hidden, depth, proj_dim, proj_hidden, bank_size=0, global_batch=2, head=kind)
    missing, unexpected = head.load_state_dict(state, strict=False)
    if unexpected or (set(missing) - {"running_mean", "running_var", "running_steps"}) or (missing and kind != "mlp"):
        raise CheckpointError(f"the checkpoint's Repulsor head does not load (missing {missing}, unexpected "
                              f"{unexpected}): it was not written by this train.py") from None
    return depth, head.eval().requires_grad_(False)


class _LatentMeans(Dataset):
    def __init__(self, data: LatentDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index][0]


class SitEncoder:
    kind = "sit"

    def __init__(self, args: argparse.Namespace, data_dir: str, manifest: dict, device: torch.device,
                 dtype: torch.dtype):
        path = args.encoder.split(":", 1)[1]
        ckpt = load_checkpoint(path, fix="pass another --encoder sit:CKPT")
        if "model_config" not in ckpt:
            raise CheckpointError(f"checkpoint {path!r} has no model_config (not written by train.py): the sit "
                                  "encoder needs one of our training checkpoints")
        self.model = model_from_checkpoint(ckpt, args.sit_weights, log=lambda m: None).to(device).eval()
        cfg = self.model.config
        shape = [cfg.in_channels, cfg.input_size, cfg.input_size]
        if list(manifest["latent_shape"]) != shape:
            raise CheckpointError(f"checkpoint {path!r} models {'x'.join(map(str, shape))} latents but the dataset "
                                  f"holds {'x'.join(map(str, manifest['latent_shape']))}: use a checkpoint trained "
                                  "on this kind of data")
        self.depth, self.head = sit_block_and_head(ckpt, cfg.depth, args.sit_depth)
        if self.head is not None:
            self.head.to(device)
        self.dim = int(self.head.head[-1].out_features if self.head is not None else cfg.hidden_size)
        self.scale, self.shift = (v.to(device) for v in latent_scale_shift(manifest))
        self.t, self.seed = args.sit_t, args.seed
        self.path_type = (ckpt.get("args") or {}).get("path_type", "linear")
        self.device, self.dtype = device, dtype
        self.encoder_id = os.path.abspath(path)
        self.settings = dict(checkpoint=self.encoder_id, step=ckpt.get("step"), weights=args.sit_weights,
                             model_config=cfg.to_dict(), t=self.t, depth=self.depth, pool="token mean",
                             head="repulsor" if self.head is not None else None, condition="null (drop mask)",
                             path_type=self.path_type, latent="posterior mean, scaled",
                             seed=self.seed if self.t > 0 else None, dtype=str(dtype).split(".")[-1])
        self.dataset = _LatentMeans(LatentDataset(data_dir))
        self.num_items = len(self.dataset)
        self.collate = None

    def batches(self, start: int, end: int, batch_size: int) -> list[list[int]]:
        return [list(range(b, min(b + batch_size, end))) for b in range(start, end, batch_size)]

    @torch.inference_mode()
    def __call__(self, indices: list[int], mean: torch.Tensor) -> torch.Tensor:
        x = (mean.to(self.device).float() - self.shift) * self.scale
        n = x.shape[0]
        t = torch.full((n,), self.t, device=self.device)
        if self.t > 0:  # noise of item i from (seed, i): the same on any number of ranks
            gens = [torch.Generator().manual_seed(image_seed(self.seed, i)) for i in indices]
            eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(self.device)
            x, _ = interpolate(self.path_type, x, eps, t)
        cfg = self.model.config
        y = (torch.zeros(n, cfg.memory_dim, device=self.device) if cfg.cond == "memory"
             else torch.zeros(n, dtype=torch.long, device=self.device))
        drop = torch.ones(n, dtype=torch.bool, device=self.device)  # the null condition: no label in the snippet
        with _autocast(self.device, self.dtype):
            _, hidden = self.model(x, t, y, return_hidden_at=self.depth, drop=drop)
        if self.head is not None:
            return self.head.project(hidden.float())
        return hidden.float().mean(dim=1)


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


# ----------------------------------------------------------------------------- main work

def default_name(args: argparse.Namespace) -> str:
    if args.encoder == "dinov2":
        return "dinov2"
    path = os.path.abspath(args.encoder.split(":", 1)[1])
    parent = os.path.dirname(path)  # train.py writes RUN/checkpoints/STEP.pt: name it after RUN
    run = os.path.basename(os.path.dirname(parent)) if os.path.basename(parent) == "checkpoints" else ""
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"sit-{run}-{stem}" if run else f"sit-{stem}")


def check_output(out: str, config: dict, info: DistInfo) -> bool:
    """Create the bank directory and refuse to mix with another build; True if already complete."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the bank directory {out!r} ({e.strerror or e}): pass a writable --out") from None
    meta_path = os.path.join(out, gmem.MEMORY_META)
    if os.path.isfile(meta_path):
        meta = gmem.read_memory_meta(out)
        same = (meta["encoder"], meta["encoder_id"], meta["settings"], meta["data"]["hash"]) == \
            (config["encoder"], config["encoder_id"], config["settings"], config["data_hash"])
        if not same:
            raise MemoryBankError(f"{out!r} holds a bank built with other settings: pass another --name, or delete "
                                  "it to rebuild")
        return True
    run_path = os.path.join(out, RUN_FILE)
    if os.path.isfile(run_path):
        refuse_other_settings(run_path, config, MemoryBankError, "another --name")
    elif os.listdir(out):
        raise MemoryBankError(f"{out!r} is not empty and holds no bank build: pass another --name or --out")
    return False


def encode_chunks(encoder: Any, out: str, todo: list[int], chunk_size: int, args: argparse.Namespace,
                  info: DistInfo, stop: StopSignals | None = None) -> int:
    """Encode this rank's unfinished chunks; returns the number of items encoded. Once `stop` is
    requested (SIGTERM / SIGUSR1 on any rank) it returns after the current batch, dropping the chunk
    in flight (a rerun encodes it)."""
    stop = stop or StopSignals()
    n = encoder.num_items
    batches: list[list[int]] = []
    per_chunk: list[int] = []
    for c in todo:  # batches never cross chunks, so their contents do not depend on the world size
        chunk = encoder.batches(c * chunk_size, min((c + 1) * chunk_size, n), args.batch_size)
        batches += chunk
        per_chunk.append(len(chunk))
    if not batches:
        return 0
    workers = args.workers
    if workers < 0:
        workers = min(8, max(0, (os.cpu_count() or 1) // info.world_size - 1))
    loader = DataLoader(encoder.dataset, batch_sampler=batches, num_workers=workers, collate_fn=encoder.collate,
                        pin_memory=info.device.type == "cuda", prefetch_factor=4 if workers else None,
                        worker_init_fn=ignore_stop_signals)  # a scheduler signals the workers too
    total = sum(min((c + 1) * chunk_size, n) - c * chunk_size for c in todo)
    bar = tqdm(total=total, unit="item", disable=not info.is_main, dynamic_ncols=True, smoothing=0.05,
               desc=f"memory rank 0/{info.world_size}" if info.world_size > 1 else "memory",
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    it = zip(batches, loader)
    written = 0
    for c, nb in zip(todo, per_chunk):
        rows = []
        for _ in range(nb):
            if stop.requested():
                bar.close()
                return total
            indices, batch = next(it)
            rows.append(encoder(indices, batch).cpu())
            bar.update(len(rows[-1]))
        snippets = torch.cat(rows)
        want = min((c + 1) * chunk_size, n) - c * chunk_size
        if snippets.shape != (want, encoder.dim):
            raise MemoryBankError(f"chunk {c}: the encoder returned {tuple(snippets.shape)}, expected ({want}, "
                                  f"{encoder.dim})")
        try:
            gmem.write_chunk(out, c, snippets)
        except OSError as e:
            raise DataError(f"cannot write chunk {c} to {out!r} ({e.strerror or e}): free disk space or pass a "
                            "writable --out; rerunning resumes") from None
        written += 1
        if args.stop_after_chunks is not None and written >= args.stop_after_chunks:
            bar.close()
            raise StopAfterChunks(f"rank {info.rank}: stopping after {written} chunks (--stop-after-chunks)")
    bar.close()
    return total


def run(args: argparse.Namespace, argv: Sequence[str], stop: StopSignals | None = None) -> dict | None:
    """The whole job on this rank; returns memory.json's contents on rank 0. Raises Preempted after a
    stop (SIGTERM / SIGUSR1, see `encode_chunks`)."""
    stop = stop or StopSignals()
    t0 = time.time()
    info = init_distributed(args.device)
    say = print if info.is_main else (lambda *a, **k: None)
    manifest = read_manifest(args.data_dir)
    dtype = resolve_dtype(args.dtype, info.device)
    if args.encoder == "dinov2":
        if not info.is_main:
            barrier()  # rank 0 downloads into the hub cache first; the others then read the cache
        try:
            encoder: Any = DinoEncoder(args, manifest, info.device, dtype)
        finally:
            if info.is_main:
                barrier()
    else:
        encoder = SitEncoder(args, args.data_dir, manifest, info.device, dtype)
    copies = 2 if encoder.kind == "dinov2" and manifest.get("flip") else 1
    chunk_size = math.ceil(args.chunk_size / copies) * copies  # an image and its mirror share a chunk
    n = int(manifest["count"])
    num_chunks = math.ceil(n / chunk_size)
    out = args.out or gmem.memory_dir(args.data_dir, args.name or default_name(args))
    config = dict(encoder=encoder.kind, encoder_id=encoder.encoder_id, settings=encoder.settings, dim=encoder.dim,
                  count=n, chunk_size=chunk_size, data_hash=data_fingerprint(manifest)["hash"])
    config = json.loads(json.dumps(config))  # tuples -> lists, as it reads back from run.json
    done = check_output(out, config, info)
    stop.marker = os.path.join(out, STOP_FILE)
    if info.is_main:
        stop.clear_marker()  # left by a stopped run: this one resumes
    barrier()  # every rank checked the old run.json (and no stale marker is left) before rank 0 replaces it
    if done:
        say(f"memory: {out} is already complete ({n} snippets, {encoder.dim}-d): nothing to do", flush=True)
        return gmem.read_memory_meta(out) if info.is_main else None
    if info.is_main:
        atomic_write_json(os.path.join(out, RUN_FILE), dict(config=config))
    mine = [c for c in range(num_chunks) if c % info.world_size == info.rank]
    todo = [c for c in mine if not gmem.chunk_complete(out, c)]
    say(f"memory: {n} items of {args.data_dir} -> {out}: encoder {args.encoder}, {encoder.dim}-d, {num_chunks} "
        f"chunks of {chunk_size}, {config['settings']['dtype']} on {info.device}, {info.world_size} rank(s)",
        flush=True)
    if len(todo) < len(mine):
        say(f"resume: rank 0 skips {len(mine) - len(todo)} completed chunks", flush=True)
    t1 = time.time()
    count = encode_chunks(encoder, out, todo, chunk_size, args, info, stop)
    dt = time.time() - t1
    if count and not stop.requested():
        print(f"rank {info.rank}: encoded {count} items in {dt:.1f} s ({count / max(dt, 1e-9):.1f} items/s)", flush=True)
    if any_rank(stop.requested()):  # also the barrier before rank 0 joins the chunks
        finished = sum(gmem.chunk_complete(out, c) for c in range(num_chunks)) if info.is_main else 0
        raise Preempted(f"stopped by {stop.why()}: {finished} of {num_chunks} chunks are complete in {out}; run "
                        "the same command to resume" if info.is_main else "")
    if not info.is_main:
        return None
    meta = gmem.finalize_memory(out, num_chunks, encoder=encoder.kind, encoder_id=encoder.encoder_id,
                                settings=encoder.settings, data_manifest=manifest,
                                extra=dict(chunk_size=chunk_size, argv=list(argv)))
    os.remove(os.path.join(out, RUN_FILE))
    say(f"done: {meta['count']} snippets, {meta['dim']}-d, fingerprint {meta['fingerprint']}, "
        f"{time.time() - t0:.1f} s", flush=True)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        return run_stoppable(run, args, argv)
    except (DataError, CheckpointError) as e:  # MemoryBankError is a DataError
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except StopAfterChunks as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        return STOP_EXIT_CODE
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: other ranks may be gone after an error


if __name__ == "__main__":
    sys.exit(main())
