"""preprocessing/: center crop, image sources, the encoder CLI (tiny random VAE), resume and 2 ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import DataError, LatentDataset, write_shard
from preprocessing import encode
from preprocessing.images import (DEBIAN_FASHION_MNIST, ImageFolderSource, center_crop_arr, list_image_folder,
                                  read_idx)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "preprocessing", "encode.py")
CLASSES = ("ant", "bee", "cat")
SIZES = ((20, 24), (40, 32), (17, 17), (64, 48))  # (W, H): crops, box-downsamples and upsamples


def subprocess_env() -> dict:
    # One thread everywhere: the 1-rank reference runs with torch.set_num_threads(1) too, so the
    # comparison is bitwise and two ranks do not fight over the two shared cores.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def one_thread_main(argv: list[str]) -> int:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return encode.main(argv)
    finally:
        torch.set_num_threads(old)


def read_all(data_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Manifest (minus the command line) and every shard array, concatenated."""
    with open(os.path.join(data_dir, "manifest.json")) as f:
        manifest = json.load(f)
    arrays = {field: np.concatenate([np.load(os.path.join(data_dir, s["name"], f"{field}.npy"))
                                     for s in manifest["shards"]]) for field in ("mean", "std", "label")}
    for key in ("args", "argv"):
        manifest.pop(key)
    return manifest, arrays


