"""The seam a new objective plugs into (issue 21): loss.Context, the registry's hooks, SiT.hidden_at.

The objective is docs/adding_an_objective.md's example, executed as written (tests/seam_worker.py):
a regulariser that needs a second, no-grad forward pass (the EMA at a lower noise level, up to its
block). It registers itself, builds against the SiT, trains one step in-process and two ranks under
torchrun with an exact resume, and train.py is never edited for it.
"""
import copy
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import loss
import train
from conftest import TINY_MODEL, make_easy_dataset, run_train
from loss import Regulariser, build_regulariser, flag_problems, register
from models.sit import build_sit
from test_regularisers import assert_state_equal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seam_worker  # noqa: E402

FOUR_BLOCKS = ["--model", "custom", "--depth", "4", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "4"]


@pytest.fixture
def self_align(monkeypatch):
    """The doc's regulariser, registered for this test only."""
    monkeypatch.setattr(loss, "REGULARISERS", dict(loss.REGULARISERS))
    return seam_worker.register_doc_example()


def _args(*extra):
    return train.get_args(["--data-dir", "unused", *FOUR_BLOCKS, "--global-batch-size", "4", *extra])


def _sit():
    torch.manual_seed(0)
    sit = build_sit(None, depth=4, hidden_size=32, num_heads=2, patch_size=4, input_size=8, in_channels=1,
                    num_classes=3)
    with torch.no_grad():  # leave adaLN-Zero, so every block changes its input
        for p in sit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sit


def _step(module, args, seed=0):
    params = [p for p in module.parameters() if p.requires_grad]
    opt = train.make_optimizer(params, args)
    g = torch.Generator().manual_seed(seed)
    batch = (torch.randn(4, 1, 8, 8, generator=g), torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 1]))
    one, zero = torch.ones(1, 1, 1), torch.zeros(1, 1, 1)
    return train.train_step(module, opt, torch.amp.GradScaler("cpu", enabled=False), params, batch, args, one,
                            zero, None)


def test_hidden_at_runs_only_the_blocks_it_needs():
    sit = _sit().eval()
    calls = [0] * 4
    for i, block in enumerate(sit.blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: calls.__setitem__(i, calls[i] + 1))
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 2])
    _, want = sit(x, t, y, return_hidden_at=2)
    calls[:] = [0] * 4
    assert torch.equal(sit.hidden_at(x, t, y, 2), want)
    assert calls == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="block 5 is outside 1..4"):
        sit.hidden_at(x, t, y, 5)
    # The null-condition mask is the one forward would draw: same RNG call, same numbers.
    sit.train()
    torch.manual_seed(3)
    drawn = sit.condition_drop(1000, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.rand(1000) < sit.config.class_dropout_prob)


