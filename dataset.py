"""On-disk latent format, the random-access reader and the deterministic distributed sampler.

Layout of a dataset directory (written by preprocessing/ or `write_dataset`):

    DATA_DIR/
      manifest.json          written last; its presence marks the dataset complete
      shard-00000/           one directory per shard, renamed into place atomically
        mean.npy             float16, n x C x H x W   VAE posterior mean (or pixels in [-1, 1])
        std.npy              float16, n x C x H x W   VAE posterior std  (zeros for pixel data)
        label.npy            int64,   n               class index in [0, num_classes)
        image.npy            uint8,   n x H x W x C   optional (encode.py --store-images): the ADM-cropped
                                                      image the item was encoded from; manifest: images
                                                      true, image_shape. With --flip too: n/2 x H x W x C
                                                      and manifest image_layout "pair": row k is item 2k's
                                                      image, item 2k+1 (its mirror) reads it flipped
                                                      left-right ([:, ::-1]); a manifest without
                                                      image_layout: one image per item (older datasets)
      shard-00001/ ...

Training latent for one step:  z = (mean + std * eps - latent_shift) * latent_scale,
with fresh eps every step (see `sample_latents`). Decoding inverts it: raw = z / scale + shift.
The reader checks every .npy header up front and then reads single items with positioned
reads, so ImageNet-size sets (about 21 GB) are never loaded whole into RAM; each process keeps
every shard file it has read open (each opened once), within its open-file limit (see LatentDataset).
Images are read only by a dataset opened with `with_images=True` (REPA's encoder needs them);
otherwise not a byte of image.npy is read.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import operator
import os
import resource
import shutil
import threading
import warnings
from collections import OrderedDict
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FIELDS = ("mean", "std", "label")
IMAGE_FIELD = "image"  # optional per-item uint8 image (H x W x C), next to the latents
# Manifest `image_layout` of a flipped dataset that stores one image per mirrored pair (item 2k's,
# row k of image.npy; item 2k+1 reads it mirrored). Absent: one image per item (and every dataset
# written before the field existed).
IMAGE_PAIRS = "pair"


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


def write_shard(data_dir: str, index: int, mean: np.ndarray, std: np.ndarray | None, labels: np.ndarray,
                images: np.ndarray | None = None, image_pairs: bool = False) -> str:
    """Write one shard atomically: into a temporary directory, then one rename. `images`
    (uint8 n x H x W x C) adds image.npy, inside the same rename; with `image_pairs` it holds
    n/2 rows, one per mirrored pair (image_layout "pair")."""
    mean = np.asarray(mean, dtype=np.float16)
    std = np.zeros_like(mean) if std is None else np.asarray(std, dtype=np.float16)
    labels = np.asarray(labels, dtype=np.int64)
    if std.shape != mean.shape or labels.shape != (mean.shape[0],) or mean.ndim != 4:
        raise DataError(f"shard {index}: mean {mean.shape}, std {std.shape}, labels {labels.shape} do not "
                        "fit n x C x H x W, n x C x H x W, n")
    arrays = [(name, arr) for name, arr in zip(FIELDS, (mean, std, labels))]
    if images is not None:
        rows = mean.shape[0] // 2 if image_pairs else mean.shape[0]
        odd = image_pairs and mean.shape[0] % 2
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != rows or odd:
            raise DataError(f"shard {index}: images {images.dtype} {images.shape} do not fit uint8 "
                            f"{'n/2' if image_pairs else 'n'} x H x W x C with n = {mean.shape[0]}")
        arrays.append((IMAGE_FIELD, np.ascontiguousarray(images)))
    final = os.path.join(data_dir, shard_name(index))
    tmp = os.path.join(data_dir, f".{shard_name(index)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, arr in arrays:
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


def _check_labels(path: str, labels: np.ndarray, num_classes: int, fix: str) -> None:
    """Every label must index a class row; num_classes itself is the CFG null row, so it is refused too."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        k, v = int(bad[0]), int(labels[bad[0]])
        null = " (the classifier-free-guidance null class)" if v == num_classes else ""
        raise DataError(f"{path} item {k} has label {v}{null}, outside 0..{num_classes - 1} for num_classes "
                        f"{num_classes}: {fix}")


