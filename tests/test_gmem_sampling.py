"""GMem sampling: guidance through the drop mask, snippets per (seed, i), interpolation, sample_ddp.py
with memory checkpoints (world-size invariance, recorded bank, bad banks), and train.py --cond memory
end to end (grids, exact resume)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import gmem
import sample_ddp
from checkpoint import load_checkpoint, save_checkpoint
from dataset import read_manifest
from models.sit import build_sit
from samplers import (Interpolation, SampleError, generate, interpolation_rows, make_inputs, memory_conditions,
                      parse_interpolation, sample, setup_from_checkpoint)

from conftest import TINY_MODEL, make_easy_dataset, run_train
from test_sampling import one_thread  # noqa: F401  (autouse: one thread, as train.py's OMP_NUM_THREADS=1)

REPO = Path(__file__).resolve().parents[1]
DIM = 6


def tiny_sit(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    fields = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=1, num_classes=4)
    fields.update(kw)
    model = build_sit(**fields)
    with torch.no_grad():  # off adaLN-Zero, so conditions reach the output
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def make_bank(data_dir: str, name: str = "test", dim: int = DIM, seed: int = 0) -> str:
    manifest = read_manifest(data_dir)
    raw = np.random.default_rng(seed).standard_normal((manifest["count"], dim))
    gmem.write_memory(gmem.memory_dir(data_dir, name), raw, manifest, encoder="test", settings={"seed": seed})
    return gmem.memory_dir(data_dir, name)


@pytest.fixture
def data(tmp_path) -> str:
    return make_easy_dataset(str(tmp_path / "data"), n=12, size=8, shard_size=5)


def make_memory_ckpt(path: Path, bank: str, dim: int = DIM) -> Path:
    """A train.py-format checkpoint of a tiny memory-conditioned SiT on 1 x 8 x 8 pixels."""
    model = tiny_sit(cond="memory", memory_dim=dim)
    sd = model.state_dict()
    save_checkpoint(str(path), {
        "model": sd, "ema": sd, "model_config": model.config.to_dict(), "args": {"path_type": "linear"},
        "data": dict(vae="none", latent_scale=1.0, latent_shift=0.0, latent_shape=[1, 8, 8], num_classes=4,
                     class_names=None),
        "memory": gmem.open_memory(bank).describe(), "step": 5,
    })
    return path


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = sample_ddp.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


class NoDrop(nn.Module):
    """The same SiT seen as a foreign velocity field without a drop argument: guided through the
    null label num_classes, the samplers' path before the drop mask."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, x, t, y):
        return self.model(x, t, y)


# ----------------------------------------------------------------------------------------------
# Guidance through the drop mask


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_class_guidance_through_the_drop_mask_is_bitwise_the_null_label(mode):
    model = tiny_sit()
    noise, labels, _ = make_inputs(range(5), seed=0, latent_shape=(1, 8, 8), num_classes=4)
    calls = []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("drop")), with_kwargs=True)
    kw = dict(mode=mode, num_steps=4, heun=mode == "ode", cfg_scale=2.5, guidance_low=0.2, guidance_high=0.8)
    gen = (lambda: torch.Generator().manual_seed(3)) if mode == "sde" else (lambda: None)
    ours = sample(model, noise, labels, generator=gen(), **kw)
    guided = [d for d in calls if d is not None]
    assert guided and all(d.tolist() == [False] * 5 + [True] * 5 for d in guided)  # the mask path was taken
    assert len(guided) < len(calls)  # outside the interval: one conditional pass, no mask
    before = sample(NoDrop(model), noise, labels, generator=gen(), **kw)
    assert torch.equal(ours, before)


