"""One-shot check of the training step, the sampler and the FID extractor on a rented CUDA GPU (an H200).

Device command (the working tree travels with .gpu_carry/, which benchmarks/gpu_prepare.sh fills):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_carry/whl/*.whl && \
        PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py --out $OUT

CPU dry run (the same code path at tiny sizes, about half a minute; tests/test_gpu_scripts.py runs it):

    .venv/bin/python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check-dry

GPU time is scarce, so the run has a hard wall-clock budget (--budget-s): every section first checks the
time left and is recorded as "skipped: budget" when it would not fit; a watchdog ends the process at the
deadline (the section then running is recorded as "killed: budget"). Every section runs in try/except,
records its error and lets the next one run; gpu_check.json and gpu_check.md in --out are rewritten after
every section (and within long ones), so whatever happens the results so far are on disk. Sections, in
order (cheap and most wanted first, torch.compile's compilations last):

  machine          device, torch / CUDA versions, date
  matrix_eager     SiT-B/2, batch 256, bf16, random 4x32x32 latents and 1000 classes, train.py's real step
                   (train_step + NonFiniteGuard.record + update_ema on the objects train.py builds) for
                   --reg none, dispersive, repulsor (bank K 65536, pre-filled) and repa (a DINOv2-B/14 with
                   random weights on 256 px uint8 images resized to 224): one step under
                   torch.cuda.set_sync_debug_mode("error") (any host sync raises), ms/step, MFU, peak memory
  repa_style       the same SiT and batch with "REPA's choices" (written below, labelled): eager, non-fused
                   AdamW (foreach=False), fp16 autocast + GradScaler, loss.item() every step, a Python EMA loop
  nonfinite_guard  a NaN batch and a NaN gradient on CUDA: the step is skipped on the device (weights,
                   AdamW moments and EMA bitwise unchanged), the flags are set, NonFiniteGuard stops the run
  resume           train.py's checkpoint dict (model, EMA, AdamW, Repulsor bank, RNG) saved, loaded into
                   freshly built objects by train.restore_training_state: the next step is bitwise equal
  speed_eager      SiT-B/2 and SiT-XL/2 at batch 64 and 256 (--reg none): ms/step, images/s, MFU, memory
  inception        FID Inception-v3 feature extraction, images/s (random weights when the real ones are absent)
  sampling         SiT-XL/2 (random weights) Euler-Maruyama SDE with CFG 1.8 on t in [0, 0.7], batch 256:
                   short probes in bf16 and fp32 (TF32), extrapolated to 250 steps by the count of model
                   evaluations; the full 250 steps when they fit in --sample-full-max-s
  sample_ddp_e2e   sample_ddp.py end to end (its main(), in this warm process, 2,048 images) against
                   samplers.sample alone, same model, steps, batch and precision. sample_ddp.py refuses
                   4-channel latents without a VAE (and this machine has none), so both sides use a
                   pixel-space SiT-XL/2 on 3x32x32 (the same 256 tokens, so the same cost per image); fewer
                   SDE steps than 250, chosen from the sampling probe so that each side takes about
                   --e2e-target-s (per-step overheads weigh the same; per-batch ones more than at 250 steps)
  matrix_compiled  as matrix_eager with sit.compile() (train.py --compile): sync-free step, first-step loss
                   terms against eager's (same init, batch and RNG) within bf16 tolerance, speed, memory
  speed_compiled   as speed_eager with sit.compile()

Compile settings: static shapes (a train.py run has one batch shape), a raised recompile limit (one process
compiles many models) and inductor's fallback_random, so the label-dropout draw inside the compiled SiT uses
eager's RNG kernel and the compiled step sees exactly eager's dropout mask. All models get small random
values in their zero-initialised weights (adaLN-Zero, final layer; see perturb_zero_init): the cost is the
same, but the blocks are no longer identities, so numerical checks compare real work.
MFU: analytic FLOPs (benchmarks/overhead.py's approx_gflop: matmuls, fwd + bwd = 3 x fwd) / time / --peak-tflops.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from dataset import data_fingerprint, make_manifest, sample_latents  # noqa: E402
from loss import Repulsor, build_regulariser, interpolate, sample_time, velocity_loss  # noqa: E402
from models.sit import build_sit  # noqa: E402
from overhead import approx_gflop  # noqa: E402  (benchmarks/ is this script's directory)
from samplers import sample, time_grid  # noqa: E402
from train import (NonFiniteGuard, TrainError, TrainModule, get_args, make_optimizer,  # noqa: E402
                   manifest_for_sampling, restore_training_state, rng_state, train_step, update_ema)

REGS = ("none", "dispersive", "repulsor", "repa")
# Compiled: the regulariser reads block 4's output for repulsor and repa (one SiT graph, compiled once) and
# block 3's for dispersive; the likeliest to fit the budget first.
COMPILED_ORDER = ("none", "repulsor", "repa", "dispersive")
# Tiny stand-ins for the dry run: the tables keep the real names so the code path is the same.
DRY_MODELS = {"SiT-B/2": (2, 64, 2, 2), "SiT-XL/2": (3, 96, 2, 2)}  # depth, width, heads, patch
DRY_ENCODER = '{"embed_dim": 32, "depth": 1, "num_heads": 2}'


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def one_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}"[:600]


def default_out() -> str:
    return os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results", "gpu")


# ----------------------------------------------------------------------------------------------
# The report: JSON + markdown rewritten after every section, the budget and its watchdog


class Report:
    """Results of one run as JSON (and markdown via `render`), rewritten after every section.

    `section(name, need_s, fn)` runs fn(result_dict) unless fewer than need_s seconds are left; an exception is
    recorded (one line plus a short traceback) and never propagates. A watchdog thread ends the process at the
    deadline, after marking the running section "killed: budget" and stopping registered subprocesses.
    """

    def __init__(self, out_dir: str, name: str, budget_s: float, render, data: dict | None = None):
        os.makedirs(out_dir, exist_ok=True)
        self.json_path = os.path.join(out_dir, f"{name}.json")
        self.md_path = os.path.join(out_dir, f"{name}.md")
        self.render = render
        self.t0 = time.time()
        self.deadline = self.t0 + budget_s
        self.lock = threading.RLock()
        self.children: list[subprocess.Popen] = []  # stopped by the watchdog
        self.at_exit: list = []  # called by the watchdog before it ends the process (e.g. removing scratch files)
        self.current: str | None = None  # the section running now, since current_t0
        self.current_t0 = 0.0
        self.data = data if data is not None else {
            "script": name, "argv": sys.argv[1:], "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "budget_s": budget_s, "sections": {}, "checks": [], "errors": [],
        }

    def remaining(self) -> float:
        return self.deadline - time.time()

    def write(self) -> None:
        with self.lock:
            self.data["elapsed_s"] = round(time.time() - self.t0, 1)
            tmp = f"{self.json_path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1, default=str)
            os.replace(tmp, self.json_path)
            try:
                text = self.render(self.data)
            except Exception as e:  # noqa: BLE001  (a table bug must not lose the JSON)
                text = f"markdown rendering failed: {one_line(e)}\n"
            with open(f"{self.md_path}.tmp", "w") as f:
                f.write(text)
            os.replace(f"{self.md_path}.tmp", self.md_path)

    def error(self, where: str, e: BaseException) -> str:
        msg = one_line(e)
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-2000:]
        with self.lock:
            self.data["errors"].append({"where": where, "error": msg, "traceback": tb})
        log(f"ERROR in {where}: {msg}")
        return msg

    def check(self, name: str, ok: bool | None, detail: str) -> None:
        """A pass/fail result (None: not applicable here, e.g. sync debugging on a CPU)."""
        with self.lock:
            self.data["checks"].append({"name": name, "pass": ok, "detail": detail})
        log(f"check {'PASS' if ok else 'n/a' if ok is None else 'FAIL'}: {name} ({detail})")

    def section(self, name: str, need_s: float, fn) -> dict | None:
        left = self.remaining()
        record = self.data["sections"].setdefault(name, {})
        if left < need_s:
            record.update(status=f"skipped: budget (needs ~{need_s:.0f} s, {max(left, 0):.0f} s left)", seconds=0)
            log(f"section {name}: {record['status']}")
            self.write()
            return None
        log(f"section {name} (~{need_s:.0f} s needed, {left:.0f} s left)")
        result: dict = {}
        record.update(status="running", result=result)
        self.current, self.current_t0 = name, time.time()
        self.write()
        t = time.time()
        try:
            fn(result)
            status = "ok"
        except Exception as e:  # noqa: BLE001  (recorded; the next section still runs)
            status = "error"
            record["error"] = self.error(name, e)
        with self.lock:
            record.update(status=status, seconds=round(time.time() - t, 1))
            self.current = None
        log(f"section {name}: {status} in {record['seconds']} s")
        self.write()
        return result

    def start_watchdog(self) -> None:
        def watch() -> None:
            while self.remaining() > 0:
                time.sleep(min(1.0, max(self.remaining(), 0.01)))
            try:
                for p in list(self.children):
                    stop_process(p, grace_s=0)
                for _ in range(5):  # the main thread may be changing a result dict while we serialise it
                    try:
                        with self.lock:
                            if self.current is not None:
                                self.data["sections"][self.current].update(
                                    status="killed: budget", seconds=round(time.time() - self.current_t0, 1))
                            self.data["killed_at_deadline"] = True
                            self.write()
                        break
                    except RuntimeError:
                        time.sleep(0.05)
            finally:
                for fn in self.at_exit:
                    fn()
                log(f"budget of {self.data['budget_s']} s spent: stopped")
                os._exit(0)

        threading.Thread(target=watch, daemon=True).start()


def report_only(out_dir: str, name: str, render) -> None:
    """Rewrite OUT/NAME.md from OUT/NAME.json (the committed tables are checked this way); exit 2 without it."""
    path = os.path.join(out_dir, f"{name}.json")
    if not os.path.isfile(path):
        sys.exit(f"error: {path} does not exist: run without --report-only first (or pass --out)")
    with open(path) as f:
        text = render(json.load(f))
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text)
    print(text)


def stop_process(p: subprocess.Popen, grace_s: float = 10) -> None:
    """End a subprocess started with start_new_session=True, and its own children (SIGTERM, then SIGKILL)."""
    if p.poll() is not None:
        return
    try:
        if grace_s > 0:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=grace_s)
            return
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def scratch_dir(prefix: str) -> str:
    """A temporary directory in RAM (/dev/shm) when it has room for multi-GB checkpoints, else on disk."""
    shm = "/dev/shm"
    use = os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 8 * 2 ** 30
    return tempfile.mkdtemp(prefix=prefix, dir=shm if use else None)


# ----------------------------------------------------------------------------------------------
# Settings: the GPU run and its tiny CPU twin


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output directory (default: $OUT, else benchmarks/results/gpu)")
    p.add_argument("--budget-s", type=float, default=300, help="hard wall-clock budget of the whole run")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny models, batches and image counts on the CPU (compile with the 'eager' backend)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 10; dry 2)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200 SXM)")
    p.add_argument("--sample-full-max-s", type=float, default=20.0,
                   help="run the full 250-step SDE only if the probe predicts at most this many seconds")
    p.add_argument("--e2e-target-s", type=float, default=10.0, help="sampling seconds per side of the e2e test")
    p.add_argument("--inception-weights", choices=("auto", "random"), default=None,
                   help="auto: the real FID weights when evaluations finds them offline, else random; random: always "
                        "(default: auto; the dry run: random, the path the GPU machine takes)")
    p.add_argument("--skip", nargs="*", default=[], help="section names to skip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true", help="only rewrite --out's gpu_check.md from its JSON")
    g = p.parse_args()
    g.out = g.out or default_out()
    g.inception_weights = g.inception_weights or ("random" if g.dry_run else "auto")
    g.device = torch.device("cpu" if g.dry_run or not torch.cuda.is_available() else "cuda")
    dry = g.dry_run
    g.input_size, g.channels = (8 if dry else 32), 4
    g.num_classes = 10 if dry else 1000
    g.image_size = 8 * g.input_size  # SD-VAE: 256 px images for 32 x 32 latents
    g.batch, g.small_batch = (4, 2) if dry else (256, 64)
    g.bank_size = 64 if dry else 65536
    g.steps = g.steps or (1 if dry else 10)
    g.warmup = 1 if dry else 3
    g.extra = ["--proj-hidden", "64", "--repa-encoder-config", DRY_ENCODER] if dry else []
    g.compile_kwargs = {"backend": "eager"} if dry else {}  # eager backend: dynamo traces, no inductor build on CPU
    g.sample_batch, g.probe_steps, g.sample_steps = (4, 2, 20) if dry else (256, 10, 250)
    g.cfg_scale, g.guidance_high = 1.8, 0.7
    g.e2e_images, g.e2e_batch = (8, 4) if dry else (2048, 256)
    g.inception_images, g.inception_batch, g.inception_size = (2, 2, 32) if dry else (2048, 256, 256)
    # Seconds each section needs at least on the GPU (a compile of SiT-B/2 takes tens of seconds).
    g.need = dict(machine=1, matrix_eager=25, repa_style=8, nonfinite_guard=5, resume=12, speed_eager=15, inception=8,
                  sampling=15, sample_ddp_e2e=30, matrix_compiled=45, speed_compiled=45)
    g.need_compile = 1 if dry else 45  # per compiled configuration inside a section
    return g


def model_flags(g: argparse.Namespace, name: str) -> list[str]:
    if not g.dry_run:
        return ["--model", name]
    d, w, h, p = DRY_MODELS[name]
    return ["--model", "custom", "--depth", str(d), "--hidden-size", str(w), "--num-heads", str(h),
            "--patch-size", str(p)]


def train_args(g: argparse.Namespace, model: str, reg: str, batch: int) -> argparse.Namespace:
    """train.py's parsed arguments for one configuration: its defaults, bf16, the benchmark's batch and bank."""
    argv = ["--data-dir", "unused", "--reg", reg, "--global-batch-size", str(batch), "--mixed-precision", "bf16",
            "--bank-size", str(g.bank_size), "--repa-encoder", "random", "--seed", str(g.seed), "--ema-warmup",
            *model_flags(g, model), *g.extra]
    return get_args(argv)


def build_model(g: argparse.Namespace, args: argparse.Namespace, device: torch.device, channels: int | None = None):
    """The SiT as train.py builds it, created on `device` directly (an XL/2 initialises in seconds on the CPU)."""
    name = None if args.model == "custom" else args.model
    with torch.device(device):
        return build_sit(name, depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads,
                         patch_size=args.patch_size, input_size=g.input_size, in_channels=channels or g.channels,
                         num_classes=g.num_classes, class_dropout_prob=args.cfg_prob).to(device)  # pos_embed: numpy


@torch.no_grad()
def perturb_zero_init(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Small seeded noise in every all-zero parameter (adaLN-Zero modulations, the final layer, biases).

    At init adaLN-Zero makes every block an identity and the output exactly 0: a step then barely
    exercises the network, compiled-vs-eager agreement is trivial and sampled images are constant. The
    cost of a step does not depend on the values. Same seed and device: the same weights in every copy."""
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same values on any device
    for p in model.parameters():
        if not p.any():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * std)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_batch(g: argparse.Namespace, n: int, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """(mean, std, labels, uint8 images) as the data loader yields them; the same for the same n and seed."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, g.channels, g.input_size, g.input_size)
    return (torch.randn(shape, generator=gen).to(device), torch.zeros(shape).to(device),
            torch.randint(0, g.num_classes, (n,), generator=gen).to(device),
            torch.randint(0, 256, (n, g.image_size, g.image_size, 3), generator=gen, dtype=torch.uint8).to(device))


class Trainer:
    """One configuration as train.py builds and steps it: SiT (+ sit.compile()), regulariser, TrainModule,
    fused AdamW, EMA with warm-up, NonFiniteGuard; step() is train.py's loop body without the data loader."""

    def __init__(self, g: argparse.Namespace, model: str, reg: str, batch: int, device: torch.device,
                 compiled: bool = False, init_seed: int | None = None, prefill_bank: bool = True):
        self.args = args = train_args(g, model, reg, batch)
        self.device, self.batch_size, self.compiled = device, batch, compiled
        torch.manual_seed(g.seed if init_seed is None else init_seed)
        sit = build_model(g, args, device)
        perturb_zero_init(sit, g.seed if init_seed is None else init_seed)
        self.tokens = (g.input_size // sit.config.patch_size) ** 2
        named = None if args.model == "custom" or args.depth is not None else args.model
        self.reg = build_regulariser(args, named, sit.config.hidden_size, sit.config.depth, batch, device,
                                     tokens=self.tokens, image_shape=(g.image_size, g.image_size, 3)).to(device)
        if prefill_bank and isinstance(self.reg, Repulsor) and self.reg.bank.size:  # steady state: a full bank
            gen = torch.Generator().manual_seed(g.seed + 1)
            queue = F.normalize(torch.randn(self.reg.bank.size, self.reg.bank.dim, generator=gen), dim=1)
            self.reg.bank.load_state_dict({"queue": queue, "ptr": 0, "filled": self.reg.bank.size})
        self.ema = copy.deepcopy(sit).requires_grad_(False).eval()
        self.module = TrainModule(sit, self.reg).train()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, args)
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)
        self.guard = NonFiniteGuard(device, fp16=False, max_consecutive=args.max_skipped_steps)
        self.scale = torch.ones(g.channels, 1, 1, device=device)
        self.shift = torch.zeros(g.channels, 1, 1, device=device)
        self.sit, self.step_count = sit, 0
        if compiled:
            sit.compile(**g.compile_kwargs)  # in place, as train.py --compile

    def step(self, batch: tuple[torch.Tensor, ...]) -> tuple[dict, torch.Tensor]:
        if not self.reg.needs_images:  # images travel only to a regulariser that reads them, as in train.py
            batch = batch[:3]
        terms, nonfinite = train_step(self.module, self.opt, self.scaler, self.params, batch, self.args,
                                      self.scale, self.shift, torch.bfloat16)
        self.step_count += 1
        applied = self.guard.record(self.step_count, nonfinite)
        s = self.step_count
        decay = min(self.args.ema_decay, (1 + s) / (10 + s)) if self.args.ema_warmup else self.args.ema_decay
        update_ema(self.ema, self.sit, decay, applied)
        return terms, nonfinite

    def gflop(self) -> dict[str, float]:
        return approx_gflop(SimpleNamespace(batch_size=self.batch_size), self.sit.config, self.reg, self.tokens)


