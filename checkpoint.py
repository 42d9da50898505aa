"""Checkpoint files: atomic save, newest-complete lookup, and building a SiT for sampling.

A training checkpoint (RUN/checkpoints/NNNNNNN.pt) is a dict with
    model, ema            SiT state dicts (online and EMA weights), no training-only heads
    regulariser           state dict of the regulariser (e.g. the Repulsor head); {} if none
    reg_extra             its non-parameter state, e.g. {"bank": memory-bank state}; {} if none
    opt, scaler           optimizer and grad-scaler state
    step                  number of optimizer steps done
    rng                   list with every rank's RNG states
    args                  the full training configuration (dict)
    model_config          SiTConfig as a dict
    data                  the data manifest fields sampling needs (vae, latent scale/shift, shape, classes)
so `sample_ddp.py --ckpt PATH` needs no other flag.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import shutil
import socket
import time
from typing import Any

import torch

from models.sit import SiT, SiTConfig, build_sit, load_sit_state_dict, state_dict_has_qk_norm

CKPT_PATTERN = re.compile(r"^(\d{7,})\.pt$")


class CheckpointError(ValueError):
    """Missing, incomplete or incompatible checkpoint; the message says what to do."""


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict/list (about what torch.save writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def write_failed(path: str, tmp: str, e: OSError, needed: int) -> str:
    """Remove the partial file and say, in one line, why the write failed and what to do."""
    try:
        os.remove(tmp)
    except OSError:
        pass
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        except OSError:
            free = 0
        return (f"no space left writing {path} (about {needed / 1e6:.1f} MB needed, {free / 1e6:.1f} MB free): "
                "the partial file was removed and earlier files are intact; free space (or move the run), then rerun")
    return f"cannot write {path} ({e.strerror or e}): the partial file was removed and earlier files are intact"


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash never leaves a partial file, and a
    full disk is one CheckpointError line (the partial file removed, the previous checkpoint intact)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch.save may report a failed write as a RuntimeError
        needed = tensor_bytes(state)
        cause = _os_error_in(e, path, needed)
        if cause is None:
            raise
        raise CheckpointError(write_failed(path, tmp, cause, needed)) from None
    os.replace(tmp, path)


def _os_error_in(e: BaseException | None, path: str, needed: int) -> OSError | None:
    """The OSError behind a failed write (the exception or its chain); a RuntimeError with none in
    its chain (torch's "unexpected pos") counts as a full disk when less than `needed` is free."""
    first = e
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    try:
        full = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < needed
    except OSError:
        full = False
    return OSError(errno.ENOSPC, "No space left on device") if full and first is not None else None


def checkpoints_newest_first(ckpt_dir: str) -> list[str]:
    """Checkpoint files (NNNNNNN.pt) of a directory, highest step first; temporary files are ignored."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(ckpt_dir, "*.pt"))
             if (m := CKPT_PATTERN.match(os.path.basename(p)))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """Newest checkpoint (by step) in a directory, or None."""
    found = checkpoints_newest_first(ckpt_dir)
    return found[0] if found else None


def newest_loadable_checkpoint(ckpt_dir: str, log=print) -> tuple[str | None, dict[str, Any] | None]:
    """The newest checkpoint that loads, as (path, contents); (None, None) if there is none.

    A garbage, truncated or empty newer file (a disk that filled up, a copy that was cut off) is
    reported in one line, naming the checkpoint used instead, and left in place for inspection.
    """
    damaged = []
    for path in checkpoints_newest_first(ckpt_dir):
        try:
            ckpt = load_checkpoint(path, fix=None)
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        for why in damaged:
            log(f"{why}; left in place, resuming from {path} instead (--resume PATH picks another checkpoint)")
        return path, ckpt
    for why in damaged:
        log(f"{why}; left in place, and no older checkpoint loads")
    return None, None


def remove_stale_temp_files(ckpt_dir: str) -> list[str]:
    """Delete the NNNNNNN.pt.tmp-PID files of crashed writes (gigabytes each at SiT-XL size).
    Call only while holding the run lock, so no live writer owns them."""
    stale = glob.glob(os.path.join(ckpt_dir, "*.pt.tmp-*"))
    for path in stale:
        os.remove(path)
    return stale


class RunLock:
    """Exclusive lock on a run directory: one training process group writes to it at a time.

    flock(2) on RUN/lock, taken by rank 0 and held until the process exits. The kernel releases it
    when the holder dies (also on kill -9), so a lock left by a dead process never blocks. On NFS,
    Linux maps flock to a byte-range lock that the server releases when the client's lease ends.
    The file records who holds it, for the error message; it is never deleted (deleting lock files races).
    """

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "lock")
        self.file = None

    def acquire(self) -> None:
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            f.close()
            raise CheckpointError(f"run directory {os.path.dirname(self.path)} is in use by another training run "
                                  f"({holder}): stop that run, wait for it to finish, or pick another --exp-name") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def load_checkpoint(path: str, fix: str | None = "pass the path of a readable checkpoint") -> dict[str, Any]:
    """torch.load onto the CPU, memory-mapped (no full copy per rank). A file torch cannot read is one
    CheckpointError line saying it is damaged, then `fix` (None: the caller adds what to do)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist: pass the path of a .pt file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001
        try:  # mmap needs the zip format; a valid legacy (non-zip) file still loads without it
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 (torch's own message would suggest re-saving with mmap options)
            size = os.path.getsize(path)
            what = "empty" if size == 0 else f"{size} bytes, truncated or not written by torch.save"
            raise CheckpointError(f"checkpoint {path} is damaged ({what}) and cannot be read"
                                  + (f": {fix}" if fix else "")) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(ckpt).__name__}, not a dict of weights")
    return ckpt


def model_from_checkpoint(
    ckpt: dict[str, Any], weights: str = "ema", config_overrides: dict[str, Any] | None = None, log=print
) -> SiT:
    """Build the plain SiT a checkpoint describes and load its `weights` ("ema" or "model").

    Our checkpoints carry their model_config. A foreign (e.g. REPA-released) checkpoint has no
    config: pass config_overrides with at least `model` (a SiT_models name) and num_classes;
    qk-norm is read from its keys. A bare state dict (REPA's released last.pt) is accepted as
    the weights themselves.
    """
    overrides = dict(config_overrides or {})
    if weights in ckpt:
        state = ckpt[weights]
    elif "pos_embed" in ckpt or "x_embedder.proj.weight" in ckpt:
        state = ckpt  # a bare state dict
    else:
        raise CheckpointError(f"checkpoint has no {weights!r} weights (keys: {', '.join(sorted(ckpt)[:8])})")
    if "model_config" in ckpt:
        fields = dict(ckpt["model_config"])
        name = overrides.pop("model", None)
        if name is not None:
            log(f"--model {name} ignored: the checkpoint carries its own model config")
        fields.update({k: v for k, v in overrides.items() if v is not None})
        model = SiT(SiTConfig(**fields))
    else:
        if overrides.get("model") is None:
            raise CheckpointError("checkpoint has no model_config (not written by train.py): pass --model, "
                                  "e.g. --model SiT-XL/2, to say what it holds")
        # No config: the weights say whether attention has qk-norm (an option of REPA's SiT too).
        qk_norm = state_dict_has_qk_norm(state)
        if overrides.get("qk_norm") is not None and bool(overrides["qk_norm"]) != qk_norm:
            raise CheckpointError(f"qk_norm={overrides['qk_norm']} was given but the checkpoint weights "
                                  f"{'have' if qk_norm else 'have no'} q_norm/k_norm: drop the setting, "
                                  "the weights decide")
        overrides["qk_norm"] = qk_norm
        model = build_sit(overrides.pop("model"), **overrides)
    load_sit_state_dict(model, state, log=log)
    return model
