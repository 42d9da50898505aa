"""Samplers for SiT velocity models, and the pieces every sampling entry point shares.

- `sample`: Euler / Heun probability-flow ODE and the Euler-Maruyama SDE in the REPA form,
  classifier-free guidance on all channels with a guidance interval in t.
- `make_inputs`: per-image noise, labels and SDE generators from (seed, image index), so a
  sample set does not depend on how images are split over ranks and batches; `uniform_index`
  is the per-image draw behind the labels (reusable for any other per-image choice).
- `memory_conditions`: GMem snippets per image for memory-conditioned models: image i's bank row
  from (seed, i) (gmem.snippet_index), or snippets interpolated between two rows (`Interpolation`).
- `decode`, `to_uint8`, `load_vae`, `save_grid`: latents -> pixels -> uint8 images -> PNG grid.
- `setup_from_checkpoint` / `generate`: everything needed to go from a checkpoint to images,
  shared by sample_ddp.py and train.py's `--sample-every` grids.

Conventions (as models/sit.py): t = 0 is data, t = 1 is noise, x_t = alpha_t x + sigma_t eps and
the model predicts v = d/dt x_t = alpha'_t x + sigma'_t eps. The paths (alpha, sigma and their
derivatives) are defined once, in loss.py (`path_coefficients`, `PATH_TYPES`), and used from there
by training, these samplers and the score conversion: a new path is added in loss.py only.

Score from velocity. Eliminating x from (x_t, v):  v = (alpha'/alpha) x_t + (sigma' - alpha' sigma/alpha) eps, so
    eps_hat = (alpha v - alpha' x_t) / (alpha sigma' - alpha' sigma),   score = -eps_hat / sigma.
The denominator is 1 for the linear path and pi/2 for the cosine path (never zero).

Guidance and the null condition: the unconditional half of a guided batch is the conditional
batch with the model's `drop` mask set, so class and memory (GMem) models take the same path and
get exactly the null condition training used (the class table's extra row; the memory model's
learned null vector, never GMem's all-zeros snippet). For a class SiT this equals passing the
null label num_classes, bit for bit. Models without a `drop` argument (foreign velocity fields)
get the null label instead.

Heun with a guidance interval: guidance is decided by the time of each model evaluation, so the
predictor at t and the corrector at t_next of one step can differ (guided at one, not the other).
REPA's sampler decides both by the step's start time t. Ours integrates the same piecewise field
the Euler sampler sees; the two differ only in the (at most two) steps that straddle an interval
edge. The SDE makes one evaluation per step, so there the rules coincide.

SDE (REPA form). For any w(t) >= 0 the reverse-time SDE
    dx = [v - w/2 * score] dt + sqrt(w) dW      (dt < 0, from t = 1 to 0)
has the same marginals as the ODE dx = v dt. REPA uses w(t) = 2t, the grid linspace(1, 0.04, N)
followed by 0, and a deterministic last step (the drift at t = 0.04 only, no noise), which
avoids evaluating the score at sigma = 0.
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

import gmem
import loss  # the one definition of the interpolation paths (path_coefficients, PATH_TYPES)

MODES = ("ode", "sde")
DEFAULT_STEPS = {"ode": 50, "sde": 250}  # REPA's defaults: 50-step ODE, 250-step SDE for FID
SDE_LAST_T = 0.04  # REPA's SDE grid ends at 0.04, then one deterministic step to 0
LABEL_STREAM = 1  # image_seed stream of the labels (stream 0: initial and SDE noise)
PAIR_STREAM = 2  # image_seed stream of the second snippet of a random interpolation pair

# A checkpoint without a data manifest (e.g. REPA's released SiT-XL/2) was trained on SD-VAE latents
# of 256 px ImageNet with the usual 0.18215 scale and no shift, as in REPA's own sampler.
FOREIGN_DATA_DEFAULTS = dict(vae="stabilityai/sd-vae-ft-ema", latent_scale=0.18215, latent_shift=0.0)


class SampleError(ValueError):
    """A one-line, user-facing sampling error (bad flag, unusable checkpoint, VAE or output)."""


# ----------------------------------------------------------------------------------------------
# Paths and the score


def check_path_type(path_type: str) -> None:
    if path_type not in loss.PATH_TYPES:
        raise SampleError(f"unknown path type {path_type!r}; choose one of {', '.join(loss.PATH_TYPES)}")


def path_at(path_type: str, t: float) -> tuple[float, float, float, float]:
    """loss.path_coefficients at one time, in float64, as Python floats:
    (alpha_t, sigma_t, d alpha/dt, d sigma/dt) of x_t = alpha_t x + sigma_t eps."""
    check_path_type(path_type)
    return tuple(float(c) for c in loss.path_coefficients(path_type, torch.tensor(float(t), dtype=torch.float64)))


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float, path_type: str = "linear") -> torch.Tensor:
    """Score grad log p_t(x) implied by the velocity v at (x, t); t must be > 0 (sigma_t > 0)."""
    alpha, sigma, d_alpha, d_sigma = path_at(path_type, t)
    eps_hat = (alpha * v - d_alpha * x) / (alpha * d_sigma - d_alpha * sigma)
    return -eps_hat / sigma


def time_grid(mode: str, num_steps: int) -> list[float]:
    """The float64 time points from 1 to 0 (num_steps + 1 of them) as Python floats."""
    if mode == "ode":
        grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    else:
        grid = torch.cat([torch.linspace(1.0, SDE_LAST_T, num_steps, dtype=torch.float64),
                          torch.zeros(1, dtype=torch.float64)])
    return grid.tolist()


def _model_dtype(model: nn.Module) -> torch.dtype:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _null_class(model: nn.Module) -> int:
    inner = getattr(model, "module", model)  # DDP / compiled wrappers
    inner = getattr(inner, "_orig_mod", inner)
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "num_classes"):
        return int(config.num_classes)
    raise SampleError("cannot tell the model's null class for guidance: pass null_class")


def _takes_drop(model: nn.Module) -> bool:
    """Whether model(x, t, y, drop=mask) works: SiT's forward, or a wrapper (DDP, torch.compile)
    that forwards keyword arguments."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "drop" or p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


