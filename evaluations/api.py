"""evaluate(): every metric for one sample set against one reference, the way ADM's evaluator computes them,
plus the nearest-neighbour memorisation check against a training reference (evaluations/memorisation.py)."""
from __future__ import annotations

import os
import warnings
from typing import Any, Iterable

import numpy as np

from evaluations.errors import EvaluationError, ImageDataError, MetricInputError
from evaluations.images import ImageSource, open_images
from evaluations.inception import FeatureExtractor, compute_features, strict_fp32
from evaluations.memorisation import memorisation_stats, save_closest_pairs
from evaluations.metrics import (
    IS_SPLITS,
    PR_NEIGHBOURS,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)
from evaluations.reference import POOL_KEY, reference_statistics

METRICS = ("fid", "sfid", "is", "prec_recall", "memorisation")
# memorisation needs a training reference on top of the held-out one, so it only runs when asked for
# (or, with metrics=None, when train_ref is given).
DEFAULT_METRICS = ("fid", "sfid", "is", "prec_recall")
# Fewest sample images each metric can be computed from (not a quality bar: papers use 50,000).
MIN_IMAGES = {"fid": 2, "sfid": 2, "is": IS_SPLITS, "prec_recall": PR_NEIGHBOURS + 1, "memorisation": 1}
# A single training image makes the nearest neighbour trivial (and has no covariance to cache).
MIN_TRAIN_IMAGES = 2
TRAIN_REF_HELP = "the training images as a folder or an .npz/.npy with arr_0 (--train-ref PATH / train_ref=PATH)"
NO_LOGITS = (
    "the Inception weights have no logits layer (offline fid-helper copy); "
    "pass --inception-weights pt_inception-2015-12-05-6726825d.pth for IS"
)


class EvaluationWarning(UserWarning):
    """A requested metric was skipped because its inputs are unavailable."""


