"""train.py under faults: non-finite steps, resume edge cases, the run lock, flag values, a fresh clone.

Most runs here call train.main in-process (one CPU process, tiny model): fast, and faults can be
injected by monkeypatching. Multi-rank behaviour runs under real torchrun (gloo).
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
from checkpoint import RunLock, load_checkpoint
from conftest import ROOT, TINY_MODEL, make_easy_dataset, run_train
from dataset import write_dataset
from loss import build_regulariser
from models.sit import build_sit
from train import NonFiniteGuard, TrainError, TrainModule, get_args, make_optimizer, train_step, update_ema


def _args(data, res, *extra):
    return get_args(["--data-dir", data, "--results-dir", str(res), "--exp-name", "run", *TINY_MODEL,
                     "--global-batch-size", "8", "--lr", "1e-3", "--num-workers", "0", "--device", "cpu",
                     "--log-every", "1", *extra])


def _ckpts(res):
    d = os.path.join(res, "run", "checkpoints")
    return sorted(f for f in os.listdir(d) if f.endswith(".pt"))


def _metric_steps(res):
    with open(os.path.join(res, "run", "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def _poison_grads_from(monkeypatch, first_step: int, last_step: int = 10**9):
    """From the first_step-th call on, the loss keeps its finite value but its gradients are NaN
    (the gradient of an unselected torch.where branch through sqrt of a negative number)."""
    calls = {"n": 0}
    original = train.velocity_loss

    def velocity_loss(pred, target):
        calls["n"] += 1
        loss = original(pred, target)
        if first_step <= calls["n"] <= last_step:
            loss = loss + torch.where(torch.tensor(True), 0.0, torch.sqrt(-pred.float().pow(2).sum() - 1))
        return loss

    monkeypatch.setattr(train, "velocity_loss", velocity_loss)


# ----------------------------------------------------------------------------- non-finite steps
def _tiny_step_setup(precision="no"):
    args = get_args(["--data-dir", "unused", *TINY_MODEL, "--global-batch-size", "4", "--mixed-precision", precision])
    torch.manual_seed(0)
    sit = build_sit(None, depth=2, hidden_size=64, num_heads=2, patch_size=4, input_size=16, in_channels=1,
                    num_classes=4)
    reg = build_regulariser(args, sit, 4, "cpu")
    module = TrainModule(sit, reg).train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = make_optimizer(params, args)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    batch = (torch.randn(4, 1, 16, 16), torch.zeros(4, 1, 16, 16), torch.randint(0, 4, (4,)))
    one, zero = torch.ones(1, 1, 1), torch.zeros(1, 1, 1)
    return args, sit, module, params, opt, scaler, amp, batch, one, zero


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_nonfinite_gradient_with_finite_loss_never_reaches_weights_optimizer_or_ema(monkeypatch, precision):
    args, sit, module, params, opt, scaler, amp, batch, one, zero = _tiny_step_setup(precision)
    train_step(module, opt, scaler, params, batch, args, one, zero, amp)  # one good step: optimizer state exists
    ema = [p.detach().clone() for p in sit.parameters()]
    ema_model = build_sit(None, depth=2, hidden_size=64, num_heads=2, patch_size=4, input_size=16, in_channels=1,
                          num_classes=4)
    ema_model.load_state_dict(sit.state_dict())
    weights = [p.detach().clone() for p in params]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state.items()}
    _poison_grads_from(monkeypatch, 1)
    terms, flags = train_step(module, opt, scaler, params, batch, args, one, zero, amp)
    assert torch.isfinite(terms["loss"]) and not torch.isfinite(terms["grad_norm"])
    assert flags.tolist() == [False, False, True]
    assert all(torch.equal(a, b) for a, b in zip(weights, params))
    for k, s in opt.state.items():  # moments and the step counter stay as they were
        assert all(torch.equal(state[k][n], v) for n, v in s.items()), k
    guard = NonFiniteGuard(torch.device("cpu"), fp16=precision == "fp16", max_consecutive=100)
    update_ema(ema_model, sit, 0.5, guard.record(2, flags))
    assert all(torch.equal(a, b) for a, b in zip(ema, ema_model.parameters()))


def test_train_step_never_syncs_with_the_host(monkeypatch):
    """Reading a tensor on the host (item, bool, tolist, float) stalls a GPU stream: train_step must not."""
    for precision in ("no", "fp16"):
        args, sit, module, params, opt, scaler, amp, batch, one, zero = _tiny_step_setup(precision)
        train_step(module, opt, scaler, params, batch, args, one, zero, amp)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, name, lambda *a, _n=name: (_ for _ in ()).throw(AssertionError(f"host sync: {_n}")))
            terms, flags = train_step(module, opt, scaler, params, batch, args, one, zero, amp)
        assert torch.isfinite(terms["loss"]) and not flags.any()


def test_nonfinite_gradients_stop_the_run_before_any_checkpoint_or_ema(tmp_path, monkeypatch):
    data = make_easy_dataset(str(tmp_path / "data"))
    res = tmp_path / "res"
    _poison_grads_from(monkeypatch, 3)
    with pytest.raises(TrainError, match=r"gradient norm is non-finite with a finite loss at step 3 "
                                         r"\(--mixed-precision no\).*lower --lr"):
        train.main(_args(data, res, "--max-steps", "6", "--ckpt-every", "2", "--log-every", "5"))
    assert _ckpts(res) == ["0000002.pt"]  # the step-4 checkpoint would hold NaN weights
    ckpt = load_checkpoint(str(res / "run" / "checkpoints" / "0000002.pt"))
    assert all(torch.isfinite(v).all() for k in ("model", "ema") for v in ckpt[k].values())


def test_fp16_skips_overflowing_steps_and_stops_after_a_streak(tmp_path, monkeypatch):
    data = make_easy_dataset(str(tmp_path / "data"))
    res = tmp_path / "res"
    _poison_grads_from(monkeypatch, 3, 4)  # two bad steps: skipped, the run goes on
    train.main(_args(data, res, "--max-steps", "6", "--ckpt-every", "6", "--mixed-precision", "fp16"))
    ckpt = load_checkpoint(str(res / "run" / "checkpoints" / "0000006.pt"))
    assert ckpt["opt"]["state"][0]["step"].item() == 4  # 6 steps, 2 skipped
    assert all(torch.isfinite(v).all() for k in ("model", "ema") for v in ckpt[k].values())
    with open(res / "run" / "metrics.jsonl") as f:
        assert [json.loads(line)["skipped_steps"] for line in f] == [0, 0, 1, 2, 2, 2]

    _poison_grads_from(monkeypatch, 1)
    with pytest.raises(TrainError, match=r"3 fp16 steps in a row were non-finite, from step 7"):
        train.main(_args(data, res, "--max-steps", "12", "--ckpt-every", "6", "--mixed-precision", "fp16",
                         "--max-skipped-steps", "3"))
    assert _ckpts(res) == ["0000006.pt"]


def test_nonfinite_input_is_reported_as_bad_data(tmp_path):
    mean = np.random.default_rng(0).standard_normal((64, 1, 16, 16)).astype(np.float16)
    mean[40] = np.inf
    bad = str(tmp_path / "inf")
    write_dataset(bad, mean, None, np.zeros(64, np.int64), num_classes=4)
    proc = run_train(["--data-dir", bad, "--results-dir", str(tmp_path / "res"), *TINY_MODEL,
                      "--global-batch-size", "16", "--max-steps", "8", "--ckpt-every", "1"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    msg = [line for line in proc.stderr.splitlines() if line.startswith("error:")][0]
    assert "holds non-finite latents: bad data in" in msg and "lower --lr" not in msg
    ckpt_dir = tmp_path / "res" / "custom-d2-w64-h2-p4-none" / "checkpoints"
    step = int(msg.split("of step ")[1].split()[0])  # the checkpoints stop right before the bad step
    assert sorted(os.listdir(ckpt_dir)) == [f"{s:07d}.pt" for s in range(1, step)]


# ----------------------------------------------------------------------------- resume
def test_resume_refuses_seed_accumulation_and_other_data(tmp_path):
    data = make_easy_dataset(str(tmp_path / "data"))
    res = tmp_path / "res"
    train.main(_args(data, res, "--max-steps", "2", "--ckpt-every", "2"))
    with pytest.raises(train.CheckpointError, match="trained with --seed 0 \\(now 1\\)"):
        train.main(_args(data, res, "--max-steps", "4", "--seed", "1"))
    with pytest.raises(train.CheckpointError, match="trained with --grad-accum-steps 1 \\(now 2\\)"):
        train.main(_args(data, res, "--max-steps", "4", "--grad-accum-steps", "2"))
    other = make_easy_dataset(str(tmp_path / "other"), n=72)  # same shape and classes, other items
    with pytest.raises(train.CheckpointError, match="trained on other data than .*other \\(count 64 vs 72\\)"):
        train.main(_args(other, res, "--max-steps", "4"))


def test_resume_switches_to_fp16_and_keeps_the_fused_optimizer(tmp_path):
    data = make_easy_dataset(str(tmp_path / "data"))
    res = tmp_path / "res"
    train.main(_args(data, res, "--max-steps", "2", "--ckpt-every", "2"))
    path = res / "run" / "checkpoints" / "0000002.pt"
    ckpt = torch.load(path, weights_only=False)
    for group in ckpt["opt"]["param_groups"]:  # as written by a run on a device without fused AdamW
        group.update(fused=None, foreach=True)
    torch.save(ckpt, path)
    train.main(_args(data, res, "--max-steps", "4", "--ckpt-every", "2", "--mixed-precision", "fp16"))
    after = load_checkpoint(str(res / "run" / "checkpoints" / "0000004.pt"))
    assert after["scaler"]["scale"] > 0 and after["opt"]["param_groups"][0]["fused"] is True
    assert not after["opt"]["param_groups"][0]["foreach"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_newest_checkpoint_falls_back_and_stale_temp_files_go(tmp_path, damage, capsys):
    data = make_easy_dataset(str(tmp_path / "data"))
    res = tmp_path / "res"
    train.main(_args(data, res, "--max-steps", "4", "--ckpt-every", "2"))
    ckpt_dir = res / "run" / "checkpoints"
    bad = ckpt_dir / "0000004.pt"
    content = bad.read_bytes()
    bad.write_bytes({"garbage": b"not a checkpoint" * 100, "truncated": content[: len(content) // 2],
                     "empty": b""}[damage])
    damaged = bad.read_bytes()
    stale = ckpt_dir / "0000006.pt.tmp-999999"
    stale.write_bytes(b"x" * 1000)
    capsys.readouterr()
    train.main(_args(data, res, "--max-steps", "5", "--ckpt-every", "5"))
    out = capsys.readouterr().out
    good = ckpt_dir / "0000002.pt"
    line = [line for line in out.splitlines() if str(bad) in line][0]  # damaged, what is used instead, how to pick
    size = "empty" if damage == "empty" else f"{len(damaged)} bytes, truncated or not written by torch.save"
    assert line.endswith(f"checkpoint {bad} is damaged ({size}) and cannot be read; left in place, resuming from "
                         f"{good} instead (--resume PATH picks another checkpoint)"), line
    assert "_use_new_zipfile_serialization" not in out and f"resumed from {good} at step 2" in out
    assert bad.read_bytes() == damaged  # left in place for inspection
    with pytest.raises(train.CheckpointError, match=f"^checkpoint {bad} is damaged .* cannot be read: pass another "
                                                    "--resume PATH, or --resume auto for the run's newest readable"):
        train.main(_args(data, res, "--max-steps", "6", "--resume", str(bad)))
    assert not stale.exists()
    assert _metric_steps(res) == [1, 2, 3, 4, 5]  # the steps past the checkpoint were logged once


def test_a_legacy_format_checkpoint_still_loads(tmp_path):
    """mmap needs torch's zip format; a file saved in the legacy format is not damaged and loads without it."""
    path = str(tmp_path / "0000001.pt")
    torch.save({"step": 1, "w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    assert load_checkpoint(path)["step"] == 1


def test_metrics_with_a_partial_line_and_a_failing_plot_do_not_stop_training(tmp_path, monkeypatch):
    data = make_easy_dataset(str(tmp_path / "data"))
    res = tmp_path / "res"
    train.main(_args(data, res, "--max-steps", "4", "--ckpt-every", "2"))
    with open(res / "run" / "metrics.jsonl", "a") as f:  # a crash after step 5 was logged, mid-way through step 6
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
    train.main(_args(data, res, "--max-steps", "6", "--ckpt-every", "6"))  # plots with the partial line present
    assert _metric_steps(res) == [1, 2, 3, 4, 5, 6]
    assert (res / "run" / "loss_curve.png").stat().st_size > 1000

    def broken_plot(run_dir):
        raise RuntimeError("no display")

    monkeypatch.setattr(train, "plot_loss_curve", broken_plot)
    train.main(_args(data, res, "--max-steps", "8", "--ckpt-every", "2"))
    assert _ckpts(res)[-1] == "0000008.pt"


# ----------------------------------------------------------------------------- one writer per run
def test_second_writer_is_refused_and_a_dead_holder_does_not_block(tmp_path):
    data = make_easy_dataset(str(tmp_path / "data"))
    res = tmp_path / "res"
    (res / "run").mkdir(parents=True)
    holder = RunLock(str(res / "run"))
    holder.acquire()
    try:
        with pytest.raises(train.CheckpointError, match=f"is in use by another training run \\(pid {os.getpid()} on"):
            train.main(_args(data, res, "--max-steps", "2"))
    finally:
        holder.release()
    assert not (res / "run" / "config.json").exists()  # the refused run wrote nothing

    # A holder killed with SIGKILL leaves the file behind, but not the lock.
    code = f"import sys, time; sys.path.insert(0, {ROOT!r}); from checkpoint import RunLock; " \
           f"RunLock({str(res / 'run')!r}).acquire(); print('locked', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    train.main(_args(data, res, "--max-steps", "2", "--ckpt-every", "2"))
    assert _ckpts(res) == ["0000002.pt"]


def test_default_exp_name_includes_the_size():
    base = ["--data-dir", "d"]
    assert get_args(base + ["--model", "SiT-B/2", "--reg", "repulsor"]).exp_name == "SiT-B_2-repulsor"
    assert get_args(base + TINY_MODEL).exp_name == "custom-d2-w64-h2-p4-none"
    assert get_args(base + ["--model", "SiT-S/2", "--depth", "6", "--qk-norm"]).exp_name == "SiT-S_2-d6-qknorm-none"


@pytest.mark.parametrize("flags, message", [
    (["--global-batch-size", "0"], "--global-batch-size 0 must be at least 1"),
    (["--ckpt-every", "0"], "--ckpt-every 0 must be at least 1"),
    (["--log-every", "0"], "--log-every 0 must be at least 1"),
    (["--cfg-prob", "2"], "--cfg-prob 2.0 must be in [0, 1)"),
    (["--ema-decay", "1.5"], "--ema-decay 1.5 must be in [0, 1]"),
    (["--temperature", "0"], "--temperature 0.0 must be > 0"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps 0 must be at least 1"),
    (["--lr", "-1"], "--lr -1.0 must be > 0"),
])
def test_bad_flag_values_are_one_line_errors(flags, message):
    with pytest.raises(TrainError) as e:
        get_args(["--data-dir", "d", *flags])
    assert str(e.value) == message


def test_bad_flag_value_from_the_command_line(tmp_path):
    proc = run_train(["--data-dir", "d", "--results-dir", str(tmp_path), "--ckpt-every", "0"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --ckpt-every 0 must be at least 1"


def test_unwritable_results_dir_is_a_one_line_error(tmp_path):
    data = make_easy_dataset(str(tmp_path / "data"))
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(TrainError, match="cannot write to .*file/run/checkpoints.*pass a writable --results-dir"):
        train.main(_args(data, tmp_path / "file"))


# ----------------------------------------------------------------------------- several ranks
def test_two_ranks_resume_from_rank_0s_choice(tmp_path):
    """Rank 1 sees an older checkpoint list (a node-local disk, a cached NFS listing): both ranks must still
    resume from rank 0's choice, and the run continue bit-exactly."""
    data = make_easy_dataset(str(tmp_path / "data"))
    common = ["--data-dir", data, "--results-dir", str(tmp_path), *TINY_MODEL, "--global-batch-size", "8",
              "--lr", "1e-3", "--ckpt-every", "2", "--log-every", "2", "--reg", "repulsor", "--bank-size", "16",
              "--proj-hidden", "32"]
    run_train(common + ["--exp-name", "straight", "--max-steps", "6"], nproc=2)
    run_train(common + ["--exp-name", "split", "--max-steps", "4"], nproc=2)
    worker = os.path.join(ROOT, "tests", "train_stale_listing_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
                           "--num-workers", "0", "--device", "cpu", *common, "--exp-name", "split", "--max-steps", "6"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "0000004.pt at step 4" in proc.stdout
    a = load_checkpoint(str(tmp_path / "straight" / "checkpoints" / "0000006.pt"))
    b = load_checkpoint(str(tmp_path / "split" / "checkpoints" / "0000006.pt"))
    for key in ("model", "ema", "regulariser"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert torch.equal(a["reg_extra"]["bank"]["queue"], b["reg_extra"]["bank"]["queue"])


# ----------------------------------------------------------------------------- preemption
def _same_weights(a_path, b_path):
    a, b = load_checkpoint(str(a_path)), load_checkpoint(str(b_path))
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert a["opt"]["state"][0]["step"] == b["opt"]["state"][0]["step"]


def test_stop_signal_saves_at_the_step_and_the_same_command_resumes_bitwise(tmp_path, monkeypatch):
    """SIGUSR1 to the process and SIGTERM to its DataLoader worker (a scheduler signals every process of
    the job) at step 3: the step finishes, a checkpoint at step 3 is written, the lock released, the
    handlers restored and main returns --preempt-exit-code; the rerun ends equal to a straight run."""
    import multiprocessing

    data = make_easy_dataset(str(tmp_path / "data"))
    flags = ["--max-steps", "6", "--ckpt-every", "100", "--num-workers", "1"]
    assert train.main(_args(data, tmp_path / "straight", *flags)) == 0
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    ema_decay = train.ema_decay

    def signalled_at_3(args, step):
        if step == 3:
            for worker in multiprocessing.active_children():  # sent by another process, as a scheduler's is
                subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.2)  # the worker is gone before the loop goes on
        return ema_decay(args, step)

    monkeypatch.setattr(train, "ema_decay", signalled_at_3)
    res = tmp_path / "split"
    assert train.main(_args(data, res, *flags, "--preempt-exit-code", "3")) == 3
    assert _ckpts(res) == ["0000003.pt"] and _metric_steps(res) == [1, 2, 3]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before
    lock = RunLock(str(res / "run"))
    lock.acquire()  # flock is per open file: this fails while the run's own descriptor still holds it
    lock.release()
    monkeypatch.setattr(train, "ema_decay", ema_decay)
    assert train.main(_args(data, res, *flags, "--preempt-exit-code", "3")) == 0
    _same_weights(tmp_path / "straight" / "run" / "checkpoints" / "0000006.pt", res / "run" / "checkpoints" / "0000006.pt")
    with pytest.raises(SystemExit):  # an exit status is a byte
        get_args(["--data-dir", "d", "--preempt-exit-code", "256"])


def test_stop_marker_reaches_ranks_that_were_not_signalled(tmp_path):
    """sample_ddp.py and preprocessing/ ranks work without a per-step collective: the first signalled rank
    leaves a marker on the shared output that stops the others; the rerun clears it."""
    from distributed import StopSignals

    marker = str(tmp_path / "stop")
    signalled, other = StopSignals(marker), StopSignals(marker)
    assert not signalled.requested() and not other.requested()
    with signalled:
        os.kill(os.getpid(), signal.SIGTERM)
    assert signalled.requested() and other.requested() and os.path.isfile(marker)
    assert (signalled.why(), other.why()) == ("SIGTERM", "a stop signal to another rank")
    other.clear_marker()
    assert not other.requested() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_two_ranks_stop_together_on_sigterm_to_torchrun_or_a_signal_to_one_worker(tmp_path):
    """Real torchrun, gloo: (a) SIGTERM to the launcher mid-run (it forwards the signal to its workers);
    (b) SIGUSR1 to worker rank 1 only, at step 4. Either way both ranks stop after the same step
    (the per-step all-reduce of the stop flag), that step's checkpoint is the only one, and the same
    command resumes to a final checkpoint bitwise equal to an uninterrupted run's."""
    data = make_easy_dataset(str(tmp_path / "data"))
    common = ["--data-dir", data, "--results-dir", str(tmp_path), *TINY_MODEL, "--global-batch-size", "8",
              "--lr", "1e-3", "--max-steps", "10", "--ckpt-every", "100", "--log-every", "1"]
    run_train(common + ["--exp-name", "straight"], nproc=2)
    straight = tmp_path / "straight" / "checkpoints" / "0000010.pt"
    worker = os.path.join(ROOT, "tests", "train_preempt_worker.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
              "--num-workers", "0", "--device", "cpu", *common]

    # (a) An external SIGTERM to torchrun once step 2 is logged (steps slowed to 0.3 s, so it lands mid-run).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PREEMPT_SLOW="0.3")
    proc = subprocess.Popen(launch + ["--exp-name", "term"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    metrics, deadline = tmp_path / "term" / "metrics.jsonl", time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    saved = os.listdir(tmp_path / "term" / "checkpoints")
    assert len(saved) == 1 and 2 <= int(saved[0][:7]) < 10, (saved, err[-3000:])
    assert f"stopped by SIGTERM at step {int(saved[0][:7])}" in out, out[-3000:]
    assert 'train_preempt_worker.py", line' not in err and 'train.py", line' not in err, err[-3000:]  # clean exits
    proc = run_train(common + ["--exp-name", "term"], nproc=2)
    assert f"resumed from {tmp_path / 'term' / 'checkpoints' / saved[0]}" in proc.stdout
    _same_weights(straight, tmp_path / "term" / "checkpoints" / "0000010.pt")

    # (b) Rank 1 alone receives SIGUSR1 at step 4: rank 0 learns it through the collective.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PREEMPT_SELF="1:4:SIGUSR1")
    proc = subprocess.run(launch + ["--exp-name", "usr1"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=240)
    assert proc.returncode == 0 and "stopped by SIGUSR1 at step 4" in proc.stdout, proc.stderr[-3000:]
    assert os.listdir(tmp_path / "usr1" / "checkpoints") == ["0000004.pt"]
    run_train(common + ["--exp-name", "usr1"], nproc=2)
    _same_weights(straight, tmp_path / "usr1" / "checkpoints" / "0000010.pt")


# ----------------------------------------------------------------------------- a fresh clone
def test_no_tracked_file_is_a_symlink_or_points_outside():
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    links = [line.split("\t", 1)[1] for line in listed.stdout.splitlines() if line.startswith("120000")]
    assert links == [], f"tracked symlinks break fresh clones: {links}"
    for path in listed.stdout.splitlines():
        name = path.split("\t", 1)[1]
        assert os.path.realpath(os.path.join(ROOT, name)).startswith(os.path.realpath(ROOT) + os.sep), name


def test_nonfinite_projections_never_enter_the_memory_bank():
    from memory_bank import MemoryBank

    bank = MemoryBank(size=8, dim=3, global_batch=4)
    first = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    bank.enqueue(first)
    bank.enqueue(torch.ones(4, 3))
    bad = torch.ones(4, 3)
    bad[1, 2] = float("nan")
    bad[3, 0] = float("inf")
    bank.enqueue(bad)  # wraps onto the first batch's rows
    assert torch.isfinite(bank.queue).all()
    assert torch.equal(bank.queue[[1, 3]], first[[1, 3]]) and torch.equal(bank.queue[[0, 2]], torch.ones(2, 3))


ENTRY_POINTS = ["train.py", "sample_ddp.py", "demo.py", "preprocessing/encode.py", "preprocessing/memory.py",
                "evaluations/evaluate.py", "benchmarks/convergence.py", "benchmarks/memory.py",
                "benchmarks/train_throughput.py"]


@pytest.mark.parametrize("script", ENTRY_POINTS + ["-m evaluations.evaluate"])
def test_entry_points_start_from_any_working_directory(tmp_path, script):
    if script.startswith("-m") and os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")):
        pytest.skip("python -m from anywhere needs the .venv that setup.sh made")
    cmd = script.split() if script.startswith("-m") else [os.path.join(ROOT, script)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, *cmd, "--help"], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_flags_shared_with_sample_ddp_have_the_same_defaults():
    """A flag both scripts take means the same by default; sample_ddp.py's None means 'the checkpoint's'."""
    import sample_ddp

    trained = vars(get_args(["--data-dir", "d"]))
    sampled = vars(sample_ddp.build_parser().parse_args(["--ckpt", "c"]))
    shared = set(trained) & set(sampled)
    assert {"seed", "device", "tf32", "path_type", "model"} <= shared
    differ = {k: (trained[k], sampled[k]) for k in shared if sampled[k] is not None and trained[k] != sampled[k]}
    assert differ == {}


def test_main_first_builds_on_rank_zero_before_the_others_and_shares_its_error(monkeypatch):
    """REPA's hub encoder is downloaded by rank 0 alone, before any other rank builds; a rank 0 error
    reaches the other ranks through the broadcast, without them calling fn (simulated ranks)."""
    from types import SimpleNamespace

    events = []
    rank0_error = ValueError("encoder 'x' not found: pass a hub id or a file")
    for rank, shared in ((0, None), (1, None), (1, rank0_error)):
        def broadcast(obj, shared=shared):
            events.append("broadcast")
            return obj if rank == 0 else shared  # rank 1 receives what rank 0 sent
        monkeypatch.setattr(train, "broadcast_from_main", broadcast)
        events.clear()
        info = SimpleNamespace(is_main=rank == 0)
        if shared is None:
            assert train.main_first(info, lambda: events.append("build") or "reg") == "reg"
            assert events == (["build", "broadcast"] if rank == 0 else ["broadcast", "build"])
        else:
            with pytest.raises(ValueError, match="not found"):
                train.main_first(info, lambda: events.append("build"))
            assert events == ["broadcast"]
    monkeypatch.setattr(train, "broadcast_from_main", lambda obj: obj)

    def fail():
        raise ValueError("bad encoder")
    with pytest.raises(ValueError, match="bad encoder"):
        train.main_first(SimpleNamespace(is_main=True), fail)


def test_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A checkpoint write that hits a full disk (injected ENOSPC after part of the file) is one
    CheckpointError line naming the path and the bytes needed; the partial file is gone and the
    previous checkpoint loads. The same for a sample chunk of sample_ddp.py."""
    import errno

    import checkpoint
    import sample_ddp

    ckpt_dir = tmp_path / "checkpoints"
    good = str(ckpt_dir / "0000001.pt")
    checkpoint.save_checkpoint(good, {"step": 1, "w": torch.ones(10)})
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save_checkpoint(str(ckpt_dir / "0000002.pt"), {"step": 2, "w": torch.ones(1000)})
    msg = str(e.value)
    assert "\n" not in msg and "no space left writing" in msg and "0000002.pt" in msg and "0.0 MB needed" in msg
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(ckpt_dir)) == ["0000001.pt"]  # no partial or temporary file left
    assert load_checkpoint(good)["step"] == 1

    def full_disk_npy(f, arr, *a, **k):
        f.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk_npy)
    with pytest.raises(sample_ddp.SampleError) as e:
        sample_ddp.save_chunk(str(tmp_path), 0, 4, np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4))
    assert "\n" not in str(e.value) and "no space left" in str(e.value) and "rerun resumes" in str(e.value)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_skip_flag_is_exactly_zero_or_one_and_dist_timeout_is_a_flag(monkeypatch):
    """The fused AdamW kernel reads found_inf as 0 (apply) or 1 (skip): by construction, not by the reduce."""
    args = get_args(["--data-dir", "x", *TINY_MODEL, "--global-batch-size", "4", "--device", "cpu"])
    assert args.dist_timeout_min == 60.0
    torch.manual_seed(0)
    sit = build_sit(None, depth=2, hidden_size=32, num_heads=2, patch_size=4, input_size=8, in_channels=4,
                    num_classes=3)
    module = TrainModule(sit, build_regulariser(args, sit, 4, "cpu"))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = make_optimizer(params, args)
    seen = []
    real_step = opt.step
    monkeypatch.setattr(opt, "step", lambda: (seen.append(opt.found_inf.clone()), real_step()))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    scale, shift = torch.ones(4, 1, 1), torch.zeros(4, 1, 1)
    batch = (torch.randn(4, 4, 8, 8), torch.zeros(4, 4, 8, 8), torch.randint(0, 3, (4,)))
    train_step(module, opt, scaler, params, batch, args, scale, shift, None)
    bad = (batch[0] * float("nan"), batch[1], batch[2])
    train_step(module, opt, scaler, params, bad, args, scale, shift, None)
    assert [s.item() for s in seen] == [0.0, 1.0] and all(s.dtype == torch.float32 for s in seen)
    with pytest.raises(TrainError, match="--dist-timeout-min 0.0 must be > 0"):
        get_args(["--data-dir", "x", "--dist-timeout-min", "0"])


def test_persistent_workers_keep_the_data_order_across_epochs_and_resume(tmp_path):
    """One DataLoader with persistent workers for the whole run: across epoch boundaries and a resume it
    trains exactly as the in-process loader (--num-workers 0)."""
    data = make_easy_dataset(str(tmp_path / "data"), n=48)  # 3 steps an epoch at batch 16
    common = ["--data-dir", data, *TINY_MODEL, "--global-batch-size", "16", "--lr", "1e-3", "--log-every", "1",
              "--ckpt-every", "4"]
    run_train([*common, "--results-dir", str(tmp_path / "a"), "--exp-name", "run", "--max-steps", "8"])
    run_train([*common, "--results-dir", str(tmp_path / "b"), "--exp-name", "run", "--max-steps", "4",
               "--num-workers", "2"])
    run_train([*common, "--results-dir", str(tmp_path / "b"), "--exp-name", "run", "--max-steps", "8",
               "--num-workers", "2"])
    a = load_checkpoint(str(tmp_path / "a" / "run" / "checkpoints" / "0000008.pt"))
    b = load_checkpoint(str(tmp_path / "b" / "run" / "checkpoints" / "0000008.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
