"""ADM-compatible FID, sFID, IS, precision and recall in PyTorch (no TensorFlow).

    import evaluations
    extractor = evaluations.load_inception(device="cpu")
    ref = evaluations.reference_statistics("VIRTUAL_imagenet256_labeled.npz", extractor)
    scores = evaluations.evaluate("samples.npz", ref, extractor)   # {"fid": ..., "sfid": ..., ...}

CLI: python -m evaluations.evaluate --ref REF --sample SAMPLES.npz   (from the repository root)
     python /path/to/repo/evaluations/evaluate.py --ref REF --sample SAMPLES.npz   (from anywhere)
"""
from evaluations.api import DEFAULT_METRICS, METRICS, EvaluationWarning, evaluate, evaluate_detailed
from evaluations.errors import EvaluationError, ImageDataError, MetricInputError, WeightsError
from evaluations.images import ImageSource, open_images
from evaluations.inception import (
    InceptionExtractor, cache_root, compute_features, file_sha256, load_inception, resolve_weights, strict_fp32,
)
from evaluations.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from evaluations.reference import reference_statistics

__all__ = [
    "DEFAULT_METRICS", "METRICS", "EvaluationError", "EvaluationWarning", "ImageDataError", "ImageSource",
    "InceptionExtractor", "MetricInputError", "WeightsError", "cache_root", "compute_features", "evaluate",
    "evaluate_detailed", "feature_statistics", "file_sha256", "frechet_distance", "inception_score", "load_inception",
    "open_images", "precision_recall", "reference_statistics", "resolve_weights", "strict_fp32",
]