def check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    """Validate metric names, keeping the canonical order."""
    wanted = [m.strip().lower() for m in ([metrics] if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = [m for m in wanted if m not in METRICS]
    if unknown or not wanted:
        raise EvaluationError(f"unknown or no metrics {unknown or wanted}; choose from {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in wanted)


def resolve_metrics(metrics: Iterable[str] | None, train_ref: object | None) -> tuple[str, ...]:
    """The metrics to compute: DEFAULT_METRICS (+ memorisation when a training reference is given) for None.

    A training reference with a metric list that lacks memorisation is an error, not silently ignored.
    """
    if metrics is None:
        return check_metrics(DEFAULT_METRICS + (("memorisation",) if train_ref is not None else ()))
    wanted = check_metrics(metrics)
    if train_ref is not None and "memorisation" not in wanted:
        raise EvaluationError(f"a training reference was given but the metrics ({','.join(wanted)}) lack memorisation; "
                              "add memorisation to --metrics / metrics, or drop --train-ref / train_ref")
    if "memorisation" in wanted and train_ref is None:
        raise EvaluationError(f"memorisation needs a training reference: pass {TRAIN_REF_HELP}")
    return wanted


def open_train_reference(train_ref: str | os.PathLike | np.ndarray | ImageSource,
                         heldout_ref: str | dict[str, Any] | None = None) -> ImageSource:
    """Validate the training reference of the memorisation check (cheap: headers and file names only)."""
    if isinstance(train_ref, (str, os.PathLike)):
        path = os.fspath(train_ref)
        if not os.path.exists(path):
            raise ImageDataError(f"{path}: no such training reference; pass {TRAIN_REF_HELP}")
        if isinstance(heldout_ref, (str, os.PathLike)) and os.path.realpath(heldout_ref) == os.path.realpath(path):
            raise EvaluationError(f"{path} is both the held-out reference and the training reference; pass held-out "
                                  "real images (not in the training set) as --ref / ref")
    try:
        source = open_images(train_ref, "training reference")
    except ImageDataError as e:
        # The closest-pairs PNG shows training images, so statistics-only files cannot serve.
        raise ImageDataError(f"training reference {e}") from None
    if len(source) < MIN_TRAIN_IMAGES:
        raise MetricInputError(f"training reference {source.name}: memorisation needs at least {MIN_TRAIN_IMAGES} "
                               f"training images, got {len(source)}; pass the training set")
    return source


def evaluate_detailed(
    sample: np.ndarray | str | ImageSource,
    ref: str | dict[str, Any],
    extractor: FeatureExtractor,
    metrics: Iterable[str] | None = None,
    *,
    batch_size: int = 64,
    progress: bool = False,
    cache_dir: str | None = None,
    skip_unavailable: bool = True,
    train_ref: str | np.ndarray | ImageSource | None = None,
    pairs_png: str | None = None,
    num_pairs: int = 16,
) -> tuple[dict[str, float], dict[str, str]]:
    """Like evaluate(), but also returns {metric: reason} for metrics skipped as unavailable."""
    wanted = resolve_metrics(metrics, train_ref)
    images = open_images(sample, "samples")
    n = len(images)
    for m in wanted:  # fail before hours of feature extraction, not after
        if n < MIN_IMAGES[m]:
            raise MetricInputError(f"samples: {m} needs at least {MIN_IMAGES[m]} images, got {n}; sample more images")
    train = open_train_reference(train_ref, ref) if "memorisation" in wanted else None

    if isinstance(ref, dict):
        ref_stats = ref
    elif wanted == ("is",):
        ref_stats = {}  # IS looks at the samples only: do not pay for a reference pass
    else:
        ref_stats = reference_statistics(
            ref, extractor, cache_dir, pool_features=bool({"prec_recall", "memorisation"} & set(wanted)),
            batch_size=batch_size, progress=progress,
        )
    if "fid" in wanted and not ("mu" in ref_stats and "sigma" in ref_stats):
        raise MetricInputError("the reference has no pool statistics (mu, sigma); pass a reference path or a reference_statistics() dict")
    unavailable = {
        "is": None if getattr(extractor, "has_logits", False) else NO_LOGITS,
        "sfid": None if "mu_s" in ref_stats else "the reference has no spatial statistics (mu_s, sigma_s)",
        "prec_recall": None if POOL_KEY in ref_stats else "the reference has no images or pool features",
        "memorisation": None if POOL_KEY in ref_stats else "the held-out reference has no images or pool features",
    }
    skipped = {m: why for m in wanted if (why := unavailable.get(m))}
    if skipped and not skip_unavailable:
        m, why = next(iter(skipped.items()))
        raise MetricInputError(f"cannot compute {m}: {why}")

    todo = [m for m in wanted if m not in skipped]
    results: dict[str, float] = {}
    if not todo:
        return results, skipped
    feats = compute_features(images, extractor, batch_size=batch_size, progress=progress)
    if "fid" in todo:
        mu, sigma = feature_statistics(feats["pool"], "sample pool features")
        results["fid"] = frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"])
    if "sfid" in todo:
        mu_s, sigma_s = feature_statistics(feats["spatial"], "sample spatial features")
        results["sfid"] = frechet_distance(mu_s, sigma_s, ref_stats["mu_s"], ref_stats["sigma_s"])
    if "is" in todo:
        results["is"] = inception_score(feats["logits"])
    if "prec_recall" in todo:
        device = getattr(extractor, "device", "cpu")
        with strict_fp32():  # cdist runs on matmuls: a caller's TF32 setting would shift the k-NN radii
            results["precision"], results["recall"] = precision_recall(ref_stats[POOL_KEY], feats["pool"], device=device)
    if "memorisation" in todo:
        assert train is not None
        if isinstance(train_ref, (str, os.PathLike)):
            # Cached like any reference: same key (reference fingerprint + extractor identity), so a
            # tampered network's training features are never served to the real one.
            train_pool = reference_statistics(os.fspath(train_ref), extractor, cache_dir, pool_features=True,
                                              batch_size=batch_size, progress=progress)[POOL_KEY]
        else:
            train_pool = compute_features(train, extractor, batch_size=batch_size, progress=progress)["pool"]
        device = getattr(extractor, "device", "cpu")
        with strict_fp32():  # the neighbour search ranks with matmuls: keep TF32 out of it
            mem = memorisation_stats(feats["pool"], train_pool, ref_stats[POOL_KEY], device=device)
        results.update(mem.metrics())
        if pairs_png is not None:
            # Reads only the images shown (arrays, .npy and folders indexed; .npz streamed up to the last one).
            save_closest_pairs(pairs_png, images, train, mem, k=num_pairs)
    return results, skipped


def evaluate(
    sample: np.ndarray | str | ImageSource,
    ref: str | dict[str, Any],
    extractor: FeatureExtractor,
    metrics: Iterable[str] | None = None,
    *,
    batch_size: int = 64,
    progress: bool = False,
    cache_dir: str | None = None,
    skip_unavailable: bool = True,
    train_ref: str | np.ndarray | ImageSource | None = None,
    pairs_png: str | None = None,
    num_pairs: int = 16,
) -> dict[str, float]:
    """FID, sFID, IS, precision and recall of `sample` against `ref`, and optionally the memorisation check.

    sample: uint8 N x H x W x 3 array, ADM .npz path, image folder or ImageSource.
    ref: reference path (see reference_statistics) or a dict it returned (reuse it across checkpoints).
    metrics: names from METRICS; None means DEFAULT_METRICS, plus "memorisation" when train_ref is given.
    train_ref: the training images (folder, .npz/.npy path, array or ImageSource) for "memorisation",
        which then treats `ref` as held-out real images and adds "nn_median_ratio" and "nn_close_share"
        (evaluations/memorisation.py). Features of a path are cached like reference statistics.
    pairs_png: where to save the PNG of the num_pairs samples closest to the training set (none if None).
    Returns a subset of {"fid", "sfid", "is", "precision", "recall", "nn_median_ratio", "nn_close_share"}.
    A metric whose inputs are missing (IS without a logits layer, sFID, precision/recall or memorisation
    with a statistics-only reference) is skipped with an EvaluationWarning, or raises MetricInputError
    when skip_unavailable=False.
    """
    results, skipped = evaluate_detailed(
        sample, ref, extractor, metrics,
        batch_size=batch_size, progress=progress, cache_dir=cache_dir, skip_unavailable=skip_unavailable,
        train_ref=train_ref, pairs_png=pairs_png, num_pairs=num_pairs,
    )
    for m, why in skipped.items():
        warnings.warn(f"{m} skipped: {why}", EvaluationWarning, stacklevel=2)
    return results
