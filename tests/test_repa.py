"""REPA (--reg repa): the loss, the projector, the frozen encoder (loaded from a local file), the
token rule, images stored by encode.py --store-images and read only on request, one-line errors,
2-rank training on gloo with exact resume, and checkpoints without the encoder."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import encoders
from checkpoint import load_checkpoint, model_from_checkpoint
from conftest import TINY_MODEL, run_train
from dataset import DataError, LatentDataset, data_fingerprint, fingerprint_mismatch, read_manifest, write_dataset
from loss import REPA, Context, build_regulariser, needs_images, repa_image_size, repa_loss
from models.sit import build_sit
from preprocessing import encode
from preprocessing.images import ImageFolderSource
from test_train import _error  # the one-line error check of train.py's own tests
from train import TrainModule, get_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}  # DINOv2's arch (patch 14), tiny
TINY_VIT_JSON = json.dumps(TINY_VIT)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def tiny_vit_file(path: str, seed: int = 0, img_size: int = 56) -> str:
    """A tiny timm DINOv2-architecture ViT saved as a state dict, with its blocks switched on
    (DINOv2's layer scale starts at 1e-5) so the targets depend on the whole network."""
    import timm
    torch.manual_seed(seed)
    model = timm.create_model(encoders.DINOV2_ARCH, pretrained=False, img_size=img_size, num_classes=0, **TINY_VIT)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.data.fill_(1.0)
    torch.save(model.state_dict(), path)
    return path


def image_dataset(path: str, n: int = 32, size: int = 16, shard_size: int = 12, images: bool = True) -> str:
    """Latents: the grey value of each uint8 RGB image (1 x size x size, in [-1, 1]); class = brightest channel."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = pixels.reshape(n, -1, 3).mean(1).argmax(1)
    mean = (pixels.mean(-1, keepdims=True).transpose(0, 3, 1, 2) / 127.5 - 1).astype(np.float16)
    write_dataset(path, mean, None, labels, num_classes=3, shard_size=shard_size,
                  images=pixels if images else None, source="synthetic images")
    return path


@pytest.fixture(scope="module")
def repa_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("repa")
    return dict(data=image_dataset(str(root / "data")), plain=image_dataset(str(root / "plain"), images=False),
                vit=tiny_vit_file(str(root / "vit.pth")), other_vit=tiny_vit_file(str(root / "vit2.pth"), seed=1))


def repa_args(vit: str, *extra: str):
    return get_args(["--data-dir", "unused", "--reg", "repa", "--repa-encoder", vit, "--repa-encoder-config",
                     TINY_VIT_JSON, "--proj-hidden", "24", *extra])


# ----------------------------------------------------------------------------- loss and projector

def test_loss_matches_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    total = 0.0
    for b in range(3):
        for n in range(5):
            u, v = z[b, n].tolist(), y[b, n].tolist()
            dot = sum(a * c for a, c in zip(u, v))
            norm = (sum(a * a for a in u) ** 0.5) * (sum(c * c for c in v) ** 0.5)
            total += -dot / norm
    torch.testing.assert_close(repa_loss(z, y), torch.tensor(total / 15), atol=1e-6, rtol=0)
    # Masked: the mean over the kept samples only.
    kept = [-(torch.nn.functional.cosine_similarity(z[b], y[b], dim=-1)).mean() for b in (0, 2)]
    torch.testing.assert_close(repa_loss(z, y, torch.tensor([1.0, 0.0, 1.0])), torch.stack(kept).mean())
    assert repa_loss(y, y).item() == pytest.approx(-1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 math under autocast
        out = repa_loss(z.bfloat16(), y)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="differ") as e:
        repa_loss(z, y[:, :4])
    one_line(e)


def test_projector_shapes_targets_and_encoder_outside_the_module():
    enc = encoders.load_dinov2("random", 56, TINY_VIT)
    reg = REPA(hidden_size=64, depth=2, encoder=enc, image_size=56, proj_hidden=48)
    assert reg.needs_images and needs_images("repa") and not needs_images("repulsor")
    linears = [m for m in reg.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 48), (48, 48), (48, 32)]
    assert [type(m) for m in reg.projector] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    # The encoder is not a submodule: not in state_dict, parameters, .train() or DDP's view.
    assert all(k.startswith("projector.") for k in reg.state_dict())
    sit = build_sit(None, depth=2, hidden_size=64, num_heads=2, patch_size=4, input_size=16, in_channels=1,
                    num_classes=3)
    module = TrainModule(sit, reg).train()
    n_module = sum(p.numel() for p in module.parameters())
    assert n_module == sum(p.numel() for p in sit.parameters()) + sum(p.numel() for p in reg.projector.parameters())
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())

    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    # Targets: the patch tokens after the final norm, class token dropped, from ImageNet-normalised bicubic input.
    x = images.permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(encoders.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(encoders.IMAGENET_STD).view(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, size=(56, 56), mode="bicubic", align_corners=False)
    with torch.no_grad():
        want = enc.norm(enc.blocks(enc._pos_embed(enc.patch_embed(x))))[:, 1:]
    torch.testing.assert_close(reg.targets(images), want)
    assert want.shape == (4, 16, 32)

    x_t, t, y = torch.randn(4, 1, 16, 16), torch.rand(4), torch.randint(0, 3, (4,))
    out, terms = module(Context(x_t=x_t, t=t, y=y, images=images))
    assert out.shape == x_t.shape and terms["reg"].shape == () and terms["reg"].dtype == torch.float32
    terms["reg"].backward()
    assert all(p.grad is not None for p in reg.projector.parameters())
    assert sit.x_embedder.proj.weight.grad.abs().sum() > 0  # the alignment reaches the SiT below the tap
    assert sit.final_layer.linear.weight.grad is None  # but nothing above it
    assert all(p.grad is None for p in enc.parameters())
    with pytest.raises(ValueError, match="needs each item's image") as e:
        reg(Context(hidden=torch.randn(4, 16, 64), t=t))
    one_line(e)


def test_register_tokens_are_dropped_from_the_targets():
    enc = encoders.load_dinov2("random", 28, dict(TINY_VIT, reg_tokens=4))
    assert enc.num_prefix_tokens == 5
    tokens = encoders.patch_tokens(enc, torch.randn(2, 3, 28, 28))
    assert tokens.shape == (2, 4, 32)


# ----------------------------------------------------------------------------- encoder and token rule

def test_encoder_loaded_from_a_local_file(repa_files):
    args = repa_args(repa_files["vit"])
    reg = build_regulariser(args, None, 64, 6, 8, "cpu", tokens=16, image_shape=(16, 16, 3))  # block 6 // 3
    saved = torch.load(repa_files["vit"])
    own = reg.encoder.state_dict()
    assert set(own) == set(saved) and all(torch.equal(own[k], saved[k]) for k in own)
    with open(repa_files["vit"], "rb") as f:
        assert args.repa_encoder_hash == "sha256:" + hashlib.sha256(f.read()).hexdigest()
    assert args.repa_encoder_id == os.path.abspath(repa_files["vit"])
    assert args.repa_image_size == 56 and reg.image_size == 56 and reg.depth == 2 and args.reg_weight == 0.5
    # Saved at another size: the position embedding is resampled to the encoder's input size.
    other = tiny_vit_file(os.path.join(os.path.dirname(repa_files["vit"]), "vit42.pth"), img_size=42)
    reg = build_regulariser(repa_args(other), None, 64, 2, 8, "cpu", tokens=16, image_shape=(16, 16, 3))
    assert reg.encoder.pos_embed.shape == (1, 1 + 16, 32)


def test_token_rule():
    assert repa_image_size(256, 14, 256) == 224  # REPA: 256 px, SiT-x/2 on 32 x 32 latents
    assert repa_image_size(512, 14, 1024) == 448  # REPA: 512 px, SiT-x/2 on 64 x 64 latents
    assert repa_image_size(16, 14, 16) == 56  # small data: encoder patch x the SiT's grid side
    assert repa_image_size(256, 14, 64, override=112) == 112
    with pytest.raises(ValueError) as e:  # SiT-B/4 at 256 px: 64 tokens, REPA's encoder gives 256
        repa_image_size(256, 14, 64)
    msg = one_line(e)
    assert "256 patch tokens" in msg and "has 64" in msg and "--repa-image-size 112" in msg


def test_encoder_errors_are_one_line(repa_files, monkeypatch):
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach for the network (the env var is read at import,
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the constant at call time)
    build = lambda args: build_regulariser(args, None, 64, 2, 8, "cpu", tokens=16, image_shape=(16, 16, 3))  # noqa: E731
    with pytest.raises(DataError, match="does not exist") as e:
        build(repa_args("/no/such/vit.pth"))
    one_line(e)
    with pytest.raises(DataError, match="cannot load DINOv2 weights 'nobody/no-such-encoder'") as e:
        build(repa_args("nobody/no-such-encoder"))
    one_line(e)
    with pytest.raises(ValueError, match="would see 4 patch tokens") as e:  # 28 px / 14 = 2 x 2 vs the SiT's 16
        build(repa_args(repa_files["vit"], "--repa-image-size", "28"))
    one_line(e)
    with pytest.raises(ValueError, match="not valid JSON") as e:
        build(get_args(["--data-dir", "unused", "--reg", "repa", "--repa-encoder-config", "{depth"]))
    one_line(e)
    # A local file of another size than --repa-encoder-config says: no hub, no network involved.
    with pytest.raises(DataError) as e:
        build(repa_args(repa_files["vit"], "--repa-encoder-config", '{"embed_dim": 48, "depth": 1, "num_heads": 2}'))
    msg = one_line(e)
    assert msg.startswith(f"cannot load DINOv2 weights {repa_files['vit']!r}: the file does not match the configured "
                          'architecture (vit_base_patch14_dinov2 with --repa-encoder-config {"embed_dim": 48')
    assert "size mismatch for cls_token" in msg and msg.endswith("set --repa-encoder-config to the file's architecture "
                                                                 "(embed_dim, depth, num_heads, ...), or pass a file "
                                                                 "of that architecture")
    assert "network" not in msg and "hub" not in msg
    with pytest.raises(DataError, match="^cannot build vit_base_patch14_dinov2 with --repa-encoder-config "
                                        r'\{"embed_dimm": 32\} \(TypeError: .*\): fix --repa-encoder-config$'):
        build(repa_args(repa_files["vit"], "--repa-encoder-config", '{"embed_dimm": 32}'))


# ----------------------------------------------------------------------------- stored images

def test_dataset_images_round_trip_and_are_read_only_on_request(repa_files, monkeypatch):
    data = repa_files["data"]
    ds = LatentDataset(data, with_images=True)
    assert ds.manifest["images"] is True and ds.manifest["image_shape"] == [16, 16, 3]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    for i in (0, 11, 12, 31):  # across shard boundaries
        mean, std, label, image = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (16, 16, 3)
        assert np.array_equal(image.numpy(), pixels[i])
    again = pickle.loads(pickle.dumps(ds))  # what a spawn DataLoader worker receives
    assert torch.equal(again[5][3], ds[5][3])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert len(batch) == 4 and batch[3].shape == (4, 16, 16, 3)

    opened: list[str] = []
    real_open, real_os_open = open, os.open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: (opened.append(str(path)), real_open(path, *a, **k))[1])
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (opened.append(str(path)), real_os_open(path, *a, **k))[1])
    plain = LatentDataset(data)
    assert len(plain[3]) == 3 and len(plain[20]) == 3
    monkeypatch.undo()
    assert opened and not any(p.endswith("image.npy") for p in opened)  # not even a header


def test_no_images_is_a_one_line_error_and_the_fingerprint_knows(repa_files):
    with pytest.raises(DataError, match="has no images: re-run preprocessing/encode.py with --store-images") as e:
        LatentDataset(repa_files["plain"], with_images=True)
    one_line(e)
    with_images = data_fingerprint(LatentDataset(repa_files["data"]).manifest)
    without = data_fingerprint(LatentDataset(repa_files["plain"]).manifest)
    assert with_images["images"] == [16, 16, 3] and "images" not in without  # older fingerprints keep their hash
    assert fingerprint_mismatch(with_images, without).startswith("images")


def test_encode_store_images_flips_and_refuses_to_mix(tmp_path, capsys):
    """--flip --store-images keeps one image per mirrored pair (image_layout "pair"); item 2k+1 reads
    it mirrored, bit for bit what the per-item layout stored. Unreadable images leave a shard short
    (a2, b1) or empty (b1, b2), and the last shard holds one image: every shard still holds pairs."""
    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    sizes = {"a": ((20, 24), (40, 32), None), "b": ((17, 17), None, None, (24, 18))}  # None: unreadable
    for cls, wh in sizes.items():
        os.makedirs(root / cls)
        for k, size in enumerate(wh):
            if size is None:
                (root / cls / f"{k}.png").write_bytes(b"not a png")
            else:
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / cls / f"{k}.png")
    out = str(tmp_path / "enc")
    argv = ["--data-path", str(root), "--vae", "none", "--resolution", "16", "--flip", "--shard-size", "2",
            "--workers", "0", "--out", out]
    assert encode.main(argv + ["--store-images"]) == 0
    ds = LatentDataset(out, with_images=True)
    m = ds.manifest
    assert m["image_layout"] == "pair" and m["image_shape"] == [16, 16, 3] and m["num_skipped"] == 3
    assert [s["count"] for s in m["shards"]] == [4, 2, 0, 2] and len(ds) == 8
    src = ImageFolderSource(str(root), 16)
    good = [0, 1, 3, 6]  # source items that decode: a/0, a/1, b/0, b/3
    for s in m["shards"]:  # half the rows of the per-item layout: one image per pair
        assert np.load(os.path.join(out, s["name"], "image.npy")).shape == (s["count"] // 2, 16, 16, 3)
    assert np.array_equal(np.concatenate([np.load(os.path.join(out, s["name"], "image.npy")) for s in m["shards"]]),
                          np.stack([src.load(j) for j in good]))
    plain = LatentDataset(out)
    for k, j in enumerate(good):
        mean, std, label, image = ds[2 * k]
        fmean, fstd, flabel, fimage = ds[2 * k + 1]
        assert np.array_equal(image.numpy(), src.load(j)) and label == flabel == src.label(j)
        mirror = src.load(j)[:, ::-1]
        assert np.array_equal(fimage.numpy(), mirror) and fimage.is_contiguous()  # what the old layout stored
        assert not np.array_equal(fimage.numpy(), image.numpy())
        # The latents are as before: the pixels of the image and of its mirror, each encoded.
        assert torch.equal(((mean.float() + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0), image)
        assert torch.equal(((fmean.float() + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0), fimage)
        for a, b in ((plain[2 * k], (mean, std, label)), (plain[2 * k + 1], (fmean, fstd, flabel))):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    again = pickle.loads(pickle.dumps(ds))  # what a spawn DataLoader worker receives
    assert torch.equal(again[7][3], ds[7][3])
    assert np.array_equal(again[7][3].numpy(), src.load(6)[:, ::-1])
    capsys.readouterr()
    assert encode.main(argv) == 2  # the same --out without --store-images: refused, not mixed
    assert "different settings (image_layout, store_images" in capsys.readouterr().err


def test_encode_refuses_to_resume_an_old_layout_flip_images_run(tmp_path, capsys):
    """An interrupted --flip --store-images run begun before the pair layout (one image per item) is
    not resumed into mixed shards."""
    root = tmp_path / "images"
    os.makedirs(root / "a")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "a" / "0.png")
    out = str(tmp_path / "enc")
    argv = ["--data-path", str(root), "--vae", "none", "--resolution", "16", "--flip", "--store-images",
            "--workers", "0", "--out", out, "--stop-after-shards", "1"]
    assert encode.main(argv) == encode.STOP_EXIT_CODE
    run_file = os.path.join(out, "run.json")
    run = json.load(open(run_file))
    assert run["config"].pop("image_layout") == "pair"
    json.dump(run, open(run_file, "w"))  # as the older encoder wrote it
    capsys.readouterr()
    assert encode.main(argv[:-2]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds an interrupted --flip --store-images run of an older encoder" in err
    assert err.endswith("pass a fresh --out, or finish that run with the code that started it")


def _flipped_images(n_pairs: int, size: int = 8, seed: int = 0):
    """A flipped dataset in arrays: latents, labels, each pair's image and the per-item images."""
    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, 256, (n_pairs, size, size, 3), dtype=np.uint8)
    per_item = np.stack([pairs, pairs[:, :, ::-1]], 1).reshape(2 * n_pairs, size, size, 3)
    mean = rng.standard_normal((2 * n_pairs, 1, 4, 4)).astype(np.float16)
    labels = np.repeat(rng.integers(0, 3, n_pairs), 2)
    return mean, labels, pairs, per_item


