"""Reference statistics: ADM's reference batch, or real images whose statistics are computed once and cached.

A reference is
  - an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz): `arr_0` images plus precomputed
    `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial). Its precomputed statistics are used as they
    are (as ADM does); the images are only run through Inception when precision/recall needs their
    pool features;
  - a statistics-only .npz (`mu`, `sigma`, optionally `mu_s`, `sigma_s`, `pool`), e.g. one of our caches;
  - an .npz with only `arr_0`, an .npy array, or a folder of images: features computed once.
Computed results are cached as an .npz in the same layout (plus `pool`, N x 2048 float32), so a cache
file is itself a valid reference.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
from typing import Any

import numpy as np

from evaluations.errors import ImageDataError
from evaluations.images import NPZ_KEY, ArrayImages, FolderImages, ImageSource, NpzImages
from evaluations.inception import FeatureExtractor, cache_root, compute_features
from evaluations.metrics import feature_statistics

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
POOL_KEY = "pool"
# Part of every cache name: features of a different network must never be mixed up with these.
NETWORK_TAG = "inception-2015-12-05"


def _fingerprint(path: str) -> str:
    """Cheap identity of a file or folder (path, sizes, mtimes): a changed reference gets a new cache."""
    h = hashlib.sha256(os.path.abspath(path).encode())
    if os.path.isdir(path):
        for file in FolderImages(path).files:
            st = os.stat(file)
            h.update(f"{os.path.relpath(file, path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        st = os.stat(path)
        h.update(f"{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _check_stats(stats: dict[str, np.ndarray], name: str) -> None:
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if mu_key not in stats:
            continue
        mu, sigma = stats[mu_key], stats.get(sigma_key)
        d = mu.shape[0] if mu.ndim == 1 else -1
        if sigma is None or mu.ndim != 1 or sigma.shape != (d, d):
            shape = None if sigma is None else sigma.shape
            raise ImageDataError(
                f"{name}: {mu_key} {mu.shape} and {sigma_key} {shape} are not a mean vector and its covariance; "
                "use an ADM reference batch or delete the broken statistics file"
            )


def _read_npz(path: str) -> tuple[dict[str, Any], bool]:
    """(statistics and pool features found in the file, whether it holds images)."""
    if not zipfile.is_zipfile(path):
        raise ImageDataError(f"{path}: not an .npz archive; give an ADM reference batch, a statistics .npz or an image folder")
    with np.load(path) as z:
        keys = set(z.files)
        stats = {k: np.asarray(z[k], dtype=np.float64) for k in STAT_KEYS if k in keys}
        if POOL_KEY in keys:
            stats[POOL_KEY] = np.asarray(z[POOL_KEY], dtype=np.float32)
    if ("mu" in stats) != ("sigma" in stats) or ("mu_s" in stats) != ("sigma_s" in stats):
        raise ImageDataError(f"{path}: has only one of a mean/covariance pair (keys: {', '.join(sorted(keys))}); regenerate it")
    if "mu" not in stats and NPZ_KEY not in keys:
        raise ImageDataError(
            f"{path}: neither images ('{NPZ_KEY}') nor statistics ('mu', 'sigma') (keys: {', '.join(sorted(keys)) or 'none'}); "
            "give an ADM reference batch, a statistics .npz or an image folder"
        )
    _check_stats(stats, path)
    return stats, NPZ_KEY in keys


def _save_npz(path: str, arrays: dict[str, Any]) -> None:
    """Write atomically: an interrupted run never leaves a half-written cache that looks valid."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def reference_cache_path(ref: str, cache_dir: str | None = None) -> str:
    """Where reference_statistics caches the statistics of `ref`."""
    cache_dir = cache_dir or os.path.join(cache_root(), "ref-stats")
    stem = os.path.splitext(os.path.basename(os.path.normpath(ref)))[0]
    return os.path.join(cache_dir, f"{stem}-{_fingerprint(ref)}-{NETWORK_TAG}.npz")


def reference_statistics(
    ref: str,
    extractor: FeatureExtractor,
    cache_dir: str | None = None,
    *,
    pool_features: bool = True,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """mu, sigma, mu_s, sigma_s (float64) of a reference, plus "pool" (N x 2048) when available.

    pool_features=False skips the Inception pass over an ADM reference batch whose statistics are
    precomputed (precision/recall is then unavailable). Also returns "source" and "cache_path".
    """
    path = os.fspath(ref)
    if not os.path.exists(path):
        raise ImageDataError(f"{path}: no such reference; give an ADM reference batch .npz, a statistics .npz or an image folder")
    file_stats: dict[str, Any] = {}
    if os.path.isfile(path) and not path.endswith(".npy"):
        file_stats, has_images = _read_npz(path)
        if "mu" in file_stats and (POOL_KEY in file_stats or not pool_features or not has_images):
            return {**file_stats, "source": path, "cache_path": None}

    cache = reference_cache_path(path, cache_dir)
    if os.path.isfile(cache):
        stats, _ = _read_npz(cache)
        if POOL_KEY in stats:
            return {**stats, "num_images": len(stats[POOL_KEY]), "source": path, "cache_path": cache}

    images: ImageSource
    if os.path.isdir(path):
        images = FolderImages(path)
    elif path.endswith(".npy"):
        images = ArrayImages(np.load(path, mmap_mode="r"), os.path.basename(path))
    else:
        images = NpzImages(path)
    feats = compute_features(images, extractor, batch_size=batch_size, progress=progress)
    mu, sigma = feature_statistics(feats["pool"], f"{path} pool features")
    stats = {"mu": mu, "sigma": sigma}
    if "spatial" in feats:
        stats["mu_s"], stats["sigma_s"] = feature_statistics(feats["spatial"], f"{path} spatial features")
    # Precomputed statistics of an ADM batch win over ours, as in ADM's evaluator; ours differ by
    # float round-off only.
    stats.update({k: v for k, v in file_stats.items() if k in STAT_KEYS})
    stats[POOL_KEY] = feats["pool"].astype(np.float32)
    saved: str | None = cache
    try:
        _save_npz(cache, stats)
    except OSError as e:
        # The statistics are still good; losing them to an unwritable cache would waste the whole pass.
        warnings.warn(f"could not cache reference statistics at {cache} ({e.strerror}); pass cache_dir / --cache-dir")
        saved = None
    return {**stats, "num_images": len(images), "source": path, "cache_path": saved}
