"""Image sources for preprocessing: ADM center crop, ImageFolder listing and Fashion-MNIST.

A source is a fixed, deterministically ordered list of items. `load(i)` returns one image as a
uint8 H x W x C array already at the target resolution, or raises `ImageError` for an unreadable
file (the encoder skips and reports those). Sources never depend on the number of ranks, so
every rank derives the same item list on its own.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from dataset import DataError

# Same extensions torchvision's ImageFolder accepts (compared case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist


class ImageError(Exception):
    """One image could not be decoded; the encoder records it in the manifest and moves on."""


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop: box-filter halvings while the short side is >= 2 * size, then one
    bicubic resize of the short side to `size`, then a central size x size crop.

    The box halvings are a cheap anti-aliased downsample, so the bicubic step never shrinks by
    more than 2x; results match the ADM/DiT/REPA preprocessing that published FIDs assume.
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    factor = size / min(image.size)
    image = image.resize(tuple(round(s * factor) for s in image.size), resample=Image.BICUBIC)
    arr = np.array(image)  # a writable copy (torch.from_numpy warns on read-only arrays)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


@dataclass
class FolderListing:
    items: list[tuple[str, int]]            # (path relative to the root, label), sorted
    class_names: list[str]                  # label -> sorted class folder name
    ignored: list[str] = field(default_factory=list)  # non-image files inside class folders


def list_image_folder(root: str) -> FolderListing:
    """ImageFolder layout: ROOT/<class>/**/<image>; labels follow the sorted class folder names.

    Hidden entries (dot files, e.g. macOS `._x.JPEG`) are not images and are not listed; other
    non-image files are returned in `ignored` so the caller can report them.
    """
    if not os.path.isdir(root):
        raise DataError(f"input folder {root!r} does not exist: pass --data-path pointing at an image folder "
                        "in ImageFolder layout (ROOT/<class>/<image>)")
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot list input folder {root!r} ({e}): check the path and its permissions") from None
    classes = [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]
    loose = [e.name for e in entries if not e.name.startswith(".") and e.is_file() and is_image_file(e.name)]
    if loose:
        # ImageFolder would drop these silently; a flat folder is the commonest layout mistake.
        what = "and no class folders" if not classes else f"next to {len(classes)} class folders"
        raise DataError(f"input folder {root!r} holds {len(loose)} images directly ({loose[0]!r}, ...) {what}: "
                        "ImageFolder layout needs ROOT/<class>/<image>; move the images into class folders "
                        "(one folder is fine for unlabelled data)")
    if not classes:
        raise DataError(f"input folder {root!r} is empty (no class folders): ImageFolder layout needs "
                        "ROOT/<class>/<image>")
    items: list[tuple[str, int]] = []
    ignored: list[str] = []
    for label, cls in enumerate(classes):
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, root)
            for name in filenames:
                if name.startswith("."):
                    continue
                (found if is_image_file(name) else ignored).append(os.path.join(rel, name))
        if not found:
            raise DataError(f"class folder {os.path.join(root, cls)!r} has no images ({', '.join(IMG_EXTENSIONS)}): "
                            "remove it or check that the dataset was extracted completely")
        items.extend((p, label) for p in sorted(found))
    return FolderListing(items, classes, sorted(ignored))


class ImageFolderSource:
    """Images under an ImageFolder root, center-cropped (ADM) to `resolution`, RGB."""

    channels = 3

    def __init__(self, root: str, resolution: int, limit: int | None = None):
        self.root = os.path.abspath(root)
        self.resolution = resolution
        listing = list_image_folder(self.root)
        self.items = listing.items[:limit] if limit else listing.items
        self.class_names = listing.class_names
        self.ignored = listing.ignored
        self.description = f"imagefolder:{self.root}"

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, index: int) -> str:
        return self.items[index][0]

    def label(self, index: int) -> int:
        return self.items[index][1]

    def load(self, index: int) -> np.ndarray:
        path = os.path.join(self.root, self.items[index][0])
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # also forces the full decode, so truncation fails here
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... per format
            raise ImageError(f"{type(e).__name__}: {e}") from None
        return center_crop_arr(img, self.resolution)

    def fingerprint(self) -> str:
        """Hash of the item list: a resumed run must see exactly the same files in the same order."""
        h = hashlib.sha256()
        for path, label in self.items:
            h.update(f"{path}\t{label}\n".encode())
        return h.hexdigest()


def read_idx(path: str, limit: int | None = None) -> np.ndarray:
    """Read a uint8 IDX file (the MNIST format), gzipped or not; only the first `limit` items."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) != 4 or head[:3] != b"\x00\x00\x08":
                raise DataError(f"{path} is not a uint8 IDX file: re-install dataset-fashion-mnist or re-download")
            dims = struct.unpack(f">{head[3]}I", f.read(4 * head[3]))
            n = dims[0] if limit is None else min(limit, dims[0])
            size = n * math.prod(dims[1:])
            data = f.read(size)
    except (OSError, EOFError, struct.error) as e:
        raise DataError(f"cannot read {path} ({e}): re-install dataset-fashion-mnist or re-download") from None
    if len(data) != size:
        raise DataError(f"{path} is truncated: re-install dataset-fashion-mnist or re-download")
    return np.frombuffer(data, dtype=np.uint8).reshape(n, *dims[1:])