def sync_free_step(step, device: torch.device) -> tuple[bool | None, str]:
    """Run step() once; on CUDA under torch.cuda.set_sync_debug_mode("error"), so any host sync inside raises."""
    if device.type != "cuda":
        step()
        return None, "n/a on the CPU"
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as e:
        return False, one_line(e)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return True, "no host sync in the step"


def speed(tr, batch, g: argparse.Namespace, device: torch.device) -> dict:
    """Mean ms/step over g.steps steps (one sync at the end, as a training loop), images/s, TFLOP/s, MFU,
    and the allocator's peak during one more step (CUDA only)."""
    sync(device)
    t = time.perf_counter()
    for _ in range(g.steps):
        tr.step(batch)
    sync(device)
    sec = (time.perf_counter() - t) / g.steps
    out = {"ms_per_step": round(1000 * sec, 2), "images_per_s": round(tr.batch_size / sec, 1)}
    if hasattr(tr, "gflop"):
        parts = tr.gflop()
        total = sum(parts.values())
        out.update(gflop_per_step={k: round(v, 1) for k, v in parts.items()}, tflops=round(total / sec / 1e3, 1),
                   mfu=round(total * 1e9 / sec / (g.peak_tflops * 1e12), 4))
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        tr.step(batch)
        sync(device)
        out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return out


