"""Reference statistics: ADM's reference batch, or real images whose statistics are computed once and cached.

A reference is
  - an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz): `arr_0` images plus precomputed
    `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial). Its precomputed statistics are used as they
    are (as ADM does); the images are only run through Inception when precision/recall needs their
    pool features;
  - a statistics-only .npz (`mu`, `sigma`, optionally `mu_s`, `sigma_s`, `pool`), e.g. one of our caches;
  - an .npz with only `arr_0`, an .npy array, or a folder of images: features computed once.
Computed results are cached as an .npz in the same layout (plus `pool`, N x 2048 float32), so a cache
file is itself a valid reference. The cache name is a hash of everything the statistics depend on:
the reference (path, sizes, mtimes, number of images) and the extractor's `identity` (SHA-256 of the
weights file actually loaded, feature layers, resize, precision). Statistics of other weights are
never reused, and an extractor without an identity is never cached.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from typing import Any

import numpy as np

from evaluations.errors import ImageDataError, MetricInputError
from evaluations.images import NPZ_KEY, ArrayImages, FolderImages, ImageSource, NpzImages
from evaluations.inception import FeatureExtractor, cache_root, compute_features
from evaluations.metrics import feature_statistics

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
POOL_KEY = "pool"
CACHE_KEY = "cache_key"  # JSON of the key, stored in each cache file and checked on every read
CACHE_FORMAT = 2  # bump when the cache layout or the statistics change


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
    """(statistics and pool features found in the file, plus its cache key if any; whether it holds images)."""
    if not zipfile.is_zipfile(path):
        raise ImageDataError(f"{path}: not an .npz archive; give an ADM reference batch, a statistics .npz or an image folder")
    with np.load(path) as z:
        keys = set(z.files)
        stats = {k: np.asarray(z[k], dtype=np.float64) for k in STAT_KEYS if k in keys}
        if POOL_KEY in keys:
            stats[POOL_KEY] = np.asarray(z[POOL_KEY], dtype=np.float32)
        if CACHE_KEY in keys:
            stats[CACHE_KEY] = str(z[CACHE_KEY])
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


def cache_key(ref: str, identity: dict[str, Any], num_images: int) -> str:
    """Canonical JSON of what the statistics of `ref` depend on (reference and extractor)."""
    key = {"format": CACHE_FORMAT, "reference": os.path.abspath(ref), "reference_fingerprint": _fingerprint(ref),
           "num_images": num_images, "extractor": identity}
    return json.dumps(key, sort_keys=True)


def reference_cache_path(ref: str, key: str, cache_dir: str | None = None) -> str:
    """Where reference_statistics caches the statistics of `ref` under `key` (see cache_key)."""
    cache_dir = cache_dir or os.path.join(cache_root(), "ref-stats")
    stem = os.path.splitext(os.path.basename(os.path.normpath(ref)))[0]
    return os.path.join(cache_dir, f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz")


def _check_cache_origin(path: str, stored_key: str, identity: dict[str, Any] | None) -> None:
    """A cache file given as the reference must come from the same extractor (weights, layers, resize)."""
    if identity is None:
        return
    try:
        theirs = json.loads(stored_key).get("extractor")
    except (ValueError, AttributeError):
        theirs = None
    if theirs != identity:
        theirs = theirs if isinstance(theirs, dict) else {}
        changed = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k))
        raise MetricInputError(
            f"{path}: statistics were computed by another feature extractor ({', '.join(changed)} differ); "
            "pass the original reference images instead, or the same --inception-weights"
        )


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
    identity = getattr(extractor, "identity", None)
    file_stats: dict[str, Any] = {}
    if os.path.isfile(path) and not path.endswith(".npy"):
        file_stats, has_images = _read_npz(path)
        stored_key = file_stats.pop(CACHE_KEY, None)
        if stored_key is not None:
            _check_cache_origin(path, stored_key, identity)
        if "mu" in file_stats and (POOL_KEY in file_stats or not pool_features or not has_images):
            return {**file_stats, "source": path, "cache_path": None}

    images: ImageSource
    if os.path.isdir(path):
        images = FolderImages(path)
    elif path.endswith(".npy"):
        images = ArrayImages(np.load(path, mmap_mode="r"), os.path.basename(path))
    else:
        images = NpzImages(path)
    key = cache_key(path, identity, len(images)) if identity is not None else None
    cache = reference_cache_path(path, key, cache_dir) if key is not None else None
    if cache is not None and os.path.isfile(cache):
        stats, _ = _read_npz(cache)
        # The stored key must match in full, not just the 20 hex digits of the name.
        if POOL_KEY in stats and stats.pop(CACHE_KEY, None) == key:
            return {**stats, "num_images": len(stats[POOL_KEY]), "source": path, "cache_path": cache}

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
    if cache is not None:
        try:
            _save_npz(cache, {**stats, CACHE_KEY: np.array(key)})
        except OSError as e:
            # The statistics are still good; losing them to an unwritable cache would waste the whole pass.
            warnings.warn(f"could not cache reference statistics at {cache} ({e.strerror}); pass cache_dir / --cache-dir")
            saved = None
    return {**stats, "num_images": len(images), "source": path, "cache_path": saved}
