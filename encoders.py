"""Frozen image encoders shared by training (REPA, loss.py) and preprocessing (GMem's snippets).

DINOv2 ViT-B/14 through timm (`vit_base_patch14_dinov2`, weights tag `lvd142m`), as REPA and GMem
use it. Input convention: uint8 B x H x W x C images (C = 1 or 3; the dataset's own ADM-cropped
pixels) -> /255 -> ImageNet mean/std -> bicubic resize to the encoder's input size.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import torch
import torch.nn as nn

from dataset import DataError

DINOV2_ARCH = "vit_base_patch14_dinov2"
DEFAULT_DINOV2 = "timm/vit_base_patch14_dinov2.lvd142m"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def looks_like_file(name: str) -> bool:
    """A local weights file rather than a hub id."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.endswith(
        (".pt", ".pth", ".bin", ".safetensors"))


def load_dinov2(weights: str, image_size: int, config: dict | None = None, seed: int = 0,
                config_flag: str = "--repa-encoder-config") -> nn.Module:
    """timm DINOv2 ViT (vit_base_patch14_dinov2 unless `config` overrides its size) at image_size,
    frozen and in eval mode.

    weights: a hub id (needs network), a local file (timm or original DINOv2 layout; the position
    embedding is resampled to image_size) or "random" (seeded, for tests, benchmarks and controls).
    config_flag: the caller's flag for `config`, named when a local file does not fit the architecture.
    """
    import timm

    kwargs = dict(img_size=image_size, num_classes=0, **(config or {}))
    try:
        if weights == "random" or looks_like_file(weights):
            path = os.path.expanduser(weights)
            if weights != "random" and not os.path.isfile(path):
                raise DataError(f"DINOv2 weights file {weights!r} does not exist: pass a local .pth/.safetensors, "
                                f"a hub id such as {DEFAULT_DINOV2}, or 'random'")
            torch.manual_seed(seed)  # every rank builds the same random model
            model = timm.create_model(DINOV2_ARCH, pretrained=False, **kwargs)
            if weights != "random":
                _load_weights_file(model, weights, config, config_flag)
        else:
            name = weights if weights.startswith("hf-hub:") or "/" not in weights else f"hf-hub:{weights}"
            model = timm.create_model(name, pretrained=True, **kwargs)
    except DataError:
        raise
    except Exception as e:  # offline hub, wrong file, wrong architecture: one actionable line
        msg = (str(e).strip().splitlines() or [""])[0][:300]
        if weights == "random" or looks_like_file(weights):  # no hub involved: the model could not be built
            raise DataError(f"cannot build {DINOV2_ARCH} with {config_flag} {json.dumps(config or {})} "
                            f"({type(e).__name__}: {msg}): fix {config_flag}") from None
        raise DataError(f"cannot load DINOv2 weights {weights!r} ({type(e).__name__}: {msg}): check the hub id and "
                        "network access, or pass a local weights file of vit_base_patch14_dinov2") from None
    return model.eval().requires_grad_(False)


def _load_weights_file(model: nn.Module, weights: str, config: dict | None, config_flag: str) -> None:
    """A local state dict into `model`: a file that cannot be read, and one whose tensors do not fit the
    configured architecture, are one-line DataErrors, each with its own fix (no hub, no network)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        state = timm.models.load_state_dict(os.path.expanduser(weights))
    except Exception as e:  # noqa: BLE001
        msg = (str(e).strip().splitlines() or [""])[0][:120]
        raise DataError(f"cannot load DINOv2 weights {weights!r}: the file cannot be read ({type(e).__name__}: {msg}): "
                        f"pass a .pth/.safetensors state dict of {DINOV2_ARCH}") from None
    try:
        model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    except Exception as e:  # noqa: BLE001 (missing/unexpected keys, shape mismatches)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = next((line for line in lines if not line.startswith("Error(s) in loading")), type(e).__name__)
        keys = re.findall(r'"([^"]+)"', first)
        if len(keys) > 2:  # "Missing key(s) in state_dict: ..." lists every key
            first = f"{first.split(':')[0]}: {keys[0]}, {keys[1]} and {len(keys) - 2} more"
        arch = DINOV2_ARCH + (f" with {config_flag} {json.dumps(config)}" if config else "")
        raise DataError(f"cannot load DINOv2 weights {weights!r}: the file does not match the configured "
                        f"architecture ({arch}; {first[:200]}): set {config_flag} to the file's architecture "
                        "(embed_dim, depth, num_heads, ...), or pass a file of that architecture") from None


def dinov2_inputs(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 B x H x W x C (C = 1 or 3) -> fp32 B x 3 x S x S: /255, ImageNet mean/std, bicubic to S."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grey into an RGB encoder: replicate
    # Python-scalar constants: REPA calls this every training step, and a small host tensor copied to
    # the GPU each time would make the stream wait for the host.
    x = torch.stack([(x[:, c] - m) / s for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))], dim=1)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
    return x


def patch_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ViT's patch tokens after the final norm (DINOv2's x_norm_patchtokens): B x N x D, without
    the class and register tokens."""
    return model.forward_features(x)[:, model.num_prefix_tokens:]


def encoder_identity(weights: str, seed: int = 0) -> tuple[str, str]:
    """(id, hash) of an encoder's weights, for configs and checkpoints: a local file is its absolute
    path and SHA-256; a hub id is itself (weights under a hub id are taken as immutable); random
    weights are 'random' and their seed."""
    if weights == "random":
        return "random", f"seed {seed}"
    if looks_like_file(weights):
        path = os.path.abspath(os.path.expanduser(weights))
        if not os.path.isfile(path):
            raise DataError(f"encoder weights file {weights!r} does not exist: pass a local .pth/.safetensors, "
                            f"a hub id such as {DEFAULT_DINOV2}, or 'random'")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return path, "sha256:" + digest.hexdigest()
    return weights, weights
