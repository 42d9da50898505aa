"""Does torch.compile change the SiT's numbers under bf16 autocast? (issue 11 item 15)

    python benchmarks/compile_bf16_nan.py                  # demo-sized SiT, batch 32, CPU: 3 compiles, ~2-4 min
    python benchmarks/compile_bf16_nan.py --layer-steps 0 --train-steps 300   # only the long train_step run

Part 1 (layer by layer): an eager SiT and a copy whose embedders, blocks and final layer are each
compiled alone get the same weights and the same batch at every step (the weights follow the
eager model's AdamW trajectory). Per step it prints the first module whose output (forward) or
output gradient (backward) is non-finite, the worst relative difference compiled vs eager of
module outputs, output gradients and parameter gradients, and whether two compiled passes on
the same input are bitwise equal.
Part 2 (end to end): train.py's own train_step with the whole SiT compiled, as `train.py --compile
--mixed-precision bf16` runs it (fused AdamW, non-finite steps flagged), for --train-steps steps.

Exit status 1 when a compiled value is non-finite, or differs from eager by more than --tol
(relative L2), in either part; 0 otherwise. Random training label dropout is replaced by one fixed
drop mask so that eager and compiled see the same conditions.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from loss import build_regulariser, interpolate, sample_time, velocity_loss  # noqa: E402
from models.sit import SiT, build_sit  # noqa: E402
from train import TrainModule, get_args, make_optimizer, train_step  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--layer-steps", type=int, default=6, help="part 1: lock-step eager/compiled steps (0 = skip)")
    p.add_argument("--train-steps", type=int, default=50, help="part 2: compiled train_step steps (0 = skip)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--tol", type=float, default=0.05, help="largest accepted relative L2 difference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return p.parse_args()


def build(a: argparse.Namespace) -> SiT:
    torch.manual_seed(a.seed)
    return build_sit(None, depth=a.depth, hidden_size=a.hidden_size, num_heads=a.num_heads, patch_size=a.patch_size,
                     input_size=a.image_size, in_channels=a.channels, num_classes=a.num_classes)


def probed_modules(sit: SiT) -> list[tuple[str, nn.Module]]:
    """The modules compared one by one, in forward order."""
    return ([("x_embedder", sit.x_embedder), ("t_embedder", sit.t_embedder), ("y_embedder", sit.y_embedder)]
            + [(f"blocks.{i}", b) for i, b in enumerate(sit.blocks)] + [("final_layer", sit.final_layer)])


def attach_probes(sit: SiT) -> dict[str, torch.Tensor]:
    """Forward hooks storing each probed module's output (and keeping its gradient after backward)."""
    store: dict[str, torch.Tensor] = {}
    for name, m in probed_modules(sit):
        def hook(_m, _inp, out, name=name):
            if out.requires_grad:
                out.retain_grad()
            store[name] = out
        m.register_forward_hook(hook)
    return store


def rel(c: torch.Tensor, e: torch.Tensor) -> float:
    c, e = c.detach().float(), e.detach().float()
    return ((c - e).norm() / e.norm().clamp_min(1e-8)).item()


def forward_backward(sit: SiT, store: dict, batch: tuple) -> tuple[float, dict, dict, dict]:
    """Loss, module outputs, their gradients and parameter gradients of one bf16 step (no update)."""
    x_t, t, y, drop, target = batch
    sit.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sit(x_t, t, y, drop=drop)
    loss = velocity_loss(out, target)
    loss.backward()
    acts = {k: v.detach().clone() for k, v in store.items()}
    act_grads = {k: v.grad.clone() for k, v in store.items() if v.grad is not None}
    grads = {n: p.grad.clone() for n, p in sit.named_parameters() if p.grad is not None}
    return loss.item(), acts, act_grads, grads


def first_nonfinite(tensors: dict[str, torch.Tensor], order: list[str]) -> str | None:
    return next((k for k in order if k in tensors and not torch.isfinite(tensors[k]).all()), None)


