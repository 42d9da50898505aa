import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataset import (DataError, DistributedEpochSampler, LatentDataset, data_fingerprint, fingerprint_mismatch,
                     latent_scale_shift, make_manifest, read_manifest, sample_latents, write_dataset, write_manifest)


def _arrays(n=50, shape=(4, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal((n, *shape)).astype(np.float16)
    std = rng.uniform(0.1, 1, (n, *shape)).astype(np.float16)
    return mean, std, rng.integers(0, 7, n)


def test_write_read_round_trip(tmp_path):
    mean, std, labels = _arrays()
    m = write_dataset(str(tmp_path), mean, std, labels, num_classes=7, shard_size=16, vae="tiny",
                      latent_scale=0.5, latent_shift=[0.1, 0.2, 0.3, 0.4], flip=True, source="unit test")
    assert [s["count"] for s in m["shards"]] == [16, 16, 16, 2]
    ds = LatentDataset(str(tmp_path))
    assert len(ds) == 50 and ds.latent_shape == (4, 8, 8) and ds.num_classes == 7
    for i in [0, 15, 16, 33, 49]:
        mu, sd, y = ds[i]
        assert mu.dtype == torch.float16 and np.array_equal(mu.numpy(), mean[i])
        assert np.array_equal(sd.numpy(), std[i]) and y == labels[i]
    manifest = read_manifest(str(tmp_path))
    for key in ("count", "latent_shape", "dtype", "vae", "latent_scale", "latent_shift", "flip", "source", "num_classes"):
        assert key in manifest
    scale, shift = latent_scale_shift(manifest)
    assert scale.shape == (4, 1, 1) and shift[:, 0, 0].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_posterior_sample_and_scaling():
    mean, std = torch.full((20000, 1, 1, 1), 2.0), torch.full((20000, 1, 1, 1), 0.5)
    z = sample_latents(mean, std, torch.tensor(0.5).view(1, 1, 1), torch.tensor(1.0).view(1, 1, 1),
                       generator=torch.Generator().manual_seed(0))
    assert z.mean().item() == pytest.approx((2 - 1) * 0.5, abs=0.01)
    assert z.std().item() == pytest.approx(0.25, abs=0.01)
    zero = sample_latents(mean, torch.zeros_like(std), torch.ones(1, 1, 1), torch.zeros(1, 1, 1))
    assert torch.equal(zero, mean)  # pixel data: std = 0 is deterministic


def _peak_rss_kib(code: str) -> int:
    out = subprocess.run([sys.executable, "-c", code + "\nimport resource; print(resource.getrusage("
                          "resource.RUSAGE_SELF).ru_maxrss)"], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    return int(out.stdout.split()[-1])


def test_reads_are_memory_mapped(tmp_path):
    """A 2 x 512 MiB dataset (sparse files) is read at random without loading it."""
    n, shape = 16384, (4, 64, 64)
    shard = tmp_path / "shard-00000"
    shard.mkdir()
    for field in ("mean", "std"):
        arr = np.lib.format.open_memmap(shard / f"{field}.npy", mode="w+", dtype=np.float16, shape=(n, *shape))
        arr[::1000] = 1.0
        arr.flush()
        del arr
    np.save(shard / "label.npy", np.zeros(n, np.int64))
    write_manifest(str(tmp_path), make_manifest(count=n, latent_shape=shape, num_classes=1, shard_counts=[n]))
    ds = LatentDataset(str(tmp_path))
    assert isinstance(ds._shards[0][0], np.memmap)
    assert ds[1000][0].float().mean().item() == 1.0
    base = _peak_rss_kib("import dataset")
    read = _peak_rss_kib(f"import dataset\nds = dataset.LatentDataset({str(tmp_path)!r})\n"
                         f"for i in range(0, {n}, 37): ds[i]")
    assert read - base < 64 * 1024, (base, read)  # vs 1 GiB of shards


@pytest.mark.parametrize("n", [64, 70])
def test_two_rank_sampler_covers_every_index_once(n):
    s0, s1 = (DistributedEpochSampler(n, 8, 2, r, seed=3) for r in (0, 1))
    for epoch in (0, 1):
        s0.set_epoch(epoch), s1.set_epoch(epoch)
        a, b = list(s0), list(s1)
        assert len(a) == len(b) == (n // 8) * 4
        assert not set(a) & set(b) and len(set(a) | set(b)) == (n // 8) * 8
        if n % 8 == 0:
            assert sorted(a + b) == list(range(n))
        assert a == list(DistributedEpochSampler(n, 8, 2, 0, seed=3).__iter__()) if epoch == 0 else True
    s0.set_epoch(0), s1.set_epoch(0)
    first = list(s0)
    s0.set_epoch(1)
    assert list(s0) != first  # a fresh permutation each epoch
    s0.set_epoch(0, start_step=3)
    assert list(s0) == first[3 * 4:]  # exact resume skips finished global batches


def test_sampler_errors():
    with pytest.raises(DataError, match="not divisible by the world size 3"):
        DistributedEpochSampler(100, 16, 3, 0, 0)
    with pytest.raises(DataError, match="fewer than the global batch"):
        DistributedEpochSampler(10, 16, 2, 0, 0)


def test_reader_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        LatentDataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        LatentDataset(str(tmp_path / "empty"))
    mean, std, labels = _arrays(20)
    d = str(tmp_path / "d")
    write_dataset(d, mean, std, labels, num_classes=7, shard_size=8)
    with open(os.path.join(d, "shard-00001", "mean.npy"), "r+b") as f:  # truncate a shard
        f.truncate(100)
    with pytest.raises(DataError, match="corrupt or missing shard file .*shard-00001.*mean.npy"):
        LatentDataset(d)
    os.remove(os.path.join(d, "shard-00002", "label.npy"))
    m = read_manifest(d)
    with pytest.raises(DataError, match="shard-00002 .* is missing or incomplete"):
        write_manifest(d, m)


def test_data_fingerprint_identifies_the_dataset(tmp_path):
    mean, std, labels = _arrays()
    m = write_dataset(str(tmp_path / "a"), mean, std, labels, num_classes=7, shard_size=16, vae="tiny",
                      flip=True, source="unit test", latent_scale=0.5)
    fp = data_fingerprint(m)
    assert fp["count"] == 50 and fp["latent_shape"] == [4, 8, 8] and fp["num_classes"] == 7
    assert fp["vae"] == "tiny" and fp["flip"] is True and fp["source"] == "unit test"
    assert fp["shards"] == [["shard-00000", 16], ["shard-00001", 16], ["shard-00002", 16], ["shard-00003", 2]]
    assert len(fp["hash"]) == 16 and len(json.dumps(fp)) < 1000
    # Stable across a JSON round trip (checkpoints store it) and across re-reading the same data.
    assert json.loads(json.dumps(fp)) == fp == data_fingerprint(read_manifest(str(tmp_path / "a")))
    assert fingerprint_mismatch(fp, json.loads(json.dumps(fp))) is None
    # The same items in other shards, other class counts, other settings: each named.
    other = data_fingerprint(write_dataset(str(tmp_path / "b"), mean, std, labels, num_classes=7, shard_size=25,
                                           vae="tiny", flip=True, source="unit test", latent_scale=0.5))
    assert other["hash"] != fp["hash"]
    assert fingerprint_mismatch(fp, other) == "number of shards 4 vs 2"
    assert fingerprint_mismatch(fp, {**fp, "num_classes": 10}) == "num_classes 7 vs 10"
    assert fingerprint_mismatch(fp, {**fp, "count": 49}) == "count 50 vs 49"
    assert fingerprint_mismatch(fp, {**fp, "latent_scale": 0.18215}) == "latent_scale 0.5 vs 0.18215"
    shards = [list(s) for s in fp["shards"]]
    shards[3][1] = 3
    assert fingerprint_mismatch(fp, {**fp, "shards": shards}) == ("shard shard-00003 with 2 items vs "
                                                                  "shard-00003 with 3 items")
    assert fingerprint_mismatch(fp, {**fp, "hash": "0" * 16}) == f"hash {fp['hash']!r} vs '0000000000000000'"
    c = data_fingerprint({**m, "vae": "stabilityai/sd-vae-ft-ema"})
    assert c["hash"] != fp["hash"] and fingerprint_mismatch(fp, c) == "vae 'tiny' vs 'stabilityai/sd-vae-ft-ema'"
