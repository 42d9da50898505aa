"""Training throughput (steps/s, samples/s) of the real train.py step, for a grid of settings.

    python benchmarks/train_throughput.py                       # small CPU model, eager/compile x fp32/bf16
    python benchmarks/train_throughput.py --model SiT-XL/2 --batch 32 --precisions bf16 --compile-modes eager compile
    python benchmarks/train_throughput.py --baseline /tmp/old-checkout   # paired: this step vs another version's
    python benchmarks/train_throughput.py --report-only                  # reprint the table from results.json

Data are random tensors already on the device (this measures the model step, not the loader).
Each setting: warm-up steps (including the compile) excluded, then the median of timed steps.
With --baseline DIR, the train.py step of the checkout in DIR runs on an identical model and batch,
alternating step by step with ours, so the ratio stays meaningful on a loaded machine.
Writes OUT/results.json (every timed step, the settings, the machine) and OUT/table.md (the table
printed; benchmarks/report.py).
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
import report  # noqa: E402  (benchmarks/report.py: benchmarks/ is this script's directory)
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
    sys.modules[spec.name] = module  # a dataclass in it looks its module up there
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
            device: torch.device, baseline: ModuleType | None = None) -> tuple[list[float], list[float] | None]:
    """Seconds of each timed optimizer step of train.py's step (and of the baseline's, interleaved)."""
    args = train.get_args(["--data-dir", "unused"] + train_flags)
    runners = [Stepper(train, args, channels, size, num_classes, device)]
    if baseline is not None:
        runners.append(Stepper(baseline, args, channels, size, num_classes, device))
    for i in range(warmup + steps):
        for r in runners:
            r.step(timed=i >= warmup)
    return runners[0].times, (runners[1].times if baseline is not None else None)


def size_flags(s: dict) -> list[str]:
    """The model flags of train.py, from the settings."""
    return ["--model", s["model"]] + ([] if s["model"] != "custom" else [
        "--depth", str(s["depth"]), "--hidden-size", str(s["hidden_size"]), "--num-heads", str(s["num_heads"]),
        "--patch-size", str(s["patch_size"])])


def render(results: dict) -> str:
    """The printed table, from results.json alone."""
    s, m = results["settings"], results["machine"]
    paired = s["baseline"] is not None
    extra = f", train.py flags {' '.join(s['extra'])}" if s["extra"] else ""
    header = "| compile | precision | ms/step | steps/s | samples/s |"
    rule = "|---|---|---|---|---|"
    if paired:
        header, rule = header + " baseline ms/step | ratio |", rule + "---|---|"
    lines = [f"device {m['device']}, torch {m['torch']}, threads {m['threads']}, model {' '.join(size_flags(s))}, "
             f"input {s['channels']}x{s['image_size']}x{s['image_size']}, batch {s['batch']}{extra}", header, rule]
    for r in results["rows"]:
        sec = r["median_s"]
        row = f"| {r['compile']} | {r['precision']} | {1000 * sec:.0f} | {1 / sec:.2f} | {s['batch'] / sec:.0f} |"
        if paired:
            row += f" {1000 * r['baseline_median_s']:.0f} | {sec / r['baseline_median_s']:.3f} |"
        lines.append(row)
    return "\n".join(lines)


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
    report.add_args(p, "train_throughput")  # --extra takes the rest of the line: put --out before it
    a = p.parse_args()
    if a.report_only:
        return report.rebuild(a.out, render, __file__)
    baseline = load_baseline(a.baseline) if a.baseline else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {**report.meta(__file__, a, device), "rows": []}
    for mode in a.compile_modes:
        for prec in a.precisions:
            flags = size_flags(vars(a)) + ["--global-batch-size", str(a.batch), "--mixed-precision", prec] + (
                ["--compile"] if mode == "compile" else []) + a.extra
            times, base = measure(flags, a.channels, a.image_size, a.num_classes, a.steps, a.warmup, device, baseline)
            row = {"compile": mode, "precision": prec, "median_s": statistics.median(times), "step_s": times}
            if base is not None:
                row.update(baseline_median_s=statistics.median(base), baseline_step_s=base)
            results["rows"].append(row)
            print(f"{mode} {prec}: {1000 * row['median_s']:.0f} ms/step", file=sys.stderr, flush=True)
    report.save(a.out, results, render)


if __name__ == "__main__":
    main()
