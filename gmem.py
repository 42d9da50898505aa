"""GMem's explicit memory: one L2-normalised snippet per training item, stored with the dataset.

Layout, inside a dataset directory (written by preprocessing/memory.py or `write_memory`):

    DATA_DIR/memory-<name>/
      memory.json        written last; its presence marks the bank complete
      snippets.npy       float16, N x D, row i = snippet of dataset item i (flipped copies included:
                         with flip, item 2k+1 is the mirror of item 2k and gets the mirror's snippet)
      run.json, chunks/  only while a (resumable) build is in progress

Rows are read through a numpy memory map opened lazily, so a `SnippetMemory` pickles to a few
hundred bytes (DataLoader workers) and an ImageNet-size bank (2.56M x 768 fp16, about 3.9 GB) is
never loaded whole. The bank's fingerprint (`memory_fingerprint`) hashes the encoder, its settings,
the dimension, the count, the dataset's fingerprint and a cheap content hash (file size plus a
strided subset of rows); checkpoints record it and sampling refuses a bank with another one.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dataset import (DataError, atomic_write_bytes, atomic_write_json, data_fingerprint, fingerprint_mismatch,
                     read_manifest)

MEMORY_VERSION = 1
MEMORY_PREFIX = "memory-"
MEMORY_META = "memory.json"
SNIPPETS = "snippets.npy"
CHUNK_DIR = "chunks"
CONTENT_ROWS = 1024      # rows hashed for the content fingerprint (evenly strided, first and last included)
NORM_TOLERANCE = 1e-2    # fp16 storage keeps unit norms to about 1e-3
_SNIPPET_SALT = 0x6D656D  # "mem": the snippet draw's stream differs from the image's noise stream


class MemoryBankError(DataError):
    """Missing, mismatched or corrupt memory bank: the message names the problem and the fix.
    A DataError (the bank lives in the dataset directory), so every script already reports it
    as a one-line `error: ...` with exit code 2."""


# ----------------------------------------------------------------------------- vector maths

def l2_normalize(x: torch.Tensor | np.ndarray, eps: float = 1e-12) -> torch.Tensor | np.ndarray:
    """Rows scaled to unit L2 norm (computed in fp32 or wider; a zero row stays zero)."""
    if isinstance(x, np.ndarray):
        x64 = x.astype(np.float64 if x.dtype == np.float64 else np.float32)
        return x64 / np.maximum(np.linalg.norm(x64, axis=-1, keepdims=True), eps)
    return F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=-1, eps=eps)


def slerp(a: torch.Tensor, b: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from a (w = 0) to b (w = 1) of the normalised rows, renormalised.

    Nearly parallel rows fall back to a renormalised linear interpolation (same limit, no 0/0).
    Antipodal rows have no unique great circle and are refused.
    """
    a, b = l2_normalize(a), l2_normalize(b)
    w = torch.as_tensor(w, dtype=a.dtype, device=a.device)
    if w.ndim == 1 and a.ndim == 2:
        w = w[:, None]
    dot = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    if bool((dot < -1 + 1e-6).any()):
        raise ValueError("cannot slerp antipodal snippets (the great circle between them is not unique): "
                         "pick another pair")
    omega = torch.acos(dot)
    so = torch.sin(omega)
    near = so < 1e-6
    safe = torch.where(near, torch.ones_like(so), so)
    sph = (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / safe
    lin = (1 - w) * a + w * b
    return l2_normalize(torch.where(near, lin, sph))


# ----------------------------------------------------------------------------- paths and hashes

def memory_dir(data_dir: str, name: str) -> str:
    """DATA_DIR/memory-<name>: where a bank called `name` of that dataset lives."""
    if not name or os.sep in name or name.startswith("."):
        raise MemoryBankError(f"memory name {name!r} must be a plain, non-empty folder name")
    return os.path.join(data_dir, MEMORY_PREFIX + name)


def list_memories(data_dir: str) -> list[str]:
    """Names of the complete banks stored in a dataset directory."""
    return sorted(os.path.basename(p)[len(MEMORY_PREFIX):]
                  for p in glob.glob(os.path.join(data_dir, MEMORY_PREFIX + "*"))
                  if os.path.isfile(os.path.join(p, MEMORY_META)))


def find_memory(data_dir: str, name: str | None = None) -> str:
    """Directory of the bank `name` of a dataset; with name None, the dataset's only bank."""
    if name is not None:
        path = memory_dir(data_dir, name)
        if not os.path.isfile(os.path.join(path, MEMORY_META)):
            raise MemoryBankError(f"dataset {data_dir!r} has no memory bank {name!r} ({path} has no {MEMORY_META}): "
                                  f"build it with preprocessing/memory.py --data-dir {data_dir} --name {name}")
        return path
    names = list_memories(data_dir)
    if len(names) == 1:
        return memory_dir(data_dir, names[0])
    if not names:
        raise MemoryBankError(f"dataset {data_dir!r} has no memory bank: build one with preprocessing/memory.py "
                              f"--data-dir {data_dir} --encoder sit:CKPT (or dinov2)")
    raise MemoryBankError(f"dataset {data_dir!r} has {len(names)} memory banks ({', '.join(names)}): "
                          "name the one to use")


def content_hash(path: str) -> str:
    """Cheap identity of a snippets.npy: its size plus CONTENT_ROWS evenly strided rows (not the
    whole file: an ImageNet bank is gigabytes). Catches replaced, truncated or rewritten banks."""
    arr = np.load(path, mmap_mode="r")
    n = arr.shape[0]
    rows = np.unique(np.linspace(0, max(n - 1, 0), min(CONTENT_ROWS, n)).round().astype(np.int64)) if n else []
    h = hashlib.sha256(f"{os.path.getsize(path)}|{arr.shape}|{arr.dtype}".encode())
    for i in rows:
        h.update(np.ascontiguousarray(arr[i]).tobytes())
    return h.hexdigest()[:16]


# Fields of memory.json that define a bank, hashed in this order into its fingerprint.
FINGERPRINT_FIELDS = ("encoder", "encoder_id", "dim", "count", "settings", "data", "content")


def memory_fingerprint(meta: dict) -> str:
    """16 hex digits over a bank's defining memory.json fields (see FINGERPRINT_FIELDS)."""
    fields = {k: meta.get(k) for k in FINGERPRINT_FIELDS}
    data = fields["data"]
    fields["data"] = data.get("hash") if isinstance(data, dict) else data  # the dataset by its own digest
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- writing

def chunk_path(path: str, index: int) -> str:
    return os.path.join(path, CHUNK_DIR, f"chunk-{index:05d}.npy")


def chunk_complete(path: str, index: int) -> bool:
    return os.path.isfile(chunk_path(path, index))


def write_chunk(path: str, index: int, snippets: np.ndarray | torch.Tensor) -> str:
    """Rows of one chunk, L2-normalised and stored fp16; atomic (a temporary file, then a rename)."""
    if isinstance(snippets, torch.Tensor):
        snippets = snippets.detach().float().cpu().numpy()
    arr = np.asarray(l2_normalize(np.asarray(snippets, dtype=np.float32)), dtype=np.float16)
    if arr.ndim != 2:
        raise MemoryBankError(f"chunk {index}: snippets must be N x D, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise MemoryBankError(f"chunk {index}: the encoder produced NaN/inf snippets: rerun in fp32")
    final = chunk_path(path, index)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    buf = io.BytesIO()  # a chunk is a few MB: serialise, then one atomic write
    np.save(buf, arr)
    atomic_write_bytes(final, buf.getvalue())
    return final


def finalize_memory(path: str, num_chunks: int, *, encoder: str, encoder_id: str, settings: dict,
                    data_manifest: dict, extra: dict | None = None) -> dict:
    """Join the chunks into snippets.npy (streamed through a memmap), then write memory.json last.

    Every chunk must exist; their row total must equal the dataset's item count. The chunks are
    removed once memory.json is in place.
    """
    chunks = []
    for i in range(num_chunks):
        if not chunk_complete(path, i):
            raise MemoryBankError(f"chunk {i} of {path!r} is missing (did a rank fail?): rerun the same command "
                                  "to resume")
        chunks.append(np.load(chunk_path(path, i), mmap_mode="r"))
    dims = {c.shape[1] for c in chunks}
    if len(dims) != 1:
        raise MemoryBankError(f"chunks of {path!r} have different dimensions {sorted(dims)}: delete {path} and rebuild")
    dim, count = dims.pop(), sum(len(c) for c in chunks)
    if count != data_manifest["count"]:
        raise MemoryBankError(f"{path!r}: chunks hold {count} snippets but the dataset has {data_manifest['count']} "
                              f"items: delete {path} and rebuild")
    final = os.path.join(path, SNIPPETS)
    tmp = f"{final}.tmp-{os.getpid()}"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(count, dim))
    start = 0
    for c in chunks:
        out[start:start + len(c)] = c
        start += len(c)
    out.flush()
    del out
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    meta = dict(format_version=MEMORY_VERSION, encoder=encoder, encoder_id=encoder_id, dim=int(dim),
                count=int(count), dtype="float16", normalised=True, settings=settings,
                data=data_fingerprint(data_manifest), content=content_hash(final), **(extra or {}))
    meta["fingerprint"] = memory_fingerprint(meta)
    atomic_write_json(os.path.join(path, MEMORY_META), meta)
    shutil.rmtree(os.path.join(path, CHUNK_DIR), ignore_errors=True)
    return meta


def write_memory(path: str, snippets: np.ndarray | torch.Tensor, data_manifest: dict, *, encoder: str,
                 encoder_id: str = "", settings: dict | None = None, chunk_size: int = 65536) -> dict:
    """Write in-memory snippets (one row per dataset item) as a bank (tests, small datasets)."""
    if isinstance(snippets, torch.Tensor):
        snippets = snippets.detach().float().cpu().numpy()
    n = len(snippets)
    if n != data_manifest["count"]:
        raise MemoryBankError(f"{n} snippets for a dataset of {data_manifest['count']} items: give one per item")
    os.makedirs(path, exist_ok=True)
    starts = range(0, n, chunk_size)
    for i, start in enumerate(starts):
        write_chunk(path, i, snippets[start:start + chunk_size])
    return finalize_memory(path, len(starts), encoder=encoder, encoder_id=encoder_id, settings=settings or {},
                           data_manifest=data_manifest)


# ----------------------------------------------------------------------------- reading

def read_memory_meta(path: str) -> dict:
    """memory.json of a bank directory, with one-line errors for a missing or broken bank."""
    meta_path = os.path.join(path, MEMORY_META)
    if not os.path.isfile(meta_path):
        if os.path.isdir(os.path.join(path, CHUNK_DIR)):
            raise MemoryBankError(f"memory bank {path!r} is incomplete (no {MEMORY_META} yet): rerun "
                                  "preprocessing/memory.py with the same arguments to finish it")
        raise MemoryBankError(f"no memory bank at {path!r} ({MEMORY_META} missing): build it with "
                              "preprocessing/memory.py --data-dir DATA --encoder sit:CKPT (or dinov2), or pass "
                              "the right --memory")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise MemoryBankError(f"{meta_path} is unreadable ({e}): delete {path} and rebuild the bank") from None
    if meta.get("format_version") != MEMORY_VERSION:
        raise MemoryBankError(f"{meta_path} has format_version {meta.get('format_version')!r}, this code reads "
                              f"{MEMORY_VERSION}: rebuild the bank")
    if meta.get("fingerprint") != memory_fingerprint(meta):
        raise MemoryBankError(f"{meta_path} was edited (its fingerprint no longer matches its fields): "
                              "rebuild the bank")
    return meta


class SnippetMemory:
    """Read access to a bank: len, dim, fingerprint, and rows as fp32 tensors.

    The memory map opens on first use, so pickling (DataLoader workers, spawn) copies the path
    and the metadata only.
    """

    def __init__(self, path: str, meta: dict):
        self.path, self.meta = path, meta
        self._rows: np.ndarray | None = None

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = np.load(os.path.join(self.path, SNIPPETS), mmap_mode="r")
        return self._rows

    def __getstate__(self) -> dict:
        return {"path": self.path, "meta": self.meta, "_rows": None}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int | Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Row `index` (D) or rows (B x D), float32."""
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        return torch.from_numpy(np.array(self.rows[index], dtype=np.float32))

    def describe(self) -> dict:
        """What a checkpoint records so sampling can find and verify the bank."""
        return dict(path=os.path.abspath(self.path), fingerprint=self.fingerprint, dim=self.dim, count=self.count,
                    encoder=self.meta["encoder"], encoder_id=self.meta["encoder_id"])


def open_memory(path: str, *, data_manifest: dict | None = None, dim: int | None = None,
                fingerprint: str | None = None, verify_content: bool = True) -> SnippetMemory:
    """Open a bank directory and check it against what the caller expects.

    data_manifest: the dataset the bank must belong to (count and data fingerprint);
    dim: the model's memory_dim; fingerprint: the one a checkpoint recorded.
    verify_content re-hashes the strided rows (about CONTENT_ROWS small reads).
    """
    meta = read_memory_meta(path)
    file = os.path.join(path, SNIPPETS)
    if not os.path.isfile(file):
        raise MemoryBankError(f"memory bank {path!r} has {MEMORY_META} but no {SNIPPETS}: rebuild the bank")
    try:
        arr = np.load(file, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise MemoryBankError(f"corrupt {file} ({e}): delete {path} and rebuild the bank") from None
    if arr.shape != (meta["count"], meta["dim"]) or arr.dtype != np.float16:
        raise MemoryBankError(f"corrupt {file}: {arr.dtype} {arr.shape}, {MEMORY_META} says float16 "
                              f"({meta['count']}, {meta['dim']}): delete {path} and rebuild the bank")
    if verify_content and content_hash(file) != meta["content"]:
        raise MemoryBankError(f"{file} does not match its {MEMORY_META} (content hash differs: replaced or "
                              "rewritten): rebuild the bank")
    if fingerprint is not None and fingerprint != meta["fingerprint"]:
        raise MemoryBankError(f"memory bank {path!r} has fingerprint {meta['fingerprint']}, the checkpoint was "
                              f"trained with {fingerprint}: pass --memory pointing at the bank it was trained with")
    if dim is not None and int(dim) != int(meta["dim"]):
        raise MemoryBankError(f"memory bank {path!r} holds {meta['dim']}-d snippets but the model expects {dim}-d: "
                              "use the bank the model was built for, or set the model's memory_dim to "
                              f"{meta['dim']}")
    if data_manifest is not None:
        check_memory_matches_data(path, meta, data_manifest)
    return SnippetMemory(path, meta)


def check_memory_matches_data(path: str, meta: dict, data_manifest: dict) -> None:
    """One snippet per dataset item, built from this very dataset."""
    if int(meta["count"]) != int(data_manifest["count"]):
        raise MemoryBankError(f"memory bank {path!r} holds {meta['count']} snippets but the dataset has "
                              f"{data_manifest['count']} items: rebuild the bank for this dataset")
    why = fingerprint_mismatch(meta["data"], data_fingerprint(data_manifest))
    if why is not None:
        raise MemoryBankError(f"memory bank {path!r} was built for another dataset ({why}): rebuild the bank "
                              "for this dataset")


def open_dataset_memory(data_dir: str, name: str | None = None, **expect: Any) -> SnippetMemory:
    """The bank `name` (or the only bank) of a dataset, checked against that dataset."""
    return open_memory(find_memory(data_dir, name), data_manifest=read_manifest(data_dir), **expect)


class MemoryDataset(Dataset):
    """A latent dataset whose items carry their own snippet: (mean, std, snippet fp32 D).

    Item i's snippet is row i of the bank, so a flipped copy (its own item) gets the flipped
    image's snippet. Drop-in for LatentDataset in the training loop: the third field becomes the
    model's condition y (B x D after collation) instead of the label.
    """

    def __init__(self, base: Dataset, memory: SnippetMemory):
        manifest = getattr(base, "manifest", None)
        if manifest is not None:
            check_memory_matches_data(memory.path, memory.meta, manifest)
        elif len(base) != len(memory):
            raise MemoryBankError(f"memory bank {memory.path!r} holds {len(memory)} snippets but the dataset has "
                                  f"{len(base)} items: rebuild the bank for this dataset")
        self.base, self.memory = base, memory

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        mean, std, _, *image = self.base[index]  # a base opened with images keeps its image last (REPA)
        return (mean, std, self.memory[int(index)], *image)


# ----------------------------------------------------------------------------- sampling

def snippet_index(seed: int, index: int, count: int) -> int:
    """Bank row drawn for image `index` of a sample set made with `seed`: uniform over the bank,
    a function of (seed, index) only, so the set does not depend on the number of ranks or the
    batch size. Its own stream (salted), so it never correlates with the image's noise."""
    if seed < 0 or index < 0 or count < 1:
        raise ValueError(f"need seed >= 0, index >= 0 and a non-empty bank, got {seed}, {index}, {count}")
    return int(np.random.default_rng(np.random.SeedSequence([seed, index, _SNIPPET_SALT])).integers(count))


def snippet_indices(seed: int, indices: Sequence[int], count: int) -> np.ndarray:
    return np.array([snippet_index(seed, int(i), count) for i in indices], dtype=np.int64)


def interpolated_snippets(memory: SnippetMemory, a: int, b: int, weights: Sequence[float]) -> torch.Tensor:
    """len(weights) x D snippets on the great circle from row a (w = 0) to row b (w = 1)."""
    for i in (a, b):
        if not 0 <= i < len(memory):
            raise ValueError(f"snippet index {i} is outside the bank's 0..{len(memory) - 1}")
    w = torch.as_tensor(list(weights), dtype=torch.float32)
    n = len(w)
    return slerp(memory[a].expand(n, -1), memory[b].expand(n, -1), w)
