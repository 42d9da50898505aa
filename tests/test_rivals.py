"""The encoder-free rivals on the seam (issue 22): SRA, ΔFM (contrastive flow matching) and --reg-until.

Losses are checked against hand-written loops (values and analytic gradients); SRA's teacher pass
against a recomputation on the EMA; the training runs on two ranks resume bit-exactly, across the
--reg-until switch too.
"""
import copy
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import loss
import train
from conftest import TINY_MODEL, make_easy_dataset, run_train
from loss import SRA, DeltaFM, build_regulariser, deltafm_negative_error, flag_problems, sra_loss
from models.sit import build_sit
from test_regularisers import assert_state_equal
from test_seam import _args, _sit, _step  # the 4-block SiT, its flags and one train_step

def _capture(reg):
    """Record each ctx the regulariser sees and the global RNG state just before its forward."""
    seen, forward = [], reg.forward
    reg.forward = lambda ctx: (seen.append((ctx, torch.get_rng_state())), forward(ctx))[1]
    return seen


# ----------------------------------------------------------------------------- SRA
def _sra_reference(z, target, over):
    """Mean of 1 - cos by loops, and its gradient d loss / d z by the formula
    d cos(a, c) / d a = c / (|a| |c|) - cos(a, c) a / |a|^2."""
    z, target = z.double(), target.double()
    b, n, d = z.shape
    pairs = ([(i, slice(None), k) for i in range(b) for k in range(d)] if over == "tokens"
             else [(i, j, slice(None)) for i in range(b) for j in range(n)])
    value, grad = 0.0, torch.zeros_like(z)
    for idx in pairs:
        a, c = z[idx], target[idx]
        na, nc = math.sqrt(float((a * a).sum())), math.sqrt(float((c * c).sum()))
        cos = float((a * c).sum()) / (na * nc)
        value += (1 - cos) / len(pairs)
        grad[idx] = -(c / (na * nc) - cos * a / na ** 2) / len(pairs)
    return value, grad


@pytest.mark.parametrize("over", ["tokens", "features"])
def test_sra_loss_matches_hand_reference(over):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    target = torch.randn(3, 5, 4, generator=g)
    got = sra_loss(z, target, over)
    assert got.shape == (3,)  # per sample
    got.mean().backward()
    value, grad = _sra_reference(z.detach(), target, over)
    assert abs(got.mean().item() - value) < 1e-6
    torch.testing.assert_close(z.grad.double(), grad, rtol=1e-5, atol=1e-7)
    # The two reductions differ (SRA's code reduces over tokens): the flag is not cosmetic.
    other = "features" if over == "tokens" else "tokens"
    assert abs(sra_loss(z, target, other).mean().item() - value) > 1e-3
    assert sra_loss(target, 3 * target, over).abs().max() < 1e-6  # aligned up to scale: zero loss
    with pytest.raises(ValueError, match=r"SRA: projected tokens \(3, 5, 4\) and teacher tokens \(3, 5, 2\) differ"):
        sra_loss(z, target[..., :2])


def test_sra_default_blocks_and_errors():
    # SRA's SiT-XL recipe: block 8 of 28 aligned to EMA block 20; projector D -> 2D -> D.
    args = train.get_args(["--data-dir", "unused", "--reg", "sra"])
    assert args.reg_weight == 0.5 and args.sra_t_gap == 0.2 and args.sra_cos_over == "tokens"
    reg = build_regulariser(args, "SiT-XL/2", 64, 28, 16, "cpu", tokens=16)
    assert (reg.depth, reg.teacher_depth) == (8, 20)
    assert [tuple(m.weight.shape) for m in reg.proj if hasattr(m, "weight")] == [(128, 64), (64, 128)]
    assert [loss._sra_blocks(n) for n in (2, 4, 12, 24)] == [(1, 2), (1, 3), (3, 9), (7, 17)]
    assert flag_problems(SRA) == [] and loss.REGULARISERS["sra"] is SRA
    with pytest.raises(ValueError, match=r"--sra-teacher-depth 2 must be after the student's block 2 .* 3\.\.4"):
        build_regulariser(_args("--reg", "sra", "--reg-depth", "2", "--sra-teacher-depth", "2"), _sit(), 4, "cpu")
    with pytest.raises(ValueError, match="--sra-teacher-depth 5 must be after"):
        build_regulariser(_args("--reg", "sra", "--sra-teacher-depth", "5"), _sit(), 4, "cpu")
    with pytest.raises(train.TrainError, match=r"^--sra-t-gap 1.5 must be in \[0, 1\]$"):
        _args("--sra-t-gap", "1.5")