def layerwise(a: argparse.Namespace) -> bool:
    """Part 1; returns True when compiled and eager agree and stay finite."""
    eager = build(a).train()
    comp = copy.deepcopy(eager)
    e_store, c_store = attach_probes(eager), attach_probes(comp)
    for _, m in probed_modules(comp):
        m.compile()  # each module alone, so a difference is pinned to one module
    order = [n for n, _ in probed_modules(eager)]
    opt = torch.optim.AdamW([p for p in eager.parameters() if p.requires_grad], lr=a.lr)
    b, ok = a.batch, True
    x0 = torch.randn(b, a.channels, a.image_size, a.image_size)
    y = torch.randint(0, a.num_classes, (b,))
    drop = torch.rand(b) < eager.y_embedder.dropout_prob
    print("part 1: per-module compile vs eager, bf16 autocast, same weights and batch\n"
          "| step | loss eager | loss compiled | worst out (module) | worst out-grad (module) | "
          "worst param-grad (param) | first non-finite | bitwise repeatable |\n|---|---|---|---|---|---|---|---|")
    for step in range(a.layer_steps):
        t0 = time.perf_counter()
        comp.load_state_dict(eager.state_dict())
        t = sample_time(b, "uniform", "cpu")
        x_t, target = interpolate("linear", x0, torch.randn_like(x0), t)
        batch = (x_t, t, y, drop, target)
        le, ae, age, ge = forward_backward(eager, e_store, batch)
        lc, ac, agc, gc = forward_backward(comp, c_store, batch)
        _, ac2, _, gc2 = forward_backward(comp, c_store, batch)
        repeat = all(torch.equal(gc[k], gc2[k]) for k in gc) and all(torch.equal(ac[k], ac2[k]) for k in ac)
        worst = [max(((rel(c[k], e[k]), k) for k in e), default=(0.0, "-")) for c, e in
                 ((ac, ae), (agc, age), (gc, ge))]
        bad = [f"{tag} {k}" for tag, d, o in (("fwd", ac, order), ("bwd", agc, order[::-1]), ("grad", gc, list(gc)))
               if (k := first_nonfinite(d, o))]
        eager_bad = [k for d, o in ((ae, order), (age, order[::-1]), (ge, list(ge))) if (k := first_nonfinite(d, o))]
        ok &= not bad and all(w <= a.tol for w, _ in worst) and abs(lc - le) <= a.tol * abs(le)
        print(f"| {step} | {le:.5f} | {lc:.5f} | " + " | ".join(f"{w:.2g} ({k})" for w, k in worst)
              + f" | {', '.join(bad) or '-'}{' (eager too: ' + ', '.join(eager_bad) + ')' if eager_bad else ''}"
              f" | {repeat} |", flush=True)
        if not repeat:  # which tensors differ between two identical compiled passes, and by how much
            diff = {k: (gc[k] - gc2[k]).abs().max().item() for k in gc if not torch.equal(gc[k], gc2[k])}
            print(f"  not repeatable: {diff}")
        for n, p in eager.named_parameters():  # advance along the eager trajectory (as train.py would)
            p.grad = ge.get(n)
        torch.nn.utils.clip_grad_norm_([p for p in eager.parameters() if p.grad is not None], 1.0)
        opt.step()
        if step == 0:  # includes the compiles
            print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return ok


def end_to_end(a: argparse.Namespace) -> bool:
    """Part 2: train.py's train_step with the whole SiT compiled; True when every step was finite."""
    args = get_args(["--data-dir", "unused", "--model", "custom", "--depth", str(a.depth), "--hidden-size",
                     str(a.hidden_size), "--num-heads", str(a.num_heads), "--patch-size", str(a.patch_size),
                     "--global-batch-size", str(a.batch), "--mixed-precision", "bf16", "--compile", "--lr", str(a.lr)])
    sit = build(a)
    module = TrainModule(sit, build_regulariser(args, sit, a.batch, "cpu")).train()
    sit.compile()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = make_optimizer(params, args)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    b = a.batch
    batch = (torch.randn(b, a.channels, a.image_size, a.image_size), torch.zeros(b, a.channels, a.image_size,
             a.image_size), torch.randint(0, a.num_classes, (b,)))
    one, zero = torch.ones(a.channels, 1, 1), torch.zeros(a.channels, 1, 1)
    print(f"part 2: train.py train_step, whole SiT compiled, bf16, {a.train_steps} steps")
    first_bad, losses = None, []
    for step in range(a.train_steps):
        terms, flags = train_step(module, opt, scaler, params, batch, args, one, zero, torch.bfloat16)
        losses.append(terms["loss"].item())
        if step % 50 == 49:
            print(f"  step {step + 1}: loss {losses[-1]:.4f}", flush=True)
        if first_bad is None and (flags.any() or not all(torch.isfinite(p).all() for p in params)):
            first_bad = step
            print(f"  step {step}: non-finite (flags input/loss/grad {flags.tolist()}, loss {losses[-1]}, "
                  f"grad_norm {terms['grad_norm'].item()})", flush=True)
    print(f"  loss first {losses[0]:.4f}, last {losses[-1]:.4f}; first non-finite step: {first_bad}")
    return first_bad is None


def main() -> None:
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, device cpu, threads {torch.get_num_threads()}, SiT depth {a.depth} width "
          f"{a.hidden_size} heads {a.num_heads} patch {a.patch_size}, input {a.channels}x{a.image_size}^2, "
          f"batch {a.batch}, seed {a.seed}")
    ok = (a.layer_steps == 0 or layerwise(a)) & (a.train_steps == 0 or end_to_end(a))
    print("OK: compiled bf16 matches eager and stays finite" if ok else "MISMATCH: see the rows above")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