def test_doc_example_registers_builds_and_trains_one_step(self_align):
    assert "selfalign" in loss.REGULARISERS and flag_problems(self_align) == []
    args = _args("--reg", "selfalign", "--reg-depth", "1", "--align-depth", "2", "--align-t-gap", "0.3")
    assert args.reg_weight == 0.5  # Regulariser.default_weight
    sit = _sit()
    reg = build_regulariser(args, sit, 4, "cpu")
    assert (reg.depth, reg.teacher_depth, reg.gap) == (1, 2, 0.3)
    ema = copy.deepcopy(sit).requires_grad_(False).eval()
    module = train.TrainModule(sit, reg, ema).train()
    # The EMA is attached, not registered: outside parameters, state_dict and (so) DDP and the optimizer.
    assert all(k.startswith(("sit.", "reg.")) for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in sit.parameters()) + sum(
        p.numel() for p in reg.parameters())
    assert not ema.training and module.ema is ema

    seen, calls = [], [0] * 4
    for i, block in enumerate(ema.blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: calls.__setitem__(i, calls[i] + 1))
    forward = reg.forward
    reg.forward = lambda ctx: (seen.append(ctx), forward(ctx))[1]
    proj = [p.detach().clone() for p in reg.proj.parameters()]
    ema_before = copy.deepcopy(ema.state_dict())
    terms, flags = _step(module, args)
    assert not flags.any() and -1 <= terms["reg"].item() <= 1 and "align_cos" in terms
    assert calls == [1, 1, 0, 0]  # the teacher ran blocks 1..2 of the EMA, once
    assert all(not torch.equal(a, b) for a, b in zip(proj, reg.proj.parameters()))  # the projector trained
    assert_state_equal(ema_before, ema.state_dict(), "ema")  # no gradient step reaches the EMA
    assert all(p.grad is None for p in ema.parameters())
    ctx = seen[0]
    assert ctx.hidden.shape == (4, 4, 32) and ctx.hidden.requires_grad and ctx.ema is ema and ctx.sit is sit
    x_t, target = loss.interpolate("linear", ctx.x, ctx.noise, ctx.t)
    assert torch.equal(ctx.x_t, x_t) and torch.equal(ctx.target, target)
    # The context's teacher pass is the EMA's hidden_at at the student's condition, without gradient.
    assert ctx.drop.dtype == torch.bool and ctx.drop.shape == (4,)  # the student's null-condition mask
    with torch.no_grad():
        want = ema.hidden_at(ctx.x_t, ctx.t, ctx.y, 2, drop=ctx.drop)
        unconditional = ema.hidden_at(ctx.x_t, ctx.t, ctx.y, 2, drop=torch.ones(4, dtype=torch.bool))
    got = ctx.hidden_at(ctx.x_t, ctx.t, 2)
    assert torch.equal(got, want) and not got.requires_grad
    assert torch.equal(ctx.hidden_at(ctx.x_t, ctx.t, 2, y=ctx.y, drop=torch.ones(4, dtype=torch.bool)),
                       unconditional)

    # Without an EMA attached the teacher pass is a one-line error, not a silent other model.
    with pytest.raises(ValueError, match="no ema model in the context: build TrainModule"):
        _step(train.TrainModule(_sit(), build_regulariser(args, _sit(), 4, "cpu")).train(), args)


def test_doc_example_errors_are_one_line(self_align):
    with pytest.raises(ValueError, match="--reg selfalign declares no default block: pass --reg-depth"):
        build_regulariser(_args("--reg", "selfalign"), _sit(), 4, "cpu")  # never Repulsor's block silently
    with pytest.raises(ValueError, match="--align-depth 9 is outside 1..4 for this model"):
        build_regulariser(_args("--reg", "selfalign", "--reg-depth", "1", "--align-depth", "9"), _sit(), 4, "cpu")
    with pytest.raises(train.TrainError, match=r"^--align-t-gap 1.5 must be in \[0, 1\)$"):
        _args("--align-t-gap", "1.5")
    with pytest.raises(ValueError, match="registered already"):
        register(type("Other", (Regulariser,), {"name": "selfalign"}))


def test_every_flag_of_every_regulariser_is_must_match_or_free(self_align):
    """A flag a regulariser declares but that its class lists neither as must-match on resume nor as
    free to change would let a resume change the objective silently: register() refuses it."""
    known = set(vars(_args()))
    for name, cls in loss.REGULARISERS.items():
        assert flag_problems(cls) == [], name
        for key in cls.must_match + cls.free_to_change:
            assert key in known, f"{name} lists {key!r}, which train.py's arguments do not have"

    class Forgetful(Regulariser):
        name = "forgetful"
        must_match = Regulariser.must_match + ("listed",)

        @classmethod
        def add_args(cls, g):
            g.add_argument("--listed", type=int, default=1)
            g.add_argument("--forgotten", type=int, default=1)

    assert flag_problems(Forgetful) == ["--forgotten is in neither must_match nor free_to_change"]
    with pytest.raises(ValueError, match="regulariser 'forgetful': --forgotten is in neither"):
        register(Forgetful)
    Forgetful.must_match = ("listed",)  # forgetting the generic flags is caught too
    assert "--reg-weight is in neither must_match nor free_to_change" in flag_problems(Forgetful)
    assert "forgetful" not in loss.REGULARISERS