def test_memory_guidance_uses_the_learned_null_vector():
    model = tiny_sit(cond="memory", memory_dim=DIM).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    snippets = gmem.l2_normalize(torch.randn(3, DIM, dtype=torch.float64))
    out = sample(model, x, snippets, mode="ode", num_steps=1, cfg_scale=3.0)  # one Euler step from t = 1
    t = torch.ones(3, dtype=torch.float64)
    cond = model(x, t, snippets)
    uncond = model(x, t, torch.zeros_like(snippets), drop=torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(out, (x - (uncond + 3.0 * (cond - uncond))).float())
    assert not torch.allclose(uncond, model(x, t, torch.zeros_like(snippets)))  # not GMem's zeros snippet
    with pytest.raises(SampleError, match="drop mask"):
        sample(NoDrop(model), x, snippets, num_steps=1, cfg_scale=2.0)
    with pytest.raises(SampleError, match="snippets B x D"):
        sample(model, x, snippets[:2], num_steps=1)


# ----------------------------------------------------------------------------------------------
# Snippets per image, and interpolation


def test_snippets_are_drawn_per_seed_and_image(data):
    mem = gmem.open_memory(make_bank(data))
    snippets, rows = memory_conditions(mem, range(40), seed=7)
    assert rows.dtype == np.int64 and rows.tolist() == gmem.snippet_indices(7, range(40), 12).tolist()
    assert torch.equal(snippets, mem[rows]) and snippets.shape == (40, DIM) and snippets.dtype == torch.float32
    part, part_rows = memory_conditions(mem, [33, 5], seed=7)  # any batch, any order
    assert torch.equal(part, snippets[[33, 5]]) and part_rows.tolist() == rows[[33, 5]].tolist()
    assert memory_conditions(mem, range(40), seed=8)[1].tolist() != rows.tolist()
    assert len(set(rows.tolist())) > 6  # spread over the bank


def test_interpolation_gives_unit_norm_snippets_between_two_rows(data):
    mem = gmem.open_memory(make_bank(data))
    path = parse_interpolation("2,9", 5)
    assert path == Interpolation((2, 9), 5)
    snippets, record = memory_conditions(mem, range(5), seed=0, interpolate=path)
    torch.testing.assert_close(snippets.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(snippets[0], gmem.l2_normalize(mem[2]))
    torch.testing.assert_close(snippets[4], gmem.l2_normalize(mem[9]))
    a, b = gmem.l2_normalize(mem[2]), gmem.l2_normalize(mem[9])
    angle = torch.acos((a * b).sum())
    for i in range(5):  # equal angular steps on the great circle: w = i / (N - 1)
        torch.testing.assert_close(torch.acos((snippets[i] * a).sum().clamp(-1, 1)), angle * i / 4,
                                   atol=1e-3, rtol=0)
    assert record.tolist() == [2] * 5
    assert torch.equal(memory_conditions(mem, [3], seed=5, interpolate=path)[0], snippets[3:4])

    random = parse_interpolation("random", 5)
    snippets, record = memory_conditions(mem, range(30), seed=4, interpolate=random)
    first, second, w = interpolation_rows(random, range(30), 4, 12)
    assert record.tolist() == first.tolist() == gmem.snippet_indices(4, range(30), 12).tolist()
    assert (first != second).all() and (w == 0.5).all() and len(set(second.tolist())) > 6
    torch.testing.assert_close(snippets.norm(dim=1), torch.ones(30))
    torch.testing.assert_close(snippets, gmem.slerp(mem[first], mem[second], 0.5))
    # The midpoint is equally far from both ends and belongs to neither.
    da, db = (snippets * gmem.l2_normalize(mem[first])).sum(1), (snippets * gmem.l2_normalize(mem[second])).sum(1)
    torch.testing.assert_close(da, db, atol=1e-5, rtol=0)
    assert (da < 0.9999).all()

    for bad, msg in (("3", "two bank rows"), ("a,b", "two bank rows"), ("4,4", "two different"),
                     ("-1,2", "non-negative")):
        with pytest.raises(SampleError, match=msg):
            parse_interpolation(bad, 5)
    with pytest.raises(SampleError, match="row 12 is outside the memory bank's 0..11"):
        memory_conditions(mem, range(2), seed=0, interpolate=parse_interpolation("1,12", 2))


# ----------------------------------------------------------------------------------------------
# sample_ddp.py with a memory checkpoint


def test_sample_ddp_memory_set_records_rows_and_bank(tmp_path, data, capsys):
    bank = make_bank(data)
    ckpt = make_memory_ckpt(tmp_path / "ckpt.pt", bank)
    common = ["--ckpt", ckpt, "--num-samples", 9, "--per-proc-batch-size", 4, "--chunk-size", 4, "--mode", "ode",
              "--num-steps", 3, "--heun", "--cfg-scale", 2.0, "--guidance-high", 0.7, "--seed", 3]
    code, stdout, err = run_main(capsys, *common, "--out", tmp_path / "set.npz")
    assert code == 0, err
    assert "memory snippets" in stdout
    with np.load(tmp_path / "set.npz") as f:
        images, rows = f["arr_0"], f["arr_1"]
    assert images.shape == (9, 8, 8, 3) and images.dtype == np.uint8
    assert rows.tolist() == gmem.snippet_indices(3, range(9), 12).tolist()
    record = json.loads((tmp_path / "set.json").read_text())
    meta = gmem.read_memory_meta(bank)
    assert record["memory"]["path"] == os.path.abspath(bank)
    assert record["memory"]["fingerprint"] == record["settings"]["memory_fingerprint"] == meta["fingerprint"]
    assert record["settings"]["labels"] == "memory" and "snippet_index" in record["labels"]
    assert record["distinct_rows"] == len(set(rows.tolist())) and "class_counts" not in record
    # The Python API (train.py's grids) gives the same images, in any batch.
    setup = setup_from_checkpoint(load_checkpoint(str(ckpt)), log=lambda *a: None)
    assert setup.cond == "memory" and setup.memory.fingerprint == meta["fingerprint"]
    api, api_rows = generate(setup, None, [6, 2], seed=3, mode="ode", num_steps=3, heun=True, cfg_scale=2.0,
                             guidance_high=0.7)
    assert (api == images[[6, 2]]).all() and api_rows.tolist() == rows[[6, 2]].tolist()
    # The snippet matters: another seed draws other rows and other images.
    other, _ = generate(setup, None, range(9), seed=4, mode="ode", num_steps=3, heun=True)
    assert not (other == images).all()

    # --memory at a moved copy of the bank (same fingerprint): the same set.
    moved = shutil.copytree(bank, tmp_path / "elsewhere" / "memory-test")
    code, _, err = run_main(capsys, *common, "--memory", moved, "--out", tmp_path / "moved.npz")
    assert code == 0, err
    assert (tmp_path / "moved.npz").read_bytes() == (tmp_path / "set.npz").read_bytes()

    # Interpolation: a path from row 2 to row 9 over the set, and random midpoints.
    code, _, err = run_main(capsys, *common, "--interpolate", "2,9", "--out", tmp_path / "path.npz")
    assert code == 0, err
    with np.load(tmp_path / "path.npz") as f:
        path_images, path_rows = f["arr_0"], f["arr_1"]
    assert path_rows.tolist() == [2] * 9 and not (path_images == images).all()
    record = json.loads((tmp_path / "path.json").read_text())
    assert record["settings"]["labels"] == "memory interpolate 2,9 over 9 images"
    assert "i / (N - 1)" in record["labels"]
    code, _, err = run_main(capsys, *common, "--interpolate", "random", "--out", tmp_path / "mid.npz")
    assert code == 0, err
    with np.load(tmp_path / "mid.npz") as f:
        assert f["arr_1"].tolist() == rows.tolist()  # a_i: the plain set's row of image i
        assert not (f["arr_0"] == images).all()
    # A path of another length is another set: its chunks are never reused.
    code, _, err = run_main(capsys, *common[:-2], "--seed", 3, "--interpolate", "2,9", "--num-samples", 5,
                            "--out", tmp_path / "path.npz")
    assert code == 2 and "--overwrite" in err


def test_sample_ddp_refuses_bad_banks_and_flags_in_one_line(tmp_path, data, capsys):
    bank = make_bank(data)
    ckpt = make_memory_ckpt(tmp_path / "ckpt.pt", bank)
    base = ["--ckpt", ckpt, "--num-samples", 4, "--mode", "ode", "--num-steps", 1]

    def error_of(*argv):
        code, _, err = run_main(capsys, *base, *argv, "--out", tmp_path / "out" / "x.npz")
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()  # refused before any directory is made
        return err

    other = make_bank(data, name="other", seed=1)  # same dataset and dimension, other content
    err = error_of("--memory", other)
    assert "fingerprint" in err and "pass --memory pointing at the bank it was trained with" in err
    wide = make_bank(data, name="wide", dim=DIM + 2)
    assert f"holds {DIM + 2}-d snippets but the checkpoint's model takes {DIM}-d" in error_of("--memory", wide)
    assert "no memory bank at" in error_of("--memory", tmp_path / "nowhere")
    assert "--class-balanced applies to class-conditional checkpoints" in error_of("--class-balanced")
    assert "row 20 is outside the memory bank's 0..11" in error_of("--interpolate", "3,20")
    assert "two bank rows" in error_of("--interpolate", "3")
    shutil.move(bank, tmp_path / "moved")  # the recorded location is gone
    err = error_of()
    assert "the checkpoint's memory bank" in err and "is missing" in err and "pass --memory" in err
    # A class-conditional checkpoint takes neither flag.
    cls = tiny_sit()
    sd = cls.state_dict()
    save_checkpoint(str(tmp_path / "cls.pt"), {
        "model": sd, "ema": sd, "model_config": cls.config.to_dict(), "args": {},
        "data": dict(vae="none", latent_scale=1.0, latent_shift=0.0, latent_shape=[1, 8, 8], num_classes=4)})
    base[1] = tmp_path / "cls.pt"
    assert "--memory applies to memory-conditioned checkpoints" in error_of("--memory", tmp_path / "moved")
    assert "--interpolate applies to memory-conditioned checkpoints" in error_of("--interpolate", "random")


def test_memory_set_is_world_size_and_batch_invariant_with_torchrun(tmp_path, data, capsys):
    """1 rank (batch 3, chunks of 4) vs 2 ranks (batch 5, chunks of 3): byte-identical npz, snippet
    rows included; SDE with guidance on an interval, fp64 (batch-independent arithmetic)."""
    ckpt = make_memory_ckpt(tmp_path / "ckpt.pt", make_bank(data))
    common = ["--ckpt", ckpt, "--num-samples", 11, "--mode", "sde", "--num-steps", 4, "--cfg-scale", 2.5,
              "--guidance-high", 0.7, "--precision", "fp64", "--seed", 1]
    code, _, err = run_main(capsys, *common, "--per-proc-batch-size", 3, "--chunk-size", 4,
                            "--out", tmp_path / "one.npz")
    assert code == 0, err
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "sample_ddp.py"), *map(str, common), "--per-proc-batch-size", "5", "--chunk-size", "3",
         "--out", str(tmp_path / "two.npz")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    with np.load(tmp_path / "two.npz") as f:
        assert f["arr_1"].tolist() == gmem.snippet_indices(1, range(11), 12).tolist()
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and two["memory"]["fingerprint"] == two["settings"]["memory_fingerprint"]


# ----------------------------------------------------------------------------------------------
# train.py --cond memory


def _grid_pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def test_train_cond_memory_grids_and_exact_resume(tmp_path, capsys):
    data = make_easy_dataset(str(tmp_path / "data"))  # 64 items of 1 x 16 x 16: 4 steps per epoch
    bank = make_bank(data, name="mem", dim=8)
    common = ["--data-dir", data, "--results-dir", str(tmp_path / "res"), *TINY_MODEL, "--cond", "memory",
              "--global-batch-size", "16", "--grad-accum-steps", "2", "--lr", "1e-3", "--ckpt-every", "3",
              "--log-every", "3", "--ema-decay", "0.9", "--cfg-prob", "0.3", "--sample-steps", "2"]
    run_train(common + ["--exp-name", "straight", "--max-steps", "6", "--sample-every", "6"])
    run_train(common + ["--exp-name", "split", "--max-steps", "3"])
    proc = run_train(common + ["--exp-name", "split", "--max-steps", "6"])
    assert "resumed from" in proc.stdout + proc.stderr
    a = load_checkpoint(str(tmp_path / "res" / "straight" / "checkpoints" / "0000006.pt"))
    b = load_checkpoint(str(tmp_path / "res" / "split" / "checkpoints" / "0000006.pt"))
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert a["model_config"]["cond"] == "memory" and a["model_config"]["memory_dim"] == 8
    assert a["memory"]["fingerprint"] == gmem.read_memory_meta(bank)["fingerprint"]
    assert a["memory"]["path"] == os.path.abspath(bank)
    config = json.loads((tmp_path / "res" / "straight" / "config.json").read_text())
    assert config["memory"] == a["memory"]

    # The training grid is images 0..63 of sample_ddp.py's default set for --seed (same rows, same path).
    out = tmp_path / "s.npz"
    code, _, err = run_main(capsys, "--ckpt", tmp_path / "res" / "straight" / "checkpoints" / "0000006.pt",
                            "--num-samples", 64, "--mode", "ode", "--heun", "--num-steps", 2, "--seed", 0,
                            "--out", out)
    assert code == 0, err
    grid = _grid_pixels(tmp_path / "res" / "straight" / "samples" / "0000006.png")
    ours = _grid_pixels(str(out)[:-4] + ".grid.png")
    assert np.array_equal(grid, ours)  # one thread each, same batch of 64: the same arithmetic


def test_train_cond_memory_without_a_bank_is_one_line(tmp_path):
    data = make_easy_dataset(str(tmp_path / "data"), n=16)
    proc = run_train(["--data-dir", data, "--results-dir", str(tmp_path / "res"), *TINY_MODEL, "--cond", "memory",
                      "--global-batch-size", "8", "--max-steps", "1"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "has no memory bank" in lines[0] and "preprocessing/memory.py" in lines[0]
    assert not os.path.exists(tmp_path / "res")  # refused before the run directory exists