def labels_sha256(labels: np.ndarray) -> str:
    """SHA-256 of a shard's labels as int64 values (so the file's header and dtype do not matter)."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


def write_manifest(data_dir: str, manifest: dict) -> None:
    """Write manifest.json last, after checking that every shard it names is complete and that its
    labels lie in [0, num_classes); records label_min / label_max and, per shard, the labels'
    `label_sha256` in `manifest` (the reader checks the files against them)."""
    lo, hi = None, None
    for i, shard in enumerate(manifest["shards"]):
        if not shard_complete(data_dir, i):
            raise DataError(f"cannot write the manifest: {shard['name']} in {data_dir} is missing or incomplete")
        path = os.path.join(data_dir, shard["name"], "label.npy")
        labels = np.load(path)  # 8 bytes an item: small even for ImageNet
        if labels.shape != (shard["count"],):
            raise DataError(f"cannot write the manifest: {shard['name']} holds {labels.shape[0]} items, "
                            f"expected {shard['count']}")
        _check_labels(path, labels, manifest["num_classes"], "fix the labels or num_classes, then write the "
                      "manifest again")
        if manifest.get("images") and not os.path.isfile(os.path.join(data_dir, shard["name"], f"{IMAGE_FIELD}.npy")):
            raise DataError(f"cannot write the manifest: it says the dataset has images but {shard['name']} in "
                            f"{data_dir} has no {IMAGE_FIELD}.npy")
        if labels.size:
            lo = int(labels.min()) if lo is None else min(lo, int(labels.min()))
            hi = int(labels.max()) if hi is None else max(hi, int(labels.max()))
        shard["label_sha256"] = labels_sha256(labels)
    manifest["label_min"], manifest["label_max"] = lo, hi
    atomic_write_json(os.path.join(data_dir, MANIFEST), manifest)


def write_dataset(
    data_dir: str,
    mean: np.ndarray,
    std: np.ndarray | None,
    labels: np.ndarray,
    *,
    num_classes: int,
    shard_size: int = 65536,
    images: np.ndarray | None = None,
    image_pairs: bool = False,
    **manifest_fields: Any,
) -> dict:
    """Write in-memory arrays in the on-disk format (tests, demos, small datasets); `images`: uint8
    n x H x W x C, item i's image (stored as image.npy, recorded in the manifest). With `image_pairs`
    (a flipped dataset, as encode.py --flip --store-images writes it) `images` holds n/2 rows, row k
    item 2k's image, which item 2k+1 reads mirrored; n and shard_size must be even."""
    os.makedirs(data_dir, exist_ok=True)
    n = len(mean)
    if n == 0:
        raise DataError("cannot write an empty dataset")
    if image_pairs:
        if images is None or n % 2 or shard_size % 2 or not manifest_fields.setdefault("flip", True):
            raise DataError("image_pairs needs images, an even item count and shard size, and flip")
    counts = []
    for i, start in enumerate(range(0, n, shard_size)):
        sl = slice(start, start + shard_size)
        image = None
        if images is not None:
            image = images[start // 2:(start + shard_size) // 2] if image_pairs else images[sl]
        write_shard(data_dir, i, mean[sl], None if std is None else std[sl], labels[sl], image, image_pairs)
        counts.append(len(labels[sl]))
    if images is not None:
        manifest_fields = dict(manifest_fields, **image_manifest_fields(images.shape[1:], image_pairs))
    manifest = make_manifest(count=n, latent_shape=mean.shape[1:], num_classes=num_classes,
                             shard_counts=counts, **manifest_fields)
    write_manifest(data_dir, manifest)
    return manifest


def image_manifest_fields(image_shape: Sequence[int], pairs: bool = False) -> dict:
    """The manifest fields of a dataset that stores images (H x W x C uint8 per item; with `pairs`
    one per mirrored pair of a flipped dataset: image_layout "pair")."""
    fields: dict[str, Any] = dict(images=True, image_shape=[int(s) for s in image_shape])
    if pairs:  # only then: manifests of one image per item stay as they were
        fields["image_layout"] = IMAGE_PAIRS
    return fields


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
# Recorded only when present (the image shape of a dataset with images), so the fingerprints and
# hashes of datasets without images, and of the checkpoints trained on them, stay as they were.
OPTIONAL_FINGERPRINT_FIELDS = ("images",)


def data_fingerprint(manifest: dict) -> dict:
    """A small JSON-able identity of a dataset, for checkpoints to record and compare on resume.

    Fields absent from older manifests (e.g. source_sha256) are None. `hash` is a short digest
    over the other fields, so equal hashes mean equal fingerprints.
    """
    fp: dict[str, Any] = {k: manifest.get(k) for k in FINGERPRINT_FIELDS}
    fp["shards"] = [[s["name"], int(s["count"])] for s in manifest.get("shards", [])]
    if manifest.get("images"):
        fp["images"] = manifest.get("image_shape")
    # Round-trip through JSON so a fingerprint compares equal to its reloaded copy (tuples -> lists).
    fp = json.loads(json.dumps(fp, sort_keys=True))
    fp["hash"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


def fingerprint_mismatch(a: dict, b: dict) -> str | None:
    """A short description of the first field where fingerprints a and b differ ("count 50 vs 60"), or None."""
    for key in FINGERPRINT_FIELDS + OPTIONAL_FINGERPRINT_FIELDS:
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


class _Field(NamedTuple):
    """Where one .npy file of a shard keeps its items: item k is `itemsize` bytes at offset + k * itemsize."""
    path: str
    count: int
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]  # of one item
    itemsize: int


def _open_field(path: str, count: int, want: tuple[int, ...] | None) -> _Field:
    """Read and check one shard file's .npy header (not its data); the file is closed again."""
    fix = "re-run preprocessing to rewrite it"
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset, size = f.tell(), os.fstat(f.fileno()).st_size
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"corrupt or missing shard file {path} ({e}): {fix}") from None
    if shape[:1] != (count,) or (want is not None and shape[1:] != want):
        raise DataError(f"corrupt shard file {path}: shape {shape}, manifest says "
                        f"{(count, *want) if want is not None else (count, '...')}: {fix}")
    if fortran or dtype.hasobject:
        raise DataError(f"shard file {path} is not a C-ordered numeric array: {fix}")
    itemsize = dtype.itemsize * math.prod(shape[1:])
    if size < offset + count * itemsize:
        raise DataError(f"corrupt or truncated shard file {path}: {size} bytes, its header needs "
                        f"{offset + count * itemsize}: {fix}")
    return _Field(path, count, offset, dtype, tuple(shape[1:]), itemsize)