def first_step(tr, batch, g: argparse.Namespace, device: torch.device) -> dict:
    """The first step from a fixed RNG state (the same for eager and compiled); includes compilation."""
    torch.manual_seed(g.seed + 1)
    sync(device)
    t = time.perf_counter()
    terms, nonfinite = tr.step(batch)
    sync(device)
    return {"first_step_s": round(time.perf_counter() - t, 2), "finite": not bool(nonfinite.any()),
            "terms": {k: float(v) for k, v in terms.items()}}


# ----------------------------------------------------------------------------------------------
# Sections


def section_machine(g, report: Report, res: dict) -> None:
    res.update(device=str(g.device), torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               cpus=os.cpu_count(), date=datetime.datetime.now().isoformat(timespec="seconds"), dry_run=g.dry_run)
    if g.device.type == "cuda":
        prop = torch.cuda.get_device_properties(g.device)
        res.update(name=torch.cuda.get_device_name(g.device), capability=f"{prop.major}.{prop.minor}",
                   memory_gib=round(prop.total_memory / 2 ** 30, 1), cudnn=torch.backends.cudnn.version())
    else:
        res.update(name=f"CPU ({platform.processor() or platform.machine()})")
    for dist_name in ("timm", "torch-fidelity", "diffusers"):  # metadata only: importing diffusers takes seconds
        try:
            res[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            res[dist_name] = "absent"
    res["compile"] = {"backend": g.compile_kwargs.get("backend", "inductor"), "automatic_dynamic_shapes": False,
                      "recompile_limit": 64, "inductor_fallback_random": True}
    report.data["machine"] = res


def section_matrix(g, report: Report, res: dict, mode: str) -> None:
    """Every regulariser at SiT-B/2, batch g.batch: correctness (sync-free, finite, compiled vs eager) and speed."""
    device = g.device
    batch = make_batch(g, g.batch, device, g.seed)
    eager = (report.data["sections"].get("matrix_eager") or {}).get("result") or {}
    for reg in COMPILED_ORDER if mode == "compiled" else REGS:
        if mode == "compiled" and report.remaining() < g.need_compile:
            res[reg] = {"status": f"skipped: budget ({report.remaining():.0f} s left)"}
            report.write()
            continue
        row = res[reg] = {"status": "running"}
        tr = None
        try:
            tr = Trainer(g, "SiT-B/2", reg, g.batch, device, compiled=mode == "compiled")
            row.update(first_step(tr, batch, g, device))
            for _ in range(g.warmup - 1):
                tr.step(batch)
            ok, detail = sync_free_step(lambda: tr.step(batch), device)
            row["sync_free"] = {"pass": ok, "detail": detail}
            report.check(f"no host sync in the {mode} step, --reg {reg}", ok, detail)
            row.update(speed(tr, batch, g, device))
            row["skipped_steps"] = tr.guard.check(tr.args, "(benchmark: no checkpoints)")  # raises if non-finite
            row["reg_params_m"] = round(sum(p.numel() for p in tr.reg.parameters()) / 1e6, 2)
            if mode == "compiled" and "terms" in eager.get(reg, {}):
                row["vs_eager"] = compare_terms(row["terms"], eager[reg]["terms"])
                report.check(f"compiled first step matches eager within bf16 tolerance, --reg {reg}",
                             row["vs_eager"]["pass"], row["vs_eager"]["detail"])
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001
            row.update(status="error", error=report.error(f"matrix_{mode}/{reg}", e))
        finally:
            del tr
            free(device)
        log(f"  {mode} {reg}: {row.get('ms_per_step', '-')} ms/step, peak {row.get('peak_gib', '-')} GiB")
        report.write()


def compare_terms(compiled: dict, eager: dict, rtol: float = 2e-2, atol: float = 1e-3) -> dict:
    """|compiled - eager| <= atol + rtol |eager| for every loss term of the first step (bf16 autocast)."""
    diffs, bad = {}, []
    for k in sorted(set(compiled) & set(eager)):
        d = abs(compiled[k] - eager[k])
        diffs[k] = d
        if not d <= atol + rtol * abs(eager[k]):
            bad.append(f"{k} {compiled[k]:.6g} vs {eager[k]:.6g}")
    detail = ("; ".join(bad) if bad else "max abs diff " + f"{max(diffs.values(), default=0):.2e}") + \
             f" (rtol {rtol}, atol {atol})"
    return {"pass": not bad, "detail": detail, "abs_diff": diffs}


class RepaStyleStep:
    """'REPA's choices' around this repository's SiT, batch and objective (--reg none), for comparison only:
    eager (no compile), non-fused per-parameter AdamW (foreach=False), fp16 autocast with a GradScaler,
    a host read of the loss every step (loss.item()) and a per-parameter Python EMA loop. Written for this
    benchmark after REPA's training loop as described in its paper and README (no code copied)."""

    def __init__(self, g: argparse.Namespace, batch: int, device: torch.device):
        self.args = args = train_args(g, "SiT-B/2", "none", batch)
        torch.manual_seed(g.seed)
        self.sit = build_model(g, args, device)
        perturb_zero_init(self.sit, g.seed)
        self.sit.train()
        self.ema = copy.deepcopy(self.sit).requires_grad_(False).eval()
        self.params = list(self.sit.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                     weight_decay=args.weight_decay, foreach=False, fused=False)
        self.scaler = torch.amp.GradScaler(device.type)
        self.scale = torch.ones(g.channels, 1, 1, device=device)
        self.shift = torch.zeros(g.channels, 1, 1, device=device)
        self.device, self.batch_size = device, batch

    def step(self, batch: tuple[torch.Tensor, ...]) -> float:
        mean, std, labels = batch[:3]
        args = self.args
        x = sample_latents(mean, std, self.scale, self.shift)
        t = sample_time(x.shape[0], args.time_sampling, self.device)
        x_t, target = interpolate(args.path_type, x, torch.randn_like(x), t)
        with torch.autocast(self.device.type, dtype=torch.float16):
            pred = self.sit(x_t, t, labels)
        loss = velocity_loss(pred, target)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm)
        self.scaler.step(self.opt)  # reads found_inf on the host
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        d = args.ema_decay
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.sit.parameters()):
                p_ema.mul_(d).add_(p, alpha=1 - d)
        return loss.item()


