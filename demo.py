"""The whole pipeline on Fashion-MNIST, offline, on the CPU (README: `bash setup.sh && .venv/bin/python demo.py`).

    preprocess (pixels, 32x32) -> torchrun train.py (small SiT + Repulsor) -> sample_ddp.py
    -> FID against held-out real images -> sample grid, loss curve, FID-vs-step plot, results.json

Every stage is the real command a researcher would run at scale (printed before it runs), and
re-running the demo resumes: finished shards, checkpoints and sample sets are reused.
`--smoke` runs the same path with a tiny model, a few steps and a few images (the test suite does).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

from loss import REGULARISERS  # noqa: E402

# Demo model: 1.9M-parameter SiT on 1x32x32 pixels, patch 4 (64 tokens): about 5 steps/s at batch 32
# on 2 CPU cores, so 1600 steps take about 6 minutes.
MODEL_FLAGS = ["--model", "custom", "--depth", "6", "--hidden-size", "128", "--num-heads", "4", "--patch-size", "4"]
SMOKE_MODEL_FLAGS = ["--model", "custom", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "8"]


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data", help="where the preprocessed datasets go")
    p.add_argument("--out", default=None,
                   help="run directory (training run, samples, plots; default results/demo, --smoke results/demo-smoke)")
    p.add_argument("--steps", type=int, default=1600, help="training steps")
    p.add_argument("--batch", type=int, default=32, help="global batch size")
    p.add_argument("--lr", type=float, default=1e-3)
    # Every registered regulariser that needs no stored images (the demo encodes none).
    p.add_argument("--reg", default="repulsor", choices=[n for n, c in REGULARISERS.items() if not c.needs_images])
    p.add_argument("--fid-points", type=int, default=2, help="checkpoints evaluated (evenly spaced)")
    p.add_argument("--fid-samples", type=int, default=300, help="generated images per FID point")
    p.add_argument("--fid-ref", type=int, default=500, help="held-out real images in the FID reference")
    p.add_argument("--sample-steps", type=int, default=25, help="Heun ODE steps for sampling")
    p.add_argument("--nproc", type=int, default=2, help="training processes (torchrun, gloo)")
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps, few images (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.fid_points, args.fid_samples, args.fid_ref, args.sample_steps = 4, 16, 2, 10, 10, 2
    if args.out is None:
        args.out = "results/demo-smoke" if args.smoke else "results/demo"
    return args


def data_dirs(args: argparse.Namespace) -> tuple[str, str]:
    """The train and test datasets. The smoke run's are a 512-image cut in their own directories, so
    a full demo after CI's smoke run (same --data-root) neither meets nor reuses them."""
    suffix = "-smoke" if args.smoke else ""
    return tuple(os.path.join(args.data_root, f"fmnist-{split}{suffix}") for split in ("train", "test"))


def run(cmd: list[str], env: dict | None = None) -> None:
    """Run one stage, showing the command; a failing stage stops the demo with its own message."""
    print(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"error: stage failed (exit code {proc.returncode}): {' '.join(cmd[:3])} ...")