def test_sra_step_aligns_to_the_ema_at_lower_noise_up_to_its_block():
    args = _args("--reg", "sra", "--sra-t-gap", "0.5")
    sit = _sit()
    reg = build_regulariser(args, sit, 4, "cpu")
    assert (reg.depth, reg.teacher_depth) == (1, 3)  # round(4 * 8 / 28), round(4 * 20 / 28)
    ema = copy.deepcopy(sit).requires_grad_(False).eval()
    with torch.no_grad():  # an EMA that differs from the online SiT, so the test tells them apart
        for p in ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module = train.TrainModule(sit, reg, ema).train()
    calls = {"ema": [0] * 4, "sit": [0] * 4}
    for name, net in (("ema", ema), ("sit", sit)):
        for i, block in enumerate(net.blocks):
            block.register_forward_hook(lambda m, inp, out, c=calls[name], i=i: c.__setitem__(i, c[i] + 1))
    seen = _capture(reg)
    ema_before = copy.deepcopy(ema.state_dict())
    proj_before = copy.deepcopy(reg.proj.state_dict())
    terms, flags = _step(module, args)
    assert not flags.any()
    assert calls == {"ema": [1, 1, 1, 0], "sit": [1, 1, 1, 1]}  # one teacher pass, blocks 1..3 only

    # The teacher is the EMA, outside the module, the optimizer and the checkpointed state.
    assert all(k.startswith(("sit.", "reg.proj.")) for k in module.state_dict())
    assert set(reg.state_dict()) == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias"}
    ema_ids = {id(p) for p in ema.parameters()}  # train.py's optimizer takes the module's parameters
    assert not any(id(p) in ema_ids for p in module.parameters())
    assert_state_equal(ema_before, ema.state_dict(), "ema")
    assert all(p.grad is None for p in ema.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(proj_before.values(), reg.proj.state_dict().values()))

    # The term, recomputed by hand: t_teacher = max(t - 0.5 u, 0) with u the regulariser's draw.
    ctx, rng = seen[0]
    torch.set_rng_state(rng)
    t_teacher = (ctx.t - 0.5 * torch.rand(4)).clamp(min=0)
    assert (t_teacher <= ctx.t).all() and (t_teacher < ctx.t).any()
    tt = t_teacher.view(-1, 1, 1, 1)
    x_teacher = (1 - tt) * ctx.x + tt * ctx.noise  # linear path, same image and noise
    with torch.no_grad():
        target = ema.hidden_at(x_teacher, t_teacher, ctx.y, 3, drop=ctx.drop)
    proj = copy.deepcopy(reg.proj)
    proj.load_state_dict(proj_before)
    with torch.no_grad():
        z = proj(ctx.hidden)
    value, _ = _sra_reference(z, target, "tokens")
    assert abs(terms["reg"].item() - value) < 1e-5


def test_sra_gap_zero_aligns_to_the_same_time():
    """--sra-t-gap 0: the teacher sees the student's own x_t and t (per-token cosine here)."""
    args = _args("--reg", "sra", "--sra-t-gap", "0", "--sra-teacher-depth", "2", "--sra-cos-over", "features")
    sit = _sit()
    reg = build_regulariser(args, sit, 4, "cpu")
    ema = copy.deepcopy(sit).requires_grad_(False).eval()
    proj = copy.deepcopy(reg.proj)
    seen = _capture(reg)
    terms, _ = _step(train.TrainModule(sit, reg, ema).train(), args)
    ctx, _ = seen[0]
    with torch.no_grad():
        target = ema.hidden_at(ctx.x_t, ctx.t, ctx.y, 2, drop=ctx.drop)
        value, _ = _sra_reference(proj(ctx.hidden), target, "features")
    assert abs(terms["reg"].item() - value) < 1e-5


