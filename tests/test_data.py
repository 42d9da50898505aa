import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataset import (DataError, DistributedEpochSampler, LatentDataset, data_fingerprint, fingerprint_mismatch,
                     labels_sha256, latent_scale_shift, make_manifest, read_manifest, sample_latents, write_dataset,
                     write_manifest)


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


def test_reads_do_not_load_the_dataset(tmp_path):
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
    write_dataset(d, mean, std, labels, num_classes=7, shard_size=8)
    with open(os.path.join(d, "shard-00001", "std.npy"), "r+b") as f:  # the header survives, the data does not
        f.truncate(1000)
    with pytest.raises(DataError, match=r"corrupt or truncated shard file \S*shard-00001.std.npy: 1000 bytes, "
                                        r"its header needs 4224: re-run preprocessing"):
        LatentDataset(d)
    write_dataset(d, mean, std, labels, num_classes=7, shard_size=8)
    ds = LatentDataset(d, max_open_shards=1)
    with open(os.path.join(d, "shard-00000", "std.npy"), "r+b") as f:  # changed after opening
        f.truncate(1000)
    with pytest.raises(DataError, match=r"shard-00000.std.npy ends before item 7: it was truncated"):
        ds[7]
    os.remove(os.path.join(d, "shard-00001", "label.npy"))
    ds.close()
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(DataError, match=r"cannot open \S*shard-00001.label.npy \(No such file"):
        ds[8]
    assert len(os.listdir("/proc/self/fd")) == before  # mean.npy and std.npy were closed again
    assert ds[16][2] == labels[16]
    write_dataset(d, mean, std, labels, num_classes=7, shard_size=8)
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


def _n_open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_pickles_paths_only_and_worker_processes_read_the_same_items(tmp_path):
    """Workers get paths and headers, not the shard bytes, and reopen the files themselves."""
    import pickle

    mean, std, labels = _arrays(2000, (4, 16, 16))  # 4 MB of shards
    write_dataset(str(tmp_path), mean, std, labels, num_classes=7, shard_size=300)
    ds = LatentDataset(str(tmp_path))
    direct = [ds[i] for i in range(0, len(ds), 7)]  # the parent now holds open files (fork inherits them)
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000, len(blob)
    copy = pickle.loads(blob)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
               for a, b in zip(direct, (copy[i] for i in range(0, len(ds), 7))))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:400].tolist()
    want = [ds[i] for i in order]
    for context in ("spawn", "fork"):
        loader = torch.utils.data.DataLoader(ds, batch_size=50, sampler=order, num_workers=2,
                                             multiprocessing_context=context)
        got = [item for m, s, y in loader for item in zip(m, s, y.tolist())]
        assert len(got) == len(want), context
        for (m, s, y), (wm, ws, wy) in zip(got, want):
            assert torch.equal(m, wm) and torch.equal(s, ws) and y == wy, context


def _image_shards(tmp_path, shards=20, per_shard=4):
    """`shards` small shards with images (4 files each)."""
    n = shards * per_shard
    mean, std, labels = _arrays(n, (1, 2, 2))
    images = np.random.default_rng(1).integers(0, 256, (n, 3, 3, 3), dtype=np.uint8)
    write_dataset(str(tmp_path), mean, std, labels, num_classes=7, shard_size=per_shard, images=images)
    return mean, std, labels, images


def _read_all_twice(ds, mean, images, seed=0):
    """Every item in random order, twice; checks the values and returns the peak of open descriptors
    and the order."""
    rng = np.random.default_rng(seed)
    peak = _n_open_fds()
    order = rng.permutation(len(ds)).tolist() + rng.permutation(len(ds)).tolist()
    for i in order:
        mu, _, _, image = ds[i]
        assert np.array_equal(mu.numpy(), mean[i]) and np.array_equal(image.numpy(), images[i])
        peak = max(peak, _n_open_fds())
    return peak, order


