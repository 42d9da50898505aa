"""Generate an FID sample set (ADM .npz) from a checkpoint, on any number of ranks, resumably.

    torchrun --standalone --nproc_per_node=8 sample_ddp.py --ckpt RUN/checkpoints/0400000.pt \
        --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7

Everything about the model (config, latent scale/shift, VAE, classes, path) comes from the
checkpoint. Image i gets its noise (initial and SDE) from its own generator, seeded from
(seed, i), and its label drawn uniformly at random from its own hash of (seed, i), as
ADM/DiT/SiT/REPA draw labels (--class-balanced: label i % num_classes instead), so the inputs of
every image do not depend on the number of ranks, the batch size or the chunk size. The outputs
are then bitwise identical as far as the network's arithmetic is batch-independent: in float64
(--precision fp64) in practice; in fp32 / bf16 different batch sizes can round a few uint8
values differently (see benchmarks/sampling.py), which no metric notices. TF32 matmuls and
convolutions are allowed on GPUs by default, as in REPA's generate.py (--no-tf32: true fp32).

For --out X.npz: the index space 0..N-1 is cut into fixed chunks of --chunk-size images; rank r
generates pending chunks r, r + W, ... and saves each finished chunk atomically under X.parts/.
A rerun with the same settings skips finished chunks, or does nothing if X.npz is finished. A
rerun with other settings (or a different --num-samples for a finished set) is refused, naming
what changed, unless --overwrite, which removes the earlier set or chunks first. Everything is
checked before any directory is created. Rank 0 then
streams the chunks into X.npz (arr_0 uint8 N x H x W x 3 and arr_1 int64 labels, as ADM's
class-conditional sample files) without a PNG round trip, writes X.grid.png (the first 64
images) and X.json (settings and timing), and removes X.parts/ unless --keep-parts.
--save-png also writes X-png/NNNNNN.png.

Memory-conditioned (GMem) checkpoints: image i is conditioned on bank row
gmem.snippet_index(seed, i), uniform over the bank and a function of (seed, i) only, so the set
is as independent of ranks and batches as labels are; arr_1 holds those rows. Guidance acts on the
snippet (conditional: the snippet; unconditional: the model's learned null vector, through its
drop mask), with the same interval. The bank is the one the checkpoint recorded, or --memory PATH
(e.g. after moving the dataset); a bank whose fingerprint or dimension differs from the
checkpoint's is refused. --interpolate A,B (a path between two rows over the N images) or
--interpolate random (the midpoint of a random pair per image) makes new content from snippets
between training items (samplers.Interpolation). X.json records the bank (path, fingerprint) and
the condition scheme.

Errors that a user can fix print one line `error: ...` and exit with code 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

if __name__ == "__main__":  # the repository's modules, from any working directory (also under python -P)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
import torch.distributed as dist

from checkpoint import CheckpointError, load_checkpoint, write_failed
from dataset import DataError
from distributed import DistInfo, Preempted, StopSignals, add_preempt_arg, init_distributed, is_dist, run_stoppable
from loss import PATH_TYPES
from samplers import (
    DEFAULT_STEPS,
    Interpolation,
    SampleError,
    SamplingSetup,
    generate,
    load_vae,
    memory_conditions,
    parse_interpolation,
    save_grid,
    setup_from_checkpoint,
)

PRECISIONS = ("fp32", "bf16", "fp64")
SETTINGS_FILE = "settings.json"
STOP_FILE = "stop"  # in X.parts/: a rank got SIGTERM / SIGUSR1, every rank stops (removed by the rerun)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="training checkpoint (.pt) or a REPA-released SiT state dict")
    p.add_argument("--num-samples", type=int, default=50_000, help="images in the set (default 50000)")
    p.add_argument("--per-proc-batch-size", type=int, default=64, help="images per forward on each rank (default 64)")
    p.add_argument("--mode", choices=("ode", "sde"), default="sde", help="sampler (default sde, as REPA's FIDs)")
    p.add_argument("--num-steps", type=int, default=None,
                   help=f"default {DEFAULT_STEPS['sde']} for the SDE, {DEFAULT_STEPS['ode']} for the ODE")
    p.add_argument("--heun", action="store_true", help="Heun (2nd order) ODE steps")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale; 1 = none, no unconditional pass")
    p.add_argument("--guidance-low", type=float, default=0.0, help="guide only for t >= this (default 0)")
    p.add_argument("--guidance-high", type=float, default=1.0, help="guide only for t <= this (default 1; REPA 0.7)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed (seed, i) (default 0)")
    p.add_argument("--out", default=None, help="output .npz (default samples/<ckpt>-<settings>.npz)")
    p.add_argument("--vae", default=None,
                   help="diffusers AutoencoderKL hub id or local dir, or none for pixel space "
                        "(default: the checkpoint's)")
    p.add_argument("--class-balanced", action=argparse.BooleanOptionalAction, default=False,
                   help="image i gets label i %% num_classes; default off: labels uniformly at random, drawn "
                        "per image from (seed, i), as ADM/DiT/SiT/REPA")
    g = p.add_argument_group("memory-conditioned (GMem) checkpoints")
    g.add_argument("--memory", default=None,
                   help="memory bank directory (DATA_DIR/memory-NAME; default: the one the checkpoint recorded); "
                        "its fingerprint must match the checkpoint's")
    g.add_argument("--interpolate", default=None, metavar="A,B|random",
                   help="new content: A,B = image i on the great circle from bank row A to row B, weight "
                        "i / (N - 1); random = the midpoint of a random pair of rows per image, from (seed, i)")
    p.add_argument("--save-png", action="store_true", help="also write every image as OUT-png/NNNNNN.png")
    p.add_argument("--chunk-size", type=int, default=250, help="images per resumable chunk (default 250)")
    p.add_argument("--keep-parts", action="store_true", help="keep OUT.parts/ after the .npz is written")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished OUT.npz (or OUT.parts/, OUT-png/) made with other settings; "
                        "without it such a rerun is refused")
    p.add_argument("--grid-images", type=int, default=64, help="images in OUT.grid.png (default 64)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default), bf16 (autocast), fp64 (model and VAE in float64: slow; removes "
                        "batch-size effects on the result in practice)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="allow TF32 in CUDA matmuls and convolutions (default on, as REPA's generate.py; "
                        "about 4x faster than --no-tf32 on H100; no effect on CPU or with fp64)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights (default ema)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    add_preempt_arg(p)
    g = p.add_argument_group("checkpoints without a model config (e.g. REPA's released SiT-XL/2)")
    g.add_argument("--model", default=None, help="SiT name, e.g. SiT-XL/2")
    g.add_argument("--num-classes", type=int, default=None, help="default 1000")
    g.add_argument("--input-size", type=int, default=None, help="latent size (default 32: 256 px SD-VAE latents)")
    g.add_argument("--path-type", choices=PATH_TYPES, default=None,
                   help="override the checkpoint's path (default: the checkpoint's, else linear)")
    return p


# ----------------------------------------------------------------------------------------------
# Small helpers


class AgreedError(SampleError):
    """An error every rank raises (reported once, by rank 0)."""


def agree(err: str | None) -> None:
    """All ranks learn whether any rank failed; every rank then raises the first error."""
    errs = [err]
    if is_dist():
        errs = [None] * dist.get_world_size()
        dist.all_gather_object(errs, err)
    for r, e in enumerate(errs):
        if e is not None:
            raise AgreedError(e if r == 0 else f"(rank {r}) {e}")


def broadcast(obj: Any) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fingerprint(module: torch.nn.Module | None) -> str | None:
    """Hash of a module's weights, so a resumed run cannot mix chunks from different weights."""
    if module is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return h.hexdigest()


