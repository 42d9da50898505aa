"""Training-step overhead of every registered regulariser (--reg none, dispersive, repulsor, repa, ...).

    python benchmarks/overhead.py                      # CPU-sized defaults, a few minutes on 2 cores
    python benchmarks/overhead.py --model SiT-S/2,SiT-B/2 --input-size 32 --in-channels 4 \
        --batch-size 8 --steps 4 --warmup 1 --threads 1           # the README's table (CPU)
    python benchmarks/overhead.py --model SiT-B/2 --input-size 32 --in-channels 4 \
        --batch-size 256 --precision bf16 --device cuda --steps 50 --warmup 10  # a GPU setting
    python benchmarks/overhead.py --report-only       # reprint the tables from OUT/results.json

Every configuration gets the same SiT (same seed, size, batch, precision), built with its EMA and
TrainModule as train.py builds them, and runs the very step of train.py (`train.train_step` +
`update_ema`) on a fixed random batch. The Repulsor
bank is pre-filled (K rows of unit vectors), so every timed step pays for the full bank as in
steady-state training. REPA gets a DINOv2 ViT-B/14-sized encoder with random weights (its
FLOPs and memory are what matter here) and a random uint8 image batch at --image-size.
Steps are interleaved round-robin over the configurations (so load from other processes hits
them alike), warm-up rounds are dropped, and the table reports the median ms/step and its
ratio to --reg none. --model takes a comma-separated list: one table per model, one process.

Memory, per configuration, from one extra untimed step: on CUDA the allocator's peak during
the step (torch.cuda.max_memory_allocated). On the CPU torch keeps no allocator statistics, so
the table gives what the step must hold: the persistent state (weights, gradients, AdamW
moments, EMA, Repulsor bank, frozen encoder) plus the tensors saved for backward during the
forward (unique storages, parameters excluded), i.e. the live memory at the end of the forward;
transient work buffers (e.g. the encoder's own activations under no_grad) are not included.
GFLOP per step by part are analytic counts of the matmuls (a multiply-add = 2 FLOPs; trained
parts fwd + bwd = 3 x fwd; the frozen encoder forward only).
--breakdown also times the Repulsor's parts alone (head MLP, bank product + loss, in-batch-only
loss, enqueue) to show where the time goes.

Writes OUT/results.json (every timed step of every configuration, memory, GFLOP, the settings, the
machine) and OUT/table.md (the tables printed; benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import report  # noqa: E402  (benchmarks/report.py: benchmarks/ is this script's directory)
from loss import REGULARISERS, REPA, SRA, Dispersive, Repulsor, build_regulariser, repulsor_loss  # noqa: E402
from models.sit import SiT_models, build_sit  # noqa: E402
from train import TrainModule, get_args, make_optimizer, train_step, update_ema  # noqa: E402

AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_FLAG = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="custom",
                   help=f"comma-separated, each one of {', '.join(SiT_models)} or custom (one table each)")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=None,
                   help="repa: stored image resolution (default: 8 x --input-size for 4-channel, i.e. SD-VAE, "
                        "latents; else --input-size, pixel data)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch = this process's batch")
    p.add_argument("--precision", default="fp32", choices=list(AMP),
                   help="fp32 by default: bf16 autocast is slower than fp32 on this project's 2-core CPU")
    p.add_argument("--regs", default=",".join(REGULARISERS), help="comma-separated --reg values (default: all)")
    p.add_argument("--bank-size", type=int, default=65536)
    p.add_argument("--proj-dim", type=int, default=128)
    p.add_argument("--proj-hidden", type=int, default=2048)
    p.add_argument("--reg-depth", type=int, default=None, help="default: train.py's default per regulariser")
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--breakdown", action="store_true", help="also time the Repulsor's parts in isolation")
    p.add_argument("--seed", type=int, default=0)
    report.add_args(p, "overhead")
    b = p.parse_args()
    b.models = [m.strip() for m in b.model.split(",") if m.strip()]
    for m in b.models:
        if m not in SiT_models and m != "custom":
            p.error(f"--model {m!r}: choose from {', '.join(SiT_models)} or custom")
    if b.image_size is None:
        b.image_size = 8 * b.input_size if b.in_channels == 4 else b.input_size
    return b


def train_args(b: argparse.Namespace, reg: str) -> argparse.Namespace:
    """The train.py configuration of one benchmark column (its defaults for everything else)."""
    argv = ["--data-dir", "unused", "--reg", reg, "--global-batch-size", str(b.batch_size),
            "--mixed-precision", PRECISION_FLAG[b.precision], "--bank-size", str(b.bank_size),
            "--proj-dim", str(b.proj_dim), "--proj-hidden", str(b.proj_hidden), "--model", b.model,
            "--repa-encoder", "random", "--seed", str(b.seed)]
    if b.model == "custom":
        argv += ["--depth", str(b.depth), "--hidden-size", str(b.hidden_size), "--num-heads", str(b.num_heads),
                 "--patch-size", str(b.patch_size)]
    if b.reg_depth is not None:
        argv += ["--reg-depth", str(b.reg_depth)]
    return get_args(argv)


class Config:
    """One column: a TrainModule, its optimizer, EMA and a step closure, as train.py builds them."""

    def __init__(self, b: argparse.Namespace, reg_name: str, device: torch.device):
        self.name = reg_name
        self.args = args = train_args(b, reg_name)
        torch.manual_seed(b.seed)  # same SiT init for every column
        name = None if b.model == "custom" else b.model
        sit = build_sit(name, depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads,
                        patch_size=args.patch_size, input_size=b.input_size, in_channels=b.in_channels,
                        num_classes=b.num_classes).to(device)
        self.tokens = (b.input_size // sit.config.patch_size) ** 2
        self.reg = build_regulariser(args, sit, b.batch_size, device,
                                     image_shape=(b.image_size, b.image_size, 3)).to(device)
        if isinstance(self.reg, Repulsor) and self.reg.bank.size:  # steady state: a full bank
            g = torch.Generator().manual_seed(b.seed + 1)
            queue = F.normalize(torch.randn(self.reg.bank.size, self.reg.bank.dim, generator=g), dim=1)
            self.reg.bank.load_state_dict({"queue": queue, "ptr": 0, "filled": self.reg.bank.size})
        self.sit, self.ema = sit, copy.deepcopy(sit).requires_grad_(False).eval()
        self.module = TrainModule(sit, self.reg, self.ema).train()  # the EMA as a teacher, as in train.py
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, args)
        self.scaler = torch.amp.GradScaler(device.type, enabled=b.precision == "fp16")
        self.amp_dtype = AMP[b.precision]
        self.reg_depth = self.reg.depth
        self.reg_params = sum(p.numel() for p in self.reg.parameters())
        self.times: list[float] = []

    def step(self, batch: tuple[torch.Tensor, ...], scale: torch.Tensor, shift: torch.Tensor) -> None:
        if not self.reg.needs_images:  # the images travel only to a regulariser that reads them, as in train.py
            batch = batch[:3]
        _, nonfinite = train_step(self.module, self.opt, self.scaler, self.params, batch, self.args, scale, shift,
                                  self.amp_dtype)
        if nonfinite.any():  # a skipped step would be timed silently
            raise SystemExit(f"error: a timed step was non-finite (input/loss/grad {nonfinite.tolist()})")
        update_ema(self.ema, self.sit, self.args.ema_decay)  # timed: part of train.py's step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, n: int, warmup: int = 2) -> float:
    """Median seconds of fn over n calls after warm-up."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def breakdown(b: argparse.Namespace, rep: Repulsor, device: torch.device, tokens: int) -> list[tuple[str, float]]:
    """Time of the Repulsor's parts alone, at the benchmark's batch and precision."""
    amp = (lambda: torch.autocast(device.type, dtype=AMP[b.precision])) if AMP[b.precision] else nullcontext
    hidden = torch.randn(b.batch_size, tokens, rep.head[0].in_features, device=device, requires_grad=True)
    z = F.normalize(torch.randn(b.batch_size, b.proj_dim, device=device), dim=1).requires_grad_(True)
    bank = rep.bank.negatives()

    def head() -> None:
        with amp():
            out = rep.project(hidden)
        out.sum().backward()

    def loss_with(neg: torch.Tensor, autocast: bool = True) -> Callable[[], None]:
        def run() -> None:
            with amp() if autocast else nullcontext():
                loss, _ = repulsor_loss(z, neg, rep.temperature)
            loss.backward()
        return run

    head_params = list(rep.head.parameters())
    for p in head_params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(head_params, lr=1e-4, fused=device.type == "cuda")

    def head_opt() -> None:
        torch.nn.utils.clip_grad_norm_(head_params, 1.0)
        opt.step()

    n = max(3, b.steps)
    rows = [
        ("head MLP + pooling, fwd+bwd", timed(head, device, n)),
        ("AdamW step + grad-norm over the head's parameters", timed(head_opt, device, n)),
        (f"loss vs batch + bank K={bank.shape[0]}, fwd+bwd", timed(loss_with(bank), device, n)),
        ("loss vs batch only (K=0), fwd+bwd", timed(loss_with(bank[:0]), device, n)),
        ("bank.negatives() copy", timed(rep.bank.negatives, device, n)),
        ("bank.enqueue", timed(lambda: rep.bank.enqueue(z.detach()), device, n)),
    ]
    if AMP[b.precision]:
        rows.insert(3, (f"loss vs batch + bank K={bank.shape[0]}, fwd+bwd, autocast off (fp32)",
                        timed(loss_with(bank, autocast=False), device, n)))
    return rows


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_memory(c: Config, batch: tuple[torch.Tensor, ...], scale: torch.Tensor, shift: torch.Tensor,
                   device: torch.device) -> dict[str, float]:
    """MB a training step needs (see the module docstring for what is measured on each device)."""
    mb = 1 / 2 ** 20
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        c.step(batch, scale, shift)
        sync(device)
        return {"peak": torch.cuda.max_memory_allocated(device) * mb}
    params = {p.untyped_storage().data_ptr() for p in c.module.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        c.step(batch, scale, shift)
    trainable = nbytes(c.params)
    moments = nbytes(v for state in c.opt.state.values() for v in state.values()
                     if torch.is_tensor(v) and v.dim() > 0)  # exp_avg, exp_avg_sq (not the step counters)
    persistent = (nbytes(c.module.parameters()) + trainable + moments + nbytes(c.ema.parameters())
                  + nbytes(c.module.buffers()) + nbytes(c.ema.buffers()))
    if isinstance(c.reg, Repulsor):
        persistent += nbytes([c.reg.bank.queue])
    if isinstance(c.reg, REPA):
        persistent += nbytes(c.reg.encoder.parameters()) + nbytes(c.reg.encoder.buffers())
    activations = sum(saved.values())
    return {"persistent": persistent * mb, "activations": activations * mb, "peak": (persistent + activations) * mb}


def approx_gflop(b: argparse.Namespace, sit_cfg, reg, tokens: int) -> dict[str, float]:
    """Analytic GFLOP of one training step by part: matmuls only, 2 FLOPs a multiply-add, trained parts
    fwd + bwd = 3 x fwd, the frozen encoder forward only."""
    d, n, bs = sit_cfg.hidden_size, tokens, b.batch_size
    per_block = 2 * (12 * d * d * n + 2 * n * n * d + 6 * d * d)  # qkv+proj+mlp per token, attention, adaLN
    out = {"SiT": 3 * bs * sit_cfg.depth * per_block / 1e9}
    if isinstance(reg, Repulsor):
        head = sum(m.in_features * m.out_features for m in reg.head if isinstance(m, torch.nn.Linear))
        out["head"] = 3 * 2 * bs * head / 1e9
        out["bank"] = 2 * 2 * bs * reg.bank.size * reg.bank.dim / 1e9  # fwd + grad wrt z (bank has none)
    elif isinstance(reg, Dispersive):
        out["gram"] = 3 * 2 * bs * bs * n * d / 1e9  # B x B Gram matrix of the flattened hidden states
    elif isinstance(reg, REPA):
        enc = reg.encoder
        e, ne, hid = enc.embed_dim, enc.patch_embed.num_patches + enc.num_prefix_tokens, enc.blocks[0].mlp.fc1.out_features
        layer = 2 * (4 * e * e * ne + 2 * e * hid * ne + 2 * ne * ne * e)  # qkv+proj, mlp, attention
        embed = 2 * enc.patch_embed.num_patches * enc.patch_embed.proj.weight[0].numel() * e
        out["encoder fwd"] = bs * (len(enc.blocks) * layer + embed) / 1e9
        proj = sum(m.in_features * m.out_features for m in reg.projector if isinstance(m, torch.nn.Linear))
        out["projector"] = 3 * 2 * bs * n * proj / 1e9
    elif isinstance(reg, SRA):
        out["teacher fwd"] = bs * reg.teacher_depth * per_block / 1e9  # EMA blocks 1..m, no backward
        proj = sum(m.in_features * m.out_features for m in reg.proj if isinstance(m, torch.nn.Linear))
        out["projector"] = 3 * 2 * bs * n * proj / 1e9
    return out  # ΔFM: elementwise only


def run_model(b: argparse.Namespace, model: str, device: torch.device, results: dict) -> dict:
    """Time every --regs configuration on one SiT: its entry of results["models"]."""
    b = argparse.Namespace(**{**vars(b), "model": model})
    regs = [r.strip() for r in b.regs.split(",") if r.strip()]
    configs = [Config(b, r, device) for r in regs]
    g = torch.Generator().manual_seed(b.seed)
    shape = (b.batch_size, b.in_channels, b.input_size, b.input_size)
    batch = (torch.randn(shape, generator=g).to(device), torch.zeros(shape, device=device),
             torch.randint(0, b.num_classes, (b.batch_size,), generator=g).to(device),
             torch.randint(0, 256, (b.batch_size, b.image_size, b.image_size, 3), generator=g,
                           dtype=torch.uint8).to(device))
    scale = torch.ones(b.in_channels, 1, 1, device=device)
    shift = torch.zeros(b.in_channels, 1, 1, device=device)

    sit = configs[0].sit
    entry = {"model": b.model, "depth": sit.config.depth, "hidden_size": sit.config.hidden_size,
             "patch_size": sit.config.patch_size, "tokens": configs[0].tokens,
             "sit_params": sum(p.numel() for p in sit.parameters()), "configs": []}
    for c in configs:
        if isinstance(c.reg, Repulsor):
            extra = f", K {c.reg.bank.size}, d {c.reg.bank.dim}, head hidden {b.proj_hidden}"
        elif isinstance(c.reg, REPA):
            n_enc = sum(p.numel() for p in c.reg.encoder.parameters())
            extra = (f", projector hidden {b.proj_hidden} -> {c.reg.z_dim}; frozen encoder {c.args.repa_encoder} "
                     f"(DINOv2 ViT-B/14 architecture, {n_enc / 1e6:.1f}M params) on {b.image_size} px images "
                     f"resized to {c.reg.image_size} px")
        elif isinstance(c.reg, Dispersive):
            extra = f", variant {c.args.disp_variant}"
        else:
            extra = f"; {c.reg.describe()}" if c.reg.describe() else ""
        entry["configs"].append({"reg": c.name, "reg_depth": c.reg_depth, "reg_params": c.reg_params, "detail": extra,
                                 "gflop": approx_gflop(b, sit.config, c.reg, entry["tokens"])})
    print(model_header(results, entry), file=sys.stderr, flush=True)

    t_start = time.time()
    for rnd in range(b.warmup + b.steps):
        order = configs[rnd % len(configs):] + configs[: rnd % len(configs)]  # rotate who goes first
        for c in order:
            sync(device)
            t0 = time.perf_counter()
            c.step(batch, scale, shift)
            sync(device)
            if rnd >= b.warmup:
                c.times.append(time.perf_counter() - t0)
        print(f"  round {rnd + 1}/{b.warmup + b.steps} done ({time.time() - t_start:.0f} s)", file=sys.stderr, flush=True)
    for c, row in zip(configs, entry["configs"]):
        row["step_s"] = c.times
        row["memory_mb"] = measure_memory(c, batch, scale, shift, device)  # untimed, after the timing rounds

    rep_cfg = next((c for c in configs if isinstance(c.reg, Repulsor)), None)
    if b.breakdown and rep_cfg is not None:
        entry["breakdown_s"] = breakdown(b, rep_cfg.reg, device, entry["tokens"])
    return entry


def model_header(results: dict, m: dict) -> str:
    """The lines that describe one model's configurations (printed before its timing, and in the report)."""
    b, mach = results["settings"], results["machine"]
    lines = [f"SiT {m['model']}: depth {m['depth']}, width {m['hidden_size']}, patch {m['patch_size']}, "
             f"{b['in_channels']}x{b['input_size']}x{b['input_size']} ({m['tokens']} tokens), "
             f"{m['sit_params'] / 1e6:.2f}M params; batch {b['batch_size']}; {b['precision']}; {b['device']}, "
             f"{mach['threads']} threads; torch {mach['torch']}"]
    for c in m["configs"]:
        if c["reg"] != "none":
            lines.append(f"  {c['reg']}: block {c['reg_depth']}, {c['reg_params'] / 1e6:.2f}M training-only params"
                         f"{c['detail']}")
    return "\n".join(lines)


def render(results: dict) -> str:
    """The printed tables, one block per model, from results.json alone."""
    b = results["settings"]
    cpu = b["device"] == "cpu"
    blocks = []
    for m in results["models"]:
        base_cfg = next((c for c in m["configs"] if c["reg"] == "none"), None)
        base = statistics.median(base_cfg["step_s"]) if base_cfg else None
        lines = [f"| --reg | ms/step (median of {b['steps']}) | min | ratio to none (medians) | "
                 "paired ratio (median over rounds) | "
                 + ("persistent MB | saved activations MB | step memory MB |" if cpu else "peak MB |")
                 + " GFLOP per step: parts | GFLOP total | FLOP ratio to none |",
                 "|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if cpu else "---:|") + "---|---:|---:|"]
        for c in m["configs"]:
            times, mem, parts = c["step_s"], c["memory_mb"], c["gflop"]
            med = statistics.median(times)
            label = c["reg"] if c["reg"] != "repulsor" else f"repulsor (K {b['bank_size']}, d {b['proj_dim']})"
            ratio = f"{med / base:.3f}" if base else "-"
            paired = f"{statistics.median(x / y for x, y in zip(times, base_cfg['step_s'])):.3f}" if base else "-"
            memory = (f"{mem['persistent']:.0f} | {mem['activations']:.0f} | {mem['peak']:.0f}" if cpu
                      else f"{mem['peak']:.0f}")
            total = sum(parts.values())
            lines.append(f"| {label} | {1000 * med:.0f} | {1000 * min(times):.0f} | {ratio} | {paired} | {memory} | "
                         + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
                         + f" | {total:.1f} | {total / parts['SiT']:.3f} |")  # the same SiT in every column
        blocks += [model_header(results, m), "\n".join(lines)]
        if "breakdown_s" in m:
            lines = ["| Repulsor part (alone) | ms | share of none's median step |", "|---|---:|---:|"]
            for name, sec in m["breakdown_s"]:
                share = f"{100 * sec / base:.1f} %" if base else "-"
                lines.append(f"| {name} | {1000 * sec:.1f} | {share} |")
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main() -> None:
    b = parse()
    if b.report_only:
        return report.rebuild(b.out, render, __file__)
    if b.threads:
        torch.set_num_threads(b.threads)
    device = torch.device(b.device)
    results = {**report.meta(__file__, b, device), "models": []}
    for model in b.models:
        results["models"].append(run_model(b, model, device, results))
    report.save(b.out, results, render)


if __name__ == "__main__":
    main()