def test_pair_and_item_image_layouts_read_the_same_items(tmp_path):
    """A dataset written before the pair layout (one image per item, no image_layout in its manifest)
    reads exactly as before, and as the same data in the pair layout reads."""
    mean, labels, pairs, per_item = _flipped_images(15)
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    m_old = write_dataset(old, mean, None, labels, num_classes=3, shard_size=8, images=per_item, flip=True)
    m_new = write_dataset(new, mean, None, labels, num_classes=3, shard_size=8, images=pairs, image_pairs=True)
    assert "image_layout" not in m_old and m_new["image_layout"] == "pair" and m_new["flip"] is True
    assert np.load(os.path.join(old, "shard-00003", "image.npy")).shape == (6, 8, 8, 3)
    assert np.load(os.path.join(new, "shard-00003", "image.npy")).shape == (3, 8, 8, 3)
    assert data_fingerprint(m_old) == data_fingerprint(m_new)  # the same items: the same identity
    a, b = LatentDataset(old, with_images=True), LatentDataset(new, with_images=True)
    for i in range(30):
        x, y = a[i], b[i]
        assert np.array_equal(x[3].numpy(), per_item[i]) and np.array_equal(y[3].numpy(), per_item[i]), i
        assert torch.equal(x[0], y[0]) and x[2] == y[2] == labels[i]
    assert not np.array_equal(per_item[1], per_item[0])  # the mirror is a different image
    with pytest.raises(DataError, match="image_pairs needs images, an even item count and shard size"):
        write_dataset(str(tmp_path / "odd"), mean, None, labels, num_classes=3, shard_size=7, images=pairs,
                      image_pairs=True)


