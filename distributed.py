"""torch.distributed set-up shared by train.py, sample_ddp.py and preprocessing/.

Same code for `python script.py` (no process group), torchrun on CPU (gloo) and torchrun
on GPUs (NCCL): the backend follows the device.
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_min: float = 60.0) -> DistInfo:
    """Init the process group when launched by torchrun; pick cuda:LOCAL_RANK when available.

    timeout_min: how long a collective may wait before the job fails. Explicit, because ranks wait in
    a barrier while rank 0 writes a checkpoint (about 10 GB for SiT-XL/2 with EMA and AdamW moments)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None,
                                timeout=datetime.timedelta(minutes=timeout_min))
    return DistInfo(rank, world, local_rank, dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def host_group(timeout_min: float = 60.0):
    """A gloo process group over every rank for tiny host-side collectives (train.py's per-step stop
    flag): a CPU tensor reduced there never enters a CUDA stream, so it costs no device sync, whatever
    the default backend. None without a process group."""
    if not is_dist():
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_min))


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (one collective, so also a barrier); flag itself alone."""
    if not is_dist():
        return bool(flag)
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))
    return any(flags)


# ----------------------------------------------------------------------------- preemption
# What a scheduler sends some seconds before it kills a job (SLURM: SIGTERM on preemption and at the
# time limit, or the signal of --signal=USR1@120).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A clean stop on a stop signal: finished work is saved and the same command resumes. The message
    (empty on ranks other than 0) says what was kept."""


class StopSignals:
    """Record SIGTERM / SIGUSR1 instead of dying, so a script finishes (or drops) its work in flight and
    exits cleanly at its next safe point.

    A context manager: handlers are installed on entering (from the main thread only; Python runs
    them there between bytecodes, so recording is all they do) and the previous ones are restored on
    leaving. `signum` is the first signal received, 0 for none. `marker`: a file on shared storage
    that the first signalled rank creates and `requested()` looks for, so ranks that work on their
    own without a per-step collective (sample_ddp.py, preprocessing/) stop together even when the
    signal reached only one of them.
    """

    def __init__(self, marker: str | None = None):
        self.marker, self.signum = marker, 0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, signum: int, frame) -> None:
        self.signum = self.signum or signum

    def requested(self) -> bool:
        """True once this process was signalled or, with a marker, once any rank was."""
        if self.signum and self.marker and not os.path.exists(self.marker):
            try:
                open(self.marker, "w").close()
            except OSError:  # the local flag still stops this rank
                pass
        return bool(self.signum) or (self.marker is not None and os.path.exists(self.marker))

    def clear_marker(self) -> None:
        """Remove the marker a stopped run left (rank 0, before any rank starts working)."""
        if self.marker and os.path.exists(self.marker):
            os.remove(self.marker)

    def why(self, signum: int | None = None) -> str:
        """'SIGTERM', or what stopped a rank that was not signalled itself."""
        signum = self.signum if signum is None else signum
        return signal.Signals(signum).name if signum else "a stop signal to another rank"


def run_stoppable(run, args: argparse.Namespace, *run_args) -> int:
    """run(args, *run_args, stop) with the stop signals recorded (StopSignals): 0 once it returns, or
    --preempt-exit-code once it raised Preempted (whose message, if any, is printed)."""
    try:
        with StopSignals() as stop:
            run(args, *run_args, stop)
    except Preempted as e:
        if str(e):
            print(e, flush=True)
        return args.preempt_exit_code
    return 0


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn. A scheduler signals every process of a job, DataLoader workers too:
    a worker killed by SIGTERM would stop its main process with "worker exited unexpectedly" before
    it can save. Workers ignore the stop signals and end with their loader (or their parent)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _exit_code(text: str) -> int:
    if not text.isdigit() or int(text) > 255:
        raise argparse.ArgumentTypeError(f"{text!r} is not an exit status in 0..255")
    return int(text)


def add_preempt_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--preempt-exit-code", type=_exit_code, default=0, metavar="0..255",
                   help="exit status after a clean stop on SIGTERM or SIGUSR1 (work saved, the same command "
                        "resumes): 0, or the code your job script treats as 'requeue me'")


class _AllGatherCat(torch.autograd.Function):
    """all_gather in rank order whose backward hands every rank the gradient of ALL ranks'
    losses with respect to its own rows: all_reduce(sum) of the incoming gradient, then this
    rank's slice. Under DDP (which averages over ranks) this makes a loss over the gathered
    batch train exactly like the same loss on one process holding the whole batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce is in place: own the buffer
        dist.all_reduce(grad)
        return grad[ctx.rows]


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (same shape on every rank) from every rank in rank order; x itself without a
    group. Differentiable: see _AllGatherCat. Every rank must call it (and run its backward)."""
    if not is_dist():
        return x
    return _AllGatherCat.apply(x)


def cleanup() -> None:
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()
