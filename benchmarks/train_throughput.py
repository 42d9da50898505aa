"""Training throughput (steps/s, samples/s) of the real train.py step, for a grid of settings.

    python benchmarks/train_throughput.py                       # small CPU model, eager/compile x fp32/bf16
    python benchmarks/train_throughput.py --model SiT-XL/2 --batch 32 --precisions bf16 --compile-modes eager compile

Data are random tensors already on the device (this measures the model step, not the loader).
Each setting: warm-up steps (including the compile) excluded, then the median of timed steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loss import build_regulariser  # noqa: E402
from models.sit import build_sit  # noqa: E402
from train import TrainModule, get_args, make_optimizer, train_step  # noqa: E402


def measure(train_flags: list[str], channels: int, size: int, num_classes: int, steps: int, warmup: int,
            device: torch.device) -> float:
    """Median seconds per optimizer step of train.py's step for the given train.py flags."""
    args = get_args(["--data-dir", "unused"] + train_flags)
    torch.manual_seed(0)
    name = None if args.model == "custom" else args.model
    sit = build_sit(name, depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads,
                    patch_size=args.patch_size, input_size=size, in_channels=channels,
                    num_classes=num_classes).to(device)
    reg = build_regulariser(args, name if args.depth is None else None, sit.config.hidden_size, sit.config.depth,
                            args.global_batch_size // args.grad_accum_steps, device).to(device)
    module = TrainModule(sit, reg).train()
    if args.compile:
        sit.compile()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = make_optimizer(params, args)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    b = args.global_batch_size
    batch = (torch.randn(b, channels, size, size, device=device), torch.zeros(b, channels, size, size, device=device),
             torch.randint(0, num_classes, (b,), device=device))
    one, zero = torch.ones(channels, 1, 1, device=device), torch.zeros(channels, 1, 1, device=device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(module, opt, scaler, params, batch, args, one, zero, amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further train.py flags, e.g. --reg repulsor")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size_flags = ["--model", a.model] + ([] if a.model != "custom" else [
        "--depth", str(a.depth), "--hidden-size", str(a.hidden_size), "--num-heads", str(a.num_heads),
        "--patch-size", str(a.patch_size)])
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, model {' '.join(size_flags)}, "
          f"input {a.channels}x{a.image_size}x{a.image_size}, batch {a.batch}")
    print("| compile | precision | ms/step | steps/s | samples/s |\n|---|---|---|---|---|")
    for mode in a.compile_modes:
        for prec in a.precisions:
            flags = size_flags + ["--global-batch-size", str(a.batch), "--mixed-precision", prec] + (
                ["--compile"] if mode == "compile" else []) + a.extra
            sec = measure(flags, a.channels, a.image_size, a.num_classes, a.steps, a.warmup, device)
            print(f"| {mode} | {prec} | {1000 * sec:.0f} | {1 / sec:.2f} | {a.batch / sec:.0f} |", flush=True)


if __name__ == "__main__":
    main()