def test_resume_reads_the_registry(self_align, tmp_path):
    """The resume check uses the running regulariser's lists: the doc example's flag is refused, a
    flag Dispersive does not read (--bank-size, Repulsor's) may change."""
    data = make_easy_dataset(str(tmp_path / "data"))
    base = ["--data-dir", data, "--results-dir", str(tmp_path), *TINY_MODEL, "--global-batch-size", "8",
            "--num-workers", "0", "--device", "cpu", "--ckpt-every", "1", "--log-every", "1"]
    align = [*base, "--exp-name", "align", "--reg", "selfalign", "--reg-depth", "1"]
    train.main(train.get_args([*align, "--max-steps", "1"]))
    with pytest.raises(train.CheckpointError, match="trained with --align-t-gap 0.1 \\(now 0.2\\): resume with"):
        train.main(train.get_args([*align, "--max-steps", "2", "--align-t-gap", "0.2"]))
    disp = [*base, "--exp-name", "disp", "--reg", "dispersive"]
    train.main(train.get_args([*disp, "--max-steps", "1"]))
    train.main(train.get_args([*disp, "--max-steps", "2", "--bank-size", "32"]))
    with pytest.raises(train.CheckpointError, match="trained with --disp-margin 1.0 \\(now 2.0\\)"):
        train.main(train.get_args([*disp, "--max-steps", "3", "--disp-margin", "2"]))


def test_doc_example_trains_two_ranks_and_resumes_exactly(tmp_path):
    """2 ranks (gloo): 4 steps straight equal 2 steps + resume to 4, bitwise (SiT, EMA, projector)."""
    data = make_easy_dataset(str(tmp_path / "data"))
    common = ["--data-dir", data, "--results-dir", str(tmp_path), *TINY_MODEL, "--global-batch-size", "8",
              "--lr", "1e-3", "--ckpt-every", "2", "--log-every", "1", "--ema-decay", "0.5", "--reg", "selfalign",
              "--reg-depth", "1", "--align-depth", "2"]
    worker = dict(nproc=2, script=os.path.join("tests", "seam_worker.py"))
    with ThreadPoolExecutor(max_workers=2) as pool:  # the straight run and the first half, side by side
        runs = [pool.submit(run_train, common + ["--exp-name", name, "--max-steps", steps], **worker)
                for name, steps in (("straight", "4"), ("split", "2"))]
        [r.result() for r in runs]
    proc = run_train(common + ["--exp-name", "split", "--max-steps", "4"], **worker)
    assert "resumed from" in proc.stdout + proc.stderr
    a = torch.load(tmp_path / "straight" / "checkpoints" / "0000004.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoints" / "0000004.pt", weights_only=False)
    for key in ("model", "ema", "regulariser"):
        assert_state_equal(a[key], b[key], key)
    assert set(a["regulariser"]) == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias"}
    assert a["args"]["align_t_gap"] == 0.1 and a["args"]["reg"] == "selfalign"
    with open(tmp_path / "straight" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(-1 <= r["reg"] <= 1 for r in rows)
    assert rows[-1]["align_cos"] != rows[0]["align_cos"]


def test_build_regulariser_old_call_still_works():
    """build_regulariser(args, model_name, hidden_size, depth, global_batch, device, tokens=, image_shape=):
    the call of scripts written before the builders received the SiT."""
    args = train.get_args(["--data-dir", "unused", "--reg", "repulsor", "--proj-hidden", "8", "--bank-size", "16"])
    reg = build_regulariser(args, "SiT-XL/2", 64, 28, 16, "cpu", tokens=16)
    assert reg.depth == 8 and reg.head[0].in_features == 64
    with pytest.raises(TypeError, match="build_regulariser"):
        build_regulariser(args, _sit(), 16, "cpu", 3)
