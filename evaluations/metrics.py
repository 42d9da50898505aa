"""FID, sFID, Inception Score and precision/recall, computed the way ADM's evaluator computes them.

- FID / sFID: Frechet distance between Gaussians fitted (float64) to pool_3 / spatial features,
  with scipy.linalg.sqrtm and ADM's fallback (eps on the diagonals when the product is singular).
- IS: exp(E[KL(p(y|x) || p(y))]) averaged over 10 splits of the softmax of the unbiased logits.
- Precision / recall: k-NN manifold estimate (k = 3) of Kynkaanniemi et al., as in ADM.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

from evaluations.errors import MetricInputError

IS_SPLITS = 10
PR_NEIGHBOURS = 3
# Distance blocks hold at most this many float32 entries (128 MB): 50k x 50k never materialises.
_BLOCK_ELEMS = 1 << 25


def feature_statistics(features: np.ndarray, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise MetricInputError(f"{name}: expected an N x D feature matrix, got shape {x.shape}")
    if x.shape[0] < 2:
        raise MetricInputError(f"{name}: a covariance needs at least 2 images, got {x.shape[0]}; evaluate more images")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) in float64, with ADM's singular-product fallback."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise MetricInputError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}; "
            "compare statistics of the same feature layer"
        )
    diff = mu1 - mu2
    # ADM passes disp=False to keep this first attempt quiet (its result is checked right below);
    # SciPy >= 1.16 deprecates `disp` and warns instead, so silence that warning here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives tiny imaginary parts; a large one means the statistics are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = float(np.max(np.abs(covmean.imag)))
            raise MetricInputError(
                f"sqrt(sigma1 @ sigma2) has an imaginary component of {worst:.3g}; "
                "the covariances are not valid (check for NaN/inf features or mismatched statistics)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS, seed: int | None = 0) -> float:
    """Mean over `splits` chunks of exp(mean_x KL(p(y|x) || p(y))), as ADM reports it (no std).

    ADM shuffles the samples before splitting (unseeded); a fixed seed keeps the value reproducible
    while still breaking up class-sorted sample files. seed=None keeps the file order.
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2:
        raise MetricInputError(f"logits: expected an N x C matrix, got shape {x.shape}")
    if x.shape[0] < splits:
        raise MetricInputError(f"IS needs at least {splits} images (one per split), got {x.shape[0]}; evaluate more images")
    log_p = x - x.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    if seed is not None:
        log_p = log_p[np.random.default_rng(seed).permutation(len(log_p))]
    scores = []
    for part in np.array_split(log_p, splits):
        p = np.exp(part)
        log_q = np.log(p.mean(axis=0, keepdims=True))
        # Where p underflows to 0 the term is 0 (not 0 * inf).
        kl = np.where(p > 0, p * (part - log_q), 0.0).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def knn_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS) -> torch.Tensor:
    """Distance of every point to its k-th nearest other point of the same set."""
    n = len(features)
    if n <= k:
        raise MetricInputError(f"precision/recall with k={k} needs more than {k} images per set, got {n}; evaluate more images")
    rows = max(1, _BLOCK_ELEMS // n)
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for i in range(0, n, rows):
        d = torch.cdist(features[i : i + rows], features)
        # Index k (0-based) skips the point itself, which sits at distance 0.
        radii[i : i + rows] = d.kthvalue(k + 1, dim=1).values
    return radii


def _inside_any_ball(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Bool per query: within radii[j] of some centre j. Blocked over both sets to bound memory."""
    cols = min(len(centres), max(1, int(np.sqrt(_BLOCK_ELEMS))))
    rows = max(1, _BLOCK_ELEMS // cols)
    inside = torch.zeros(len(queries), dtype=torch.bool, device=queries.device)
    for i in range(0, len(queries), rows):
        for j in range(0, len(centres), cols):
            d = torch.cdist(queries[i : i + rows], centres[j : j + cols])
            inside[i : i + rows] |= (d <= radii[j : j + cols]).any(dim=1)
    return inside


def precision_recall(
    ref_features: np.ndarray, sample_features: np.ndarray, k: int = PR_NEIGHBOURS, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """ADM's improved precision and recall on pool features.

    precision: fraction of samples inside some reference k-NN ball;
    recall: fraction of references inside some sample k-NN ball.
    Distances are float32 (ADM uses float16 with a float32 fallback).
    """
    ref = torch.as_tensor(np.asarray(ref_features, dtype=np.float32), device=device)
    sam = torch.as_tensor(np.asarray(sample_features, dtype=np.float32), device=device)
    if ref.ndim != 2 or sam.ndim != 2 or ref.shape[1] != sam.shape[1]:
        raise MetricInputError(
            f"precision/recall: feature shapes {tuple(ref.shape)} and {tuple(sam.shape)} do not match; use pool features of both sets"
        )
    ref_radii, sam_radii = knn_radii(ref, k), knn_radii(sam, k)
    precision = _inside_any_ball(sam, ref, ref_radii).double().mean().item()
    recall = _inside_any_ball(ref, sam, sam_radii).double().mean().item()
    return float(precision), float(recall)