def _find_idx(dirs: list[str], stem: str) -> str | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
    return None


def find_fashion_mnist(split: str, data_path: str | None) -> tuple[str, str]:
    """Paths of the (images, labels) IDX files: --data-path (flat or torchvision layout), else the
    Debian package, else torchvision's downloader (needs network)."""
    prefix = FASHION_MNIST_PREFIX[split]
    base = [data_path] if data_path else [DEBIAN_FASHION_MNIST]
    dirs = base + [os.path.join(d, "FashionMNIST", "raw") for d in base]
    images = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
    if images and labels:
        return images, labels
    root = data_path or os.path.join(os.path.expanduser("~"), ".cache", "repulsor-sit", "fashion-mnist")
    try:
        from torchvision.datasets import FashionMNIST
        FashionMNIST(root, train=split == "train", download=True)
    except Exception as e:  # offline, no torchvision, bad mirror: one actionable message
        raise DataError(f"Fashion-MNIST {split} files not found in {', '.join(dirs)} and the download failed "
                        f"({type(e).__name__}: {e}): apt-get install dataset-fashion-mnist, or pass --data-path "
                        "DIR holding the *-ubyte(.gz) files") from None
    raw = [os.path.join(root, "FashionMNIST", "raw")]
    images = _find_idx(raw, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(raw, f"{prefix}-labels-idx1-ubyte")
    if not (images and labels):
        raise DataError(f"torchvision downloaded Fashion-MNIST to {root} but the {split} IDX files are missing: "
                        "pass --data-path DIR holding the *-ubyte(.gz) files")
    return images, labels


def pad_or_crop(arr: np.ndarray, size: int, fill: int = 0) -> np.ndarray:
    """Fit an H x W (x C) image to size x size: pad with `fill` (centered) when it is smaller,
    ADM center crop when it is larger."""
    h, w = arr.shape[:2]
    if h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        pad = [(top, size - h - top), (left, size - w - left)] + [(0, 0)] * (arr.ndim - 2)
        return np.pad(arr, pad, constant_values=fill)
    squeezed = arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
    out = center_crop_arr(Image.fromarray(squeezed), size)
    return out.reshape(size, size, *arr.shape[2:])


class FashionMNISTSource:
    """Fashion-MNIST (28 x 28 grayscale, 1 channel).

    Larger resolutions pad with the background value 0 (black) instead of resizing: padding
    keeps every garment pixel exact and crisp (a 28 -> 32 bicubic resize blurs thin strokes and
    rings at edges), and 32 = 28 + 2 * 2 is the classic LeNet padding. Smaller resolutions use
    the ADM center crop (a real downsample).
    """

    channels = 1

    def __init__(self, split: str, resolution: int, data_path: str | None = None, limit: int | None = None):
        if split not in FASHION_MNIST_PREFIX:
            raise DataError(f"unknown Fashion-MNIST split {split!r}: use --split train or --split test")
        images_path, labels_path = find_fashion_mnist(split, data_path)
        self.images = read_idx(images_path, limit)
        self.labels = read_idx(labels_path, limit).astype(np.int64)
        if self.images.ndim != 3 or len(self.images) != len(self.labels):
            raise DataError(f"{images_path} and {labels_path} do not match ({self.images.shape} images, "
                            f"{self.labels.shape} labels): re-install dataset-fashion-mnist")
        self.resolution = resolution
        self.split = split
        self.class_names = list(FASHION_MNIST_CLASSES)
        self.ignored: list[str] = []
        self.path = os.path.dirname(os.path.abspath(images_path))
        self.description = f"fashion-mnist:{split}"

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        return f"{self.split}[{index}]"

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def load(self, index: int) -> np.ndarray:
        return pad_or_crop(self.images[index][:, :, None], self.resolution, fill=0)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.images.tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()