# ----------------------------------------------------------------------------------------------
# The sampler


@torch.no_grad()
def sample(
    model: nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    *,
    mode: str = "ode",
    num_steps: int | None = None,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    null_class: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Integrate from noise (t = 1) to data (t = 0) and return the t = 0 sample in fp32.

    mode "ode": Euler, or Heun with `heun=True` (last step Euler, as EDM/REPA: NFE = 2N - 1).
    path_type: one of loss.PATH_TYPES (the score conversion of the SDE depends on it).
    mode "sde": Euler-Maruyama, REPA form (module docstring); num_steps model evaluations.
    num_steps None = 250 for the SDE, 50 for the ODE.
    labels: B int64 class labels, or B x D float snippets for a memory-conditioned SiT.
    Guidance: v = v_u + cfg_scale (v_c - v_u) on every channel, only at evaluation times t with
    guidance_low <= t <= guidance_high; cfg_scale == 1 never runs the unconditional pass. Both
    halves go through one batched forward; the unconditional half is the same conditions with the
    model's drop mask set (module docstring). Only a model without a `drop` argument gets the null
    label null_class (default model.config.num_classes) instead.
    Heun: the corrector (evaluated at t_next) is guided iff t_next is in the interval, not by the
    step's start time as in REPA's sampler (module docstring).
    generator (SDE noise): one generator for the batch, or one per image, which makes every
    image's noise independent of the batch it is in (what sample_ddp.py relies on); per-image CPU
    generators feed a CUDA device through pinned memory (per_image_noise).
    The time grid and the state are float64; the model sees inputs in its own dtype (optionally
    under autocast_dtype autocast). The model is put in eval mode for the call (label dropout off).
    """
    if mode not in MODES:
        raise SampleError(f"unknown sampling mode {mode!r}; choose one of {', '.join(MODES)}")
    if heun and mode != "ode":
        raise SampleError("--heun applies to the ODE sampler only (the REPA SDE is Euler-Maruyama)")
    num_steps = DEFAULT_STEPS[mode] if num_steps is None else int(num_steps)
    if num_steps < 1:
        raise SampleError(f"the number of steps must be at least 1, got {num_steps}")
    if not guidance_low <= guidance_high:
        raise SampleError(f"guidance interval [{guidance_low}, {guidance_high}] is empty: low must be <= high")
    check_path_type(path_type)
    snippets = labels.is_floating_point()
    if noise.ndim != 4 or labels.shape[:1] != noise.shape[:1] or labels.ndim != (2 if snippets else 1):
        raise SampleError(f"noise must be B x C x H x W and labels B (or snippets B x D), got {tuple(noise.shape)} "
                          f"and {tuple(labels.shape)}")
    batch, device = noise.shape[0], noise.device
    per_image = generator is not None and not isinstance(generator, torch.Generator)
    if per_image and len(generator) != batch:
        raise SampleError(f"{len(generator)} per-image generators for a batch of {batch}")
    use_cfg = cfg_scale != 1.0
    drop_cfg = None  # guided batches: conditional half, then the same conditions dropped to the null
    if use_cfg and _takes_drop(model):
        labels_cfg = torch.cat([labels, labels])
        drop_cfg = torch.arange(2 * batch, device=device) >= batch
    elif use_cfg:
        if snippets:
            raise SampleError("guidance on snippets needs a model that takes a drop mask (models.sit.SiT)")
        null = _null_class(model) if null_class is None else int(null_class)
        labels_cfg = torch.cat([labels, torch.full_like(labels, null)])

    dtype = _model_dtype(model)
    t_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # SiT embeds t in fp32 anyway

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        guided = use_cfg and guidance_low <= t <= guidance_high
        x_in, y_in = (torch.cat([x, x]), labels_cfg) if guided else (x, labels)
        t_in = torch.full((x_in.shape[0],), t, dtype=t_dtype, device=device)
        kw = {"drop": drop_cfg} if guided and drop_cfg is not None else {}
        if autocast_dtype is not None:
            with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                out = model(x_in.to(dtype), t_in, y_in, **kw)
        else:
            out = model(x_in.to(dtype), t_in, y_in, **kw)
        out = out.to(torch.float64)
        if not guided:
            return out
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)  # all channels (DiT/SiT guided only 3 of 4)

    def sde_noise() -> torch.Tensor:
        shape = tuple(noise.shape)
        if per_image and all(g.device.type == "cpu" for g in generator):
            z = per_image_noise(generator, shape[1:], device)  # sample_ddp: the same set on any device
        elif per_image:
            z = torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator])
        elif generator is not None:
            z = torch.randn(shape, generator=generator, device=generator.device)
        else:
            z = torch.randn(shape, device=device)
        return z.to(device=device, dtype=torch.float64)

    was_training = model.training
    model.eval()
    try:
        x = noise.to(torch.float64)
        ts = time_grid(mode, num_steps)
        for i in range(num_steps):
            t, t_next = ts[i], ts[i + 1]
            dt = t_next - t  # negative
            v = velocity(x, t)
            if mode == "ode":
                x_next = x + dt * v
                if heun and i < num_steps - 1:
                    # Trapezoidal correction. Guidance is decided by the time of each evaluation
                    # (t_next here; REPA uses the step's start t): the integrated field is the
                    # same piecewise field the Euler sampler sees.
                    x_next = x + dt * 0.5 * (v + velocity(x_next, t_next))
                x = x_next
            else:
                w = 2.0 * t  # REPA's diffusion coefficient w(t) = 2t
                drift = v - 0.5 * w * score_from_velocity(v, x, t, path_type)
                x = x + dt * drift
                if i < num_steps - 1:  # the last step (0.04 -> 0) is the deterministic mean
                    x = x + math.sqrt(w * -dt) * sde_noise()
        return x.to(torch.float32)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------
# Per-image inputs


def image_seed(seed: int, index: int, stream: int = 0) -> int:
    """64-bit seed of stream `stream` of image `index` in a set made with `seed`.

    numpy's SeedSequence hashes (seed, index, stream) (documented algorithm, stable across
    versions), so no two triples share a seed, unlike seed * K + index, which collides once
    index >= K. Stream 0 (the same hash as the pair (seed, index)) seeds the noise generator.
    """
    if min(seed, index, stream) < 0:
        raise SampleError(f"seed, image index and stream must be >= 0, got {seed}, {index} and {stream}")
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, dtype=np.uint64)[0])


def uniform_index(seed: int, index: int, n: int, stream: int) -> int:
    """A uniform draw from 0..n-1 for image `index` of set `seed`, from its own hash (seed, index,
    stream): independent of the image's noise and of how the set is split over ranks and batches.
    (The modulo bias is below n / 2**64.) Labels use stream LABEL_STREAM; another per-image choice,
    e.g. a memory-bank entry, takes the next free stream."""
    if n < 1:
        raise SampleError(f"cannot draw from an empty range (n = {n})")
    return image_seed(seed, index, stream) % n


def draw_label(seed: int, index: int, num_classes: int, class_balanced: bool = False) -> int:
    """Label of image `index`: uniform at random from (seed, index), as ADM/DiT/SiT/REPA draw theirs,
    or with class_balanced the classes in order 0, 1, ..., K-1, 0, 1, ... (index % K: any prefix of
    the set is balanced too, and N divisible by K gives exactly N / K per class)."""
    if class_balanced:
        return index % num_classes
    return uniform_index(seed, index, num_classes, LABEL_STREAM)


def make_inputs(
    indices: Sequence[int],
    *,
    seed: int,
    latent_shape: Sequence[int],
    num_classes: int,
    class_balanced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Generator]]:
    """Noise (B x C x H x W fp32, CPU), labels (B, int64) and per-image CPU generators for SDE noise.

    Image i owns the CPU generator seeded with image_seed(seed, i): first the initial noise
    (C x H x W standard normal, fp32), then, inside `sample`, the SDE noise of every step. Its
    label comes from draw_label (its own stream, so the label scheme does not change the noise).
    """
    noise, gens = make_noise(indices, seed=seed, latent_shape=latent_shape)
    labels = [draw_label(seed, int(i), num_classes, class_balanced) for i in indices]
    return noise, torch.tensor(labels, dtype=torch.int64), gens


def make_noise(indices: Sequence[int], *, seed: int,
               latent_shape: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The noise half of make_inputs: image i's initial noise and its SDE generator (stream 0 of
    (seed, i)), whatever conditions the images get."""
    noises, gens = [], []
    for i in indices:
        g = torch.Generator(device="cpu").manual_seed(image_seed(seed, int(i)))
        noises.append(torch.randn(tuple(latent_shape), generator=g))
        gens.append(g)
    return torch.stack(noises), gens


