#!/usr/bin/env python
"""Encoder throughput: images/s at batch 1 (what the public preprocessing scripts do) against
real batch sizes, with the same encoder code path as preprocessing/encode.py (uint8 images in,
fp32 posterior mean/std out on the CPU, autocast as configured).

    python benchmarks/encode_throughput.py --vae-config sd --resolution 256 --batch-sizes 1,8
    python benchmarks/encode_throughput.py --vae stabilityai/sd-vae-ft-ema --batch-sizes 1,64 --device cuda
    python benchmarks/encode_throughput.py --report-only      # reprint the table from results.json

`--vae-config sd` builds the SD-VAE architecture (the sd-vae-ft-ema config: 4 blocks of
128/256/512/512 channels, 2 layers per block, 4 latent channels) with random weights, so the
cost is realistic without a download; `tiny` is the 2-block test VAE. Inputs are synthetic
uint8 images: this measures the encoder, not JPEG decoding (encode.py decodes in DataLoader
workers, in parallel with the GPU).

Writes OUT/results.json (images/s per batch size, the settings, the machine) and OUT/table.md (the
table printed; benchmarks/report.py).
"""
from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import argparse
import json
import time

import torch

import report  # noqa: E402  (benchmarks/report.py: benchmarks/ is this script's directory)
from preprocessing.encode import DTYPES, Encoder, allow_tf32, load_vae, resolve_dtype

CONFIGS = {
    "tiny": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=32),
    "sd": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, norm_num_groups=32,
               sample_size=256),
}


def build_vae(args: argparse.Namespace, device: torch.device):
    if args.vae:
        return load_vae(args.vae, device), args.vae
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(**CONFIGS[args.vae_config])
    vae.decoder = None  # the benchmark only encodes; halves the memory of the random model
    return vae.to(device).eval().requires_grad_(False), f"random {args.vae_config} config"


def measure(encoder: Encoder, batch: int, resolution: int, min_images: int, min_seconds: float,
            device: torch.device) -> tuple[int, float]:
    """Images encoded and seconds taken by back-to-back encoder calls after one warm-up call."""
    images = torch.randint(0, 256, (batch, resolution, resolution, 3), dtype=torch.uint8)
    if device.type == "cuda":
        images = images.pin_memory()
    encoder(images)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    done, t0 = 0, time.perf_counter()
    while done < min_images or time.perf_counter() - t0 < min_seconds:
        encoder(images)  # returns CPU tensors, so each call includes the device-to-host copy
        done += batch
    sync()
    return done, time.perf_counter() - t0


def render(results: dict) -> str:
    """The printed table, from results.json alone."""
    r, rows = results, results["results"]
    precision = r["dtype"].split(".")[-1] + (" (TF32)" if r["tf32"] else "")
    lines = [f"encoder: {r['encoder']}, {r['parameters'] / 1e6:.1f}M parameters, {r['resolution']}px, {precision} "
             f"on {r['device']} ({r['threads']} CPU threads)", "",
             f"| batch size | images/s | vs batch {rows[0]['batch_size']} |", "|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['batch_size']} | {row['images_per_s']:.2f} | "
                     f"{row['images_per_s'] / rows[0]['images_per_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", default=None, help="hub id or local AutoencoderKL directory (instead of --vae-config)")
    p.add_argument("--vae-config", choices=sorted(CONFIGS), default="sd")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated; the first is the baseline")
    p.add_argument("--min-images", type=int, default=8, help="per batch size (at least one batch)")
    p.add_argument("--min-seconds", type=float, default=5.0, help="per batch size")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="as preprocessing/encode.py (fp32: TF32 on GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--json", default=None, help="also write the results (as OUT/results.json) to this file")
    report.add_args(p, "encode_throughput")
    args = p.parse_args()
    if args.report_only:
        return report.rebuild(args.out, render, __file__)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = resolve_dtype(args.dtype)
    tf32 = allow_tf32(device, dtype)
    vae, name = build_vae(args, device)
    modules = [vae.encoder] + ([vae.quant_conv] if vae.quant_conv is not None else [])
    params = sum(p.numel() for m in modules for p in m.parameters())
    encoder = Encoder(vae, device, dtype)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    results = {**report.meta(__file__, args, device), "encoder": name, "parameters": params,
               "resolution": args.resolution, "dtype": str(dtype), "tf32": tf32, "device": str(device),
               "threads": torch.get_num_threads(), "results": []}
    for b in sizes:
        images, seconds = measure(encoder, b, args.resolution, args.min_images, args.min_seconds, device)
        results["results"].append(dict(batch_size=b, images_per_s=images / seconds, images=images, seconds=seconds))
        print(f"batch {b:5d}: {images / seconds:9.2f} images/s", file=sys.stderr, flush=True)
    report.save(args.out, results, render)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
