"""Throughput of FID feature extraction (images/s) on this machine, to plan 50k-image evaluations.

    python benchmarks/fid_throughput.py --batch-sizes 16,32,64 --num-images 128 --image-size 256
    python benchmarks/fid_throughput.py --report-only         # reprint the table from results.json

Times evaluations.compute_features (TF-exact resize to 299 + Inception-v3 with the pool, spatial and,
if present, logits outputs) on random uint8 images after one warm-up batch (best of --repeats interleaved
rounds), and prints a markdown table. Weights are resolved as by load_inception (--inception-weights to
pin them). Writes OUT/results.json (images/s of every round, the settings, the machine) and
OUT/table.md (the table printed; benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import report  # noqa: E402  (benchmarks/report.py: benchmarks/ is this script's directory)
from evaluations import compute_features, load_inception  # noqa: E402


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def render(results: dict) -> str:
    """The printed table, from results.json alone."""
    s, m = results["settings"], results["machine"]
    lines = [f"device {m['device']} ({m['device_name']}), torch threads {m['threads']}, os.cpu_count {m['cpus']}, "
             f"{s['image_size']}x{s['image_size']} inputs, logits {'on' if results['logits'] else 'off'}",
             "| batch size | images/s (best) | images/s (median) | 50k images |",
             "|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['batch_size']} | {r['images_per_s']:.2f} | {r['median_images_per_s']:.2f} | "
                     f"{duration(50_000 / r['images_per_s'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="16,32,64", help="comma list of batch sizes")
    p.add_argument("--num-images", type=int, default=128, help="timed images per batch size")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size; the best is reported")
    p.add_argument("--image-size", type=int, default=256, help="side of the square input images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--inception-weights", default=None)
    report.add_args(p, "fid_throughput")
    args = p.parse_args()
    if args.report_only:
        return report.rebuild(args.out, render, __file__)

    if args.threads:
        torch.set_num_threads(args.threads)
    extractor = load_inception(args.inception_weights, args.device)
    images = np.random.default_rng(0).integers(0, 256, (args.num_images, args.image_size, args.image_size, 3), dtype=np.uint8)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    for bs in sizes:
        compute_features(images[:bs], extractor, batch_size=bs)  # warm-up: allocator, kernels, caches
    rates: dict[int, list[float]] = {bs: [] for bs in sizes}
    # Rounds interleave the batch sizes, so load from other processes hits all of them alike.
    for _ in range(args.repeats):
        for bs in sizes:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            compute_features(images, extractor, batch_size=bs)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            rates[bs].append(args.num_images / (time.perf_counter() - start))
    # Best of the rounds: other processes on a shared machine only ever slow a run down.
    rows = [{"batch_size": bs, "images": args.num_images, "images_per_s": max(r),
             "median_images_per_s": float(np.median(r)), "rounds_images_per_s": r} for bs, r in rates.items()]
    results = {**report.meta(__file__, args, args.device), "logits": extractor.has_logits,
               "weights": extractor.source, "rows": rows}
    report.save(args.out, results, render)


if __name__ == "__main__":
    main()