def test_truncated_or_mismatched_pair_images_are_one_line_errors(tmp_path):
    mean, labels, pairs, per_item = _flipped_images(10)
    d = str(tmp_path / "d")
    write_dataset(d, mean, None, labels, num_classes=3, shard_size=8, images=pairs, image_pairs=True)
    path = os.path.join(d, "shard-00001", "image.npy")
    size = os.path.getsize(path)  # header + 4 rows of 8 x 8 x 3
    with open(path, "r+b") as f:
        f.truncate(size - 1)
    with pytest.raises(DataError) as e:
        LatentDataset(d, with_images=True)
    assert one_line(e) == (f"corrupt or truncated shard file {path}: {size - 1} bytes, its header needs {size}: "
                           "re-run preprocessing to rewrite it")
    LatentDataset(d)  # without images the file is not even read
    # The per-item layout's file (n rows) under a manifest that says "pair": a shape error, not mirrored garbage.
    np.save(path, per_item[8:16])
    with pytest.raises(DataError, match=r"corrupt shard file \S*shard-00001.image.npy: shape \(8, 8, 8, 3\), "
                                        r"manifest says \(4, 8, 8, 3\)") as e:
        LatentDataset(d, with_images=True)
    one_line(e)
    np.save(path, pairs[4:8])
    ds = LatentDataset(d, with_images=True, max_open_shards=1)
    assert np.array_equal(ds[13][3].numpy(), per_item[13])
    with open(path, "r+b") as f:  # truncated after opening: rows 0..1 survive
        f.truncate(size - 2 * 8 * 8 * 3)
    assert np.array_equal(ds[11][3].numpy(), per_item[11])
    with pytest.raises(DataError, match=r"shard-00001.image.npy ends before row 2 \(item 5\): it was truncated"):
        ds[13]
    np.save(path, pairs[4:8])
    _edit_manifest(d, shards=[{**s, "count": c} for s, c in zip(read_manifest(d)["shards"], (7, 9, 4))])
    with pytest.raises(DataError, match="shard-00000 holds 7 items, an odd number, but image_layout 'pair'") as e:
        LatentDataset(d, with_images=True)
    one_line(e)
    _edit_manifest(d, image_layout="tiles")
    with pytest.raises(DataError, match="has image_layout 'tiles', this code reads 'pair' or none"):
        LatentDataset(d, with_images=True)