# ----------------------------------------------------------------------------------------------
# Memory snippets (GMem)


@dataclass(frozen=True)
class Interpolation:
    """New content from a memory-conditioned model: snippets between two bank rows, on the great
    circle (gmem.slerp, renormalised), so the images belong to no single training item.

    pair (a, b): image i of an N-image set (num_samples = N) gets weight i / (N - 1) from a (w = 0)
    to b (w = 1): a path with both rows at its ends. pair None ("random"): image i gets the
    midpoint (w = 0.5) of its own pair, a = its snippet in the plain set (gmem.snippet_index) and
    b a second, different row from stream PAIR_STREAM of (seed, i), independent of N.
    """

    pair: tuple[int, int] | None
    num_samples: int = 1

    def describe(self) -> str:
        if self.pair is None:
            return "interpolate random: image i gets slerp(a_i, b_i, 0.5), a_i its snippet row, b_i another row " \
                   "from (seed, i) (samplers.interpolation_rows)"
        a, b = self.pair
        return f"interpolate {a},{b}: image i gets slerp(row {a}, row {b}, i / (N - 1)), N = {self.num_samples}"


def parse_interpolation(text: str, num_samples: int) -> Interpolation:
    """--interpolate A,B (two bank rows) or --interpolate random."""
    if text.strip() == "random":
        return Interpolation(None, num_samples)
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise SampleError(f"--interpolate {text!r} must be two bank rows A,B (e.g. 3,17) or 'random'") from None
    if a == b or min(a, b) < 0:
        raise SampleError(f"--interpolate {text!r} needs two different, non-negative bank rows")
    return Interpolation((a, b), num_samples)


