"""GMem: the snippet bank (gmem.py), memory conditioning in SiT, the snippet builder
(preprocessing/memory.py) and the memorisation check (evaluations/memorisation.py)."""
from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import gmem
from checkpoint import model_from_checkpoint, save_checkpoint
from dataset import DataError, LatentDataset, read_manifest, write_dataset
from evaluations.errors import ImageDataError, MetricInputError
from evaluations.memorisation import (gather_images, memorisation, memorisation_stats, nearest_neighbours,
                                      save_closest_pairs)
from gmem import MemoryBankError
from loss import Repulsor
from models.sit import SiT, SiTConfig, build_sit, load_sit_state_dict
from preprocessing import encode
from preprocessing import memory as memory_script

from conftest import make_easy_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# ----------------------------------------------------------------------------- the bank

@pytest.fixture
def data(tmp_path) -> str:
    return make_easy_dataset(str(tmp_path / "data"), n=10, size=8, shard_size=4)


def random_bank(data_dir: str, dim: int = 6, name: str = "test", seed: int = 0, chunk_size: int = 4):
    manifest = read_manifest(data_dir)
    raw = np.random.default_rng(seed).standard_normal((manifest["count"], dim)) * 3
    meta = gmem.write_memory(gmem.memory_dir(data_dir, name), raw, manifest, encoder="test",
                             settings={"seed": seed}, chunk_size=chunk_size)
    return raw, meta


def test_round_trip_normalised_fp16_rows_in_item_order(data):
    raw, meta = random_bank(data)
    path = gmem.memory_dir(data, "test")
    assert sorted(os.listdir(path)) == ["memory.json", "snippets.npy"]  # chunks removed
    mem = gmem.open_memory(path, data_manifest=read_manifest(data), dim=6)
    assert (len(mem), mem.dim, meta["count"], meta["dim"]) == (10, 6, 10, 6)
    stored = np.load(os.path.join(path, "snippets.npy"))
    assert stored.dtype == np.float16 and stored.shape == (10, 6)
    want = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(mem[np.arange(10)].numpy(), want, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(stored.astype(np.float32), axis=1), 1.0, atol=gmem.NORM_TOLERANCE)
    assert torch.equal(mem[3], torch.from_numpy(stored[3].astype(np.float32)))
    assert meta["fingerprint"] == gmem.memory_fingerprint(meta) == mem.fingerprint
    assert meta["data"]["hash"] == gmem.data_fingerprint(read_manifest(data))["hash"]
    # Same inputs, same fingerprint; other content, another one.
    _, again = random_bank(data, name="again")
    _, other = random_bank(data, name="other", seed=1)
    assert again["fingerprint"] == meta["fingerprint"] and other["fingerprint"] != meta["fingerprint"]


def test_memory_pickles_small_and_reopens_lazily(data):
    random_bank(data)
    mem = gmem.open_dataset_memory(data)
    first = mem[0]
    blob = pickle.dumps(mem)
    assert len(blob) < 4000  # path + metadata, not the rows
    clone = pickle.loads(blob)
    assert clone._rows is None and torch.equal(clone[0], first)


def test_memory_dataset_gives_each_item_its_own_snippet(data):
    random_bank(data)
    base = LatentDataset(data)
    mem = gmem.open_dataset_memory(data, "test")
    ds = gmem.MemoryDataset(base, mem)
    mean, std, snip = ds[7]
    assert torch.equal(mean, base[7][0]) and torch.equal(snip, mem[7])
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=1)))  # pickled into a worker
    assert batch[2].shape == (4, 6) and batch[2].dtype == torch.float32
    assert torch.equal(batch[2], mem[[0, 1, 2, 3]])