def section_repa_style(g, report: Report, res: dict) -> None:
    batch = make_batch(g, g.batch, g.device, g.seed)
    tr = RepaStyleStep(g, g.batch, g.device)
    for _ in range(g.warmup):
        tr.step(batch)
    res.update(speed(tr, batch, g, g.device))
    res["last_loss"] = tr.step(batch)
    res["choices"] = "eager, AdamW(foreach=False, fused=False), fp16 autocast + GradScaler, loss.item() per step, " \
                     "per-parameter EMA loop"
    del tr
    free(g.device)


def state_snapshot(tr: Trainer) -> dict[str, list[torch.Tensor]]:
    """Copies of everything a skipped step must leave alone: weights, EMA, AdamW moments and step counts."""
    opt_state = [v.detach().clone() for p in tr.params for v in tr.opt.state[p].values() if torch.is_tensor(v)]
    return {"weights": [p.detach().clone() for p in tr.params],
            "ema": [p.detach().clone() for p in tr.ema.parameters()], "adamw": opt_state}


def unchanged(before: dict, tr: Trainer) -> dict[str, bool]:
    now = state_snapshot(tr)
    return {k: all(torch.equal(a, b) for a, b in zip(before[k], now[k])) for k in before}


def section_nonfinite(g, report: Report, res: dict) -> None:
    """A NaN batch and, separately, a NaN gradient with a finite loss: skipped on the device, flags set."""
    device = g.device
    tr = Trainer(g, "SiT-B/2", "repulsor", g.small_batch, device)
    batch = make_batch(g, g.small_batch, device, g.seed)[:3]
    tr.step(batch)  # AdamW moments exist
    cases = {}
    poisoned = (batch[0].clone(), batch[1], batch[2])
    poisoned[0][0, 0, 0, 0] = float("nan")
    for case, data, expect in (("nan_input", poisoned, [True, True, True]), ("nan_grad", batch, [False, False, True])):
        tr.guard = NonFiniteGuard(device, fp16=False, max_consecutive=tr.args.max_skipped_steps)
        before = state_snapshot(tr)
        hook = None
        if case == "nan_grad":  # finite input and loss, a NaN gradient in one weight (multiplied in on the device)
            hook = tr.sit.final_layer.linear.weight.register_hook(lambda grad: grad * float("nan"))
        box = {}
        ok_sync, detail_sync = sync_free_step(lambda: box.update(flags=tr.step(data)[1]), device)
        if hook is not None:
            hook.remove()
        flags = box["flags"].tolist()
        same = unchanged(before, tr)
        try:
            tr.guard.check(tr.args, "(benchmark)")
            stopped = "not stopped"
        except TrainError as e:
            stopped = one_line(e)
        ok = flags == expect and all(same.values()) and stopped.startswith("TrainError")
        cases[case] = {"flags_input_loss_grad": flags, "expected": expect, "unchanged": same, "guard": stopped,
                       "sync_free": {"pass": ok_sync, "detail": detail_sync}, "pass": ok}
        report.check(f"non-finite guard skips the step ({case})", ok,
                     f"flags {flags}, unchanged {same}, guard: {stopped[:120]}")
        if ok_sync is not None:
            report.check(f"no host sync in a skipped step ({case})", ok_sync, detail_sync)
    res.update(cases)
    del tr
    free(device)