def test_overhead_benchmark_counts_sras_teacher_pass():
    """benchmarks/overhead.py's analytic GFLOP of SRA: the EMA's blocks 1..m forward (torch's counter,
    which misses CPU SDPA, gives the rest of a block exactly) and the projector fwd + bwd."""
    import argparse
    import sys

    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import overhead

    sit = _sit().eval()
    x, t, y, keep = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.bool)
    flops = []
    for m in (1, 3):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            sit.hidden_at(x, t, y, m, drop=keep)
        flops.append(counter.get_total_flops())
    d, n, bs = 32, 4, 3
    attention = 2 * 2 * n * n * d  # q k^T and attn v per sample and block, missed by the counter
    reg = SRA(hidden_size=32, depth=1, teacher_depth=3)
    parts = overhead.approx_gflop(argparse.Namespace(batch_size=bs), sit.config, reg, n)
    assert parts["teacher fwd"] * 1e9 == pytest.approx(3 / 2 * (flops[1] - flops[0] + 2 * bs * attention))
    assert parts["projector"] * 1e9 == pytest.approx(3 * 2 * bs * n * (32 * 64 + 64 * 32))
    assert set(overhead.approx_gflop(argparse.Namespace(batch_size=bs), sit.config, DeltaFM(), n)) == {"SiT"}


# ----------------------------------------------------------------------------- ΔFM
def test_deltafm_loss_matches_hand_reference():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(4, 2, 3, 3, generator=g, requires_grad=True)
    target = torch.randn(4, 2, 3, 3, generator=g)
    others = torch.tensor([2, 0, 3, 1])
    got = deltafm_negative_error(pred, target, others)
    want = [sum((pred[i].detach().flatten()[e] - target[others[i]].flatten()[e]).item() ** 2 for e in range(18)) / 18
            for i in range(4)]
    assert torch.allclose(got.detach(), torch.tensor(want), atol=1e-6)
    (-got.mean()).backward()  # reg = -mean: gradient -(2 / (B E)) (pred_i - target_j(i))
    torch.testing.assert_close(pred.grad, -(2 / (4 * 18)) * (pred.detach() - target[others]))


def test_deltafm_forward_draws_another_sample_from_the_global_rng():
    args = _args("--reg", "deltafm")
    assert args.reg_weight == 0.05 and flag_problems(DeltaFM) == []
    reg = build_regulariser(args, _sit(), 4, "cpu")
    assert reg.depth is None and not list(reg.parameters()) and not DeltaFM.needs_block
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    ctx = loss.Context(pred=pred, target=target, t=torch.rand(6, generator=g))
    torch.manual_seed(5)
    got = reg(ctx)["reg"]
    torch.manual_seed(5)
    others = (torch.arange(6) + torch.randint(1, 6, (6,))) % 6
    assert (others != torch.arange(6)).all()
    assert torch.equal(got, -deltafm_negative_error(pred, target, others).mean())
    # Over many draws every other sample is a negative, never the sample itself.
    hits = torch.zeros(6, 6)
    for _ in range(300):
        k = (torch.arange(6) + torch.randint(1, 6, (6,))) % 6
        hits[torch.arange(6), k] += 1
    assert (hits.diag() == 0).all() and (hits + torch.eye(6) > 0).all()
    with pytest.raises(ValueError, match="--reg deltafm needs at least 2 samples per rank"):
        reg(loss.Context(pred=pred[:1], target=target[:1], t=ctx.t[:1]))
    # A full step: no block, so the SiT runs without returning one; the term is negative.
    sit = _sit()
    terms, flags = _step(train.TrainModule(sit, build_regulariser(args, sit, 4, "cpu")).train(), args)
    assert not flags.any() and terms["reg"].item() < 0
    assert torch.allclose(terms["loss"], terms["velocity"] + 0.05 * terms["reg"])