def _edit_manifest(data_dir: str, **changes) -> None:
    path = os.path.join(data_dir, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    m.update(changes)
    with open(path, "w") as f:
        json.dump(m, f)


# ----------------------------------------------------------------------------- training

def test_two_ranks_exact_resume_and_checkpoint_without_encoder(repa_files, tmp_path):
    res = str(tmp_path / "res")
    common = ["--data-dir", repa_files["data"], "--results-dir", res, *TINY_MODEL, "--reg", "repa",
              "--repa-encoder", repa_files["vit"], "--repa-encoder-config", TINY_VIT_JSON, "--proj-hidden", "24",
              "--global-batch-size", "8", "--grad-accum-steps", "2", "--lr", "1e-3", "--ckpt-every", "3",
              "--log-every", "3", "--ema-decay", "0.9"]
    # 32 items / batch 8 = 4 steps per epoch: 6 steps cross an epoch boundary; resume mid-epoch at 3.
    run_train(common + ["--exp-name", "straight", "--max-steps", "6"], nproc=2)
    run_train(common + ["--exp-name", "split", "--max-steps", "3"], nproc=2)
    proc = run_train(common + ["--exp-name", "split", "--max-steps", "6"], nproc=2)
    assert "resumed from" in proc.stdout + proc.stderr
    a = load_checkpoint(os.path.join(res, "straight", "checkpoints", "0000006.pt"))
    b = load_checkpoint(os.path.join(res, "split", "checkpoints", "0000006.pt"))
    for key in ("model", "ema", "regulariser"):
        assert set(a[key]) == set(b[key])
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    rows = [json.loads(line) for line in open(os.path.join(res, "straight", "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [3, 6] and all(np.isfinite(r["reg"]) and -1 <= r["reg"] <= 1 for r in rows)

    # The checkpoint holds the projector only; the encoder by id and hash.
    assert a["regulariser"] and all(k.startswith("projector.") for k in a["regulariser"])
    with open(repa_files["vit"], "rb") as f:
        assert a["args"]["repa_encoder_hash"] == "sha256:" + hashlib.sha256(f.read()).hexdigest()
    config = json.load(open(os.path.join(res, "straight", "config.json")))
    assert config["args"]["repa_encoder_hash"] == a["args"]["repa_encoder_hash"]
    assert config["args"]["repa_image_size"] == 56
    # The sampling model is a plain SiT: the parameters of one built without any regulariser.
    model = model_from_checkpoint(a, "ema", log=lambda m: None)
    plain = build_sit(None, depth=2, hidden_size=64, num_heads=2, patch_size=4, input_size=16, in_channels=1,
                      num_classes=3)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    # ... and sample_ddp.py samples the REPA checkpoint like any other (no encoder, no images needed).
    import sample_ddp

    npz = tmp_path / "samples" / "repa.npz"
    assert sample_ddp.main(["--ckpt", os.path.join(res, "straight", "checkpoints", "0000006.pt"), "--num-samples", "3",
                            "--mode", "ode", "--num-steps", "2", "--out", str(npz), "--device", "cpu"]) == 0
    assert np.load(npz)["arr_0"].shape == (3, 16, 16, 3)

    # Resuming with another encoder (other weights, other hash) is refused in one line.
    other = [*common[:common.index("--repa-encoder") + 1], repa_files["other_vit"],
             *common[common.index("--repa-encoder") + 2:]]
    msg = _error(run_train(other + ["--exp-name", "split", "--max-steps", "8"], check=False))
    assert f"was trained with --repa-encoder {repa_files['vit']} (repa_encoder_hash sha256:" in msg
    assert msg.endswith(f"resume with --repa-encoder {repa_files['vit']} (or another copy of the same weights)")


def test_resume_with_other_encoder_weights_names_the_encoder_flag(repa_files, tmp_path):
    """The checkpoint records the encoder by hash (repa_encoder_hash, not a flag): the refusal names
    --repa-encoder and the value to resume with."""
    import train
    from checkpoint import CheckpointError

    common = ["--data-dir", repa_files["data"], "--results-dir", str(tmp_path), "--exp-name", "r", *TINY_MODEL,
              "--reg", "repa", "--repa-encoder-config", TINY_VIT_JSON, "--proj-hidden", "24",
              "--global-batch-size", "8", "--num-workers", "0", "--device", "cpu"]
    vit, other = repa_files["vit"], repa_files["other_vit"]
    train.main(get_args([*common, "--repa-encoder", vit, "--max-steps", "1"]))
    with pytest.raises(CheckpointError) as e:
        train.main(get_args([*common, "--repa-encoder", other, "--max-steps", "2"]))
    msg = one_line(e)
    assert f"was trained with --repa-encoder {vit} (repa_encoder_hash sha256:" in msg
    assert f"now --repa-encoder {other} (sha256:" in msg and "--repa-encoder-hash" not in msg
    assert msg.endswith(f"resume with --repa-encoder {vit} (or another copy of the same weights)")


def test_repa_on_data_without_images_is_a_one_line_error(repa_files, tmp_path):
    msg = _error(run_train(["--data-dir", repa_files["plain"], "--results-dir", str(tmp_path), *TINY_MODEL,
                            "--reg", "repa", "--repa-encoder", repa_files["vit"], "--global-batch-size", "8",
                            "--max-steps", "1"], check=False))
    assert "has no images: re-run preprocessing/encode.py with --store-images" in msg
    assert not os.listdir(tmp_path)  # refused before a run directory exists


# ----------------------------------------------------------------------------- the price of the encoder

def test_overhead_benchmark_counts_and_runs_repa(tmp_path):
    import subprocess
    import sys

    import timm.layers
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import overhead

    # The analytic encoder count equals torch's FLOP counter (timm's unfused attention: plain matmuls).
    fused = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(False)  # read when a block is built: the counter misses CPU SDPA
    try:
        enc = encoders.load_dinov2("random", 56, {"embed_dim": 64, "depth": 2, "num_heads": 2})
    finally:
        timm.layers.set_fused_attn(fused)
    reg = REPA(hidden_size=48, depth=1, encoder=enc, image_size=56, proj_hidden=40)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        reg.targets(torch.zeros(3, 16, 16, 3, dtype=torch.uint8))
    sit_cfg = argparse.Namespace(hidden_size=48, depth=1)
    parts = overhead.approx_gflop(argparse.Namespace(batch_size=3), sit_cfg, reg, 16)
    assert parts["encoder fwd"] * 1e9 == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert parts["projector"] == pytest.approx(3 * 2 * 3 * 16 * (48 * 40 + 40 * 40 + 40 * 64) / 1e9)

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "overhead.py"), "--model", "custom",
                           "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "4",
                           "--input-size", "8", "--batch-size", "4", "--bank-size", "64", "--proj-hidden", "32",
                           "--steps", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path / "overhead")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert {"none", "dispersive", "repa"} <= set(rows) and "encoder fwd" in rows["repa"]
    assert "architecture, 85.5M params" in proc.stdout and "resized to 28 px" in proc.stdout  # ViT-B, 2 x 2 tokens


def test_noise_pairs_encode_each_image_once_and_bf16_runs_keep_bf16_encoder_weights(repa_files):
    """--noise-pairs: the batch is [images, same images]; the encoder sees each image once and the
    targets are repeated (the same loss as encoding both halves). bf16 runs: bf16 encoder weights."""
    enc = encoders.load_dinov2("random", 56, TINY_VIT)
    plain = REPA(hidden_size=64, depth=2, encoder=enc, image_size=56, proj_hidden=48)
    paired = REPA(hidden_size=64, depth=2, encoder=enc, image_size=56, proj_hidden=48, pairs=True)
    paired.projector.load_state_dict(plain.projector.state_dict())
    seen = []
    enc.patch_embed.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8)
    images = torch.cat([images, images])
    hidden, t = torch.randn(6, 16, 64), torch.rand(6)
    want = plain(Context(hidden=hidden, t=t, images=images))["reg"]
    got = paired(Context(hidden=hidden, t=t, images=images))["reg"]
    assert seen == [6, 3]
    torch.testing.assert_close(got, want)

    a = repa_args(repa_files["vit"], "--mixed-precision", "bf16")
    reg = build_regulariser(a, None, 64, 2, 4, "cpu", tokens=16, image_shape=(16, 16, 3))
    assert next(reg.encoder.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in reg.projector.parameters())  # trained weights stay fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(reg(Context(hidden=torch.randn(4, 16, 64), t=torch.rand(4), images=images[:4]))["reg"])