def train_flags(args: argparse.Namespace, data_dir: str, results_dir: str, exp_name: str) -> list[str]:
    every = max(1, args.steps // args.fid_points)
    return [
        "--data-dir", data_dir, "--results-dir", results_dir, "--exp-name", exp_name,
        *(SMOKE_MODEL_FLAGS if args.smoke else MODEL_FLAGS),
        "--global-batch-size", str(args.batch), "--lr", str(args.lr), "--max-steps", str(args.steps),
        "--ckpt-every", str(every), "--log-every", str(max(1, min(25, args.steps // 10))),
        "--sample-every", str(every), "--sample-steps", str(args.sample_steps),
        "--reg", args.reg, "--ema-warmup", "--num-workers", "0", "--device", "cpu",
        # Repulsor at demo scale: a bank of 32 global batches, a narrower head for a 192-wide SiT.
        "--bank-size", str(32 * args.batch), "--proj-hidden", "512",
        "--mixed-precision", "no",  # bf16 autocast is several times slower than fp32 on CPUs without bf16 units
    ]


def real_images(data_dir: str, n: int) -> np.ndarray:
    """The first n held-out images as uint8 N x H x W x 3 (the FID reference)."""
    from dataset import LatentDataset
    from samplers import to_uint8
    import torch

    ds = LatentDataset(data_dir)
    if n > len(ds):
        raise SystemExit(f"error: --fid-ref {n} is more than the {len(ds)} held-out images")
    pixels = torch.stack([ds[i][0] for i in range(n)]).float()
    return to_uint8(pixels)


def checkpoint_fid(ckpt: str, out_npz: str, ref_stats: dict, extractor, num_samples: int, sample_steps: int,
                   seed: int = 0) -> float:
    """Sample `num_samples` EMA images from a checkpoint with sample_ddp.py, then FID against ref_stats."""
    import evaluations

    run([sys.executable, "sample_ddp.py", "--ckpt", ckpt, "--num-samples", str(num_samples), "--mode", "ode",
         "--heun", "--num-steps", str(sample_steps), "--per-proc-batch-size", "100", "--seed", str(seed),
         "--out", out_npz, "--device", "cpu"])
    return evaluations.evaluate(out_npz, ref_stats, extractor, metrics=("fid",), progress=True)["fid"]


def main(args: argparse.Namespace) -> None:
    t_start = time.time()
    py = sys.executable
    train_dir, test_dir = data_dirs(args)
    limit = ["--limit", "512"] if args.smoke else []
    for split, d in (("train", train_dir), ("test", test_dir)):
        run([py, "preprocessing/encode.py", "--dataset", "fashion-mnist", "--split", split, "--vae", "none",
             "--resolution", "32", "--out", d, "--device", "cpu", *limit])

    results_dir, exp = os.path.dirname(os.path.abspath(args.out)), os.path.basename(os.path.abspath(args.out))
    run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "train.py",
         *train_flags(args, train_dir, results_dir, exp)], env={"OMP_NUM_THREADS": str(max(1, 2 // args.nproc))})
    run_dir = os.path.join(results_dir, exp)
    t_train = time.time()

    import evaluations
    from checkpoint import latest_checkpoint
    from plots import plot_fid_curves

    extractor = evaluations.load_inception(device="cpu")
    ref_npz = os.path.join(args.data_root, f"fmnist-test-ref{args.fid_ref}.npz")
    if not os.path.isfile(ref_npz):
        np.savez(ref_npz, arr_0=real_images(test_dir, args.fid_ref))
    print(f"\nFID reference: {args.fid_ref} held-out Fashion-MNIST test images ({ref_npz})", flush=True)
    ref_stats = evaluations.reference_statistics(ref_npz, extractor, cache_dir=args.data_root, progress=True)

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    ckpts = sorted(os.path.join(ckpt_dir, f) for f in os.listdir(ckpt_dir) if f.endswith(".pt"))
    fids: dict[int, float] = {}
    for ckpt in ckpts:
        step = int(os.path.basename(ckpt)[:-3])
        npz = os.path.join(run_dir, "fid_samples", f"{step:07d}.npz")
        fids[step] = checkpoint_fid(ckpt, npz, ref_stats, extractor, args.fid_samples, args.sample_steps)
        print(f"step {step}: FID-{args.fid_samples} = {fids[step]:.2f}", flush=True)
    steps = sorted(fids)
    fid_png = plot_fid_curves({f"SiT + {args.reg}": (steps, [fids[s] for s in steps])},
                              os.path.join(run_dir, "fid_vs_step.png"),
                              title=f"FID-{args.fid_samples} vs {args.fid_ref} held-out images")
    final = latest_checkpoint(ckpt_dir)
    grid = os.path.join(run_dir, "fid_samples", f"{steps[-1]:07d}.grid.png")
    results = {
        "fid": {str(s): fids[s] for s in steps},
        "fid_samples": args.fid_samples, "fid_reference_images": args.fid_ref,
        "sampler": f"Heun ODE, {args.sample_steps} steps, EMA weights (with EMA warm-up), no guidance",
        "final_checkpoint": final, "train_seconds": round(t_train - t_start, 1),
        "total_seconds": round(time.time() - t_start, 1), "args": vars(args),
    }
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nDone in {results['total_seconds'] / 60:.1f} min. Pictures:\n"
          f"  samples     {grid}\n  loss curve  {os.path.join(run_dir, 'loss_curve.png')}\n"
          f"  FID curve   {fid_png}\n  grids over training: {os.path.join(run_dir, 'samples')}/\n"
          f"  results     {os.path.join(run_dir, 'results.json')}")


if __name__ == "__main__":
    main(get_args())