# ----------------------------------------------------------------------------- training runs
def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _two_rank_resume(tmp_path, flags, steps, half):
    """Run `steps` straight and `half` + resume to `steps` on 2 ranks; return both final checkpoints."""
    data = make_easy_dataset(str(tmp_path / "data"))
    common = ["--data-dir", data, "--results-dir", str(tmp_path), *TINY_MODEL, "--global-batch-size", "8",
              "--lr", "1e-3", "--ckpt-every", "2", "--log-every", "1", "--ema-decay", "0.5", *flags]
    with ThreadPoolExecutor(max_workers=2) as pool:  # the straight run and the first half, side by side
        runs = [pool.submit(run_train, common + ["--exp-name", name, "--max-steps", str(n)], nproc=2)
                for name, n in (("straight", steps), ("split", half))]
        [r.result() for r in runs]
    proc = run_train(common + ["--exp-name", "split", "--max-steps", str(steps)], nproc=2)
    assert "resumed from" in proc.stdout + proc.stderr
    ckpt = f"{steps:07d}.pt"
    a = torch.load(tmp_path / "straight" / "checkpoints" / ckpt, weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoints" / ckpt, weights_only=False)
    for key in ("model", "ema", "regulariser"):
        assert_state_equal(a[key], b[key], key)
    return a, b


def test_sra_two_ranks_resume_exactly_across_reg_until(tmp_path):
    """SRA on 2 ranks (gloo) with --reg-until 4: 6 steps straight equal 2 + resume to 6, bitwise; steps 1..4
    train the projector, 5..6 do not call it (DDP, rebuilt without it, waits for none of its gradients)."""
    a, _ = _two_rank_resume(tmp_path, ["--reg", "sra", "--reg-until", "4"], 6, 2)
    assert a["args"]["reg_until"] == 4 and a["args"]["reg"] == "sra"
    assert set(a["regulariser"]) == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias"}
    ckpts = {s: torch.load(tmp_path / "straight" / "checkpoints" / f"{s:07d}.pt", weights_only=False) for s in (2, 4)}
    assert not torch.equal(ckpts[2]["regulariser"]["proj.0.weight"], ckpts[4]["regulariser"]["proj.0.weight"])
    assert_state_equal(ckpts[4]["regulariser"], a["regulariser"], "projector after --reg-until")
    assert not torch.equal(ckpts[4]["model"]["blocks.0.attn.qkv.weight"], a["model"]["blocks.0.attn.qkv.weight"])
    rows = _rows(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(0 < r["reg"] <= 2 for r in rows[:4]) and not any("reg" in r for r in rows[4:])
    assert all(r["loss"] == pytest.approx(r["velocity"]) for r in rows[4:])
    assert all(r["loss"] == pytest.approx(r["velocity"] + 0.5 * r["reg"]) for r in rows[:4])
    split = _rows(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]

    # sample_ddp.py samples the SRA checkpoint like a plain SiT (the projector is training-only).
    import sample_ddp

    npz = tmp_path / "samples" / "sra.npz"
    assert sample_ddp.main(["--ckpt", str(tmp_path / "straight" / "checkpoints" / "0000006.pt"), "--num-samples", "3",
                            "--mode", "ode", "--num-steps", "2", "--out", str(npz), "--device", "cpu"]) == 0
    assert np.load(npz)["arr_0"].shape[0] == 3


def test_deltafm_two_ranks_resume_exactly(tmp_path):
    a, b = _two_rank_resume(tmp_path, ["--reg", "deltafm"], 4, 2)
    assert a["regulariser"] == {} and a["args"]["reg_weight"] == 0.05
    rows = _rows(tmp_path / "straight" / "metrics.jsonl")
    assert all(r["reg"] < 0 and r["loss"] == pytest.approx(r["velocity"] + 0.05 * r["reg"]) for r in rows)


def test_reg_until_leaves_repulsor_head_and_bank_alone_and_resumes_after_the_switch(tmp_path):
    """1 rank, in-process: Repulsor with --reg-until 2. After step 2 neither its head nor its bank changes
    (it is not called), checkpoints still hold both, and a resume that starts after the switch (3 -> 4)
    equals the straight run; --reg-until may change on resume (it is not part of the objective's record)."""
    data = make_easy_dataset(str(tmp_path / "data"))
    base = ["--data-dir", data, "--results-dir", str(tmp_path), *TINY_MODEL, "--global-batch-size", "8",
            "--num-workers", "0", "--device", "cpu", "--ckpt-every", "1", "--log-every", "1", "--lr", "1e-3",
            "--reg", "repulsor", "--proj-hidden", "16", "--proj-dim", "8", "--bank-size", "32", "--reg-until", "2"]
    train.main(train.get_args([*base, "--exp-name", "straight", "--max-steps", "4"]))
    train.main(train.get_args([*base, "--exp-name", "split", "--max-steps", "3"]))
    train.main(train.get_args([*base, "--exp-name", "split", "--max-steps", "4"]))
    ck = {s: torch.load(tmp_path / "straight" / "checkpoints" / f"{s:07d}.pt", weights_only=False) for s in (1, 2, 4)}
    split = torch.load(tmp_path / "split" / "checkpoints" / "0000004.pt", weights_only=False)
    for key in ("model", "ema", "regulariser"):
        assert_state_equal(ck[4][key], split[key], key)
    assert not torch.equal(ck[1]["regulariser"]["head.0.weight"], ck[2]["regulariser"]["head.0.weight"])
    assert_state_equal(ck[2]["regulariser"], ck[4]["regulariser"], "head after --reg-until")
    bank1, bank2, bank4 = (ck[s]["reg_extra"]["bank"] for s in (1, 2, 4))  # the bank is checkpointed ...
    assert (bank1["filled"], bank2["filled"], bank4["filled"]) == (8, 16, 16)  # ... and untouched after the switch
    assert torch.equal(bank2["queue"], bank4["queue"]) and bank2["ptr"] == bank4["ptr"]
    rows = _rows(tmp_path / "straight" / "metrics.jsonl")
    assert ["reg" in r for r in rows] == [True, True, False, False]
    # --reg-until is free to change on resume (recorded in the checkpoint's args).
    assert ck[4]["args"]["reg_until"] == 2
    train.main(train.get_args([*base[:-1], "0", "--exp-name", "split", "--max-steps", "5"]))
    assert "reg" in _rows(tmp_path / "split" / "metrics.jsonl")[-1]
    with pytest.raises(train.TrainError, match=r"^--reg-until -1 must be >= 0 \(0 = never stop\)$"):
        train.get_args([*base[:-1], "-1"])


@pytest.mark.skipif(os.environ.get("RUN_COMPILE_TESTS") != "1",
                    reason="torch.compile is slow on CPU: set RUN_COMPILE_TESTS=1")
def test_reg_until_with_compile(tmp_path):
    """--compile: SRA's steps (SiT returning block tokens, EMA teacher pass) then, after --reg-until, the
    same compiled SiT without the regulariser."""
    data = make_easy_dataset(str(tmp_path / "data"))
    train.main(train.get_args(["--data-dir", data, "--results-dir", str(tmp_path), *TINY_MODEL, "--compile",
                               "--global-batch-size", "8", "--num-workers", "0", "--device", "cpu", "--log-every", "1",
                               "--reg", "sra", "--reg-until", "1", "--max-steps", "2", "--exp-name", "c"]))
    rows = _rows(tmp_path / "c" / "metrics.jsonl")
    assert ["reg" in r for r in rows] == [True, False] and all(math.isfinite(r["loss"]) for r in rows)