def assert_same_dataset(a: str, b: str) -> None:
    ma, xa = read_all(a)
    mb, xb = read_all(b)
    assert ma == mb
    for field in xa:
        assert xa[field].dtype == xb[field].dtype and np.array_equal(xa[field], xb[field]), field


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> str:
    """3 classes x 4 images of mixed sizes and formats, one corrupt JPEG, one stray text file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, cls in enumerate(CLASSES):
        os.makedirs(root / cls)
        for k, (w, h) in enumerate(SIZES):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            arr[..., c] = 255  # class-dependent tint
            Image.fromarray(arr).save(root / cls / f"img{k}.{'png' if k % 2 else 'bmp'}")
    (root / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "cat" / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> str:
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                        norm_num_groups=32)
    path = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(path)
    return path


def vae_args(image_dir: str, vae_dir: str, out: str, *extra: str) -> list[str]:
    return ["--data-path", image_dir, "--vae", vae_dir, "--resolution", "16", "--batch-size", "3",
            "--shard-size", "4", "--workers", "0", "--out", out, *extra]


@pytest.fixture(scope="module")
def reference(image_dir, vae_dir, tmp_path_factory) -> str:
    """An uninterrupted single-rank run (with one DataLoader worker, to cover that path)."""
    out = str(tmp_path_factory.mktemp("ref") / "data")
    argv = vae_args(image_dir, vae_dir, out)
    argv[argv.index("--workers") + 1] = "1"
    assert one_thread_main(argv) == 0
    return out


# ----------------------------------------------------------------------------- center crop

def test_center_crop_known_cases():
    # 64 x 32 (W x H), columns: left quarter red, middle half green, right quarter blue.
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :16, 0] = 255
    arr[:, 16:48, 1] = 255
    arr[:, 48:, 2] = 255
    # short side 32 >= 2 * 16: one box halving to 32 x 16, bicubic at scale 1, crop x in [8, 24).
    out = center_crop_arr(Image.fromarray(arr), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out == np.array([0, 255, 0], np.uint8)).all()
    # A constant image stays constant through halvings, bicubic up/down-sampling and the crop.
    for w, h in ((100, 60), (7, 9), (33, 200)):
        out = center_crop_arr(Image.new("RGB", (w, h), (10, 200, 30)), 16)
        assert out.shape == (16, 16, 3) and (out == (10, 200, 30)).all()
    # Tall image: a horizontal band in the middle third survives, the top/bottom thirds are cropped.
    tall = np.zeros((48, 16), np.uint8)
    tall[16:32] = 200
    out = center_crop_arr(Image.fromarray(tall), 16)
    assert out.shape == (16, 16) and (out == 200).all()
    # Box filter, not bicubic, for the 2x halvings: 2x2 blocks average exactly.
    checker = np.kron(np.indices((8, 8)).sum(0) % 2 * 200, np.ones((2, 2))).astype(np.uint8)
    out = center_crop_arr(Image.fromarray(checker), 4)  # 16 -> 8 (box) -> 4 (box)
    assert (out == 100).all()


# ----------------------------------------------------------------------------- sources and errors

def test_list_image_folder_layout_and_errors(image_dir, tmp_path):
    listing = list_image_folder(image_dir)
    assert listing.class_names == list(CLASSES)
    assert len(listing.items) == 13 and listing.items[0] == ("ant/img0.bmp", 0)
    assert ("bee/broken.jpg", 1) in listing.items and listing.ignored == ["cat/notes.txt"]
    with pytest.raises(DataError, match="does not exist"):
        list_image_folder(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="is empty"):
        list_image_folder(str(tmp_path))
    Image.new("RGB", (8, 8)).save(tmp_path / "flat.png")
    with pytest.raises(DataError, match="directly"):
        list_image_folder(str(tmp_path))
    os.remove(tmp_path / "flat.png")
    os.makedirs(tmp_path / "empty_class")
    with pytest.raises(DataError, match="has no images"):
        list_image_folder(str(tmp_path))


@pytest.mark.parametrize("case", ["empty", "flat", "missing_vae", "unwritable", "no_input", "bad_resolution"])
def test_cli_errors_are_one_line(case, image_dir, vae_dir, tmp_path, capsys):
    data, vae, out, res = image_dir, "none", str(tmp_path / "out"), "16"
    if case == "empty":
        data = str(tmp_path)
    elif case == "flat":
        data = str(tmp_path / "flat")
        os.makedirs(data)
        Image.new("RGB", (8, 8)).save(os.path.join(data, "a.png"))
    elif case == "missing_vae":
        vae = str(tmp_path / "no-such-vae")
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        out = str(tmp_path / "file" / "out")  # a path under a regular file (root ignores chmod)
    elif case == "no_input":
        data = str(tmp_path / "missing")
    elif case == "bad_resolution":
        vae, res = vae_dir, "15"
    rc = encode.main(["--data-path", data, "--vae", vae, "--resolution", res, "--workers", "0", "--out", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and ":" in err[0][7:], err


def test_out_inside_data_path_is_refused_up_front(image_dir, tmp_path, capsys):
    data = tmp_path / "images"
    os.makedirs(data / "cls")
    Image.new("RGB", (8, 8)).save(data / "cls" / "a.png")
    os.symlink(data, tmp_path / "link")
    for out in (data / "latents", data, tmp_path / "link" / "latents", data / "cls" / "deep" / "x"):
        rc = encode.main(["--data-path", str(data), "--vae", "none", "--resolution", "8", "--workers", "0",
                          "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "is inside --data-path" in err[0], err
    assert sorted(os.listdir(data)) == ["cls"] and os.listdir(data / "cls") == ["a.png"]  # nothing written
    # Via a symlinked --data-path too, and a sibling whose name merely starts the same is fine.
    rc = encode.main(["--data-path", str(tmp_path / "link"), "--vae", "none", "--resolution", "8", "--workers", "0",
                      "--out", str(data / "latents")])
    assert rc == 2 and "is inside --data-path" in capsys.readouterr().err
    assert encode.main(["--data-path", str(data), "--vae", "none", "--resolution", "8", "--workers", "0",
                        "--out", str(tmp_path / "images-latents")]) == 0


def test_default_precision_is_fp32():
    args = encode.parse_args(["--data-path", "x", "--out", "y"])
    assert args.dtype == "fp32"
    for device in ("cpu", "cuda"):  # on a GPU too: bf16 was the GPU default before
        assert encode.resolve_dtype(args.dtype, torch.device(device)) == torch.float32
    assert encode.resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(SystemExit):
        encode.parse_args(["--data-path", "x", "--out", "y", "--dtype", "auto"])
    # fp32 on a GPU allows TF32 (process-wide, like train.py --tf32); nothing else touches the flags.
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not encode.allow_tf32(torch.device("cpu"), torch.float32)
        assert not encode.allow_tf32(torch.device("cuda"), torch.bfloat16)
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert encode.allow_tf32(torch.device("cuda"), torch.float32)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_fp32_posterior_is_exact_and_bf16_is_not(vae_dir):
    """Why fp32 is the default: the stored std under bf16 autocast is off by about a percent."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    with torch.no_grad():
        post = vae.encode(images.permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist
    errors = {}
    for name in ("fp32", "bf16"):
        mean, std = encode.Encoder(vae, torch.device("cpu"), encode.resolve_dtype(name))(images)
        errors[name] = float(((std - post.std).abs() / post.std).max())
    assert errors["fp32"] < 1e-5 and errors["bf16"] > 1e-3, errors


def test_script_runs_from_any_working_directory(image_dir, tmp_path):
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, SCRIPT, "--data-path", image_dir, "--vae", "none", "--resolution", "8",
                          "--limit", "4", "--workers", "0", "--out", "relative-out"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(LatentDataset(str(tmp_path / "relative-out"))) == 4


# ----------------------------------------------------------------------------- tiny VAE end to end

def test_tiny_vae_dataset_reads_back(reference, image_dir, vae_dir):
    ds = LatentDataset(reference)
    m = ds.manifest
    assert len(ds) == 12 and ds.latent_shape == (4, 8, 8) and ds.num_classes == 3
    assert m["class_names"] == list(CLASSES) and m["latent_scale"] == pytest.approx(0.18215)
    assert m["latent_shift"] == 0.0 and m["resolution"] == 16 and m["flip"] is False
    assert m["vae"] == vae_dir and m["image_count"] == 12 and m["vae_config"]["latent_channels"] == 4
    assert m["encoder_dtype"] == "float32" and m["encoder_tf32"] is False  # the default, recorded
    assert [s["count"] for s in m["shards"]] == [4, 3, 4, 1]  # 13 items / 4; shard 1 lost broken.jpg
    assert m["ignored_files"] == ["cat/notes.txt"] and m["argv"][:2] == ["--data-path", image_dir]
    labels = [ds[i][2] for i in range(len(ds))]
    assert labels == [0] * 4 + [1] * 4 + [2] * 4
    # Stored posterior = the VAE's own posterior for that image (single, unbatched call).
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    src = ImageFolderSource(image_dir, 16)
    for i, j in ((0, 0), (5, 6), (11, 12)):  # dataset index -> item index (broken.jpg is item 4)
        x = torch.from_numpy(src.load(j)).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            post = vae.encode(x).latent_dist
        mean, std, _ = ds[i]
        torch.testing.assert_close(mean.float(), post.mean[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(std.float(), post.std[0], atol=2e-3, rtol=2e-3)
    # Channel statistics of z = (mean + std * eps - shift) * scale, in expectation over eps.
    all_mean = np.stack([ds[i][0].double().numpy() for i in range(len(ds))])
    all_std = np.stack([ds[i][1].double().numpy() for i in range(len(ds))])
    mu = all_mean.mean(axis=(0, 2, 3))
    var = (all_mean ** 2 + all_std ** 2).mean(axis=(0, 2, 3)) - mu ** 2
    np.testing.assert_allclose(m["channel_mean"], mu * 0.18215, rtol=1e-6)
    np.testing.assert_allclose(m["channel_std"], np.sqrt(var) * 0.18215, rtol=1e-6)


def test_corrupt_image_is_skipped_and_reported(reference):
    with open(os.path.join(reference, "manifest.json")) as f:
        m = json.load(f)
    assert m["num_skipped"] == 1 and len(m["skipped"]) == 1
    skip = m["skipped"][0]
    assert skip["path"] == "bee/broken.jpg" and skip["index"] == 4 and skip["error"]


def test_two_ranks_equal_one_rank(reference, image_dir, vae_dir, tmp_path):
    out = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
           *vae_args(image_dir, vae_dir, out)]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_dataset(reference, out)


def test_kill_midway_then_resume_equals_uninterrupted(reference, image_dir, vae_dir, tmp_path, capsys):
    out = str(tmp_path / "resumed")
    assert one_thread_main(vae_args(image_dir, vae_dir, out, "--stop-after-shards", "1")) == encode.STOP_EXIT_CODE
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    first = os.stat(os.path.join(out, "shard-00000", "mean.npy")).st_mtime_ns
    # Debris of a harder crash: a half-written temp shard and a shard renamed without its sidecar.
    os.makedirs(os.path.join(out, ".shard-00001.tmp-999999"))
    write_shard(out, 2, np.ones((1, 4, 8, 8)), None, np.zeros(1))
    capsys.readouterr()
    assert one_thread_main(vae_args(image_dir, vae_dir, out)) == 0
    assert "skips 1 completed shards" in capsys.readouterr().out
    assert os.stat(os.path.join(out, "shard-00000", "mean.npy")).st_mtime_ns == first  # not re-encoded
    assert not any(name.startswith(".") for name in os.listdir(out))
    assert_same_dataset(reference, out)
    # Same directory, other settings: refused rather than mixed.
    capsys.readouterr()
    assert one_thread_main(vae_args(image_dir, vae_dir, out, "--flip")) == 2
    assert "different settings (flip" in capsys.readouterr().err


def test_stop_signal_drops_the_shard_in_flight_and_the_rerun_completes_the_same_data(reference, image_dir, vae_dir,
                                                                                    tmp_path, capsys, monkeypatch):
    """SIGUSR1 while the first batch of shard 1 is encoded: shard 0 stays, shard 1 is dropped, no manifest,
    exit status --preempt-exit-code; the same command completes a dataset equal to an uninterrupted one."""
    import signal

    out = str(tmp_path / "stopped")
    calls = []
    real_call = encode.Encoder.__call__

    def signalled_in_shard_1(self, images):
        calls.append(len(images))
        if len(calls) == 3:  # shard 0 is two batches (3 + 1 images)
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_call(self, images)

    monkeypatch.setattr(encode.Encoder, "__call__", signalled_in_shard_1)
    capsys.readouterr()
    assert one_thread_main(vae_args(image_dir, vae_dir, out, "--preempt-exit-code", "4")) == 4
    assert "stopped by SIGUSR1: 1 of 4 shards are complete" in capsys.readouterr().out and len(calls) == 3
    assert sorted(n for n in os.listdir(out) if n.startswith("shard-")) == ["shard-00000"]
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    monkeypatch.setattr(encode.Encoder, "__call__", real_call)
    assert one_thread_main(vae_args(image_dir, vae_dir, out)) == 0
    assert "skips 1 completed shards" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, encode.STOP_FILE))
    assert_same_dataset(reference, out)