def test_bad_banks_get_one_line_errors(data, tmp_path):
    manifest = read_manifest(data)
    path = gmem.memory_dir(data, "test")
    with pytest.raises(MemoryBankError, match="no memory bank at") as e:
        gmem.open_memory(path)
    one_line(e)
    with pytest.raises(MemoryBankError, match="has no memory bank") as e:
        gmem.find_memory(data)
    one_line(e)
    random_bank(data)
    with pytest.raises(MemoryBankError, match="holds 6-d snippets but the model expects 8-d") as e:
        gmem.open_memory(path, dim=8)
    one_line(e)
    with pytest.raises(MemoryBankError, match="the checkpoint was trained with 0123456789abcdef") as e:
        gmem.open_memory(path, fingerprint="0123456789abcdef")
    one_line(e)
    bigger = make_easy_dataset(str(tmp_path / "bigger"), n=12, size=8)
    with pytest.raises(MemoryBankError, match="holds 10 snippets but the dataset has 12 items") as e:
        gmem.open_memory(path, data_manifest=read_manifest(bigger))
    one_line(e)
    other = make_easy_dataset(str(tmp_path / "other"), n=10, size=16)  # same count, other data
    with pytest.raises(MemoryBankError, match="built for another dataset .latent_shape") as e:
        gmem.MemoryDataset(LatentDataset(other), gmem.open_memory(path))
    one_line(e)
    # Rows rewritten behind memory.json's back.
    arr = np.load(os.path.join(path, "snippets.npy"))
    np.save(os.path.join(path, "snippets.npy"), arr[::-1].copy())
    with pytest.raises(MemoryBankError, match="content hash differs") as e:
        gmem.open_memory(path)
    one_line(e)
    np.save(os.path.join(path, "snippets.npy"), arr)
    gmem.open_memory(path)
    meta = json.load(open(os.path.join(path, "memory.json")))
    meta["dim"] = 7
    json.dump(meta, open(os.path.join(path, "memory.json"), "w"))
    with pytest.raises(MemoryBankError, match="was edited") as e:
        gmem.open_memory(path)
    one_line(e)
    with pytest.raises(MemoryBankError, match="20 snippets for a dataset of 10 items"):
        gmem.write_memory(path, np.ones((20, 3)), manifest, encoder="test")
    assert issubclass(MemoryBankError, DataError)  # scripts print it as `error: ...`, exit 2


def test_find_memory_picks_the_only_bank_or_asks(data):
    random_bank(data, name="a")
    assert gmem.find_memory(data) == gmem.memory_dir(data, "a")
    random_bank(data, name="b")
    with pytest.raises(MemoryBankError, match=r"has 2 memory banks \(a, b\)"):
        gmem.find_memory(data)
    assert gmem.find_memory(data, "b") == gmem.memory_dir(data, "b")
    with pytest.raises(MemoryBankError, match="no memory bank 'c'"):
        gmem.find_memory(data, "c")
    os.makedirs(os.path.join(gmem.memory_dir(data, "c"), gmem.CHUNK_DIR))
    with pytest.raises(MemoryBankError, match="is incomplete"):
        gmem.open_memory(gmem.memory_dir(data, "c"))