def interpolation_rows(interp: Interpolation, indices: Sequence[int], seed: int,
                       count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows a_i, b_i (int64) and weights w_i (float64) of images `indices` (see Interpolation)."""
    indices = [int(i) for i in indices]
    if interp.pair is not None:
        for row in interp.pair:
            if row >= count:
                raise SampleError(f"--interpolate row {row} is outside the memory bank's 0..{count - 1}")
        n = len(indices)
        last = max(interp.num_samples - 1, 1)
        return (np.full(n, interp.pair[0], dtype=np.int64), np.full(n, interp.pair[1], dtype=np.int64),
                np.array([i / last for i in indices], dtype=np.float64))
    if count < 2:
        raise SampleError("--interpolate random needs a memory bank of at least 2 snippets")
    a = gmem.snippet_indices(seed, indices, count)
    # A different second row, uniform over the other count - 1 rows.
    b = np.array([(a_i + 1 + uniform_index(seed, i, count - 1, PAIR_STREAM)) % count for a_i, i in zip(a, indices)],
                 dtype=np.int64)
    return a, b, np.full(len(indices), 0.5)


def memory_conditions(memory: gmem.SnippetMemory, indices: Sequence[int], *, seed: int,
                      interpolate: Interpolation | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Snippets (B x D float32) of images `indices` and what arr_1 records for them (B int64).

    Plain sets: image i gets bank row gmem.snippet_index(seed, i, count), uniform over the bank
    and a function of (seed, i) only (like the labels of class models), recorded as is. With
    `interpolate`, the snippet is slerp(row a_i, row b_i, w_i), renormalised, and a_i is recorded.
    """
    if interpolate is None:
        rows = gmem.snippet_indices(seed, indices, len(memory))
        return memory[rows], rows
    a, b, w = interpolation_rows(interpolate, indices, seed, len(memory))
    try:
        return gmem.slerp(memory[a], memory[b], torch.from_numpy(w).float()), a
    except ValueError as e:  # antipodal rows
        raise SampleError(str(e)) from None


def per_image_noise(generators: Sequence[torch.Generator], shape: Sequence[int],
                    device: torch.device | str) -> torch.Tensor:
    """One fp32 standard-normal draw of `shape` from each CPU generator, stacked (B x shape), on `device`.

    CPU generators make the set the same on any device. For a CUDA device the draws are written
    into pinned memory and copied with non_blocking=True: a copy from pageable memory would block
    the host every SDE step until the GPU caught up. (torch's pinned-memory cache does not reuse
    the buffer before its copy has finished.)
    """
    device = torch.device(device)
    pin = device.type == "cuda"
    host = torch.empty((len(generators), *shape), dtype=torch.float32, pin_memory=pin)
    for k, g in enumerate(generators):
        torch.randn(tuple(shape), generator=g, out=host[k])
    return host.to(device, non_blocking=pin)


# ----------------------------------------------------------------------------------------------
# Pixels


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator is meant as a local path.
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or os.path.exists(name)


def load_vae(vae: str | None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers AutoencoderKL in eval mode, or None for pixel space (vae None or "none").

    `vae` is a local directory (a VAE, or a pipeline with a vae/ subfolder) or a hub id such as
    stabilityai/sd-vae-ft-ema (needs network access or the local hub cache).
    """
    if vae is None or vae.lower() == "none":
        return None
    from diffusers import AutoencoderKL  # imported lazily: diffusers takes seconds to import

    # Load straight into the wanted dtype; low_cpu_mem_usage=False avoids needing `accelerate`.
    kw = dict(torch_dtype=dtype, low_cpu_mem_usage=False)

    if _looks_like_path(vae):
        path = os.path.expanduser(vae)
        if not os.path.isdir(path):
            raise SampleError(f"VAE directory {vae!r} does not exist: pass --vae with a diffusers "
                              "AutoencoderKL directory, a hub id, or none for pixel space")
        sub = "vae" if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
            os.path.join(path, "vae")) else None
        try:
            model = AutoencoderKL.from_pretrained(path, subfolder=sub, **kw)
        except Exception as e:
            raise SampleError(f"cannot load a diffusers AutoencoderKL from {vae!r} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    else:
        try:
            model = AutoencoderKL.from_pretrained(vae, **kw)
        except Exception as e:
            raise SampleError(f"cannot load VAE {vae!r} from the Hugging Face hub ({type(e).__name__}); "
                              "without network access download it elsewhere and pass --vae /local/dir") from None
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode(z: torch.Tensor, vae: Any | None, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Model latents -> pixels in about [-1, 1]: raw = z / scale + shift (the manifest convention,
    per channel), then the VAE decoder; pixel-space models (vae None) return raw directly."""
    raw = z / scale.to(z.device, z.dtype) + shift.to(z.device, z.dtype)
    if vae is None:
        return raw
    return vae.decode(raw.to(vae.dtype)).sample


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """B x C x H x W pixels in [-1, 1] -> N x H x W x 3 uint8 (1-channel images repeated 3 times).

    uint8 = clamp(round(127.5 x + 127.5), 0, 255): round to nearest maps [-1, 1] onto 0..255 with
    zero mean error. DiT/REPA's clamp(127.5 x + 128).to(uint8) is the same map except at exact ties;
    ADM's truncating (x + 1) * 127.5 cast darkens every pixel by 0.5 level on average. The
    arithmetic is float64, where 127.5 x + 127.5 is exact for fp32 x, so the result cannot depend
    on anything but the value of x.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise SampleError(f"expected B x 1 x H x W or B x 3 x H x W pixels, got {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise SampleError(f"{bad} decoded pixel values are NaN or infinite (try --precision fp32)")
    u = torch.round(x * 127.5 + 127.5).clamp_(0, 255).to(torch.uint8)
    if u.shape[1] == 1:
        u = u.expand(-1, 3, -1, -1)
    return u.permute(0, 2, 3, 1).contiguous().numpy()


def save_grid(images: np.ndarray, path: str, nrow: int | None = None, pad: int = 2, min_size: int = 512) -> None:
    """Tile N x H x W x 3 uint8 images into one PNG (nrow per row, default ceil(sqrt(N))), atomically.
    Small images are enlarged by an integer factor, nearest neighbour (pixels stay pixels), until the
    grid's shorter side is at least `min_size`: a grid of 32 px samples is otherwise a thumbnail."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise SampleError(f"save_grid needs a non-empty N x H x W x 3 uint8 array, got {images.shape} {images.dtype}")
    n, h, w, _ = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    factor = max(1, math.ceil(min_size / min(canvas.shape[:2])))
    if factor > 1:
        canvas = canvas.repeat(factor, axis=0).repeat(factor, axis=1)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    Image.fromarray(canvas).save(tmp, format="PNG")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# From a checkpoint to images


@dataclass
class SamplingSetup:
    """Everything sampling needs besides the sampler settings (see setup_from_checkpoint)."""

    model: nn.Module
    vae: str                      # hub id or local path; "none" = pixel space
    scale: torch.Tensor           # C x 1 x 1 latent scale (decode: raw = z / scale + shift)
    shift: torch.Tensor           # C x 1 x 1 latent shift
    num_classes: int
    path_type: str
    latent_shape: tuple[int, int, int]
    class_names: list[str] | None = None
    step: int | None = None
    notes: list[str] = field(default_factory=list)  # assumptions made for foreign checkpoints
    memory: gmem.SnippetMemory | None = None  # the bank of a memory-conditioned (GMem) model

    @property
    def cond(self) -> str:
        return "class" if self.memory is None else "memory"


def _as_dict(args: Any) -> dict:
    if isinstance(args, argparse.Namespace):  # REPA stores its argparse namespace
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def setup_from_checkpoint(
    ckpt: dict[str, Any],
    *,
    weights: str = "ema",
    config_overrides: dict[str, Any] | None = None,
    path_type: str | None = None,
    memory: str | None = None,
    log: Callable[[str], Any] = print,
) -> SamplingSetup:
    """Build the model (eval mode, no grad, CPU) and read latent scale/shift, VAE, classes and path.

    A memory-conditioned checkpoint also opens its bank (open_checkpoint_memory): `memory` is the
    bank directory, by default the one the checkpoint recorded.

    Our checkpoints carry model_config, data (the manifest subset) and args. A foreign checkpoint
    (a bare REPA state dict, or a REPA training checkpoint) needs config_overrides with at least
    `model` (a SiT_models name) unless its args name the model; its data is assumed to be SD-VAE
    latents (FOREIGN_DATA_DEFAULTS) and its path linear unless path_type is given.
    """
    from checkpoint import model_from_checkpoint
    from dataset import latent_scale_shift
    from models.sit import SiT_models

    args = _as_dict(ckpt.get("args"))
    overrides = {k: v for k, v in (config_overrides or {}).items() if v is not None}
    notes: list[str] = []
    if "model_config" not in ckpt and overrides.get("model") is None and args.get("model") in SiT_models:
        # A REPA training checkpoint: its args say which SiT it is.
        overrides["model"] = args["model"]
        for key in ("num_classes", "qk_norm"):
            if key in args and key not in overrides:
                overrides[key] = args[key]
        if "resolution" in args and "input_size" not in overrides:
            overrides["input_size"] = int(args["resolution"]) // 8
        notes.append(f"model {args['model']} taken from the checkpoint's args")
    try:
        model = model_from_checkpoint(ckpt, weights=weights, config_overrides=overrides, log=log)
    except TypeError as e:  # unknown SiTConfig field in a model_config
        raise SampleError(f"checkpoint model_config does not fit this SiT ({e})") from None
    except ValueError as e:  # CheckpointError or a key / shape mismatch from load_sit_state_dict
        hint = "" if "model_config" in ckpt or "--model" in str(e) else (
            " (the checkpoint has no model config: check --model, --input-size and --num-classes)")
        raise SampleError(f"incompatible checkpoint: {e}{hint}") from None
    model.eval().requires_grad_(False)
    cfg = model.config
    model_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)

    data = ckpt.get("data")
    if data:
        shape = tuple(int(s) for s in data.get("latent_shape", model_shape))
        if shape != model_shape:
            raise SampleError(f"checkpoint data has latent shape {list(shape)} but the model takes "
                              f"{list(model_shape)}: the checkpoint is inconsistent")
        if "num_classes" in data and int(data["num_classes"]) != cfg.num_classes:
            raise SampleError(f"checkpoint data has {data['num_classes']} classes but the model has "
                              f"{cfg.num_classes}")
        scale, shift = latent_scale_shift({**data, "latent_shape": list(shape)})
        vae = str(data.get("vae", "none"))
        class_names = data.get("class_names")
    else:
        d = FOREIGN_DATA_DEFAULTS
        scale, shift = latent_scale_shift({**d, "latent_shape": list(model_shape)})
        vae = d["vae"] if cfg.in_channels == 4 else "none"
        class_names = None
        notes.append(f"no data manifest in the checkpoint: assuming vae {vae}, latent scale "
                     f"{d['latent_scale']}, shift {d['latent_shift']}")
    if path_type is None:
        path_type = args.get("path_type")
        if path_type is None:
            path_type = "linear"
            notes.append("no path_type in the checkpoint: assuming the linear path")
    check_path_type(path_type)
    step = ckpt.get("step", ckpt.get("steps"))
    bank = None
    if getattr(cfg, "cond", "class") == "memory":
        bank = open_checkpoint_memory(ckpt, cfg.memory_dim, memory)
    elif memory is not None:
        raise SampleError("--memory applies to memory-conditioned checkpoints; this one is class-conditional: "
                          "drop --memory")
    return SamplingSetup(model=model, vae=vae, scale=scale, shift=shift, num_classes=int(cfg.num_classes),
                         path_type=path_type, latent_shape=model_shape, class_names=class_names,
                         step=None if step is None else int(step), notes=notes, memory=bank)


def open_checkpoint_memory(ckpt: dict[str, Any], memory_dim: int, path: str | None = None) -> gmem.SnippetMemory:
    """The memory bank of a memory-conditioned checkpoint: `path`, or the one recorded in the
    checkpoint. Refused (one line) when missing, of another dimension than the model's, or with
    another fingerprint than the one the checkpoint was trained with (a bank moved elsewhere keeps
    its fingerprint, so --memory may point at a copy)."""
    recorded = ckpt.get("memory") or {}
    if path is None:
        path = recorded.get("path")
        if path is None:
            raise SampleError("the checkpoint is memory-conditioned but records no memory bank: pass --memory "
                              "DATA_DIR/memory-NAME")
        if not os.path.isfile(os.path.join(path, gmem.MEMORY_META)):
            raise gmem.MemoryBankError(f"the checkpoint's memory bank {path!r} is missing (moved or deleted?): "
                                       "pass --memory with its current location")
    meta = gmem.read_memory_meta(path)
    if int(meta["dim"]) != int(memory_dim):  # checked first: the clearer message when both differ
        raise gmem.MemoryBankError(f"memory bank {path!r} holds {meta['dim']}-d snippets but the checkpoint's "
                                   f"model takes {memory_dim}-d: pass --memory pointing at the bank it was trained with")
    return gmem.open_memory(path, dim=memory_dim, fingerprint=recorded.get("fingerprint"))


def generate(
    setup: SamplingSetup,
    vae: Any | None,
    indices: Sequence[int],
    *,
    seed: int,
    class_balanced: bool = False,
    mode: str = "ode",
    num_steps: int | None = None,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    interpolate: Interpolation | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images `indices` of the set defined by `seed`: (N x H x W x 3 uint8, N int64 labels).

    The one code path behind sample_ddp.py and training grids: image i is the same whichever
    batch it is generated in (up to the model's own floating-point batch dependence).
    `vae` is the loaded AutoencoderKL (load_vae(setup.vae, ...)) or None for pixel space.
    A memory-conditioned setup draws snippets instead of labels (memory_conditions, optionally
    `interpolate`d) and returns the bank rows in place of labels.
    """
    if device is None:
        device = next(setup.model.parameters()).device
    if setup.memory is None:
        if interpolate is not None:
            raise SampleError("--interpolate needs a memory-conditioned checkpoint; this one is class-conditional")
        noise, labels, gens = make_inputs(indices, seed=seed, latent_shape=setup.latent_shape,
                                          num_classes=setup.num_classes, class_balanced=class_balanced)
        cond, record = labels, labels.numpy()
    else:
        if class_balanced:
            raise SampleError("--class-balanced applies to class-conditional checkpoints; this one is conditioned "
                              "on memory snippets (drawn per image from (seed, i)): drop the flag")
        noise, gens = make_noise(indices, seed=seed, latent_shape=setup.latent_shape)
        cond, record = memory_conditions(setup.memory, indices, seed=seed, interpolate=interpolate)
    z = sample(setup.model, noise.to(device), cond.to(device), mode=mode, num_steps=num_steps, heun=heun,
               cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high,
               path_type=setup.path_type, generator=gens if mode == "sde" else None,
               null_class=setup.num_classes, autocast_dtype=autocast_dtype)
    return to_uint8(decode(z, vae, setup.scale, setup.shift)), record


def write_sample_grid(
    setup: SamplingSetup, vae: Any | None, path: str, *, num_images: int = 64, seed: int = 0,
    nrow: int | None = None, **sampler_kwargs: Any,
) -> np.ndarray:
    """Sample images 0..num_images-1 of set `seed` (fixed noise and labels, or snippets for memory
    models: grids from different training steps are comparable) and save them as one PNG grid;
    returns the uint8 images."""
    images, _ = generate(setup, vae, range(num_images), seed=seed, **sampler_kwargs)
    save_grid(images, path, nrow=nrow)
    return images