def _lru_misses(shards, capacity):
    cache, misses = [], 0
    for s in shards:
        if s in cache:
            cache.remove(s)
        else:
            misses += 1
            cache = cache[-(capacity - 1):] if capacity > 1 else []
        cache.append(s)
    return misses


def test_each_shard_file_is_opened_once_under_random_access(tmp_path):
    import pickle

    mean, std, labels, images = _image_shards(tmp_path)  # 20 shards x 4 files
    base = _n_open_fds()
    ds = LatentDataset(str(tmp_path), with_images=True)
    assert _n_open_fds() == base and ds.file_opens == 0  # construction reads headers and closes them again
    peak, _ = _read_all_twice(ds, mean, images)
    assert ds.file_opens == 20 * 4 and peak - base == 20 * 4 == _n_open_fds() - base
    copy = pickle.loads(pickle.dumps(ds))  # no descriptors, no counts travel: a worker opens its own
    assert copy.file_opens == 0 and not copy._open and _n_open_fds() - base == 80
    assert np.array_equal(copy[5][3].numpy(), images[5]) and copy.file_opens == 4
    copy.close()
    ds.close()
    assert _n_open_fds() == base
    ds[0]
    assert ds.file_opens == 84  # closed files reopen on the next read


def test_explicit_max_open_shards_bounds_open_files(tmp_path):
    mean, std, labels, images = _image_shards(tmp_path)
    base = _n_open_fds()
    for bound in (3, 1):
        ds = LatentDataset(str(tmp_path), max_open_shards=bound, with_images=True)
        peak, order = _read_all_twice(ds, mean, images)
        assert peak - base == 4 * bound, (bound, peak - base)  # an LRU of `bound` shards x 4 files
        misses = _lru_misses([i // 4 for i in order], bound)
        assert ds.file_opens == 4 * misses and misses > 100, misses  # random access over 20 shards mostly misses
        del ds
        assert _n_open_fds() == base
    # Without images: 3 files a shard, 40 shards.
    mean, std, labels = _arrays(80, (1, 2, 2))
    write_dataset(str(tmp_path / "plain"), mean, std, labels, num_classes=7, shard_size=2)
    small = LatentDataset(str(tmp_path / "plain"), max_open_shards=2)
    peak = base
    for i in range(len(small)):
        mu, sd, y = small[i]
        assert np.array_equal(mu.numpy(), mean[i]) and y == labels[i]
        peak = max(peak, _n_open_fds())
    assert peak - base == 2 * 3 and small.file_opens == 40 * 3  # in order: each shard once
    small.close()
    assert _n_open_fds() == base


def test_default_raises_a_low_soft_fd_limit(tmp_path):
    import resource

    mean, std, labels, images = _image_shards(tmp_path)  # needs 80 descriptors
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 160:
        pytest.skip(f"hard open-file limit {hard} < 160")
    resource.setrlimit(resource.RLIMIT_NOFILE, (120, hard))  # 80 > 120 / 2: too low for all of them
    try:
        base = _n_open_fds()
        ds = LatentDataset(str(tmp_path), with_images=True)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (160, hard)  # twice the need, up to the hard limit
        peak, _ = _read_all_twice(ds, mean, images)
        assert ds.file_opens == 80 and peak - base == 80
        ds.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_default_keeps_what_fits_under_a_low_hard_fd_limit(tmp_path, monkeypatch):
    import resource

    import dataset

    mean, std, labels, images = _image_shards(tmp_path)
    calls = []
    monkeypatch.setattr(resource, "setrlimit", lambda *a: calls.append(a))
    monkeypatch.setattr(resource, "getrlimit", lambda what: (64, 64))  # soft == hard: nothing to raise
    base = _n_open_fds()
    with pytest.warns(UserWarning, match=r"20 shards x 4 files need 80 open files, more than half the open-file "
                                         r"limit \(ulimit -n: 64, hard limit 64\): keeping at most 8 shards open"):
        ds = LatentDataset(str(tmp_path), with_images=True)
    assert calls == []
    peak, order = _read_all_twice(ds, mean, images)
    assert peak - base == 8 * 4 and ds.file_opens == 4 * _lru_misses([i // 4 for i in order], 8) > 80  # 32 fds
    ds.close()
    # An unlimited hard limit the kernel refuses to reach (fs.nr_open): the same fallback.
    monkeypatch.setattr(resource, "getrlimit", lambda what: (40, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", lambda *a: (calls.append(a), (_ for _ in ()).throw(OSError("EPERM"))))
    assert dataset.open_shard_budget(20, 4)[0] == 5  # 40 / 2 descriptors: 5 shards of 4 files
    assert calls == [(resource.RLIMIT_NOFILE, (160, resource.RLIM_INFINITY))]
    monkeypatch.setattr(resource, "getrlimit", lambda what: (1000, 1000))  # fits in half: all, and no message
    assert dataset.open_shard_budget(20, 4) == (20, None)


def _rewrite_labels(data_dir: str, shard: str, labels) -> None:
    np.save(os.path.join(data_dir, shard, "label.npy"), np.asarray(labels))


def _edit_manifest(data_dir: str, **changes) -> None:
    path = os.path.join(data_dir, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    for key, value in changes.items():
        if value is None:
            m.pop(key, None)
        else:
            m[key] = value
    with open(path, "w") as f:
        json.dump(m, f)


def test_label_range_recorded_and_checked(tmp_path):
    mean, std, labels = _arrays(20)
    labels = np.arange(20) % 5 + 1  # 1..5
    d = str(tmp_path / "d")
    m = write_dataset(d, mean, std, labels, num_classes=7, shard_size=8)
    assert (m["label_min"], m["label_max"]) == (1, 5) == (read_manifest(d)["label_min"], read_manifest(d)["label_max"])
    assert LatentDataset(d).label_range == (1, 5)
    # The writer refuses labels that would index past the class table or hit the CFG null row.
    for bad, what in ((7, r"label 7 \(the classifier-free-guidance null class\), outside 0..6"),
                      (-1, r"label -1, outside 0..6"), (9, r"label 9, outside 0..6")):
        bad_labels = labels.copy()
        bad_labels[13] = bad
        with pytest.raises(DataError, match=r"shard-00001.label\.npy item 5 has " + what + " for num_classes 7: "
                                            "fix the labels or num_classes"):
            write_dataset(str(tmp_path / f"bad{bad}"), mean, std, bad_labels, num_classes=7, shard_size=8)
    # A manifest without the recorded range (older preprocessing): the reader scans the label files.
    _edit_manifest(d, label_min=None, label_max=None)
    assert LatentDataset(d).label_range == (1, 5)
    _rewrite_labels(d, "shard-00002", [0, 1, 7, 2])
    with pytest.raises(DataError, match=r"^\S*shard-00002.label\.npy item 2 has label 7 \(the classifier-free-guidance "
                                        r"null class\), outside 0..6 for num_classes 7: fix the labels \(re-run "
                                        r"preprocessing\) or num_classes in \S*manifest.json$"):
        LatentDataset(d)
    _rewrite_labels(d, "shard-00002", [0, 1, -3, 2])
    with pytest.raises(DataError, match=r"shard-00002.label\.npy item 2 has label -3, outside 0..6"):
        LatentDataset(d)
    # A recorded range that is out of bounds (num_classes edited down): the scan names the shard.
    _rewrite_labels(d, "shard-00002", [0, 1, 4, 2])
    _edit_manifest(d, label_min=0, label_max=5, num_classes=5)
    with pytest.raises(DataError, match=r"shard-00000.label\.npy item 4 has label 5 \(the classifier-free-guidance "
                                        r"null class\), outside 0..4 for num_classes 5"):
        LatentDataset(d)
    _edit_manifest(d, label_min=0, label_max=9, num_classes=7)  # the files are fine, the record is not
    with pytest.raises(DataError, match=r"manifest.json records labels 0..9, outside 0..6"):
        LatentDataset(d)
    np.save(os.path.join(d, "shard-00002", "label.npy"), np.zeros(4, np.float32))
    _edit_manifest(d, label_max=5)
    with pytest.raises(DataError, match=r"shard-00002.label\.npy holds float32 labels, not integers"):
        LatentDataset(d)


def test_labels_edited_after_writing_are_refused_at_open(tmp_path):
    """The manifest records each shard's label_sha256; opening the dataset reads every label file (8 bytes
    an item) and refuses, in one line naming the file and the fix, labels out of range (12, -1, the null
    class 10) or changed in range. A manifest from before the hash (and the range) still opens, range-checked."""
    mean, std, _ = _arrays(20)
    labels = np.arange(20) % 10
    d = str(tmp_path / "d")
    m = write_dataset(d, mean, std, labels, num_classes=10, shard_size=8)
    assert [s["label_sha256"] for s in m["shards"]] == [labels_sha256(labels[i:i + 8]) for i in (0, 8, 16)]
    assert LatentDataset(d).label_range == (0, 9)
    np.save(os.path.join(d, "shard-00001", "label.npy"), labels[8:16].astype(np.int32))  # same values, other dtype
    assert LatentDataset(d).label_range == (0, 9)
    for bad, what in ((12, "label 12, outside 0..9"), (-1, "label -1, outside 0..9"),
                      (10, r"label 10 \(the classifier-free-guidance null class\), outside 0..9")):
        _rewrite_labels(d, "shard-00001", np.r_[labels[8:11], bad, labels[12:16]])
        with pytest.raises(DataError, match=r"^\S*shard-00001.label\.npy item 3 has " + what + r".*re-run preprocessing") as e:
            LatentDataset(d)
        assert "\n" not in str(e.value)
    _rewrite_labels(d, "shard-00001", labels[8:16][::-1])  # every label still valid, but not the written ones
    with pytest.raises(DataError, match=r"^\S*shard-00001.label\.npy was changed after the dataset was written "
                                        r"\(its labels no longer match the label_sha256 in \S*manifest.json\): "
                                        r"re-run preprocessing to rewrite the dataset, or restore the file$"):
        LatentDataset(d)
    import train  # the run stops at open, in one line, before it creates anything

    res = tmp_path / "res"
    with pytest.raises(DataError, match="shard-00001.label.npy was changed after"):
        train.main(train.get_args(["--data-dir", d, "--results-dir", str(res), "--device", "cpu"]))
    assert not res.exists()
    # A manifest written before the hashes (and the recorded range): opens, with the range still checked.
    with open(os.path.join(d, "manifest.json")) as f:
        old = json.load(f)
    for shard in old["shards"]:
        del shard["label_sha256"]
    del old["label_min"], old["label_max"]
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(old, f)
    assert LatentDataset(d).label_range == (0, 9)
    _rewrite_labels(d, "shard-00002", [0, 1, 10, 2])
    with pytest.raises(DataError, match=r"shard-00002.label\.npy item 2 has label 10 \(the classifier-free"):
        LatentDataset(d)


def test_subclass_reads_an_extra_per_item_file(tmp_path):
    """The extension point for per-item side data (e.g. GMem snippets): one more .npy per shard."""
    mean, std, labels = _arrays(20)
    d = str(tmp_path)
    m = write_dataset(d, mean, std, labels, num_classes=7, shard_size=8)
    extra = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    for s, start in zip(m["shards"], range(0, 20, 8)):
        np.save(os.path.join(d, s["name"], "extra.npy"), extra[start:start + s["count"]])

    class WithExtra(LatentDataset):
        fields = ("mean", "std", "label", "extra")

    ds = WithExtra(d)
    for i in (0, 9, 19):
        item = ds.read_item(i)
        assert np.array_equal(item["extra"], extra[i]) and item["label"] == labels[i] and len(ds[i]) == 3
    np.save(os.path.join(d, "shard-00001", "extra.npy"), extra[:7])
    with pytest.raises(DataError, match=r"corrupt shard file \S*shard-00001.extra.npy: shape \(7, 3\), manifest says "
                                        r"\(8, '...'\)"):
        WithExtra(d)