def default_out(args: argparse.Namespace, num_steps: int) -> str:
    ckpt = os.path.abspath(args.ckpt)
    tag = os.path.splitext(os.path.basename(ckpt))[0]
    parent = os.path.dirname(ckpt)
    if os.path.basename(parent) == "checkpoints":  # RUN/checkpoints/0400000.pt -> RUN-0400000
        tag = f"{os.path.basename(os.path.dirname(parent))}-{tag}"
    name = f"{tag}-{args.mode}{num_steps}{'-heun' if args.heun else ''}-cfg{args.cfg_scale:g}"
    if args.cfg_scale != 1.0 and (args.guidance_low, args.guidance_high) != (0.0, 1.0):
        name += f"-g{args.guidance_low:g}-{args.guidance_high:g}"
    if args.interpolate is not None:
        name += "-interp-" + args.interpolate.strip().replace(",", "-")
    return os.path.join("samples", f"{name}-seed{args.seed}-n{args.num_samples}.npz")


class OutPaths:
    def __init__(self, out: str):
        if not out.endswith(".npz"):
            raise SampleError(f"--out {out!r} must end in .npz")
        base = out[:-4]
        self.npz, self.json, self.grid = out, base + ".json", base + ".grid.png"
        self.parts, self.png = base + ".parts", base + "-png"


