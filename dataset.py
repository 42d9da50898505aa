"""On-disk latent format, the memory-mapped reader and the deterministic distributed sampler.

Layout of a dataset directory (written by preprocessing/ or `write_dataset`):

    DATA_DIR/
      manifest.json          written last; its presence marks the dataset complete
      shard-00000/           one directory per shard, renamed into place atomically
        mean.npy             float16, n x C x H x W   VAE posterior mean (or pixels in [-1, 1])
        std.npy              float16, n x C x H x W   VAE posterior std  (zeros for pixel data)
        label.npy            int64,   n               class index in [0, num_classes)
      shard-00001/ ...

Training latent for one step:  z = (mean + std * eps - latent_shift) * latent_scale,
with fresh eps every step (see `sample_latents`). Decoding inverts it: raw = z / scale + shift.
Shards are opened with numpy memory maps, so ImageNet-size sets (about 21 GB) are read
with random access and never loaded whole into RAM.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FIELDS = ("mean", "std", "label")


class DataError(ValueError):
    """Bad or missing data: the message names the problem and the fix."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def shard_complete(data_dir: str, index: int) -> bool:
    d = os.path.join(data_dir, shard_name(index))
    return all(os.path.isfile(os.path.join(d, f"{f}.npy")) for f in FIELDS)


def write_shard(data_dir: str, index: int, mean: np.ndarray, std: np.ndarray | None, labels: np.ndarray) -> str:
    """Write one shard atomically: into a temporary directory, then one rename."""
    mean = np.asarray(mean, dtype=np.float16)
    std = np.zeros_like(mean) if std is None else np.asarray(std, dtype=np.float16)
    labels = np.asarray(labels, dtype=np.int64)
    if std.shape != mean.shape or labels.shape != (mean.shape[0],) or mean.ndim != 4:
        raise DataError(f"shard {index}: mean {mean.shape}, std {std.shape}, labels {labels.shape} do not "
                        "fit n x C x H x W, n x C x H x W, n")
    final = os.path.join(data_dir, shard_name(index))
    tmp = os.path.join(data_dir, f".{shard_name(index)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, arr in zip(FIELDS, (mean, std, labels)):
        with open(os.path.join(tmp, f"{name}.npy"), "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
    if os.path.exists(final):  # deliberate overwrite of a finished shard
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def make_manifest(
    *,
    count: int,
    latent_shape: Sequence[int],
    num_classes: int,
    shard_counts: Sequence[int],
    vae: str = "none",
    latent_scale: float | Sequence[float] = 1.0,
    latent_shift: float | Sequence[float] = 0.0,
    flip: bool = False,
    source: str = "",
    class_names: Sequence[str] | None = None,
    **extra: Any,
) -> dict:
    """The manifest fields every reader relies on; `extra` adds anything else (resolution, args, stats...)."""
    if sum(shard_counts) != count:
        raise DataError(f"shard counts add up to {sum(shard_counts)}, not the stated count {count}")
    return dict(
        format_version=FORMAT_VERSION,
        count=int(count),
        latent_shape=[int(s) for s in latent_shape],
        dtype="float16",
        num_classes=int(num_classes),
        shards=[dict(name=shard_name(i), count=int(c)) for i, c in enumerate(shard_counts)],
        vae=vae,
        latent_scale=latent_scale,
        latent_shift=latent_shift,
        flip=bool(flip),
        source=source,
        class_names=list(class_names) if class_names is not None else None,
        **extra,
    )


def write_manifest(data_dir: str, manifest: dict) -> None:
    """Write manifest.json last, after checking that every shard it names is complete."""
    for i, shard in enumerate(manifest["shards"]):
        if not shard_complete(data_dir, i):
            raise DataError(f"cannot write the manifest: {shard['name']} in {data_dir} is missing or incomplete")
        n = np.load(os.path.join(data_dir, shard["name"], "label.npy"), mmap_mode="r").shape[0]
        if n != shard["count"]:
            raise DataError(f"cannot write the manifest: {shard['name']} holds {n} items, expected {shard['count']}")
    atomic_write_json(os.path.join(data_dir, MANIFEST), manifest)


def write_dataset(
    data_dir: str,
    mean: np.ndarray,
    std: np.ndarray | None,
    labels: np.ndarray,
    *,
    num_classes: int,
    shard_size: int = 65536,
    **manifest_fields: Any,
) -> dict:
    """Write in-memory arrays in the on-disk format (tests, demos, small datasets)."""
    os.makedirs(data_dir, exist_ok=True)
    n = len(mean)
    if n == 0:
        raise DataError("cannot write an empty dataset")
    counts = []
    for i, start in enumerate(range(0, n, shard_size)):
        sl = slice(start, start + shard_size)
        write_shard(data_dir, i, mean[sl], None if std is None else std[sl], labels[sl])
        counts.append(len(labels[sl]))
    manifest = make_manifest(count=n, latent_shape=mean.shape[1:], num_classes=num_classes,
                             shard_counts=counts, **manifest_fields)
    write_manifest(data_dir, manifest)
    return manifest


def read_manifest(data_dir: str) -> dict:
    if not data_dir or not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir!r} does not exist: pass --data-dir pointing at the output "
                        "of preprocessing/encode.py")
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        what = "is empty" if not os.listdir(data_dir) else "has no manifest.json"
        raise DataError(f"data directory {data_dir!r} {what}: run preprocessing/encode.py (an interrupted "
                        "run resumes) to create the dataset")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}): re-run preprocessing to rewrite it") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format_version {manifest.get('format_version')!r}, this code reads "
                        f"{FORMAT_VERSION}: re-run preprocessing")
    return manifest