# ----------------------------------------------------------------------------- pixel space

def test_vae_none_flip_roundtrips_pixels(image_dir, tmp_path):
    out = str(tmp_path / "pix")
    assert encode.main(["--data-path", image_dir, "--vae", "none", "--resolution", "16", "--flip",
                        "--shard-size", "5", "--workers", "0", "--out", out]) == 0
    ds = LatentDataset(out)
    m = ds.manifest
    assert len(ds) == 24 and m["image_count"] == 12 and m["flip"] is True and m["items_per_image"] == 2
    assert ds.latent_shape == (3, 16, 16) and m["latent_scale"] == 1.0 and m["vae"] == "none"
    src = ImageFolderSource(image_dir, 16)
    valid = [j for j in range(len(src)) if src.describe(j) != "bee/broken.jpg"]
    for k, j in enumerate(valid):
        mean, std, label = ds[2 * k]
        fmean, fstd, flabel = ds[2 * k + 1]
        pixels = ((mean.float() + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(pixels, src.load(j)), src.describe(j)  # exact round trip through fp16
        assert torch.equal(fmean, mean.flip(-1)) and label == flabel == src.label(j)
        assert not std.any() and not fstd.any()


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEBIAN_FASHION_MNIST, "t10k-images-idx3-ubyte.gz")),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_script_pads_to_32(tmp_path):
    out = str(tmp_path / "fm")
    res = subprocess.run([sys.executable, SCRIPT, "--dataset", "fashion-mnist", "--split", "test", "--vae", "none",
                          "--resolution", "32", "--limit", "12", "--workers", "0", "--out", out],
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    ds = LatentDataset(out)
    assert len(ds) == 12 and ds.latent_shape == (1, 32, 32) and ds.num_classes == 10
    raw = read_idx(os.path.join(DEBIAN_FASHION_MNIST, "t10k-images-idx3-ubyte.gz"), 12)
    labels = read_idx(os.path.join(DEBIAN_FASHION_MNIST, "t10k-labels-idx1-ubyte.gz"), 12)
    for i in range(12):
        mean, _, label = ds[i]
        pixels = ((mean[0].float() + 1) * 127.5).round().to(torch.uint8).numpy()
        assert np.array_equal(pixels[2:30, 2:30], raw[i]) and label == labels[i]
        border = np.ones((32, 32), bool)
        border[2:30, 2:30] = False
        assert (pixels[border] == 0).all()  # background-valued padding
