"""Sampling throughput (ODE / SDE images per second) and the cost of building the FID .npz.

    .venv/bin/python benchmarks/sampling.py                      # CPU-demo-sized model, 25 steps
    .venv/bin/python benchmarks/sampling.py --steps 250 --num-images 16
    .venv/bin/python benchmarks/sampling.py --report-only        # reprint the tables from results.json

1. images/s of `samplers.generate` (noise -> sampler -> decode -> uint8) for Euler ODE, Heun ODE
   and the Euler-Maruyama SDE at --steps, without and with guidance (--cfg-scale, which doubles
   the batch inside the guidance interval). Model: by default the size REFERENCE.md suggests for
   CPU demos (pixel space 1 x 32 x 32, patch 4, width 256, depth 8; random weights: the cost does
   not depend on the weights).
2. .npz assembly for --assembly-images images of --image-size px: sample_ddp.py's direct route
   (chunk .npy files streamed into the .npz) versus the DiT/ADM route (write one PNG per image,
   read them all back, np.savez).
3. Batch-size invariance: how many uint8 values differ between batch 3 and batch 5 in fp32 and
   in fp64 (sample_ddp --precision), for the same images.
4. Per-step SDE noise (`samplers.per_image_noise`): the host cost of one step's per-image draws
   for --noise-batch latents of --noise-shape (SD-VAE 256 px: 4 32 32), and on a GPU the copy
   from pageable memory (the old route) versus pinned memory with non_blocking=True.

Writes OUT/results.json (the raw numbers, the settings, the machine) and OUT/table.md (the tables
printed; benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import report  # noqa: E402  (benchmarks/report.py: benchmarks/ is this script's directory)
from models.sit import build_sit  # noqa: E402
from sample_ddp import chunk_files, chunk_ranges, save_chunk, write_npz  # noqa: E402
from samplers import SamplingSetup, generate, make_inputs, per_image_noise, sample, to_uint8  # noqa: E402


def make_setup(args: argparse.Namespace, dtype: torch.dtype = torch.float32) -> SamplingSetup:
    torch.manual_seed(0)
    model = build_sit(depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads,
                      patch_size=args.patch_size, input_size=args.input_size, in_channels=args.channels,
                      num_classes=args.num_classes)
    with torch.no_grad():  # leave adaLN-Zero's zero output so the images are not constant
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model = model.to(dtype).eval().requires_grad_(False)
    c = args.channels
    return SamplingSetup(model=model, vae="none", scale=torch.ones(c, 1, 1), shift=torch.zeros(c, 1, 1),
                         num_classes=args.num_classes, path_type="linear",
                         latent_shape=(c, args.input_size, args.input_size))


def bench_sampling(args: argparse.Namespace) -> list[dict]:
    setup = make_setup(args)
    rows = []
    configs = [("ode", False, 1.0), ("ode", True, 1.0), ("sde", False, 1.0), ("sde", False, args.cfg_scale)]
    for mode, heun, cfg in configs:
        kw = dict(seed=0, mode=mode, num_steps=args.steps, heun=heun, cfg_scale=cfg, guidance_high=args.guidance_high)
        generate(setup, None, range(min(2, args.batch)), **kw)  # warm-up
        t0 = time.perf_counter()
        for s in range(0, args.num_images, args.batch):
            generate(setup, None, range(s, min(s + args.batch, args.num_images)), **kw)
        seconds = time.perf_counter() - t0
        name = f"{mode.upper()} {'Heun' if heun else ('Euler' if mode == 'ode' else 'Euler-Maruyama')}"
        rows.append(dict(sampler=name, steps=args.steps, nfe=(2 * args.steps - 1) if heun else args.steps,
                         cfg_scale=cfg, images=args.num_images, seconds=seconds))
    return rows


def smooth_images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Stand-ins for generated images: smooth colour fields plus mild noise, so PNG compression
    works about as hard as on real samples (pure noise would be the worst case)."""
    low = rng.uniform(0, 255, (n, 8, 8, 3)).astype(np.float32)
    up = np.repeat(np.repeat(low, size // 8, axis=1), size // 8, axis=2)
    return np.clip(up + rng.normal(0, 6, up.shape), 0, 255).astype(np.uint8)


def bench_assembly(args: argparse.Namespace) -> dict:
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tempfile.mkdtemp(prefix="bench-npz-", dir=args.tmp_dir)
    try:
        parts = os.path.join(root, "parts")
        os.makedirs(parts)
        chunks = chunk_ranges(args.assembly_images, 250)
        for s, e in chunks:  # what the sampling ranks leave behind (not timed: sampling writes them anyway)
            save_chunk(parts, s, e, smooth_images(e - s, args.image_size, rng), np.arange(s, e) % 1000)
        files = [chunk_files(parts, s, e) for s, e in chunks]

        t0 = time.perf_counter()
        write_npz(os.path.join(root, "direct.npz"), files, args.assembly_images)
        direct = time.perf_counter() - t0

        png_dir = os.path.join(root, "png")
        os.makedirs(png_dir)
        t0 = time.perf_counter()
        for img_path, _ in files:  # DiT's sample_ddp: one PNG per image during sampling
            images = np.load(img_path)
            start = int(os.path.basename(img_path).split("-")[0])
            for k, img in enumerate(images):
                Image.fromarray(img).save(os.path.join(png_dir, f"{start + k:06d}.png"))
        write_png = time.perf_counter() - t0
        t0 = time.perf_counter()
        arr = np.stack([np.asarray(Image.open(os.path.join(png_dir, f"{i:06d}.png")))
                        for i in range(args.assembly_images)])  # DiT's create_npz_from_sample_folder
        np.savez(os.path.join(root, "via_png.npz"), arr_0=arr)
        read_png = time.perf_counter() - t0
        with np.load(os.path.join(root, "direct.npz")) as f:
            assert np.array_equal(f["arr_0"], arr), "the two routes disagree"
        png_bytes = sum(os.path.getsize(os.path.join(png_dir, f)) for f in os.listdir(png_dir))
        return dict(direct=direct, write_png=write_png, read_png=read_png, png_mb=png_bytes / 2**20,
                    npz_mb=os.path.getsize(os.path.join(root, "direct.npz")) / 2**20)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench_invariance(args: argparse.Namespace) -> list[dict]:
    rows = []
    n = args.invariance_images
    for dtype in (torch.float32, torch.float64):
        setup = make_setup(args, dtype)
        noise, labels, _ = make_inputs(range(n), seed=0, latent_shape=setup.latent_shape, num_classes=setup.num_classes)
        zs = []
        for batch in args.invariance_batches:
            parts = []
            for s in range(0, n, batch):
                _, _, gens = make_inputs(range(s, min(s + batch, n)), seed=0, latent_shape=setup.latent_shape,
                                         num_classes=setup.num_classes)
                parts.append(sample(setup.model, noise[s:s + batch], labels[s:s + batch], mode="sde",
                                    num_steps=args.steps, cfg_scale=args.cfg_scale,
                                    guidance_high=args.guidance_high, generator=gens))
            zs.append(torch.cat(parts))
        diff = to_uint8(zs[0]).astype(int) - to_uint8(zs[1]).astype(int)
        rows.append(dict(precision=str(dtype).removeprefix("torch."), max_abs_diff=(zs[0] - zs[1]).abs().max().item(),
                         uint8_differing=int((diff != 0).sum()), uint8_values=diff.size))
    return rows


def bench_noise(args: argparse.Namespace) -> list[dict]:
    """Milliseconds per SDE step for the per-image noise of one batch (each of --noise-repeats; the
    table shows the median)."""
    shape, n = tuple(args.noise_shape), args.noise_batch
    gens = [torch.Generator().manual_seed(i) for i in range(n)]

    def timed(fn) -> list[float]:
        times = []
        for _ in range(args.noise_repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        return times

    rows = [("draw on the host (per_image_noise to cpu)", timed(lambda: per_image_noise(gens, shape, "cpu")))]
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        work = torch.randn(4096, 4096, device=dev)

        def step(copy) -> None:  # GPU work queued ahead, as the model's forward would be
            for _ in range(4):
                work @ work
            copy()
            torch.cuda.synchronize()

        def pageable() -> None:
            torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)

        rows.append(("GPU step + pageable copy (old)", timed(lambda: step(pageable))))
        rows.append(("GPU step + pinned non_blocking copy", timed(lambda: step(lambda: per_image_noise(gens, shape, dev)))))
        rows.append(("GPU step alone", timed(lambda: step(lambda: None))))
    return [dict(route=name, ms=ms) for name, ms in rows]


def render(results: dict) -> str:
    """The printed tables, from results.json alone (a section appears when it was run)."""
    a, m = results["settings"], results["machine"]
    blocks = [f"torch {m['torch']}, {m['threads']} threads, model depth {a['depth']} width {a['hidden_size']} "
              f"patch {a['patch_size']} on {a['channels']}x{a['input_size']}x{a['input_size']}, batch {a['batch']}"]
    if "sampling" in results:
        lines = ["| sampler | steps | NFE | CFG | images/s |", "|---|---|---|---|---|"]
        for r in results["sampling"]:
            guide = f"{r['cfg_scale']:g} on [0, {a['guidance_high']:g}]" if r["cfg_scale"] != 1.0 else "1 (none)"
            lines.append(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {guide} | {r['images'] / r['seconds']:.2f} |")
        blocks.append("\n".join(lines))
    if "assembly" in results:
        r = results["assembly"]
        n, s = a["assembly_images"], a["image_size"]
        via = r["write_png"] + r["read_png"]
        blocks.append("\n".join([
            f"| .npz of {n} images at {s} px | seconds | per 50k (extrapolated) |", "|---|---|---|",
            f"| direct: chunks streamed into the .npz | {r['direct']:.2f} | {r['direct'] * 50000 / n / 60:.1f} min |",
            f"| via PNG: write {n} PNGs | {r['write_png']:.2f} | {r['write_png'] * 50000 / n / 60:.1f} min |",
            f"| via PNG: read back + np.savez | {r['read_png']:.2f} | {r['read_png'] * 50000 / n / 60:.1f} min |",
            f"| via PNG: total | {via:.2f} | {via * 50000 / n / 60:.1f} min |"]))
        blocks.append(f"(npz {r['npz_mb']:.0f} MiB, PNG files {r['png_mb']:.0f} MiB; "
                      f"direct is {via / r['direct']:.0f}x faster)")
    if "invariance" in results:
        b1, b2 = a["invariance_batches"]
        lines = [f"| precision | max abs diff of the {a['steps']}-step SDE output, batch {b1} vs {b2} "
                 "| uint8 values differing |", "|---|---|---|"]
        for r in results["invariance"]:
            lines.append(f"| {r['precision']} | {r['max_abs_diff']:.1e} | "
                         f"{r['uint8_differing']} of {r['uint8_values']} |")
        blocks.append("\n".join(lines))
    if "noise" in results:
        shape = "x".join(map(str, a["noise_shape"]))
        lines = [f"| per-step SDE noise, {a['noise_batch']} x {shape} | ms |", "|---|---|"]
        for r in results["noise"]:
            lines.append(f"| {r['route']} | {sorted(r['ms'])[len(r['ms']) // 2]:.2f} |")  # the median
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--guidance-high", type=float, default=0.7)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--assembly-images", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--invariance-images", type=int, default=32)
    p.add_argument("--invariance-batches", type=int, nargs=2, default=[3, 32])
    p.add_argument("--noise-batch", type=int, default=64)
    p.add_argument("--noise-shape", type=int, nargs=3, default=[4, 32, 32])
    p.add_argument("--noise-repeats", type=int, default=20)
    p.add_argument("--tmp-dir", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--skip", nargs="*", default=[], choices=["sampling", "assembly", "invariance", "noise"])
    report.add_args(p, "sampling")
    args = p.parse_args()
    if args.report_only:
        return report.rebuild(args.out, render, __file__)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = report.meta(__file__, args, "cpu")  # the sampling runs on the CPU (the noise section also on a GPU)
    for section, bench in (("sampling", bench_sampling), ("assembly", bench_assembly),
                           ("invariance", bench_invariance), ("noise", bench_noise)):
        if section not in args.skip:
            print(f"{section}...", file=sys.stderr, flush=True)
            results[section] = bench(args)
    report.save(args.out, results, render)


if __name__ == "__main__":
    main()