# Manifest fields that decide what a model trains on, in the order mismatches are reported.
FINGERPRINT_FIELDS = ("count", "latent_shape", "num_classes", "source", "source_sha256", "flip", "vae",
                      "latent_scale", "latent_shift", "shards")


def data_fingerprint(manifest: dict) -> dict:
    """A small JSON-able identity of a dataset, for checkpoints to record and compare on resume.

    Fields absent from older manifests (e.g. source_sha256) are None. `hash` is a short digest
    over the other fields, so equal hashes mean equal fingerprints.
    """
    fp: dict[str, Any] = {k: manifest.get(k) for k in FINGERPRINT_FIELDS}
    fp["shards"] = [[s["name"], int(s["count"])] for s in manifest.get("shards", [])]
    # Round-trip through JSON so a fingerprint compares equal to its reloaded copy (tuples -> lists).
    fp = json.loads(json.dumps(fp, sort_keys=True))
    fp["hash"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


def fingerprint_mismatch(a: dict, b: dict) -> str | None:
    """A short description of the first field where fingerprints a and b differ ("count 50 vs 60"), or None."""
    for key in FINGERPRINT_FIELDS:
        x, y = a.get(key), b.get(key)
        if x == y:
            continue
        if key == "shards" and isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                return f"number of shards {len(x)} vs {len(y)}"
            for (nx, cx), (ny, cy) in zip(x, y):
                if (nx, cx) != (ny, cy):
                    return f"shard {nx} with {cx} items vs {ny} with {cy} items"
        return f"{key} {x!r} vs {y!r}"
    if a.get("hash") != b.get("hash"):  # same fields, different digest: one was edited or made by other code
        return f"hash {a.get('hash')!r} vs {b.get('hash')!r}"
    return None


def _channel_tensor(value: float | Sequence[float], channels: int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if t.numel() not in (1, channels):
        raise DataError(f"latent scale/shift has {t.numel()} values for {channels} channels")
    return t.expand(channels).reshape(channels, 1, 1).clone()


def latent_scale_shift(manifest: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (C x 1 x 1) float32 scale and shift from a manifest."""
    c = manifest["latent_shape"][0]
    return _channel_tensor(manifest["latent_scale"], c), _channel_tensor(manifest["latent_shift"], c)


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A fresh posterior sample, scaled for training: (mean + std * eps - shift) * scale, in fp32."""
    mean, std = mean.float(), std.float()
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps - shift.to(mean.device)) * scale.to(mean.device)


class LatentDataset(Dataset):
    """Random access into the shards through memory maps; items are (mean, std, label) tensors."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.manifest = read_manifest(data_dir)
        shape = tuple(self.manifest["latent_shape"])
        self.latent_shape = shape
        self.num_classes = self.manifest["num_classes"]
        counts = [s["count"] for s in self.manifest["shards"]]
        self._offsets = np.cumsum([0] + counts)
        if self._offsets[-1] != self.manifest["count"]:
            raise DataError(f"{data_dir}/manifest.json: shard counts add up to {self._offsets[-1]}, "
                            f"not count {self.manifest['count']}: re-run preprocessing")
        self._shards: list[tuple[np.ndarray, ...]] = []
        for shard, n in zip(self.manifest["shards"], counts):  # opening reads headers only
            arrays = []
            for field in FIELDS:
                path = os.path.join(data_dir, shard["name"], f"{field}.npy")
                try:
                    arr = np.load(path, mmap_mode="r")
                except (OSError, ValueError, EOFError) as e:
                    raise DataError(f"corrupt or missing shard file {path} ({e}): re-run preprocessing "
                                    "to rewrite it") from None
                want = (n,) if field == "label" else (n, *shape)
                if arr.shape != want:
                    raise DataError(f"corrupt shard file {path}: shape {arr.shape}, manifest says {want}: "
                                    "re-run preprocessing to rewrite it")
                arrays.append(arr)
            self._shards.append(tuple(arrays))

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        j = index - self._offsets[shard]
        mean, std, label = self._shards[shard]
        return torch.from_numpy(np.array(mean[j])), torch.from_numpy(np.array(std[j])), int(label[j])


class DistributedEpochSampler(Sampler[int]):
    """This rank's indices for one epoch, deterministic in (seed, epoch).

    Epoch e is a permutation drawn from seed + e, cut into global batches of `global_batch`;
    rank r takes the r-th contiguous slice of every global batch. Across ranks each index is
    seen at most once per epoch; the `len % global_batch` leftovers of the permutation are
    dropped (different ones each epoch), so every step has a full global batch. `start_step`
    skips the first global batches of the epoch (exact resume).
    """

    def __init__(self, num_items: int, global_batch: int, world_size: int, rank: int, seed: int):
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        if num_items < global_batch:
            raise DataError(f"dataset has {num_items} items, fewer than the global batch {global_batch}: "
                            "lower --global-batch-size")
        self.num_items, self.global_batch = num_items, global_batch
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = num_items // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def global_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=g)[: self.steps_per_epoch * self.global_batch]

    def __iter__(self) -> Iterator[int]:
        batches = self.global_order(self.epoch).view(self.steps_per_epoch, self.world_size, self.local_batch)
        return iter(batches[self.start_step:, self.rank].reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.local_batch
