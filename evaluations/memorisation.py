"""Nearest-neighbour memorisation check: do generated images sit closer to the training set than new real images do?

A generator conditioned on training-image snippets (GMem) can copy its training set, and FID does not
notice. In Inception pool features (2048-d, the FID network):

    d_gen(i)  = distance from generated image i to its nearest training image
    d_held(j) = distance from held-out real image j to its nearest training image

Reported (`MemorisationResult.metrics()`):
    nn_median_ratio  median_i d_gen(i) / median_j d_held(j). About 1 when the samples are as far from
                     the training set as unseen real images; towards 0 when they copy it (exact copies: 0).
                     A ratio of medians (not a median of per-image ratios): the two sets are unpaired.
    nn_close_share   share of generated images with d_gen(i) < the 1st percentile of d_held: about 0.01
                     for a generator that does not copy, 1.0 when every sample is a copy.
The held-out images must not be in the training set (a median held-out distance of 0 is refused).

Distances: nearest neighbours are found with blocked float32 matrix products (memory bounded by the block
sizes, any set size), then the distance to the chosen neighbour is recomputed exactly in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from evaluations.errors import ImageDataError, MetricInputError
from evaluations.images import ArrayImages, FolderImages, ImageSource, open_images, to_uint8
from evaluations.inception import FeatureExtractor, compute_features

HELDOUT_QUANTILE = 0.01  # "closer than the 1st percentile of held-out-to-train distances"
QUERY_BLOCK = 1024
REFERENCE_BLOCK = 16384  # 1024 x 16384 float32 distances: 64 MiB per block


@dataclass
class MemorisationResult:
    median_ratio: float           # median d_gen / median d_held
    close_share: float            # share of d_gen below the held-out quantile
    threshold: float              # that quantile of d_held
    median_generated: float
    median_heldout: float
    gen_distance: np.ndarray      # float64, one per generated image
    gen_index: np.ndarray         # int64, its nearest training image
    heldout_distance: np.ndarray  # float64, one per held-out image

    def metrics(self) -> dict[str, float]:
        """The two headline numbers, as evaluate() reports metrics."""
        return {"nn_median_ratio": self.median_ratio, "nn_close_share": self.close_share}

    def closest(self, k: int) -> np.ndarray:
        """Indices of the k generated images closest to the training set, closest first."""
        return np.argsort(self.gen_distance, kind="stable")[:k]


def _features(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 2 or len(arr) == 0:
        raise MetricInputError(f"{name}: features must be a non-empty N x D array, got shape {arr.shape}; pass the "
                               "'pool' features of compute_features")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise MetricInputError(f"{name}: features hold NaN or inf; recompute them")
    return arr


def nearest_neighbours(
    queries: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    *,
    query_block: int = QUERY_BLOCK,
    reference_block: int = REFERENCE_BLOCK,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(distance float64, index int64) of every query's nearest reference row (Euclidean).

    Blocked over both sets, so memory is bounded by query_block x reference_block whatever the sizes.
    """
    q, r = _features(queries, "queries"), _features(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise MetricInputError(f"feature dimensions differ ({q.shape[1]} vs {r.shape[1]}); use the same network's "
                               "pool features for every set")
    index = np.empty(len(q), dtype=np.int64)
    for qs in range(0, len(q), query_block):
        qc = torch.from_numpy(q[qs:qs + query_block]).to(device)
        qn = qc.pow(2).sum(1, keepdim=True)
        best = torch.full((len(qc),), math.inf, device=device)
        arg = torch.zeros(len(qc), dtype=torch.int64, device=device)
        for rs in range(0, len(r), reference_block):
            rc = torch.from_numpy(r[rs:rs + reference_block]).to(device)
            d2 = qn + rc.pow(2).sum(1)[None] - 2 * qc @ rc.T  # ranking only; exact distances below
            m, i = d2.min(dim=1)
            better = m < best
            best = torch.where(better, m, best)
            arg = torch.where(better, i + rs, arg)
        index[qs:qs + query_block] = arg.cpu().numpy()
    # Exact distance to the chosen neighbour (float64), blocked to bound memory.
    dist = np.empty(len(q), dtype=np.float64)
    for qs in range(0, len(q), query_block):
        diff = q[qs:qs + query_block].astype(np.float64) - r[index[qs:qs + query_block]].astype(np.float64)
        dist[qs:qs + query_block] = np.sqrt((diff * diff).sum(1))
    return dist, index


def memorisation_stats(
    generated: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor,
    heldout: np.ndarray | torch.Tensor,
    *,
    quantile: float = HELDOUT_QUANTILE,
    device: str | torch.device = "cpu",
    query_block: int = QUERY_BLOCK,
    reference_block: int = REFERENCE_BLOCK,
) -> MemorisationResult:
    """The memorisation numbers (module docstring) from pool features of the three sets."""
    if not 0 < quantile < 1:
        raise MetricInputError(f"quantile must be in (0, 1), got {quantile}")
    kw = dict(device=device, query_block=query_block, reference_block=reference_block)
    d_gen, i_gen = nearest_neighbours(generated, train, **kw)
    d_held, _ = nearest_neighbours(heldout, train, **kw)
    med_gen, med_held = float(np.median(d_gen)), float(np.median(d_held))
    if med_held <= 0:
        raise MetricInputError("more than half of the held-out images are exact copies of training images; pass "
                               "real images that are not in the training set as the held-out reference")
    threshold = float(np.quantile(d_held, quantile))
    return MemorisationResult(
        median_ratio=med_gen / med_held, close_share=float(np.mean(d_gen < threshold)), threshold=threshold,
        median_generated=med_gen, median_heldout=med_held, gen_distance=d_gen, gen_index=i_gen,
        heldout_distance=d_held,
    )


def _rgb(image: np.ndarray, name: str) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ImageDataError(f"{name}: expected a uint8 H x W x 3 (or grey) image, got {img.dtype} {img.shape}")
    return img


def gather_images(images: np.ndarray | Sequence[np.ndarray] | str | ImageSource, indices: Sequence[int],
                  batch_size: int = 256) -> dict[int, np.ndarray]:
    """{index: image} for a few indices: direct indexing for arrays, lists, .npy files and image folders
    (only those images are read), otherwise one streamed pass over the .npz / ImageSource that stops
    once every wanted image was seen."""
    wanted = {int(i) for i in indices}
    if isinstance(images, (np.ndarray, list, tuple)):
        return {i: np.asarray(images[i]) for i in wanted}
    source = open_images(images)
    if wanted and 0 <= min(wanted) and max(wanted) < len(source):
        # Random access where the source has it: only the wanted images are read (.npy is memory-mapped).
        if isinstance(source, ArrayImages):
            return {i: to_uint8(np.asarray(source.array[i:i + 1]), source.name)[0] for i in wanted}
        if isinstance(source, FolderImages):
            return {i: source._load(source.files[i]) for i in wanted}
    found: dict[int, np.ndarray] = {}
    start = 0
    for batch in source.iter_batches(batch_size):
        for i in wanted.intersection(range(start, start + len(batch))):
            found[i] = np.array(batch[i - start])
        start += len(batch)
        if len(found) == len(wanted):
            break
    if len(found) != len(wanted):
        raise ImageDataError(f"image {min(wanted - set(found))} is out of range ({start} images): pass the images "
                             "the features were computed from")
    return found


def save_closest_pairs(
    path: str,
    generated_images: np.ndarray | Sequence[np.ndarray] | str | ImageSource,
    train_images: np.ndarray | Sequence[np.ndarray] | str | ImageSource,
    result: MemorisationResult,
    k: int = 16,
    pairs_per_row: int = 4,
) -> str:
    """PNG of the k generated images closest to the training set, each as (generated | nearest training
    image) with its distance; the held-out 1st-percentile distance is in the title for scale.

    Only the 2k images shown are read (arrays are indexed, .npz files and folders streamed once).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    order = result.closest(k)
    gen_images = gather_images(generated_images, order)
    nearest = gather_images(train_images, result.gen_index[order])
    rows = math.ceil(len(order) / pairs_per_row)
    cols = min(pairs_per_row, len(order))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.5 * rows + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), order):
        gen = _rgb(gen_images[int(i)], f"generated image {i}")
        train = _rgb(nearest[int(result.gen_index[i])], f"training image {result.gen_index[i]}")
        if train.shape != gen.shape:
            train = np.asarray(Image.fromarray(train).resize(gen.shape[1::-1], Image.NEAREST))
        gap = np.full((gen.shape[0], max(1, gen.shape[1] // 16), 3), 255, np.uint8)
        ax.imshow(np.concatenate([gen, gap, train], axis=1), interpolation="nearest")
        ax.set_title(f"gen {i} | train {result.gen_index[i]}\nd = {result.gen_distance[i]:.2f}", fontsize=7)
    fig.suptitle(f"closest generated | nearest training image (held-out 1% distance {result.threshold:.2f}, "
                 f"median ratio {result.median_ratio:.3f}, close share {result.close_share:.3f})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def memorisation(
    generated: np.ndarray | str | ImageSource,
    train: np.ndarray | str | ImageSource,
    heldout: np.ndarray | str | ImageSource,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 64,
    progress: bool = False,
    png_path: str | None = None,
    k: int = 16,
    **stats_kw: Any,
) -> MemorisationResult:
    """memorisation_stats on Inception pool features computed from images (uint8 N x H x W x 3 arrays,
    .npz paths, folders or ImageSources); with png_path, also the closest-pairs PNG. Training
    features of a large set should be computed once and cached (reference_statistics(train,
    extractor)["pool"]) and passed to memorisation_stats directly."""
    feats = [compute_features(x, extractor, batch_size=batch_size, progress=progress)["pool"]
             for x in (generated, train, heldout)]
    stats_kw.setdefault("device", getattr(extractor, "device", "cpu"))
    result = memorisation_stats(*feats, **stats_kw)
    if png_path is not None:
        save_closest_pairs(png_path, generated, train, result, k=k)
    return result
