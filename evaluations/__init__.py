"""ADM-compatible FID, sFID, IS, precision and recall in PyTorch (no TensorFlow), and a nearest-neighbour
memorisation check against the training set.

    import evaluations
    extractor = evaluations.load_inception(device="cpu")
    ref = evaluations.reference_statistics("VIRTUAL_imagenet256_labeled.npz", extractor)
    scores = evaluations.evaluate("samples.npz", ref, extractor)   # {"fid": ..., "sfid": ..., ...}
    # ref = held-out real images; adds nn_median_ratio, nn_close_share and writes the closest pairs
    scores = evaluations.evaluate("samples.npz", "heldout/", extractor, train_ref="train/", pairs_png="pairs.png")

CLI: python -m evaluations.evaluate --ref REF --sample SAMPLES.npz   (from the repository root)
     python /path/to/repo/evaluations/evaluate.py --ref REF --sample SAMPLES.npz   (from anywhere)
"""
from evaluations.api import DEFAULT_METRICS, METRICS, EvaluationWarning, evaluate, evaluate_detailed
from evaluations.errors import EvaluationError, ImageDataError, MetricInputError, WeightsError
from evaluations.images import ImageSource, open_images
from evaluations.inception import (
    InceptionExtractor, cache_root, compute_features, file_sha256, load_inception, resolve_weights, strict_fp32,
)
# Not the function memorisation(): it would shadow the submodule evaluations.memorisation.
from evaluations.memorisation import MemorisationResult, memorisation_stats, save_closest_pairs
from evaluations.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from evaluations.reference import reference_statistics

__all__ = [
    "DEFAULT_METRICS", "METRICS", "EvaluationError", "EvaluationWarning", "ImageDataError", "ImageSource",
    "InceptionExtractor", "MemorisationResult", "MetricInputError", "WeightsError", "cache_root", "compute_features",
    "evaluate", "evaluate_detailed", "feature_statistics", "file_sha256", "frechet_distance", "inception_score",
    "load_inception", "memorisation_stats", "open_images", "precision_recall", "reference_statistics",
    "resolve_weights", "save_closest_pairs", "strict_fp32",
]
