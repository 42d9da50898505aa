"""train.py end to end: real torchrun on gloo, exact resume, atomic checkpoints, every bad input."""
import json
import os

import numpy as np
import pytest
import torch

from checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from conftest import TINY_MODEL, make_easy_dataset, run_train
from dataset import write_dataset


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_torchrun_two_ranks_loss_falls(tmp_path, easy_data):
    res = str(tmp_path / "res")
    run_train(["--data-dir", easy_data, "--results-dir", res, "--exp-name", "ddp", *TINY_MODEL,
               "--global-batch-size", "16", "--lr", "3e-3", "--max-steps", "40", "--log-every", "5",
               "--ckpt-every", "40", "--sample-every", "20", "--sample-steps", "2"], nproc=2)
    rows = _metrics(os.path.join(res, "ddp"))
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert rows[-1]["velocity"] < 0.7 * rows[0]["velocity"], [r["velocity"] for r in rows]
    ckpt = load_checkpoint(os.path.join(res, "ddp", "checkpoints", "0000040.pt"))
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 40
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # per-rank seeding
    assert ckpt["model_config"]["in_channels"] == 1 and ckpt["data"]["num_classes"] == 4
    assert os.path.isfile(os.path.join(res, "ddp", "loss_curve.png"))
    from PIL import Image
    grids = [np.asarray(Image.open(os.path.join(res, "ddp", "samples", f"{s:07d}.png"))) for s in (20, 40)]
    assert grids[0].shape == grids[1].shape and grids[0].shape[0] > 8 * 16  # 8 x 8 grid of 16 px images
    assert not np.array_equal(grids[0], grids[1])  # the model moved between the grids
    assert json.load(open(os.path.join(res, "ddp", "config.json")))["world_size"] == 2


def test_exact_resume(tmp_path, easy_data):
    common = ["--data-dir", easy_data, "--results-dir", str(tmp_path), *TINY_MODEL, "--global-batch-size", "16",
              "--grad-accum-steps", "2", "--lr", "1e-3", "--ckpt-every", "3", "--log-every", "3",
              "--ema-decay", "0.9", "--cfg-prob", "0.3"]
    # 64 items / batch 16 = 4 steps per epoch: 10 steps cross two epoch boundaries; resume mid-epoch at 6.
    run_train(common + ["--exp-name", "straight", "--max-steps", "10"])
    run_train(common + ["--exp-name", "split", "--max-steps", "6"])
    proc = run_train(common + ["--exp-name", "split", "--max-steps", "10"])
    assert "resumed from" in proc.stdout + proc.stderr
    a = load_checkpoint(str(tmp_path / "straight" / "checkpoints" / "0000010.pt"))
    b = load_checkpoint(str(tmp_path / "split" / "checkpoints" / "0000010.pt"))
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert a["opt"]["state"][0]["step"] == b["opt"]["state"][0]["step"] == 10


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "checkpoints"
    save_checkpoint(str(ckpt_dir / "0000010.pt"), {"step": 10, "w": torch.ones(3)})

    def dying_save(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(ckpt_dir / "0000020.pt"), {"step": 20})
    monkeypatch.undo()
    assert not (ckpt_dir / "0000020.pt").exists()
    assert latest_checkpoint(str(ckpt_dir)) == str(ckpt_dir / "0000010.pt")  # the temp file is ignored
    assert load_checkpoint(latest_checkpoint(str(ckpt_dir)))["step"] == 10
    with pytest.raises(KeyboardInterrupt):  # overwriting an existing checkpoint is atomic too
        monkeypatch.setattr(torch, "save", dying_save)
        save_checkpoint(str(ckpt_dir / "0000010.pt"), {"step": 99})
    monkeypatch.undo()
    assert load_checkpoint(str(ckpt_dir / "0000010.pt"))["step"] == 10


def _error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def test_bad_inputs_give_one_line_errors(tmp_path, easy_data):
    base = ["--results-dir", str(tmp_path / "res"), *TINY_MODEL, "--global-batch-size", "16", "--max-steps", "4"]
    assert "does not exist" in _error(run_train(["--data-dir", str(tmp_path / "missing"), *base], check=False))
    (tmp_path / "empty").mkdir()
    assert "is empty" in _error(run_train(["--data-dir", str(tmp_path / "empty"), *base], check=False))

    msg = _error(run_train(["--data-dir", easy_data, *base, "--num-classes", "2"], check=False))
    assert "--num-classes 2 is below the data's 4 classes" in msg

    msg = _error(run_train(["--data-dir", easy_data, *base, "--grad-accum-steps", "3"], check=False))
    assert "--global-batch-size 16 is not divisible by world size 1 x --grad-accum-steps 3" in msg

    bad = str(tmp_path / "corrupt")
    make_easy_dataset(bad)
    with open(os.path.join(bad, "shard-00001", "std.npy"), "r+b") as f:
        f.truncate(64)
    assert "corrupt or missing shard file" in _error(run_train(["--data-dir", bad, *base], check=False))

    # Resuming on data whose shape does not fit the checkpoint's model.
    run_train(["--data-dir", easy_data, *base, "--exp-name", "r", "--ckpt-every", "2"])
    other = make_easy_dataset(str(tmp_path / "rgb"), channels=3)
    msg = _error(run_train(["--data-dir", other, *base, "--exp-name", "r", "--max-steps", "6"], check=False))
    assert "3x16x16 latents but the checkpoint's model takes 1x16x16" in msg
    # Resuming with a different objective or data order (the checkpoint is left as it is).
    resume = ["--data-dir", easy_data, *base, "--exp-name", "r", "--max-steps", "6"]
    msg = _error(run_train([*resume, "--global-batch-size", "8"], check=False))  # the last value wins
    assert "was trained with --global-batch-size 16 (now 8): resume with the same value" in msg
    msg = _error(run_train([*resume, "--reg", "dispersive"], check=False))
    assert "was trained with --reg none (now dispersive)" in msg
    run_train(["--data-dir", easy_data, *base, "--exp-name", "d", "--reg", "dispersive", "--max-steps", "1"])
    msg = _error(run_train(["--data-dir", easy_data, *base, "--exp-name", "d", "--reg", "dispersive",
                            "--temperature", "0.2"], check=False))
    assert "was trained with --temperature 0.5 (now 0.2)" in msg
    # The optimiser's hyperparameters are not part of the objective: a new --lr applies on resume.
    run_train(["--data-dir", easy_data, *base, "--exp-name", "d", "--reg", "dispersive", "--max-steps", "2",
               "--lr", "3e-4"])
    opt = torch.load(tmp_path / "res" / "d" / "checkpoints" / "0000002.pt", weights_only=False)["opt"]
    assert [g["lr"] for g in opt["param_groups"]] == [3e-4]

    # Non-finite steps: tests/test_train_robust.py.
    proc = run_train(["--data-dir", easy_data, *base, "--no-such-flag"], check=False)
    assert proc.returncode == 2 and "unrecognized arguments: --no-such-flag" in proc.stderr
