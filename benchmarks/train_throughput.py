"""Training throughput (steps/s, samples/s) of the real train.py step, for a grid of settings.

    python benchmarks/train_throughput.py                       # small CPU model, eager/compile x fp32/bf16
    python benchmarks/train_throughput.py --model SiT-XL/2 --batch 32 --precisions bf16 --compile-modes eager compile
    python benchmarks/train_throughput.py --baseline /tmp/old-checkout   # paired: this step vs another version's

Data are random tensors already on the device (this measures the model step, not the loader).
Each setting: warm-up steps (including the compile) excluded, then the median of timed steps.
With --baseline DIR, the train.py step of the checkout in DIR runs on an identical model and batch,
alternating step by step with ours, so the ratio stays meaningful on a loaded machine.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
from types import ModuleType

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from loss import build_regulariser  # noqa: E402
from models.sit import build_sit  # noqa: E402


def load_baseline(repo: str) -> ModuleType:
    """train.py of another checkout, as its own module (its step must take the same arguments)."""
    path = os.path.join(repo, "train.py")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --baseline {repo} has no train.py: pass the root of another checkout")
    spec = importlib.util.spec_from_file_location("baseline_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Stepper:
    """One model, optimizer and batch driven by a given train.py module's train_step."""

    def __init__(self, impl: ModuleType, args: argparse.Namespace, channels: int, size: int, num_classes: int,
                 device: torch.device):
        self.impl, self.args = impl, args
        torch.manual_seed(0)
        name = None if args.model == "custom" else args.model
        sit = build_sit(name, depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads,
                        patch_size=args.patch_size, input_size=size, in_channels=channels,
                        num_classes=num_classes).to(device)
        reg = build_regulariser(args, sit, args.global_batch_size // args.grad_accum_steps, device).to(device)
        ema = copy.deepcopy(sit).requires_grad_(False).eval()
        # Each version steps its own TrainModule (before issue 21 it took no EMA and no loss.Context).
        self.module = (train.TrainModule(sit, reg, ema) if impl is train else impl.TrainModule(sit, reg)).train()
        if args.compile:
            sit.compile()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        # The optimizer each version builds (before make_optimizer existed: AdamW, fused on CUDA only).
        self.opt = (impl.make_optimizer(self.params, args) if hasattr(impl, "make_optimizer") else
                    torch.optim.AdamW(self.params, lr=args.lr, fused=device.type == "cuda"))
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
        b = args.global_batch_size
        self.batch = (torch.randn(b, channels, size, size, device=device),
                      torch.zeros(b, channels, size, size, device=device),
                      torch.randint(0, num_classes, (b,), device=device))
        self.one = torch.ones(channels, 1, 1, device=device)
        self.zero = torch.zeros(channels, 1, 1, device=device)
        self.device, self.times = device, []

    def step(self, timed: bool) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.impl.train_step(self.module, self.opt, self.scaler, self.params, self.batch, self.args,
                                   self.one, self.zero, self.amp)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if timed:
            self.times.append(time.perf_counter() - t0)
        if isinstance(out, tuple) and out[1].any():  # a skipped step would be timed silently
            raise SystemExit(f"error: a timed step was non-finite (input/loss/grad {out[1].tolist()}) "
                             f"with {self.impl.__name__}")


def measure(train_flags: list[str], channels: int, size: int, num_classes: int, steps: int, warmup: int,
            device: torch.device, baseline: ModuleType | None = None) -> tuple[float, float | None]:
    """Median seconds per optimizer step of train.py's step (and of the baseline's, interleaved)."""
    args = train.get_args(["--data-dir", "unused"] + train_flags)
    runners = [Stepper(train, args, channels, size, num_classes, device)]
    if baseline is not None:
        runners.append(Stepper(baseline, args, channels, size, num_classes, device))
    for i in range(warmup + steps):
        for r in runners:
            r.step(timed=i >= warmup)
    medians = [statistics.median(r.times) for r in runners]
    return medians[0], (medians[1] if baseline is not None else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="custom", help="a SiT_models name or 'custom'")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=["no", "bf16", "fp16"])
    p.add_argument("--compile-modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--baseline", default=None, help="root of another checkout whose train.py step to compare with")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further train.py flags, e.g. --reg repulsor")
    a = p.parse_args()
    baseline = load_baseline(a.baseline) if a.baseline else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size_flags = ["--model", a.model] + ([] if a.model != "custom" else [
        "--depth", str(a.depth), "--hidden-size", str(a.hidden_size), "--num-heads", str(a.num_heads),
        "--patch-size", str(a.patch_size)])
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, model {' '.join(size_flags)}, "
          f"input {a.channels}x{a.image_size}x{a.image_size}, batch {a.batch}")
    extra_cols = " baseline ms/step | ratio |" if baseline else ""
    print(f"| compile | precision | ms/step | steps/s | samples/s |{extra_cols}\n|---|---|---|---|---|"
          + ("---|---|" if baseline else ""))
    for mode in a.compile_modes:
        for prec in a.precisions:
            flags = size_flags + ["--global-batch-size", str(a.batch), "--mixed-precision", prec] + (
                ["--compile"] if mode == "compile" else []) + a.extra
            sec, base = measure(flags, a.channels, a.image_size, a.num_classes, a.steps, a.warmup, device, baseline)
            row = f"| {mode} | {prec} | {1000 * sec:.0f} | {1 / sec:.2f} | {a.batch / sec:.0f} |"
            if base is not None:
                row += f" {1000 * base:.0f} | {sec / base:.3f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
