"""train.py under torchrun where rank 1 sees a stale checkpoint listing (tests/test_train_robust.py).

On node-local disks or behind a cached NFS listing, another node may not see the newest
checkpoint yet. Here rank 1's listing hides the newest file; train.py must resume every rank
from the checkpoint rank 0 chose.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import train  # noqa: E402

if int(os.environ.get("RANK", "0")) == 1:
    listing = checkpoint.checkpoints_newest_first
    stale = lambda ckpt_dir: listing(ckpt_dir)[1:]  # noqa: E731
    for module in (checkpoint, train):
        module.checkpoints_newest_first = stale
    checkpoint.latest_checkpoint = lambda ckpt_dir: (stale(ckpt_dir) or [None])[0]

if __name__ == "__main__":
    train.main(train.get_args())