def section_resume(g, report: Report, res: dict) -> None:
    """Save train.py's checkpoint dict mid-run, restore it into fresh objects: is the next step bitwise equal?"""
    device = g.device
    torch.use_deterministic_algorithms(True, warn_only=True)  # e.g. attention backward: run-to-run identical
    work = scratch_dir("gpu-check-resume-")
    try:
        batch = make_batch(g, g.small_batch, device, g.seed)[:3]
        manifest = make_manifest(count=g.small_batch, latent_shape=[g.channels, g.input_size, g.input_size],
                                 num_classes=g.num_classes, shard_counts=[g.small_batch], source="random batch")
        a = Trainer(g, "SiT-B/2", "repulsor", g.small_batch, device, prefill_bank=False)
        torch.manual_seed(g.seed + 7)
        for _ in range(2):
            a.step(batch)
        path = os.path.join(work, f"{a.step_count:07d}.pt")
        save_checkpoint(path, {  # the dict train.py writes
            "model": a.sit.state_dict(), "ema": a.ema.state_dict(), "regulariser": a.reg.state_dict(),
            "reg_extra": a.reg.extra_state(), "opt": a.opt.state_dict(), "scaler": a.scaler.state_dict(),
            "step": a.step_count, "rng": [rng_state(device)], "args": vars(a.args),
            "model_config": a.sit.config.to_dict(), "data": manifest_for_sampling(manifest),
            "data_fingerprint": data_fingerprint(manifest)})
        res["checkpoint_mb"] = round(os.path.getsize(path) / 2 ** 20, 1)
        reference = next_step(a, batch)
        del a
        free(device)

        def resumed() -> dict:
            b = Trainer(g, "SiT-B/2", "repulsor", g.small_batch, device, init_seed=g.seed + 99, prefill_bank=False)
            parts = dict(sit=b.sit, ema=b.ema, reg=b.reg, opt=b.opt, scaler=b.scaler)
            b.step_count = restore_training_state(load_checkpoint(path), path, b.args, manifest, parts, 1, 0, device,
                                                  lambda m: None, None)
            out = next_step(b, batch)
            del b
            free(device)
            return out

        again = resumed()
        diff = compare_states(reference, again)
        ok = not diff
        res.update(bitwise_equal=ok, differences=diff)
        if not ok:  # is the step itself reproducible? a second restore tells kernels from lost state
            res["control_second_restore_differences"] = compare_states(again, resumed())
        report.check("save/resume round trip: the next step is bitwise equal", ok,
                     "loss terms, weights, EMA, bank and AdamW state identical" if ok else "; ".join(diff)[:300])
    finally:
        torch.use_deterministic_algorithms(False)
        shutil.rmtree(work, ignore_errors=True)


def next_step(tr: Trainer, batch) -> dict:
    terms, _ = tr.step(batch)
    out = {"terms": {k: v.detach().float().cpu() for k, v in terms.items()},
           "weights": [p.detach().cpu().clone() for p in tr.params],
           "ema": [p.detach().cpu().clone() for p in tr.ema.parameters()],
           "bank": tr.reg.bank.queue.detach().cpu().clone(),
           "adamw": [v.detach().cpu().clone() for p in tr.params for v in tr.opt.state[p].values()
                     if torch.is_tensor(v)]}
    return out


def compare_states(a: dict, b: dict) -> list[str]:
    diff = []
    for k, v in a["terms"].items():
        if not torch.equal(v, b["terms"][k]):
            diff.append(f"term {k}: {v.item():.8g} vs {b['terms'][k].item():.8g}")
    for k in ("weights", "ema", "adamw"):
        n = sum(not torch.equal(x, y) for x, y in zip(a[k], b[k]))
        if n:
            worst = max((x.float() - y.float()).abs().max().item() for x, y in zip(a[k], b[k]))
            diff.append(f"{k}: {n} tensors differ (max abs {worst:.2e})")
    if not torch.equal(a["bank"], b["bank"]):
        diff.append("bank differs")
    return diff


