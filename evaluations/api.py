"""evaluate(): every metric for one sample set against one reference, the way ADM's evaluator computes them."""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import numpy as np

from evaluations.errors import EvaluationError, MetricInputError
from evaluations.images import ImageSource, open_images
from evaluations.inception import FeatureExtractor, compute_features, strict_fp32
from evaluations.metrics import (
    IS_SPLITS,
    PR_NEIGHBOURS,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)
from evaluations.reference import POOL_KEY, reference_statistics

METRICS = ("fid", "sfid", "is", "prec_recall")
DEFAULT_METRICS = METRICS
# Fewest sample images each metric can be computed from (not a quality bar: papers use 50,000).
MIN_IMAGES = {"fid": 2, "sfid": 2, "is": IS_SPLITS, "prec_recall": PR_NEIGHBOURS + 1}
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


def evaluate_detailed(
    sample: np.ndarray | str | ImageSource,
    ref: str | dict[str, Any],
    extractor: FeatureExtractor,
    metrics: Iterable[str] = DEFAULT_METRICS,
    *,
    batch_size: int = 64,
    progress: bool = False,
    cache_dir: str | None = None,
    skip_unavailable: bool = True,
) -> tuple[dict[str, float], dict[str, str]]:
    """Like evaluate(), but also returns {metric: reason} for metrics skipped as unavailable."""
    wanted = check_metrics(metrics)
    images = open_images(sample, "samples")
    n = len(images)
    for m in wanted:  # fail before hours of feature extraction, not after
        if n < MIN_IMAGES[m]:
            raise MetricInputError(f"samples: {m} needs at least {MIN_IMAGES[m]} images, got {n}; sample more images")

    if isinstance(ref, dict):
        ref_stats = ref
    elif wanted == ("is",):
        ref_stats = {}  # IS looks at the samples only: do not pay for a reference pass
    else:
        ref_stats = reference_statistics(
            ref, extractor, cache_dir, pool_features="prec_recall" in wanted, batch_size=batch_size, progress=progress
        )
    if "fid" in wanted and not ("mu" in ref_stats and "sigma" in ref_stats):
        raise MetricInputError("the reference has no pool statistics (mu, sigma); pass a reference path or a reference_statistics() dict")
    unavailable = {
        "is": None if getattr(extractor, "has_logits", False) else NO_LOGITS,
        "sfid": None if "mu_s" in ref_stats else "the reference has no spatial statistics (mu_s, sigma_s)",
        "prec_recall": None if POOL_KEY in ref_stats else "the reference has no images or pool features",
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
    return results, skipped


def evaluate(
    sample: np.ndarray | str | ImageSource,
    ref: str | dict[str, Any],
    extractor: FeatureExtractor,
    metrics: Iterable[str] = DEFAULT_METRICS,
    *,
    batch_size: int = 64,
    progress: bool = False,
    cache_dir: str | None = None,
    skip_unavailable: bool = True,
) -> dict[str, float]:
    """FID, sFID, IS, precision and recall of `sample` against `ref`.

    sample: uint8 N x H x W x 3 array, ADM .npz path, image folder or ImageSource.
    ref: reference path (see reference_statistics) or a dict it returned (reuse it across checkpoints).
    Returns a subset of {"fid", "sfid", "is", "precision", "recall"}. A metric whose inputs are missing
    (IS without a logits layer, sFID or precision/recall with a statistics-only reference) is skipped
    with an EvaluationWarning, or raises MetricInputError when skip_unavailable=False.
    """
    results, skipped = evaluate_detailed(
        sample, ref, extractor, metrics,
        batch_size=batch_size, progress=progress, cache_dir=cache_dir, skip_unavailable=skip_unavailable,
    )
    for m, why in skipped.items():
        warnings.warn(f"{m} skipped: {why}", EvaluationWarning, stacklevel=2)
    return results