def open_shard_budget(num_shards: int, files_per_shard: int) -> tuple[int, str | None]:
    """How many shards' files one process may keep open: all of them when that takes at most half of
    the open-file soft limit (RLIMIT_NOFILE; the other half stays for DataLoader sockets, checkpoint
    files, ...), raising the soft limit towards 2x what they need where the hard limit allows (only
    upward). Otherwise the shards that fit in half the limit, with a message saying so (else None)."""
    need = num_shards * files_per_shard
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if soft != unlimited and need > soft // 2:
        target = 2 * need if hard == unlimited else min(hard, 2 * need)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):  # e.g. above fs.nr_open with an unlimited hard limit
                pass
    if soft == unlimited or need <= soft // 2:
        return max(1, num_shards), None
    shards = max(1, soft // 2 // files_per_shard)
    return shards, (f"{num_shards} shards x {files_per_shard} files need {need} open files, more than half the "
                    f"open-file limit (ulimit -n: {soft}, hard limit {'unlimited' if hard == unlimited else hard}): "
                    f"keeping at most {shards} shards open (least recently used closed first); raise the hard "
                    f"limit to {2 * need} to open each file once")


class LatentDataset(Dataset):
    """Random access into the shards; items are (mean, std, label) tensors, and with
    `with_images=True` (mean, std, label, image), the image a uint8 H x W x C tensor (the stored
    layout, as ADM's sample files; encoders.dinov2_inputs takes it). Without the option no image
    file is opened or read. A dataset with image_layout "pair" stores one image per mirrored pair:
    item 2k+1 gets item 2k's image mirrored, identical to the mirror stored per item before.

    Items are read with os.preadv at offsets taken from the .npy headers, so nothing is loaded
    whole and no memory map exists. Open files are per process, reopened after fork and never
    pickled, so spawn DataLoader workers receive only paths and metadata. They stay open once
    read (one descriptor per field and shard; `file_opens` counts the opens) up to
    `max_open_shards` shards, beyond which the least recently used shard is closed. The default
    None keeps every shard open when that fits in half the process's open-file limit, raising the
    soft limit where the hard limit allows, and otherwise as many as fit (with a warning); each
    process (DataLoader worker) applies it to its own limit. The fields read are the class
    attribute `fields`; a subclass may add a per-item file stored alongside (e.g. "snippet").
    """

    fields: tuple[str, ...] = FIELDS

    def __init__(self, data_dir: str, max_open_shards: int | None = None, with_images: bool = False):
        self.data_dir = data_dir
        self.max_open_shards = None if max_open_shards is None else max(1, int(max_open_shards))
        self.manifest = read_manifest(data_dir)
        self.with_images = bool(with_images)
        self._image_pairs = False
        if self.with_images:
            if not self.manifest.get("images"):
                raise DataError(f"dataset {data_dir!r} has no images: re-run preprocessing/encode.py with "
                                "--store-images (into a fresh --out)")
            layout = self.manifest.get("image_layout")
            if layout not in (None, IMAGE_PAIRS):
                raise DataError(f"{data_dir}/manifest.json has image_layout {layout!r}, this code reads "
                                f"{IMAGE_PAIRS!r} or none (one image per item): re-run preprocessing")
            self._image_pairs = layout == IMAGE_PAIRS
            self.fields = self.fields + (IMAGE_FIELD,)
        shape = tuple(self.manifest["latent_shape"])
        self.latent_shape = shape
        self.num_classes = int(self.manifest["num_classes"])
        counts = [s["count"] for s in self.manifest["shards"]]
        self._starts = [int(s) for s in np.cumsum([0] + counts)]  # a list: bisect is faster than numpy here
        if self._starts[-1] != self.manifest["count"]:
            raise DataError(f"{data_dir}/manifest.json: shard counts add up to {self._starts[-1]}, "
                            f"not count {self.manifest['count']}: re-run preprocessing")
        want = {"mean": shape, "std": shape, "label": ()}
        if self.with_images:
            want[IMAGE_FIELD] = tuple(self.manifest["image_shape"])
        if self._image_pairs:  # items 2k and 2k+1 of a shard are a pair: every shard holds whole pairs
            odd = next((s for s in self.manifest["shards"] if s["count"] % 2), None)
            if odd is not None:
                raise DataError(f"{data_dir}/manifest.json: {odd['name']} holds {odd['count']} items, an odd number, "
                                f"but image_layout {IMAGE_PAIRS!r} stores one image per mirrored pair: re-run "
                                "preprocessing")

        def rows(field: str, n: int) -> int:  # of the field's file for a shard of n items
            return n // 2 if self._image_pairs and field == IMAGE_FIELD else n

        self._shards: list[tuple[_Field, ...]] = [
            tuple(_open_field(os.path.join(data_dir, shard["name"], f"{field}.npy"), rows(field, n), want.get(field))
                  for field in self.fields)
            for shard, n in zip(self.manifest["shards"], counts)]
        self._image = self.fields.index(IMAGE_FIELD) if self.with_images else -1
        self._label = self.fields.index("label")
        for fields in self._shards:
            if fields[self._label].dtype.kind not in "iu":
                raise DataError(f"shard file {fields[self._label].path} holds {fields[self._label].dtype} labels, "
                                "not integers: re-run preprocessing to rewrite it")
            if self.with_images and fields[-1].dtype != np.uint8:
                raise DataError(f"shard file {fields[-1].path} holds {fields[-1].dtype} images, not uint8: "
                                "re-run preprocessing to rewrite it")
        self.label_range = self._check_label_range()
        self._reset_open_files(warn=True)

    def _check_label_range(self) -> tuple[int, int] | None:
        """(min, max) label. Every label file is read (8 bytes an item: 10 MB for ImageNet) and checked
        against [0, num_classes), so a label.npy edited after preprocessing is a one-line error here,
        not an IndexError mid-run or, for label num_classes, silent training as the null class; and
        against the `label_sha256` the manifest records per shard (manifests written before it was
        recorded are checked for the range only)."""
        manifest_path = os.path.join(self.data_dir, MANIFEST)
        fix = f"fix the labels (re-run preprocessing) or num_classes in {manifest_path}"
        ranges, changed = [], None
        for shard, fields in zip(self.manifest["shards"], self._shards):
            path, labels = fields[self._label].path, self._read_all(fields[self._label])
            _check_labels(path, labels, self.num_classes, fix)
            if labels.size:
                ranges.append((int(labels.min()), int(labels.max())))
            recorded = shard.get("label_sha256")
            if changed is None and recorded is not None and labels_sha256(labels) != recorded:
                changed = path
        lo, hi = self.manifest.get("label_min"), self.manifest.get("label_max")
        if lo is not None and hi is not None and not (0 <= lo and hi < self.num_classes):
            raise DataError(f"{manifest_path} records labels {lo}..{hi}, outside 0..{self.num_classes - 1}: {fix}")
        if changed is not None:
            raise DataError(f"{changed} was changed after the dataset was written (its labels no longer match the "
                            f"label_sha256 in {manifest_path}): re-run preprocessing to rewrite the dataset, or "
                            "restore the file")
        return (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None

    @staticmethod
    def _read_all(field: _Field) -> np.ndarray:
        with open(field.path, "rb") as f:
            f.seek(field.offset)
            return np.fromfile(f, dtype=field.dtype, count=field.count * math.prod(field.shape))

    # -- open files: per process, bounded, never pickled

    _PROCESS_STATE = ("_open", "_lock", "_pid", "_max_open", "file_opens")

    def _reset_open_files(self, warn: bool = False) -> None:
        self._open: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.file_opens = 0  # descriptors this process opened for item reads (not the header checks)
        self._max_open = self.max_open_shards
        if self._max_open is None:  # this process's own limit (a DataLoader worker has its own)
            self._max_open, why = open_shard_budget(len(self._shards), len(self.fields))
            if why and warn:
                warnings.warn(f"LatentDataset {self.data_dir!r}: {why}", stacklevel=3)

    def close(self) -> None:
        """Close this process's open shard files (they reopen on the next read)."""
        for fds in getattr(self, "_open", {}).values():
            for fd in fds:
                os.close(fd)
        self._open = OrderedDict()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown; never raise from a finaliser
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in self._PROCESS_STATE:
            state.pop(key)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_open_files()

    def _shard_fds(self, shard: int) -> tuple[int, ...]:
        """Descriptors of one shard's files, least recently used shard closed beyond max_open_shards."""
        fds = self._open.get(shard)
        if fds is not None:
            self._open.move_to_end(shard)
            return fds
        while len(self._open) >= self._max_open:
            for fd in self._open.popitem(last=False)[1]:
                os.close(fd)
        opened: list[int] = []
        try:
            for field in self._shards[shard]:
                opened.append(os.open(field.path, os.O_RDONLY))
        except OSError as e:
            for fd in opened:
                os.close(fd)
            raise DataError(f"cannot open {e.filename} ({e.strerror}): was the dataset moved or deleted?") from None
        self.file_opens += len(opened)
        self._open[shard] = tuple(opened)
        return self._open[shard]

    def read_item(self, index: int) -> dict[str, np.ndarray]:
        """Item `index` of every file in `fields`, as fresh writable arrays."""
        index = operator.index(index)  # numpy / torch integers too
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        if os.getpid() != self._pid:  # a forked worker: the inherited descriptors are the parent's copies
            self.close()
            self._reset_open_files()
        shard = bisect.bisect_right(self._starts, index) - 1
        j = index - self._starts[shard]
        out = {}
        with self._lock:
            for k, (name, field, fd) in enumerate(zip(self.fields, self._shards[shard], self._shard_fds(shard))):
                row = j // 2 if k == self._image and self._image_pairs else j
                arr = np.empty(field.shape, field.dtype)
                if os.preadv(fd, [arr], field.offset + row * field.itemsize) != field.itemsize:
                    where = f"item {j}" if row == j else f"row {row} (item {j})"
                    raise DataError(f"shard file {field.path} ends before {where}: it was truncated after "
                                    "the dataset was opened; re-run preprocessing")
                out[name] = arr
        if self._image_pairs and j % 2:  # item 2k+1 is item 2k mirrored (H x W x C: flip W)
            out[IMAGE_FIELD] = np.ascontiguousarray(out[IMAGE_FIELD][:, ::-1])
        return out

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> tuple:
        item = self.read_item(index)
        out = torch.from_numpy(item["mean"]), torch.from_numpy(item["std"]), int(item["label"])
        if self.with_images:
            return (*out, torch.from_numpy(item[IMAGE_FIELD]))
        return out


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
