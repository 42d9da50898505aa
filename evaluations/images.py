"""Image sources for evaluation: in-memory arrays, ADM-format .npz files (streamed) and image folders.

ADM format: a .npz whose `arr_0` is a uint8 array N x H x W x 3. A 50k sample set at 256 px is
about 10 GB, so .npz files are read batch by batch straight from the zip member instead of
being loaded whole.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from typing import IO, Iterator

import numpy as np

from evaluations.errors import ImageDataError

NPZ_KEY = "arr_0"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _dtype_hint(dtype: np.dtype, lo: float, hi: float) -> str:
    """Suggest the conversion that most likely turns this array into uint8 in [0, 255]."""
    if np.issubdtype(dtype, np.floating) and lo >= -1.0 and hi <= 1.0:
        if lo < 0:
            return "((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)"
        return "(x * 255).round().clip(0, 255).astype(np.uint8)"
    return "np.clip(x, 0, 255).astype(np.uint8)"


def check_image_shape(shape: tuple[int, ...], name: str) -> None:
    """Raise ImageDataError unless `shape` is N x H x W x 3 with N > 0."""
    if len(shape) == 4 and shape[-1] == 3 and shape[0] > 0 and shape[1] > 0 and shape[2] > 0:
        return
    if len(shape) >= 1 and shape[0] == 0:
        raise ImageDataError(f"{name}: holds no images (shape {tuple(shape)}); write at least one image")
    if len(shape) == 4 and shape[1] == 3:
        fix = "transpose channels last with x.transpose(0, 2, 3, 1)"
    elif len(shape) == 4 and shape[-1] == 1:
        fix = "repeat the grey channel with np.repeat(x, 3, axis=-1)"
    elif len(shape) == 3:
        fix = "add an RGB channel axis with np.repeat(x[..., None], 3, axis=-1)"
    else:
        fix = "store images as an N x H x W x 3 array"
    raise ImageDataError(f"{name}: images have shape {tuple(shape)}, expected N x H x W x 3; {fix}")


def check_image_dtype(dtype: np.dtype, name: str, sample: np.ndarray | None = None) -> None:
    """Raise ImageDataError unless the dtype is an integer type (uint8, or castable after a range check)."""
    if np.issubdtype(dtype, np.integer):
        return
    if sample is not None and sample.size and np.issubdtype(dtype, np.number):
        lo, hi = float(np.min(sample)), float(np.max(sample))
        seen = f" (values in [{lo:.3g}, {hi:.3g}])"
        hint = _dtype_hint(dtype, lo, hi)
    else:
        seen, hint = "", "np.clip(x, 0, 255).astype(np.uint8)"
    raise ImageDataError(f"{name}: images have dtype {dtype}{seen}, expected uint8 in [0, 255]; convert with {hint}")


def to_uint8(batch: np.ndarray, name: str) -> np.ndarray:
    """Return `batch` as uint8; other integer dtypes are accepted when every value is in [0, 255]."""
    if batch.dtype == np.uint8:
        return batch
    check_image_dtype(batch.dtype, name, batch)
    lo, hi = int(batch.min()), int(batch.max())
    if lo < 0 or hi > 255:
        raise ImageDataError(
            f"{name}: pixel values span [{lo}, {hi}], expected [0, 255]; "
            "rescale them, or clip with np.clip(x, 0, 255).astype(np.uint8)"
        )
    return batch.astype(np.uint8)


class ImageSource:
    """N images of one size, read in uint8 N x H x W x 3 batches."""

    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def image_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError


class ArrayImages(ImageSource):
    """An in-memory (or memory-mapped) array; validated on construction."""

    def __init__(self, array: np.ndarray, name: str = "images") -> None:
        if not isinstance(array, np.ndarray):
            raise ImageDataError(f"{name}: expected a numpy array, got {type(array).__name__}; pass np.asarray(images)")
        check_image_shape(array.shape, name)
        # Floats are refused up front; other integer dtypes are range-checked per batch.
        check_image_dtype(array.dtype, name, array[: min(len(array), 64)])
        self.array = array
        self.name = name

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.array.shape[1]), int(self.array.shape[2])

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(self), batch_size):
            yield to_uint8(np.asarray(self.array[i : i + batch_size]), self.name)


class NpzImages(ImageSource):
    """`arr_0` of an .npz, streamed from the zip member so 50k images never sit in memory at once."""

    def __init__(self, path: str, key: str = NPZ_KEY) -> None:
        self.path, self.key, self.name = path, key, os.path.basename(path)
        if not os.path.isfile(path):
            raise ImageDataError(f"{path}: no such file; give the .npz that sample_ddp.py wrote")
        if not zipfile.is_zipfile(path):
            raise ImageDataError(f"{path}: not an .npz archive; save images with np.savez(path, arr_0=images)")
        with zipfile.ZipFile(path) as zf:
            members = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        if key not in members:
            raise ImageDataError(
                f"{path}: no array '{key}' (arrays: {', '.join(members) or 'none'}); "
                f"ADM format stores images under {key}: np.savez(path, {key}=images)"
            )
        with self._open() as (shape, fortran, dtype, _):
            pass  # only the header is needed here
        self.shape, self.fortran, self.dtype = shape, fortran, dtype
        check_image_shape(shape, f"{self.name}:{key}")
        if not np.issubdtype(dtype, np.integer):
            first = next(self.iter_batches(64, check=False))
            check_image_dtype(dtype, f"{self.name}:{key}", first)

    @contextlib.contextmanager
    def _open(self) -> Iterator[tuple[tuple[int, ...], bool, np.dtype, IO[bytes]]]:
        """Yield (shape, fortran_order, dtype, member file positioned at the array data)."""
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
            except ValueError as e:
                raise ImageDataError(
                    f"{self.path}: '{self.key}' is not a readable .npy member ({e}); rewrite it with np.savez"
                ) from e
            yield shape, fortran, dtype, f

    def __len__(self) -> int:
        return int(self.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.shape[1]), int(self.shape[2])

    def iter_batches(self, batch_size: int, check: bool = True) -> Iterator[np.ndarray]:
        if self.fortran or self.dtype.hasobject:
            # Rare layouts: fall back to a full load rather than re-implementing them.
            with np.load(self.path) as data:
                source = ArrayImages(np.ascontiguousarray(data[self.key]), self.name)
            yield from source.iter_batches(batch_size)
            return
        per_image = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with self._open() as (_, _, _, f):
            for i in range(0, len(self), batch_size):
                n = min(batch_size, len(self) - i)
                raw = f.read(n * per_image)
                if len(raw) != n * per_image:
                    raise ImageDataError(f"{self.path}: '{self.key}' is truncated at image {i}; re-write the file")
                batch = np.frombuffer(raw, dtype=self.dtype).reshape((n, *self.shape[1:]))
                yield to_uint8(batch, self.name) if check else batch


class FolderImages(ImageSource):
    """Every image file under a folder (recursively, sorted); all must have the same size."""

    def __init__(self, path: str) -> None:
        self.path, self.name = path, os.path.basename(os.path.normpath(path))
        files = []
        for root, _, names in os.walk(path):
            files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise ImageDataError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}); point --ref at a folder of images")
        self.files = sorted(files)
        self._size = self._load(self.files[0]).shape[:2]

    @staticmethod
    def _load(file: str) -> np.ndarray:
        from PIL import Image

        with Image.open(file) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self._size[0]), int(self._size[1])

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(self), batch_size):
            batch = []
            for file in self.files[i : i + batch_size]:
                im = self._load(file)
                if im.shape[:2] != self._size:
                    raise ImageDataError(
                        f"{file}: size {im.shape[1]}x{im.shape[0]} differs from {self._size[1]}x{self._size[0]}; "
                        "resize or centre-crop the reference images to one size first"
                    )
                batch.append(im)
            yield np.stack(batch)


def open_images(source: str | np.ndarray | ImageSource, name: str | None = None) -> ImageSource:
    """Wrap an array, an .npz/.npy path or an image folder as an ImageSource (validating it)."""
    if isinstance(source, ImageSource):
        return source
    if isinstance(source, np.ndarray):
        return ArrayImages(source, name or "images")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return FolderImages(path)
        if path.endswith(".npy") and os.path.isfile(path):
            return ArrayImages(np.load(path, mmap_mode="r"), os.path.basename(path))
        return NpzImages(path)
    raise ImageDataError(f"unsupported image source {type(source).__name__}; pass a uint8 NHWC array, an .npz path or a folder")