def section_speed(g, report: Report, res: dict, mode: str) -> None:
    """SiT-B/2 and SiT-XL/2 at batch 64 and 256, --reg none (B/2 at 256 is the matrix's none row)."""
    device = g.device
    matrix = (report.data["sections"].get(f"matrix_{mode}") or {}).get("result") or {}
    for model in ("SiT-B/2", "SiT-XL/2"):
        for bs in (g.small_batch, g.batch):
            key = f"{model} batch {bs}"
            if model == "SiT-B/2" and bs == g.batch and matrix.get("none", {}).get("status") == "ok":
                res[key] = {"status": "ok", "from": f"matrix_{mode}", **{k: matrix["none"][k] for k in (
                    "ms_per_step", "images_per_s", "tflops", "mfu", "peak_gib", "first_step_s") if k in matrix["none"]}}
                continue
            if mode == "compiled" and report.remaining() < g.need_compile:
                res[key] = {"status": f"skipped: budget ({report.remaining():.0f} s left)"}
                continue
            row = res[key] = {"status": "running"}
            tr = None
            try:
                tr = Trainer(g, model, "none", bs, device, compiled=mode == "compiled")
                batch = make_batch(g, bs, device, g.seed)[:3]
                row.update(first_step(tr, batch, g, device))
                for _ in range(g.warmup - 1):
                    tr.step(batch)
                row.update(speed(tr, batch, g, device))
                row["params_m"] = round(sum(p.numel() for p in tr.sit.parameters()) / 1e6, 1)
                row["status"] = "ok"
            except torch.cuda.OutOfMemoryError as e:
                row.update(status="out of memory", detail=one_line(e))
            except Exception as e:  # noqa: BLE001
                row.update(status="error", error=report.error(f"speed_{mode}/{key}", e))
            finally:
                del tr
                free(device)
            log(f"  {mode} {key}: {row.get('ms_per_step', '-')} ms/step")
            report.write()


def sampling_model(g, channels: int, device: torch.device):
    """SiT-XL/2 with random weights (final layer and adaLN small-random: outputs are not zero), eval, fp32."""
    args = train_args(g, "SiT-XL/2", "none", g.sample_batch)
    torch.manual_seed(g.seed)
    model = build_model(g, args, device, channels)
    perturb_zero_init(model, g.seed)
    return model.eval().requires_grad_(False)


def sde_evaluations(steps: int, high: float, low: float = 0.0) -> int:
    """Model evaluations of the SDE sampler in units of one batch: a guided step runs a doubled batch."""
    ts = time_grid("sde", steps)
    return sum(2 if low <= ts[i] <= high else 1 for i in range(steps))


def section_sampling(g, report: Report, res: dict) -> None:
    device = g.device
    model = sampling_model(g, g.channels, device)
    n = g.sample_batch
    gen = torch.Generator(device=device).manual_seed(g.seed)
    noise = torch.randn((n, g.channels, g.input_size, g.input_size), generator=gen, device=device)
    labels = torch.randint(0, g.num_classes, (n,), generator=gen, device=device)

    def run(steps: int, autocast) -> tuple[float, torch.Tensor]:
        sync(device)
        t = time.perf_counter()
        z = sample(model, noise, labels, mode="sde", num_steps=steps, cfg_scale=g.cfg_scale, guidance_low=0.0,
                   guidance_high=g.guidance_high, generator=gen, autocast_dtype=autocast)
        sync(device)
        return time.perf_counter() - t, z

    res.update(model="SiT-XL/2 (random weights)", batch=n, steps=g.sample_steps, cfg_scale=g.cfg_scale,
               guidance=[0.0, g.guidance_high],
               latent=[g.channels, g.input_size, g.input_size])
    full_cost = sde_evaluations(g.sample_steps, g.guidance_high)
    for name, dtype in (("bf16", torch.bfloat16), ("fp32 (TF32)", None)):
        run(2, dtype)  # warm-up
        sec, z = run(g.probe_steps, dtype)
        per_eval = sec / sde_evaluations(g.probe_steps, g.guidance_high)
        est = per_eval * full_cost
        res[name] = {"probe_steps": g.probe_steps, "probe_s": round(sec, 3),
                     "per_batch_eval_ms": round(1000 * per_eval, 2),
                     f"estimated_{g.sample_steps}_step_s": round(est, 2),
                     "estimated_images_per_s": round(n / est, 2), "finite": bool(torch.isfinite(z).all())}
        report.write()
    est = res["bf16"][f"estimated_{g.sample_steps}_step_s"]
    if est <= g.sample_full_max_s and report.remaining() > est + g.need["sample_ddp_e2e"]:
        sec, z = run(g.sample_steps, torch.bfloat16)
        res["bf16"].update(measured_steps=g.sample_steps, measured_s=round(sec, 2), images_per_s=round(n / sec, 2),
                           finite_full=bool(torch.isfinite(z).all()), nonzero=bool(z.abs().sum() > 0))
    else:
        res["bf16"]["full_run"] = f"not run: estimated {est:.0f} s > --sample-full-max-s or the budget"
    report.check("SDE samples are finite", all(res[k]["finite"] for k in ("bf16", "fp32 (TF32)")), "bf16 and fp32")
    del model
    free(device)