def check_writable(paths: OutPaths) -> None:
    """Fail early, with one line, if --out cannot be written; creates nothing (a temporary file is
    made and removed in the nearest existing directory)."""
    nearest = os.path.dirname(os.path.abspath(paths.parts))
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    if os.path.isdir(paths.parts):
        nearest = paths.parts  # chunks go there
    where = f"output {paths.npz!r} is not writable"
    if not os.path.isdir(nearest):
        raise SampleError(f"{where}: {nearest} is a file, not a directory: choose another --out")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise SampleError(f"{where}: no write permission in {nearest}: choose another --out")
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as e:  # read-only file system, or a directory such as /proc that takes no files
        raise SampleError(f"{where} ({e.strerror or e} in {nearest}): choose another --out") from None


@contextmanager
def tf32_allowed(enabled: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 in CUDA matmuls and cuDNN convolutions for one run, then restore
    torch's previous flags: importing or calling sample_ddp leaves no global state behind.
    (The flags only affect CUDA; on CPU they are set but change nothing.)"""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def chunk_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """Fixed chunks [start, end) of the index space; they depend only on n and size."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def chunk_files(parts: str, start: int, end: int) -> tuple[str, str]:
    base = os.path.join(parts, f"{start:08d}-{end:08d}")
    return base + ".npy", base + ".labels.npy"


def _atomic_save_npy(path: str, arr: np.ndarray) -> None:
    """Write, fsync, rename; a full disk is one SampleError line (partial file removed, finished chunks kept)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise SampleError(write_failed(path, tmp, e, arr.nbytes) + " (finished chunks are kept: rerun resumes)") from None
    os.replace(tmp, path)


def save_chunk(parts: str, start: int, end: int, images: np.ndarray, labels: np.ndarray) -> None:
    """Labels first, images last: a chunk is complete once its image file exists."""
    img_path, lab_path = chunk_files(parts, start, end)
    _atomic_save_npy(lab_path, labels.astype(np.int64))
    _atomic_save_npy(img_path, images)


def chunk_done(parts: str, start: int, end: int) -> bool:
    img_path, lab_path = chunk_files(parts, start, end)
    try:  # memory-mapped: reads only the headers
        images = np.load(img_path, mmap_mode="r")
        labels = np.load(lab_path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return (images.dtype == np.uint8 and images.ndim == 4 and images.shape[0] == end - start
            and images.shape[-1] == 3 and labels.shape == (end - start,))


def save_pngs(png_dir: str, start: int, images: np.ndarray) -> None:
    from PIL import Image

    for k, img in enumerate(images):
        path = os.path.join(png_dir, f"{start + k:06d}.png")
        if not os.path.exists(path):
            tmp = f"{path}.tmp-{os.getpid()}"
            Image.fromarray(np.asarray(img)).save(tmp, format="PNG")
            os.replace(tmp, path)


def write_npz(path: str, chunk_paths: Sequence[tuple[str, str]], n: int) -> np.ndarray:
    """Stream the chunks into an uncompressed .npz (what np.savez writes) with constant memory.

    arr_0: N x H x W x 3 uint8 images, arr_1: N int64 labels. Zip entries get a fixed timestamp,
    so the same images give a byte-identical file. Written to a temporary name, then renamed.
    Returns the labels.
    """
    first = np.load(chunk_paths[0][0], mmap_mode="r")
    h, w = first.shape[1:3]
    labels = []
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        info = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
        with zf.open(info, "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (n, h, w, 3)}
            np.lib.format.write_array_header_1_0(f, header)
            written = 0
            for img_path, lab_path in chunk_paths:
                images = np.load(img_path, mmap_mode="r")
                if images.dtype != np.uint8 or images.shape[1:] != (h, w, 3):
                    raise SampleError(f"chunk {img_path} holds {images.shape} {images.dtype}, expected "
                                      f"n x {h} x {w} x 3 uint8: delete {os.path.dirname(img_path)} and rerun")
                for s in range(0, len(images), 256):  # bounded memory for 256 px images
                    f.write(np.ascontiguousarray(images[s:s + 256]).tobytes())
                written += len(images)
                labels.append(np.load(lab_path))
            if written != n:
                raise SampleError(f"chunks hold {written} images, expected {n}")
        labels = np.concatenate(labels).astype(np.int64)
        with zf.open(zipfile.ZipInfo("arr_1.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as f:
            np.lib.format.write_array(f, labels)
        zf.close()
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return labels


def _atomic_write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# The run


def check_args(args: argparse.Namespace) -> None:
    for name in ("num_samples", "per_proc_batch_size", "chunk_size", "grid_images"):
        if getattr(args, name) < 1:
            raise SampleError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.num_steps is not None and args.num_steps < 1:
        raise SampleError(f"--num-steps must be at least 1, got {args.num_steps}")
    if args.seed < 0:
        raise SampleError(f"--seed must be >= 0, got {args.seed}")
    if args.heun and args.mode != "ode":
        raise SampleError("--heun applies to --mode ode only (the REPA SDE is Euler-Maruyama)")
    if not args.guidance_low <= args.guidance_high:
        raise SampleError(f"--guidance-low {args.guidance_low} is above --guidance-high {args.guidance_high}")
    if args.cfg_scale < 0 or not math.isfinite(args.cfg_scale):
        raise SampleError(f"--cfg-scale must be a finite number >= 0, got {args.cfg_scale}")
    if args.interpolate is not None:
        parse_interpolation(args.interpolate, args.num_samples)


def interpolation_of(args: argparse.Namespace) -> Interpolation | None:
    return None if args.interpolate is None else parse_interpolation(args.interpolate, args.num_samples)


def check_condition_flags(args: argparse.Namespace, cond: str) -> None:
    """Flags that only make sense for one kind of conditioning, refused before the bank is opened."""
    if cond == "memory" and args.class_balanced:
        raise SampleError("--class-balanced applies to class-conditional checkpoints; this one is conditioned on "
                          "memory snippets (one bank row per image, drawn from (seed, i)): drop the flag")
    if cond != "memory":
        flag = "--memory" if args.memory is not None else "--interpolate" if args.interpolate is not None else None
        if flag:
            raise SampleError(f"{flag} applies to memory-conditioned checkpoints; this one is class-conditional: "
                              f"drop {flag}")


def not_writable(paths: OutPaths, e: OSError) -> SampleError:
    return SampleError(f"output {paths.npz!r} is not writable ({e.strerror or e}: {e.filename or paths.parts}): "
                       "choose another --out")


def prepare_output(paths: OutPaths, rank: int) -> None:
    """Prove that this rank can write into the parts directory rank 0 created (chunks go there)."""
    try:
        probe = os.path.join(paths.parts, f".probe-{rank}-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise not_writable(paths, e) from None


def load_setup(args: argparse.Namespace, info: DistInfo, log) -> tuple[SamplingSetup, Any, str]:
    ckpt = load_checkpoint(args.ckpt, fix="pass another --ckpt")
    check_condition_flags(args, (ckpt.get("model_config") or {}).get("cond", "class"))
    overrides = dict(model=args.model, num_classes=args.num_classes, input_size=args.input_size)
    setup = setup_from_checkpoint(ckpt, weights=args.weights, config_overrides=overrides,
                                  path_type=args.path_type, memory=args.memory, log=log)
    del ckpt
    interp = interpolation_of(args)
    if interp is not None:  # rows inside the bank (and a path's ends not antipodal) before any work
        memory_conditions(setup.memory, [0], seed=args.seed, interpolate=interp)
    if args.class_balanced and args.num_samples < setup.num_classes:
        raise SampleError(f"--num-samples {args.num_samples} is smaller than the {setup.num_classes} classes: "
                          "--class-balanced needs at least one image per class (or pass --no-class-balanced)")
    vae_name = args.vae if args.vae is not None else setup.vae
    vae_dtype = torch.float64 if args.precision == "fp64" else torch.float32
    vae = load_vae(vae_name, info.device, vae_dtype)
    if vae is not None and vae.config.latent_channels != setup.latent_shape[0]:
        raise SampleError(f"VAE {vae_name!r} has {vae.config.latent_channels} latent channels but the model "
                          f"makes {setup.latent_shape[0]}: pass the VAE the model was trained with")
    if vae is None and setup.latent_shape[0] not in (1, 3):
        raise SampleError(f"the model makes {setup.latent_shape[0]}-channel latents but no VAE is set "
                          "(--vae none or a pixel-space checkpoint): pass --vae")
    return setup, vae, vae_name


def run(args: argparse.Namespace, info: DistInfo, stop: StopSignals | None = None) -> None:
    """The whole job on this rank. On SIGTERM / SIGUSR1 (`stop`) every rank drops the chunk it is making
    and raises Preempted: finished chunks stay, and the same command resumes."""
    stop = stop or StopSignals()
    log = print if info.is_main else (lambda *a, **k: None)
    rank, world = info.rank, info.world_size
    num_steps = args.num_steps if args.num_steps is not None else DEFAULT_STEPS[args.mode]

    err = None
    try:  # everything that can be checked without loading anything; creates nothing
        check_args(args)
        paths = OutPaths(args.out or default_out(args, num_steps))
        check_writable(paths)
    except SampleError as e:
        err = str(e)
    agree(err)

    setup = vae = vae_name = None
    try:
        setup, vae, vae_name = load_setup(args, info, log)
    except (SampleError, CheckpointError, DataError) as e:
        err = str(e)
    agree(err)
    for note in setup.notes:
        log(f"note: {note}")

    # What determines the images (compared on resume); world size, batch and device are not part of it.
    settings = dict(
        weights=args.weights, step=setup.step, mode=args.mode, num_steps=num_steps, heun=args.heun,
        cfg_scale=args.cfg_scale, guidance_low=args.guidance_low, guidance_high=args.guidance_high,
        path_type=setup.path_type, seed=args.seed, labels=label_scheme(args, setup),
        num_classes=setup.num_classes, latent_shape=list(setup.latent_shape),
        latent_scale=setup.scale.flatten().tolist(), latent_shift=setup.shift.flatten().tolist(),
        vae=vae_name, precision=args.precision, tf32=tf32_setting(args),
    )
    if setup.memory is not None:  # the bank by its identity: a moved copy continues the same set
        settings.update(memory_fingerprint=setup.memory.fingerprint, memory_count=len(setup.memory))
    chunks = chunk_ranges(args.num_samples, args.chunk_size)
    state: dict[str, Any] = {"error": None, "done": False, "pending": []}
    if info.is_main:
        settings["model_sha"] = fingerprint(setup.model)
        settings["vae_sha"] = fingerprint(vae)
        try:
            state = plan(paths, settings, args)
            if not state["done"]:
                state["pending"] = start_parts(paths, settings, chunks, state.pop("remove"), log)
        except SampleError as e:
            state = {"error": str(e), "done": False, "pending": []}
    stop.marker = os.path.join(paths.parts, STOP_FILE)  # start_parts removed a stopped run's marker
    state = broadcast(state)
    settings = broadcast(settings)
    agree(state["error"] if info.is_main else None)
    if state["done"]:
        log(f"{paths.npz} is already complete with these settings: nothing to do")
        return
    err = None
    try:
        prepare_output(paths, rank)
    except SampleError as e:
        err = str(e)
    agree(err)
    if args.class_balanced and args.num_samples % setup.num_classes:
        log(f"note: {args.num_samples} images over {setup.num_classes} classes: the first "
            f"{args.num_samples % setup.num_classes} classes get one image more than the others")

    # Precision (after fingerprinting, which hashes the checkpoint's own weights); TF32: see main().
    model = setup.model.to(info.device, torch.float64 if args.precision == "fp64" else torch.float32)
    setup.model = model
    autocast = torch.bfloat16 if args.precision == "bf16" else None

    interp = interpolation_of(args)
    pending = [tuple(c) for c in state["pending"]]
    mine = pending[rank::world]
    indices = [i for s, e in mine for i in range(s, e)]
    total_new = sum(e - s for s, e in pending)
    log(f"sampling {args.num_samples} images ({args.mode}, {num_steps} steps{', Heun' if args.heun else ''}, "
        f"cfg {args.cfg_scale:g} on t in [{args.guidance_low:g}, {args.guidance_high:g}], {setup.path_type} "
        f"path, vae {vae_name}, {args.precision}"
        f"{', TF32' if settings['tf32'] and info.device.type == 'cuda' else ''}, "
        f"{settings['labels']} {'labels' if setup.memory is None else 'snippets'}) on {world} rank(s); "
        f"{len(chunks) - len(pending)} of "
        f"{len(chunks)} chunks already done, {total_new} images to go -> {paths.npz}")

    from tqdm import tqdm

    t0 = time.time()
    bar = tqdm(total=len(indices), unit="img", disable=not info.is_main, dynamic_ncols=True,
               desc=f"rank 0/{world}" if world > 1 else "sampling", smoothing=0.1)
    acc_img: list[np.ndarray] = []
    acc_lab: list[np.ndarray] = []
    acc, ci = 0, 0
    for b in range(0, len(indices), args.per_proc_batch_size):
        if stop.requested():  # the chunk in flight is dropped: the rerun makes it
            break
        batch = indices[b:b + args.per_proc_batch_size]
        images, labels = generate(setup, vae, batch, seed=args.seed, class_balanced=args.class_balanced,
                                  mode=args.mode, num_steps=num_steps, heun=args.heun, cfg_scale=args.cfg_scale,
                                  guidance_low=args.guidance_low, guidance_high=args.guidance_high,
                                  device=info.device, autocast_dtype=autocast, interpolate=interp)
        acc_img.append(images)
        acc_lab.append(labels)
        acc += len(batch)
        # Batches run across chunk boundaries (no padding waste); a chunk is saved once complete.
        while ci < len(mine) and acc >= mine[ci][1] - mine[ci][0]:
            s, e = mine[ci]
            all_img, all_lab = np.concatenate(acc_img), np.concatenate(acc_lab)
            save_chunk(paths.parts, s, e, all_img[:e - s], all_lab[:e - s])
            if args.save_png:
                os.makedirs(paths.png, exist_ok=True)
                save_pngs(paths.png, s, all_img[:e - s])
            acc_img, acc_lab = [all_img[e - s:]], [all_lab[e - s:]]
            acc -= e - s
            ci += 1
        bar.update(len(batch))
    bar.close()

    if not info.is_main:
        if ci < len(mine):
            raise Preempted("")
        return
    # Rank 0 waits for the other ranks' chunks through the file system rather than a collective,
    # so a slower rank cannot trip a process-group timeout (torchrun stops us if a rank dies).
    while missing := [c for c in pending if not chunk_done(paths.parts, *c)]:
        if stop.requested():
            raise Preempted(f"stopped by {stop.why()}: {len(chunks) - len(missing)} of {len(chunks)} chunks are "
                            f"saved in {paths.parts}; run the same command to resume")
        if world == 1:
            raise SampleError(f"{len(missing)} chunks are missing from {paths.parts} after sampling, e.g. "
                              f"images {missing[0][0]}..{missing[0][1] - 1}: was it modified meanwhile? rerun")
        time.sleep(1.0)
    seconds = time.time() - t0
    assemble(paths, chunks, settings, args, world, info.device.type, total_new, seconds, log,
             memory=None if setup.memory is None else setup.memory.describe())


def label_scheme(args: argparse.Namespace, setup: SamplingSetup) -> str:
    """What conditions the images get (settings.labels): class labels uniform or class-balanced;
    memory snippets (one bank row per image), or an interpolation between rows."""
    if setup.memory is not None:
        interp = interpolation_of(args)
        if interp is None:
            return "memory"
        # A path's weights depend on N: part of the settings, so chunks of another N are never reused.
        return "memory interpolate random" if interp.pair is None else \
            f"memory interpolate {interp.pair[0]},{interp.pair[1]} over {interp.num_samples} images"
    return "class-balanced" if args.class_balanced else "uniform"


def describe_labels(settings: dict, args: argparse.Namespace) -> str:
    """X.json's sentence on what arr_1 holds and how the conditions were drawn."""
    scheme = settings["labels"]
    if scheme == "uniform":
        return "uniform at random per image from (seed, i)"
    if scheme == "class-balanced":
        return "class-balanced: image i has label i % num_classes"
    if scheme == "memory":
        return "memory: arr_1[i] = bank row gmem.snippet_index(seed, i, count), uniform over the bank"
    return f"memory {interpolation_of(args).describe()}; arr_1[i] = a_i"


def tf32_setting(args: argparse.Namespace) -> bool:
    """Whether TF32 may round this run's fp32 matmuls / convolutions (on CUDA; fp64 never uses it)."""
    return bool(args.tf32) and args.precision != "fp64"


def describe_changes(old: dict, new: dict) -> str:
    diff = [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]
    more = f"; and {len(diff) - 4} more" if len(diff) > 4 else ""
    return "; ".join(diff[:4]) + more


def plan(paths: OutPaths, settings: dict, args: argparse.Namespace) -> dict:
    """Rank 0, before anything is created: is the set already finished, and what did an earlier run
    with other settings leave at --out? That is refused (SampleError naming what changed) unless
    --overwrite, which lists it under "remove". Chunks made with these settings are kept."""
    wanted = dict(settings, num_samples=args.num_samples)
    info = _read_json(paths.json)
    finished = dict(info.get("settings") or {}, num_samples=info.get("num_samples")) if info else None
    if finished == wanted and os.path.isfile(paths.npz):
        return {"error": None, "done": True, "pending": []}
    stale: list[tuple[str, list[str]]] = []  # (what, paths that --overwrite removes)
    if os.path.exists(paths.npz):
        why = f"was made with other settings ({describe_changes(finished, wanted)})" if finished else (
            f"has no readable {os.path.basename(paths.json)} to say how it was made")
        stale.append((f"the finished set {paths.npz} {why}", [paths.npz, paths.json, paths.grid]))
    old = _read_json(os.path.join(paths.parts, SETTINGS_FILE))
    resuming = old == settings
    if os.path.isdir(paths.parts) and not resuming:
        if old is not None:
            stale.append((f"{paths.parts} holds chunks made with other settings ({describe_changes(old, settings)})",
                          [paths.parts]))
        elif any(name.endswith(".npy") for name in os.listdir(paths.parts)):
            stale.append((f"{paths.parts} holds chunks without a {SETTINGS_FILE}", [paths.parts]))
    if os.path.isdir(paths.png) and not resuming:  # save_pngs keeps existing files: they must be ours
        stale.append((f"{paths.png} holds images of an earlier run", [paths.png]))
    if stale and not args.overwrite:
        more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
        raise SampleError(f"{stale[0][0]}{more}: pass --overwrite to replace it, or choose another --out")
    return {"error": None, "done": False, "remove": [p for _, ps in stale for p in ps]}


def start_parts(paths: OutPaths, settings: dict, chunks: list[tuple[int, int]], remove: list[str],
                log) -> list[tuple[int, int]]:
    """Rank 0, once every check has passed: remove what --overwrite replaces, create X.parts/ with
    its settings file, and list the chunks still to make."""
    settings_path = os.path.join(paths.parts, SETTINGS_FILE)
    try:
        for path in remove:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        if remove:
            log(f"--overwrite: removed {', '.join(remove)}")
        os.makedirs(paths.parts, exist_ok=True)
        if os.path.exists(os.path.join(paths.parts, STOP_FILE)):  # left by a stopped run: this one resumes
            os.remove(os.path.join(paths.parts, STOP_FILE))
        if _read_json(settings_path) is None:
            _atomic_write_json(settings_path, settings)
    except OSError as e:
        raise not_writable(paths, e) from None
    pending = [c for c in chunks if not chunk_done(paths.parts, *c)]
    if len(pending) < len(chunks):
        log(f"resuming: {len(chunks) - len(pending)} of {len(chunks)} chunks already done in {paths.parts}")
    return pending


def assemble(paths: OutPaths, chunks, settings: dict, args: argparse.Namespace, world: int, device: str,
             total_new: int, seconds: float, log, memory: dict | None = None) -> None:
    files = [chunk_files(paths.parts, s, e) for s, e in chunks]
    t0 = time.time()
    try:
        labels = write_npz(paths.npz, files, args.num_samples)
    except OSError as e:  # e.g. a full disk: the chunks stay, so a rerun only reassembles
        image_bytes = sum(os.path.getsize(f) for f, _ in files)
        raise SampleError(write_failed(paths.npz, f"{paths.npz}.tmp-{os.getpid()}", e, image_bytes)
                          + " (the chunks are kept: rerun to assemble)") from None
    npz_seconds = time.time() - t0

    grid, have = [], 0
    for img_path, _ in files:  # only the chunks the grid needs
        if have >= args.grid_images:
            break
        part = np.load(img_path, mmap_mode="r")[: args.grid_images - have]
        grid.append(np.asarray(part))
        have += len(part)
    save_grid(np.concatenate(grid), paths.grid)
    if args.save_png:  # chunks made by an earlier run without --save-png
        os.makedirs(paths.png, exist_ok=True)
        for (s, _), (img_path, _) in zip(chunks, files):
            save_pngs(paths.png, s, np.load(img_path, mmap_mode="r"))

    if memory is None:
        counts = np.bincount(labels, minlength=settings["num_classes"])
        spread = dict(class_counts=dict(min=int(counts.min()), max=int(counts.max())))
    else:  # arr_1 holds bank rows: how many distinct training items condition the set
        spread = dict(memory=memory, distinct_rows=int(len(np.unique(labels))))
    rate = total_new / seconds if seconds > 0 and total_new else None
    _atomic_write_json(paths.json, dict(
        settings=settings, num_samples=args.num_samples, ckpt=os.path.abspath(args.ckpt),
        shape=[args.num_samples, *np.load(files[0][0], mmap_mode="r").shape[1:]],
        **spread, labels=describe_labels(settings, args),
        world_size=world, device=device, per_proc_batch_size=args.per_proc_batch_size, chunk_size=args.chunk_size,
        images_generated_this_run=total_new, sampling_seconds=round(seconds, 3),
        images_per_second=None if rate is None else round(rate, 3), npz_seconds=round(npz_seconds, 3),
        finished=time.strftime("%Y-%m-%d %H:%M:%S"),
    ))
    if not args.keep_parts:
        shutil.rmtree(paths.parts, ignore_errors=True)
    speed = f" at {rate:.2f} images/s" if rate else ""
    log(f"wrote {paths.npz} ({args.num_samples} images; generated {total_new} in {seconds:.1f} s{speed} on "
        f"{world} rank(s); npz assembled in {npz_seconds:.1f} s), grid {paths.grid}, settings {paths.json}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    info = init_distributed(args.device)
    code = 0
    try:
        with tf32_allowed(tf32_setting(args)):  # set here only, restored on return
            code = run_stoppable(run, args, info)
    except (SampleError, CheckpointError, DataError) as e:
        if info.is_main or not isinstance(e, AgreedError):
            print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        if is_dist():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