def test_slerp_follows_the_great_circle():
    a, b = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 5.0, 0.0]])
    for w in (0.0, 1 / 3, 0.5, 1.0):
        out = gmem.slerp(a, b, w)
        angle = w * math.pi / 2
        torch.testing.assert_close(out, torch.tensor([[math.cos(angle), math.sin(angle), 0.0]]))
    ws = torch.tensor([0.0, 0.25, 1.0])
    out = gmem.slerp(a.expand(3, -1), b.expand(3, -1), ws)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(out[1], torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8), 0.0]))
    # Parallel rows: no 0/0, the (normalised) row itself.
    torch.testing.assert_close(gmem.slerp(a, 3 * a, 0.5), torch.tensor([[1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="antipodal"):
        gmem.slerp(a, -a, 0.5)


def test_interpolated_snippets_run_between_two_rows(data):
    random_bank(data)
    mem = gmem.open_dataset_memory(data)
    out = gmem.interpolated_snippets(mem, 2, 5, [0.0, 0.5, 1.0])
    torch.testing.assert_close(out[0], gmem.l2_normalize(mem[2]))
    torch.testing.assert_close(out[2], gmem.l2_normalize(mem[5]))
    torch.testing.assert_close(out[1], gmem.slerp(mem[2:3], mem[5:6], 0.5)[0])
    with pytest.raises(ValueError, match="outside the bank"):
        gmem.interpolated_snippets(mem, 0, 10, [0.5])


def test_snippet_index_depends_on_seed_and_image_only():
    idx = gmem.snippet_indices(0, range(4000), 10)
    assert idx.min() >= 0 and idx.max() < 10
    assert [gmem.snippet_index(0, i, 10) for i in (17, 3, 17)] == [idx[17], idx[3], idx[17]]
    counts = np.bincount(idx, minlength=10)
    chi2 = ((counts - 400) ** 2 / 400).sum()
    assert chi2 < 30, counts  # 9 degrees of freedom: p < 1e-3
    assert not np.array_equal(gmem.snippet_indices(1, range(50), 10), idx[:50])


# ----------------------------------------------------------------------------- SiT with cond="memory"

def tiny_sit(**kw) -> SiT:
    torch.manual_seed(0)
    fields = dict(depth=2, hidden_size=32, num_heads=2, patch_size=4, input_size=8, in_channels=1, num_classes=3)
    fields.update(kw)
    model = build_sit(**fields)
    for p in model.parameters():  # leave adaLN-Zero so the condition reaches the output
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def test_memory_sit_shapes_and_keys():
    model = tiny_sit(cond="memory", memory_dim=6)
    x, t, s = torch.randn(3, 1, 8, 8), torch.rand(3), torch.randn(3, 6)
    out, hidden = model(x, t, s, return_hidden_at=1)
    assert out.shape == x.shape and hidden.shape == (3, 4, 32)
    keys = set(model.state_dict())
    assert {"y_embedder.proj.weight", "y_embedder.proj.bias", "y_embedder.null_embedding"} <= keys
    assert not any("embedding_table" in k for k in keys)
    assert "y_embedder.embedding_table.weight" in build_sit(depth=1, hidden_size=32, num_heads=2, patch_size=4,
                                                            input_size=8, in_channels=1).state_dict()
    # The condition matters, and the config round-trips through a checkpoint.
    assert not torch.allclose(model.eval()(x, t, s), model(x, t, torch.randn(3, 6)))
    ckpt = {"ema": model.state_dict(), "model_config": model.config.to_dict()}
    clone = model_from_checkpoint(ckpt, log=lambda m: None)
    assert clone.config.cond == "memory" and torch.equal(clone.eval()(x, t, s), model(x, t, s))


def test_dropped_samples_get_the_learned_null_vector():
    model = tiny_sit(cond="memory", memory_dim=6).eval()
    emb = model.y_embedder
    s = torch.randn(4, 6)
    drop = torch.tensor([True, False, True, False])
    out = emb(s, False, drop)
    assert torch.equal(out[0], emb.null_embedding) and torch.equal(out[2], emb.null_embedding)
    torch.testing.assert_close(out[[1, 3]], emb.proj(s[[1, 3]]))
    assert emb.null_embedding.requires_grad and emb.null_embedding.abs().sum() > 0  # learned, not zeros
    # Through the whole network: a dropped sample's output ignores its snippet.
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    a, b = model(x, t, s, drop=drop), model(x, t, torch.randn(4, 6), drop=drop)
    assert torch.equal(a[drop], b[drop]) and not torch.allclose(a[~drop], b[~drop])
    # Gradients reach the null vector through dropped samples only.
    model.train()
    model(x, t, s, drop=torch.tensor([False] * 4)).sum().backward()
    assert emb.null_embedding.grad is None or emb.null_embedding.grad.abs().sum() == 0
    model(x, t, s, drop=drop).pow(2).sum().backward()
    assert emb.null_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("p", [0.1, 0.4])
def test_training_dropout_rate_matches_cfg_prob(p):
    model = tiny_sit(cond="memory", memory_dim=6, class_dropout_prob=p).train()
    emb = model.y_embedder
    n = 20000
    torch.manual_seed(1)
    with torch.no_grad():
        out = emb(torch.randn(n, 6), True)
    dropped = (out == emb.null_embedding).all(1).float().mean().item()
    assert abs(dropped - p) < 4 * math.sqrt(p * (1 - p) / n), dropped
    with torch.no_grad():  # eval mode and no mask: never dropped
        assert not (emb(torch.randn(100, 6), False) == emb.null_embedding).all(1).any()


def test_unconditional_branch_at_sampling_equals_the_training_null():
    model = tiny_sit(cond="memory", memory_dim=6, class_dropout_prob=1.0)
    x, t, s = torch.randn(3, 1, 8, 8), torch.rand(3), torch.randn(3, 6)
    with torch.no_grad():
        trained_null = model.train()(x, t, s)  # p = 1: every sample dropped, as training sees it
        sampled_null = model.eval()(x, t, torch.zeros(3, 6), drop=torch.ones(3, dtype=torch.bool))
    assert torch.equal(trained_null, sampled_null)
    # The same drop mask on the class path is the null class.
    cls = tiny_sit().eval()
    y = torch.tensor([0, 1, 2])
    assert torch.equal(cls(x, t, y, drop=torch.ones(3, dtype=torch.bool)), cls(x, t, torch.full_like(y, 3)))
    assert torch.equal(cls(x, t, y, drop=torch.zeros(3, dtype=torch.bool)), cls(x, t, y))


def test_bad_conditions_get_one_line_errors():
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    mem = tiny_sit(cond="memory", memory_dim=6)
    for bad in (torch.tensor([0, 1]), torch.randn(2, 5)):
        with pytest.raises(ValueError, match="takes B x 6 float snippets") as e:
            mem(x, t, bad)
        one_line(e)
    with pytest.raises(ValueError, match="takes integer labels") as e:
        tiny_sit()(x, t, torch.randn(2, 6))
    one_line(e)
    with pytest.raises(ValueError, match="drop mask has shape"):
        mem(x, t, torch.randn(2, 6), drop=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs memory_dim >= 1"):
        SiT(SiTConfig(depth=1, hidden_size=32, num_heads=2, input_size=8, cond="memory"))
    with pytest.raises(ValueError, match="unknown conditioning 'text'"):
        SiT(SiTConfig(depth=1, hidden_size=32, num_heads=2, input_size=8, cond="text"))
    # A class checkpoint does not load into a memory model: the missing key is named.
    with pytest.raises(ValueError, match="y_embedder"):
        load_sit_state_dict(mem, tiny_sit(hidden_size=32).state_dict())


# ----------------------------------------------------------------------------- preprocessing/memory.py

SCRIPT = os.path.join(ROOT, "preprocessing", "memory.py")
TINY_DINO = json.dumps({"embed_dim": 32, "depth": 1, "num_heads": 2})


def one_thread(fn, *args):
    """Bitwise comparisons with 1-thread subprocess ranks need one thread here too."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(old)


def build_memory(argv: list[str]) -> int:
    return one_thread(memory_script.main, argv)


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> str:
    """Pixel dataset (encode.py, --vae none) of 2 classes x 3 images with flips and one unreadable
    file, so item order has both a mirror after every image and a gap."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("ant", "bee")):
        os.makedirs(root / cls)
        for k, (w, h) in enumerate(((20, 24), (40, 32), (17, 17))):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"img{k}.png")
    (root / "ant" / "img1b.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # skipped by encode.py
    out = str(tmp_path_factory.mktemp("pixels") / "data")
    assert encode.main(["--data-path", str(root), "--vae", "none", "--resolution", "16", "--flip",
                        "--shard-size", "3", "--workers", "0", "--out", out]) == 0
    return out


def dino_argv(data_dir: str, *extra: str) -> list[str]:
    return ["--data-dir", data_dir, "--encoder", "dinov2", "--dinov2-weights", "random", "--dinov2-config",
            TINY_DINO, "--image-size", "28", "--batch-size", "3", "--chunk-size", "5", "--workers", "0", *extra]


def position_sensitive_dino(path: str) -> str:
    """Tiny DINOv2 weights whose position embedding dominates, so a mirror changes the class token."""
    import timm
    torch.manual_seed(5)
    model = timm.create_model(memory_script.DINOV2_ARCH, pretrained=False, img_size=28, num_classes=0,
                              **json.loads(TINY_DINO))
    for name, p in model.named_parameters():
        if name.endswith("gamma"):  # DINOv2's layer scale starts at 1e-5: blocks would do nothing
            p.data.fill_(1.0)
    model.pos_embed.data.normal_(0, 1.0)
    model.cls_token.data.normal_(0, 1.0)
    model.blocks[0].attn.qkv.weight.data.mul_(10)  # sharp, position-dependent attention of the class token
    model.blocks[0].attn.proj.weight.data.mul_(10)
    torch.save(model.state_dict(), path)
    return path


def test_dinov2_rows_follow_the_dataset_items_flips_included(image_data, tmp_path):
    manifest = read_manifest(image_data)
    assert manifest["count"] == 12 and manifest["num_skipped"] == 1
    weights = position_sensitive_dino(str(tmp_path / "dino.pth"))
    argv = dino_argv(image_data, "--dinov2-weights", weights, "--name", "dino")
    assert build_memory(argv + ["--workers", "1"]) == 0
    mem = gmem.open_dataset_memory(image_data, "dino")
    assert mem.meta["encoder"] == "dinov2" and mem.meta["settings"]["image_size"] == 28
    assert mem.meta["encoder_id"] == weights and mem.meta["chunk_size"] == 6  # keeps images with their mirrors
    # Reference from the dataset's own pixels (item i, fp16 in [-1, 1] -> exact uint8), not the sources.
    pixels = torch.stack([LatentDataset(image_data)[i][0] for i in range(12)]).float()
    images = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(images[1], images[0].flip(1))  # item 1 is item 0 mirrored
    model = memory_script.load_dinov2(weights, 28, json.loads(TINY_DINO))
    x = ((images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(memory_script.IMAGENET_MEAN).view(1, 3, 1, 1))
         / torch.tensor(memory_script.IMAGENET_STD).view(1, 3, 1, 1))
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bicubic", align_corners=False)
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.forward_features(x)[:, 0], dim=1)
    got = mem[np.arange(12)]
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert (got[0::2] - got[1::2]).abs().amax(1).min() > 0.02  # a swapped mirror would fail the line above
    apart = (got[None] - got[:, None]).abs().amax(2) + torch.eye(12)
    assert apart.min() > 0.02  # so would any other swap of rows
    # A rerun is a no-op; other settings under the same name are refused.
    assert build_memory(argv) == 0
    assert build_memory(argv + ["--image-size", "42"]) == 2


def test_dinov2_local_weights_file_with_resampled_positions(tmp_path):
    torch.manual_seed(3)
    import timm
    src = timm.create_model(memory_script.DINOV2_ARCH, pretrained=False, img_size=42, num_classes=0,
                            **json.loads(TINY_DINO))
    path = str(tmp_path / "dino.pth")
    torch.save(src.state_dict(), path)
    model = memory_script.load_dinov2(path, 28, json.loads(TINY_DINO))
    assert model.pos_embed.shape == (1, 1 + 4, 32) and src.pos_embed.shape == (1, 1 + 9, 32)
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert torch.equal(model.pos_embed[:, 0], src.pos_embed[:, 0])  # class position kept, grid resampled
    with pytest.raises(DataError, match="does not exist") as e:
        memory_script.load_dinov2(str(tmp_path / "missing.pth"), 28)
    one_line(e)
    bad = str(tmp_path / "bad.pth")
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="cannot load DINOv2 weights") as e:
        memory_script.load_dinov2(bad, 28, json.loads(TINY_DINO))
    one_line(e)


def sit_checkpoint(path: str, reg: str = "repulsor", proj_head: str | None = "standardised",
                   **args) -> tuple[SiT, Repulsor | None]:
    """A train.py-format checkpoint of a tiny SiT on 1 x 8 x 8 data (weights off adaLN-Zero).
    proj_head None: a checkpoint from before --proj-head (uncentred head, no running statistics)."""
    model = tiny_sit(num_classes=4)
    head = None
    state = {}
    if reg == "repulsor":
        head = Repulsor(32, 1, proj_dim=8, proj_hidden=16, bank_size=0, global_batch=2, head=proj_head or "mlp")
        for p in head.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
        head.running_mean.normal_()  # the statistics eval mode uses for single images
        head.running_var.uniform_(0.5, 2.0)
        state = head.state_dict()
        if proj_head is None:
            state = {k: v for k, v in state.items() if not k.startswith("running_")}
        else:
            args["proj_head"] = proj_head
    save_checkpoint(path, {"ema": model.state_dict(), "model": model.state_dict(), "regulariser": state,
                           "model_config": model.config.to_dict(), "step": 7,
                           "args": {"reg": reg, "reg_depth": None, "model": "custom", "depth": 2,
                                    "path_type": "linear", **args}})
    return model, head


@pytest.fixture
def latent_data(tmp_path) -> str:
    rng = np.random.default_rng(1)
    mean = rng.standard_normal((10, 1, 8, 8)).astype(np.float16)
    write_dataset(str(tmp_path / "latents"), mean, np.full_like(mean, 0.3), rng.integers(0, 4, 10), num_classes=4,
                  shard_size=4, latent_scale=2.0, latent_shift=0.1, source="synthetic latents")
    return str(tmp_path / "latents")


def sit_argv(data_dir: str, ckpt: str, *extra: str) -> list[str]:
    return ["--data-dir", data_dir, "--encoder", f"sit:{ckpt}", "--batch-size", "4", "--chunk-size", "3",
            "--workers", "0", *extra]


@pytest.mark.parametrize("proj_head", ["standardised", "centred", None])
def test_sit_snippets_are_the_repulsor_projection_of_the_clean_latent(latent_data, tmp_path, proj_head):
    """Snippets: the head's projection of each image alone, normalised with the head's running statistics
    (an uncentred head from before --proj-head: not at all)."""
    ckpt = str(tmp_path / "run" / "checkpoints" / "0000007.pt")
    model, head = sit_checkpoint(ckpt, proj_head=proj_head)
    assert build_memory(sit_argv(latent_data, ckpt)) == 0
    mem = gmem.open_dataset_memory(latent_data, "sit-run-0000007")
    assert mem.dim == 8 and mem.meta["settings"]["depth"] == 1 and mem.meta["settings"]["head"] == "repulsor"
    base = LatentDataset(latent_data)
    x = (torch.stack([base[i][0] for i in range(10)]).float() - 0.1) * 2.0  # posterior mean, scaled
    with torch.no_grad():
        _, hidden = model.eval()(x, torch.zeros(10), torch.full((10,), 4), return_hidden_at=1)  # null class
        u = head.head(hidden.mean(1))
        if proj_head:
            u = u - head.running_mean
        if proj_head == "standardised":
            u = u / (head.running_var + 1e-5).sqrt()
        want = torch.nn.functional.normalize(u, dim=1)
    torch.testing.assert_close(mem[np.arange(10)], want, atol=2e-3, rtol=0)
    if proj_head is None:
        return
    # Without a Repulsor head: the pooled hidden state, hidden-size wide.
    plain = str(tmp_path / "plain.pt")
    model, _ = sit_checkpoint(plain, reg="none")
    assert build_memory(sit_argv(latent_data, plain, "--name", "plain")) == 0
    mem = gmem.open_dataset_memory(latent_data, "plain")
    with torch.no_grad():
        _, hidden = model.eval()(x, torch.zeros(10), torch.full((10,), 4), return_hidden_at=1)
    assert mem.dim == 32 and mem.meta["settings"]["head"] is None
    torch.testing.assert_close(mem[np.arange(10)], torch.nn.functional.normalize(hidden.mean(1), dim=1),
                               atol=2e-3, rtol=0)


def test_sit_build_resumes_after_a_crash_to_the_same_bank(latent_data, tmp_path):
    ckpt = str(tmp_path / "c.pt")
    sit_checkpoint(ckpt)
    assert build_memory(sit_argv(latent_data, ckpt, "--name", "ref", "--sit-t", "0.2")) == 0
    ref = np.load(os.path.join(gmem.memory_dir(latent_data, "ref"), gmem.SNIPPETS))
    argv = sit_argv(latent_data, ckpt, "--name", "crash", "--sit-t", "0.2")
    assert build_memory(argv + ["--stop-after-chunks", "2"]) == memory_script.STOP_EXIT_CODE
    path = gmem.memory_dir(latent_data, "crash")
    assert sorted(os.listdir(os.path.join(path, gmem.CHUNK_DIR))) == ["chunk-00000.npy", "chunk-00001.npy"]
    with pytest.raises(MemoryBankError, match="is incomplete"):
        gmem.open_memory(path)
    assert build_memory(argv[:-2] + ["--sit-t", "0.3"]) == 2  # changed settings mid-build: refused
    assert build_memory(argv) == 0
    assert np.array_equal(np.load(os.path.join(path, gmem.SNIPPETS)), ref)
    assert gmem.open_memory(path).fingerprint == gmem.open_memory(gmem.memory_dir(latent_data, "ref")).fingerprint


def test_two_ranks_write_the_same_bank_as_one(latent_data, tmp_path):
    ckpt = str(tmp_path / "c.pt")
    sit_checkpoint(ckpt)
    assert build_memory(sit_argv(latent_data, ckpt, "--name", "one", "--sit-t", "0.3")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
           *sit_argv(latent_data, ckpt, "--name", "two", "--sit-t", "0.3", "--device", "cpu")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = np.load(os.path.join(gmem.memory_dir(latent_data, "one"), gmem.SNIPPETS))
    two = np.load(os.path.join(gmem.memory_dir(latent_data, "two"), gmem.SNIPPETS))
    assert np.array_equal(one, two)


def test_builder_errors_are_one_line(latent_data, tmp_path, capsys):
    ckpt = str(tmp_path / "c.pt")
    sit_checkpoint(ckpt)
    # As a script, from another working directory.
    proc = subprocess.run([sys.executable, SCRIPT, *dino_argv(latent_data)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=str(tmp_path), timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "not written by preprocessing/encode.py" in lines[0]

    def cli(*argv: str) -> str:
        capsys.readouterr()
        assert build_memory(list(argv)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "does not exist" in cli("--data-dir", latent_data, "--encoder", f"sit:{tmp_path}/nope.pt")
    other = make_easy_dataset(str(tmp_path / "other"), n=10, size=16)
    assert "models 1x8x8 latents but the dataset holds 1x16x16" in cli(*sit_argv(other, ckpt))
    os.makedirs(gmem.memory_dir(latent_data, "busy"))
    open(os.path.join(gmem.memory_dir(latent_data, "busy"), "x"), "w").close()
    assert "is not empty" in cli(*sit_argv(latent_data, ckpt, "--name", "busy"))
    assert "outside 1..2" in cli(*sit_argv(latent_data, ckpt, "--sit-depth", "3"))


def test_default_bank_names():
    def name(encoder: str) -> str:
        return memory_script.default_name(memory_script.parse_args(["--data-dir", "d", "--encoder", encoder]))

    assert name("dinov2") == "dinov2"
    assert name("sit:results/my run/checkpoints/0001600.pt") == "sit-my_run-0001600"
    assert name("sit:/tmp/rep.pt") == "sit-rep"


# ----------------------------------------------------------------------------- evaluations/memorisation.py

def test_nearest_neighbours_match_brute_force_at_any_block_size():
    rng = np.random.default_rng(0)
    q, r = rng.standard_normal((50, 9)) * 10, rng.standard_normal((70, 9)) * 10
    full = np.sqrt(((q[:, None] - r[None]) ** 2).sum(-1))
    for qb, rb in ((7, 13), (1, 1), (1000, 1000)):
        d, i = nearest_neighbours(q, r, query_block=qb, reference_block=rb)
        assert np.array_equal(i, full.argmin(1))
        np.testing.assert_allclose(d, full.min(1), rtol=1e-6)
    with pytest.raises(MetricInputError, match="dimensions differ"):
        nearest_neighbours(q, r[:, :5])
    with pytest.raises(MetricInputError, match="NaN"):
        nearest_neighbours(np.full((2, 9), np.nan), r)


def test_copies_of_training_images_are_flagged():
    rng = np.random.default_rng(1)
    train, heldout = rng.standard_normal((400, 16)), rng.standard_normal((300, 16))
    picked = rng.integers(0, 400, 100)
    res = memorisation_stats(train[picked], train, heldout, query_block=32, reference_block=50)
    assert res.close_share == 1.0 and res.median_ratio == 0.0
    assert np.array_equal(res.gen_index, picked) and res.threshold > 0
    assert res.metrics() == {"nn_median_ratio": 0.0, "nn_close_share": 1.0}
    # Half the samples slightly perturbed copies, half new: the share sees the copies.
    mixed = np.concatenate([train[picked[:50]] + 1e-3, rng.standard_normal((50, 16))])
    res = memorisation_stats(mixed, train, heldout)
    assert 0.5 <= res.close_share <= 0.55
    with pytest.raises(MetricInputError, match="held-out images are exact copies"):
        memorisation_stats(heldout, train, train[:10])


def test_independent_samples_look_like_held_out_data():
    rng = np.random.default_rng(2)
    train, heldout, gen = (rng.standard_normal((n, 8)) for n in (3000, 2000, 2000))
    res = memorisation_stats(gen, train, heldout, reference_block=1000)
    assert abs(res.median_ratio - 1) < 0.05, res.median_ratio
    assert abs(res.close_share - 0.01) < 0.01, res.close_share
    assert abs(res.threshold - np.quantile(res.heldout_distance, 0.01)) < 1e-12


class PixelExtractor:
    """Stand-in for Inception: 4 x 4 average-pooled pixels as 48-d 'pool' features."""

    device = torch.device("cpu")

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4)
        return {"pool": x.flatten(1)}


def test_memorisation_from_images_saves_the_closest_pairs(tmp_path):
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    heldout = rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8)
    gen = np.concatenate([train[[5, 9, 11]], rng.integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)])
    png = str(tmp_path / "pairs.png")
    res = memorisation(gen, train, heldout, PixelExtractor(), batch_size=8, png_path=png, k=6)
    assert sorted(res.closest(3)) == [0, 1, 2] and list(res.gen_index[:3]) == [5, 9, 11]
    assert res.close_share == 0.25
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
    # Streamed sources (.npz) give the same pairs as arrays.
    np.savez(tmp_path / "train.npz", train)
    np.savez(tmp_path / "gen.npz", gen)
    picked = gather_images(str(tmp_path / "train.npz"), [39, 5, 0], batch_size=7)
    assert all(np.array_equal(picked[i], train[i]) for i in (39, 5, 0))
    save_closest_pairs(str(tmp_path / "streamed.png"), str(tmp_path / "gen.npz"), str(tmp_path / "train.npz"), res, k=6)
    with pytest.raises(ImageDataError, match="image 40 is out of range"):
        gather_images(str(tmp_path / "train.npz"), [40])


@pytest.mark.parametrize("cond, extra", [("memory", {"memory_dim": 6}), ("class", {})])
def test_every_parameter_gets_a_gradient_without_label_dropout(cond, extra):
    """DDP (find_unused_parameters=False) fails on a parameter that takes no part in the loss: with
    --cfg-prob 0 the null vector must still be in the graph (with a zero gradient)."""
    model = tiny_sit(cond=cond, class_dropout_prob=0.0, **extra).train()
    y = torch.randn(4, 6) if cond == "memory" else torch.randint(0, 3, (4,))
    model(torch.randn(4, 1, 8, 8), torch.rand(4), y).square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