def section_e2e(g, report: Report, res: dict) -> None:
    """sample_ddp.py end to end (subprocess) against samplers.sample alone on the same checkpointed model."""
    device = g.device
    sampling = (report.data["sections"].get("sampling") or {}).get("result") or {}
    per_eval = (sampling.get("bf16") or {}).get("per_batch_eval_ms")
    n, b = g.e2e_images, g.e2e_batch
    batches = -(-n // b)
    if g.dry_run or per_eval is None:
        steps = 3 if g.dry_run else 10
    else:  # the largest step count whose sampling takes about --e2e-target-s per side
        steps = 2
        while steps < g.sample_steps and batches * sde_evaluations(steps + 1, g.guidance_high) * per_eval / 1e3 \
                <= g.e2e_target_s:
            steps += 1
    precision = "bf16" if device.type == "cuda" else "fp32"
    autocast = torch.bfloat16 if precision == "bf16" else None
    res.update(model="SiT-XL/2, pixel space 3x32x32 (256 tokens), random weights" if not g.dry_run else
               "tiny stand-in, pixel space 3 channels", images=n, batch=b, mode="sde", steps=steps,
               cfg_scale=g.cfg_scale, guidance=[0.0, g.guidance_high], precision=precision,
               note="sample_ddp.py needs 1 or 3 channels without a VAE (no VAE on this machine): pixel-space SiT")
    work = scratch_dir("gpu-check-e2e-")
    try:
        model = sampling_model(g, 3, device)
        manifest = make_manifest(count=1, latent_shape=[3, g.input_size, g.input_size], num_classes=g.num_classes,
                                 shard_counts=[1], vae="none", source="random weights (gpu_check)")
        ckpt = os.path.join(work, "0000000.pt")
        t = time.time()
        torch.save({"ema": model.state_dict(), "model_config": model.config.to_dict(), "step": 0,
                    "data": manifest_for_sampling(manifest), "args": {"path_type": "linear"}}, ckpt)
        res["checkpoint_save_s"] = round(time.time() - t, 1)

        gen = torch.Generator(device=device).manual_seed(g.seed)
        sample(model, torch.randn(b, 3, g.input_size, g.input_size, device=device),
               torch.zeros(b, dtype=torch.long, device=device), mode="sde", num_steps=2, cfg_scale=g.cfg_scale,
               guidance_high=g.guidance_high, autocast_dtype=autocast)  # warm-up
        sync(device)
        t = time.perf_counter()
        for s in range(0, n, b):
            m = min(b, n - s)
            noise = torch.randn(m, 3, g.input_size, g.input_size, generator=gen, device=device)
            labels = torch.randint(0, g.num_classes, (m,), generator=gen, device=device)
            sample(model, noise, labels, mode="sde", num_steps=steps, cfg_scale=g.cfg_scale,
                   guidance_high=g.guidance_high, generator=gen, autocast_dtype=autocast)
        sync(device)
        alone = time.perf_counter() - t
        res.update(sampler_alone_s=round(alone, 2), sampler_alone_images_per_s=round(n / alone, 2))
        del model
        free(device)
        report.write()

        # In this process (its CUDA context and kernels are warm, as for the sampler above): the real main(), with
        # checkpoint loading, weight hashing, per-image CPU noise, uint8 conversion, chunk files and the npz.
        import sample_ddp

        out_npz = os.path.join(work, "samples.npz")
        argv = ["--ckpt", ckpt, "--num-samples", str(n), "--per-proc-batch-size", str(b), "--mode", "sde",
                "--num-steps", str(steps), "--cfg-scale", str(g.cfg_scale), "--guidance-high", str(g.guidance_high),
                "--precision", precision, "--out", out_npz, "--device", device.type]
        res["command"] = "sample_ddp.py " + " ".join(argv)
        t = time.perf_counter()
        rc = sample_ddp.main(argv)
        wall = time.perf_counter() - t
        if rc != 0:
            raise RuntimeError(f"sample_ddp.main exited with {rc} (its error is printed above)")
        info = json.load(open(out_npz[:-4] + ".json"))
        loop = info["sampling_seconds"]
        res.update(e2e_wall_s=round(wall, 2), e2e_sampling_loop_s=loop, e2e_npz_s=info.get("npz_seconds"),
                   e2e_images_per_s=info.get("images_per_second"), ratio_sampling_loop=round(loop / alone, 3),
                   ratio_wall=round(wall / alone, 3),
                   ratio_note="loop: sample_ddp's own sampling time (per-image CPU noise, uint8, chunk files) over "
                              "the sampler alone; wall: sample_ddp.main() whole, with checkpoint load, model build "
                              "and weight hashing (not the interpreter start)")
        ok = loop / alone <= 1.05 if device.type == "cuda" else None
        report.check("sample_ddp.py's sampling loop within 5 % of the sampler alone", ok,
                     f"ratio {loop / alone:.3f} (whole main() {wall / alone:.3f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def random_inception(device: torch.device):
    """torch-fidelity's FID Inception-v3 with random weights (the cost of a forward does not depend on them),
    wrapped like evaluations.load_inception's extractor (strict fp32, pool + spatial taps)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from evaluations import InceptionExtractor

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialisation
            return None

    with tempfile.TemporaryDirectory() as d:
        empty = os.path.join(d, "empty.pt")
        torch.save({}, empty)
        net = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    return InceptionExtractor(net, False, device, "random weights (speed only)")


def section_inception(g, report: Report, res: dict) -> None:
    import evaluations

    device = g.device
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"torch_fidelity is not importable ({e}): install the carried wheel "
                           "(.gpu_carry/whl) into a PYTHONPATH directory") from None
    extractor = None
    if g.inception_weights == "auto":
        try:
            extractor = evaluations.load_inception(device=device, allow_download=False, verbose=False)
        except Exception as e:  # noqa: BLE001  (no weights on this machine: the speed is the same)
            res["real_weights"] = f"unavailable ({one_line(e)[:200]})"
    extractor = extractor or random_inception(device)
    res["extractor"] = repr(extractor)
    images = np.random.default_rng(0).integers(0, 256, (g.inception_images, g.inception_size, g.inception_size, 3),
                                               dtype=np.uint8)
    evaluations.compute_features(images[: g.inception_batch], extractor, batch_size=g.inception_batch)  # warm-up
    sync(device)
    t = time.perf_counter()
    feats = evaluations.compute_features(images, extractor, batch_size=g.inception_batch)
    sync(device)
    sec = time.perf_counter() - t
    res.update(images=g.inception_images, size=g.inception_size, batch=g.inception_batch, seconds=round(sec, 2),
               images_per_s=round(g.inception_images / sec, 1),
               seconds_per_50k=round(50000 * sec / g.inception_images, 1),
               pool_shape=list(feats["pool"].shape), precision="fp32, no TF32 (evaluations.strict_fp32)")


# ----------------------------------------------------------------------------------------------
# Markdown


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v).replace("|", "/")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render(data: dict) -> str:
    secs = data["sections"]
    res = {k: (v.get("result") or {}) for k, v in secs.items()}
    m = data.get("machine", {})
    out = [f"# gpu_check ({'dry run, CPU' if m.get('dry_run') else m.get('name', '?')})\n",
           f"torch {m.get('torch')}, CUDA {m.get('cuda')}, Python {m.get('python')}, {m.get('cpus')} CPUs, "
           f"{m.get('date')}; budget {data['budget_s']:.0f} s, used {data.get('elapsed_s')} s"
           + (" (stopped at the deadline)" if data.get("killed_at_deadline") else "") + "\n"]
    out.append("\n## Sections\n\n")
    out.append(md_table(["section", "status", "s", "error"],
                        [[k, v.get("status"), v.get("seconds"), v.get("error")] for k, v in secs.items()]))
    if data["checks"]:
        out.append("\n## Checks\n\n")
        out.append(md_table(["check", "result", "detail"],
                            [[c["name"], {True: "pass", False: "FAIL", None: "n/a"}[c["pass"]], c["detail"]]
                             for c in data["checks"]]))
    for mode in ("eager", "compiled"):
        rows = res.get(f"matrix_{mode}") or {}
        if not rows:
            continue
        base = rows.get("none", {})
        out.append(f"\n## Regularisers, SiT-B/2, batch {data.get('batch', 256)}, bf16, {mode}\n\n")
        table = []
        for reg, r in rows.items():
            ms, mem = r.get("ms_per_step"), r.get("peak_gib")
            table.append([reg, r.get("status"), ms, ratio(ms, base.get("ms_per_step")), mem,
                          ratio(mem, base.get("peak_gib")), pct(r.get("mfu")), r.get("first_step_s"),
                          (r.get("sync_free") or {}).get("pass"), (r.get("vs_eager") or {}).get("pass")])
        out.append(md_table(["--reg", "status", "ms/step", "time / none", "peak GiB", "memory / none", "MFU %",
                             "first step s", "sync-free", "matches eager"], table))
    ours_c = (res.get("matrix_compiled") or {}).get("none", {}).get("ms_per_step")
    ours_e = (res.get("matrix_eager") or {}).get("none", {}).get("ms_per_step")
    repa = res.get("repa_style") or {}
    if repa.get("ms_per_step"):
        out.append("\n## Our default step vs REPA's choices (SiT-B/2, --reg none)\n\n")
        out.append(md_table(["step", "ms/step", "REPA-style / this"], [
            ["ours: sit.compile(), fused AdamW, bf16, no host sync, foreach EMA", ours_c,
             ratio(repa["ms_per_step"], ours_c)],
            ["ours without compile", ours_e, ratio(repa["ms_per_step"], ours_e)],
            [f"REPA-style: {repa.get('choices')}", repa["ms_per_step"], 1.0]]))
    for mode in ("eager", "compiled"):
        rows = res.get(f"speed_{mode}") or {}
        if rows:
            out.append(f"\n## Training speed, --reg none, bf16, {mode}\n\n")
            out.append(md_table(["model, batch", "status", "ms/step", "images/s", "TFLOP/s", "MFU %", "peak GiB",
                                 "first step s"],
                                [[k, r.get("status"), r.get("ms_per_step"), r.get("images_per_s"), r.get("tflops"),
                                  pct(r.get("mfu")), r.get("peak_gib"), r.get("first_step_s")]
                                 for k, r in rows.items()]))
    s = res.get("sampling") or {}
    if s.get("bf16"):
        out.append(f"\n## Sampling: {s.get('model')}, SDE, CFG {s.get('cfg_scale')} on {s.get('guidance')}, "
                   f"batch {s.get('batch')}\n\n")
        n = s.get("steps")
        out.append(md_table(["precision", "probe steps", "ms per batch evaluation", f"est. {n}-step s",
                             "est. images/s", f"measured {n}-step images/s"],
                            [[k, r.get("probe_steps"), r.get("per_batch_eval_ms"), r.get(f"estimated_{n}_step_s"),
                              r.get("estimated_images_per_s"), r.get("images_per_s")]
                             for k, r in s.items() if isinstance(r, dict)]))
    e = res.get("sample_ddp_e2e") or {}
    if e.get("sampler_alone_s"):
        out.append(f"\n## sample_ddp.py end to end vs the sampler alone ({e.get('model')}; {e.get('images')} images, "
                   f"batch {e.get('batch')}, SDE {e.get('steps')} steps, {e.get('precision')})\n\n")
        out.append(md_table(["sampler alone s", "sample_ddp loop s", "sample_ddp wall s", "loop ratio (target <= 1.05)",
                             "wall ratio"],
                            [[e.get("sampler_alone_s"), e.get("e2e_sampling_loop_s"), e.get("e2e_wall_s"),
                              e.get("ratio_sampling_loop"), e.get("ratio_wall")]]))
    i = res.get("inception") or {}
    if i.get("images_per_s"):
        out.append(f"\n## FID Inception features: {i['images_per_s']} images/s ({i['images']} images of "
                   f"{i['size']} px, batch {i['batch']}, {i['precision']}); 50k images: {i['seconds_per_50k']} s. "
                   f"{i.get('extractor')}\n")
    g = res.get("nonfinite_guard") or {}
    r = res.get("resume") or {}
    if g or r:
        out.append("\n## Robustness\n\n")
        for case, c in g.items():
            out.append(f"- {case}: flags (input, loss, grad) {c['flags_input_loss_grad']}, unchanged {c['unchanged']}, "
                       f"guard: {c['guard'][:150]}\n")
        if "bitwise_equal" in r:
            out.append(f"- resume: bitwise equal next step: {r['bitwise_equal']} {r.get('differences') or ''} "
                       f"(checkpoint {r.get('checkpoint_mb')} MB)\n")
    if data["errors"]:
        out.append("\n## Errors\n\n")
        out += [f"- {e['where']}: {e['error']}\n" for e in data["errors"]]
    return "".join(out)


def pct(x):
    return None if x is None else round(100 * x, 1)


def ratio(a, b):
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


# ----------------------------------------------------------------------------------------------


def main() -> None:
    g = parse()
    if g.report_only:
        return report_only(g.out, "gpu_check", render)
    report = Report(g.out, "gpu_check", g.budget_s, render)
    report.data["batch"] = g.batch
    report.start_watchdog()
    log(f"gpu_check on {g.device}, budget {g.budget_s:.0f} s, out {g.out}")
    if g.device.type == "cuda":  # as train.py: TF32 allowed (fp32 parts such as the Repulsor's bank product)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    for name in ("recompile_limit", "cache_size_limit"):  # one process compiles many models (name per version)
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 64)
    dynamo_config.automatic_dynamic_shapes = False  # static shapes, as a train.py run with one batch shape
    inductor_config.fallback_random = True  # compiled label dropout draws eager's mask (compare_terms)

    if not g.dry_run and g.device.type != "cuda":  # a CPU run of these sizes would only burn the budget
        report.error("setup", RuntimeError("no CUDA device (torch.cuda.is_available() is False): nothing measured; "
                                           "use --dry-run for the CPU path"))
        report.write()
        return
    sections = [
        ("machine", lambda r: section_machine(g, report, r)),
        ("matrix_eager", lambda r: section_matrix(g, report, r, "eager")),
        ("repa_style", lambda r: section_repa_style(g, report, r)),
        ("nonfinite_guard", lambda r: section_nonfinite(g, report, r)),
        ("resume", lambda r: section_resume(g, report, r)),
        ("speed_eager", lambda r: section_speed(g, report, r, "eager")),
        ("inception", lambda r: section_inception(g, report, r)),
        ("sampling", lambda r: section_sampling(g, report, r)),
        ("sample_ddp_e2e", lambda r: section_e2e(g, report, r)),
        ("matrix_compiled", lambda r: section_matrix(g, report, r, "compiled")),
        ("speed_compiled", lambda r: section_speed(g, report, r, "compiled")),
    ]
    for name, fn in sections:
        if name in g.skip:
            report.data["sections"][name] = {"status": "skipped: --skip", "seconds": 0}
            continue
        report.section(name, g.need[name], fn)
    report.data["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    report.write()
    n_fail = sum(c["pass"] is False for c in report.data["checks"])
    log(f"done in {time.time() - report.t0:.0f} s: {len(report.data['errors'])} errors, {n_fail} failed checks; "
        f"{report.json_path}")


if __name__ == "__main__":
    main()
