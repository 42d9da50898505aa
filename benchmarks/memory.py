"""Does GMem's memory conditioning speed up training, and does the memory's content matter?

    python benchmarks/memory.py                          # 3 configs x seeds 0, 1; FID at 400/800/1200
    python benchmarks/memory.py --report-only            # rebuild the tables and plot from results.json

Same SiT as the demo (depth 6, width 128, heads 4, patch 4 on 1x32x32 Fashion-MNIST pixels), same
data, seeds, batch 32, lr 1e-3, EMA with warm-up, fp32, and --reg none for every config, so only the
conditioning differs:

  class            class-conditional baseline (the label embedding);
  memory-repulsor  --cond memory, snippets from --encoder-ckpt (default: the demo's Repulsor
                   checkpoint) via `preprocessing/memory.py --encoder sit:CKPT` (encoder-free GMem);
  memory-random    --cond memory, snippets from a SiT of the same architecture with ALL weights
                   random plus a random Repulsor head (the control: does the snippets' content matter?).
                   An untrained SiT is degenerate: adaLN-Zero makes every block the identity, so the
                   snippet would be a random projection of the patch embedding. The control therefore
                   re-initialises every Linear with xavier (the zero adaLN and output layers, and the
                   std-0.02 time MLP, whose tiny condition would keep the gates near 0) and the class
                   table with N(0, 1) (biases stay zero), and is written as a train.py-format checkpoint
                   (DATA_ROOT/encoders/random-sit-s<SEED>.pt) that preprocessing/memory.py reads as sit:PATH.

FID-N against held-out test images as in benchmarks/convergence.py (EMA weights, Heun ODE, no guidance,
sample seed 0; a memory model draws snippet i uniformly from the bank, from (seed, i)). At the last step,
the memorisation check of evaluations/memorisation.py on Inception pool features: the FID sample set
against the first --train-ref training images plus the source images of the snippets drawn (the same
set for every config), with the FID's held-out images as the calibration set; nn_is_source is the share
of samples whose nearest training image is their own snippet's source (closest-pairs PNG in
OUT/<config>-s<seed>/closest_pairs.png). Each bank is also described by its mean
pairwise cosine and the 1-NN label agreement of its snippets (leave-one-out over --bank-probe items;
chance is about 10 %): how much class information the memory carries.

Every run is a real train.py run in OUT/<config>-s<seed>; re-running skips finished training, banks and
cached numbers. Writes OUT/results.json, OUT/table.md and OUT/memory.png (FID vs step, seed means).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.convergence import fid_tables, mean_spread  # noqa: E402
from demo import MODEL_FLAGS, checkpoint_fid, real_images, run  # noqa: E402

CONFIGS = ("class", "memory-repulsor", "memory-random")
DEMO_CKPT = "results/demo/checkpoints/0001600.pt"
RANDOM_HEAD = dict(proj_dim=128, proj_hidden=512)  # the demo's Repulsor head: train.py's d, --proj-hidden 512
BANK_PROBE_SEED = 0
SAMPLE_SEED = 0  # demo.checkpoint_fid's default: image i of every FID set uses (0, i), its snippet too


class BenchmarkError(ValueError):
    """A user error (flags, stale OUT): main prints it as one `error: ...` line and exits with 2."""


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/memory")
    p.add_argument("--data-root", default="data")
    p.add_argument("--encoder-ckpt", default=DEMO_CKPT,
                   help="memory-repulsor's snippet encoder: a train.py checkpoint (the demo's Repulsor run)")
    p.add_argument("--random-seed", type=int, default=0, help="weights of memory-random's random SiT and head")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"subset of {', '.join(CONFIGS)}")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables and plot from results.json")
    p.add_argument("--fid-samples", type=int, default=250)
    p.add_argument("--fid-ref", type=int, default=1000)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--train-ref", type=int, default=5000, help="training images the memorisation check searches")
    p.add_argument("--bank-probe", type=int, default=5000, help="bank items behind the cosine / 1-NN numbers")
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> None:
    """Every flag error before any data, bank or run is touched."""
    unknown = sorted(set(a.configs) - set(CONFIGS))
    if unknown:
        raise BenchmarkError(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    for name in ("steps", "eval_every", "batch", "fid_samples", "fid_ref", "train_ref", "bank_probe"):
        if getattr(a, name) < 1:
            raise BenchmarkError(f"--{name.replace('_', '-')} must be >= 1")
    if a.report_only:
        if not os.path.isfile(os.path.join(a.out, "results.json")):
            raise BenchmarkError(f"{a.out}/results.json does not exist: run without --report-only first (or pass --out)")
    elif "memory-repulsor" in a.configs and not os.path.isfile(a.encoder_ckpt):
        raise BenchmarkError(f"--encoder-ckpt {a.encoder_ckpt} does not exist: run the demo first (python demo.py "
                         "writes results/demo/checkpoints/0001600.pt) or pass a Repulsor checkpoint")


def eval_steps(a: argparse.Namespace) -> list[int]:
    """Every --eval-every steps, and always the last step (train.py saves it; memorisation uses it)."""
    return sorted(set(range(a.eval_every, a.steps + 1, a.eval_every)) | {a.steps})


def main(argv: list[str] | None = None) -> int:
    from dataset import DataError  # MemoryBankError too

    a = get_args(argv)
    try:
        check_args(a)
        results_path = os.path.join(a.out, "results.json")
        results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
        if not a.report_only:
            os.makedirs(a.out, exist_ok=True)
            run_all(a, results)
        report(a, results)
    except (BenchmarkError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- the random control

def random_encoder_checkpoint(path: str, *, latent_shape: list[int], num_classes: int, depth: int,
                              hidden_size: int, num_heads: int, patch_size: int, proj_dim: int, proj_hidden: int,
                              seed: int) -> str:
    """Write a train.py-format checkpoint whose SiT has ALL weights random at full scale (no zero or
    near-zero init anywhere) and a random Repulsor head (train.py's init) on the Repulsor block train.py
    would use; preprocessing/memory.py reads it as sit:PATH."""
    import torch
    import torch.nn as nn

    from checkpoint import save_checkpoint
    from loss import Repulsor, default_reg_depth
    from models.sit import SiT, SiTConfig

    torch.manual_seed(seed)
    cfg = SiTConfig(input_size=latent_shape[1], in_channels=latent_shape[0], patch_size=patch_size,
                    hidden_size=hidden_size, depth=depth, num_heads=num_heads, num_classes=num_classes)
    sit = SiT(cfg)
    # DiT's init makes an untrained SiT degenerate: zero adaLN outputs (every block the identity), a
    # zero output layer, and a time MLP and class table of std 0.02 (a condition so small that xavier
    # adaLN weights alone would still give gates of about 0.003). Here every Linear is xavier and the
    # class table N(0, 1), nn.Embedding's own default; biases stay zero.
    for m in sit.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
    nn.init.normal_(sit.y_embedder.embedding_table.weight, std=1.0)
    block = default_reg_depth("repulsor", None, depth)
    head = Repulsor(hidden_size, block, proj_dim, proj_hidden, bank_size=0, global_batch=2)
    args = dict(model="custom", depth=depth, reg="repulsor", reg_depth=block, proj_dim=proj_dim,
                proj_head="standardised",
                proj_hidden=proj_hidden, path_type="linear", seed=seed,
                note="random weights (benchmarks/memory.py control): never trained")
    save_checkpoint(path, {"ema": sit.state_dict(), "regulariser": head.state_dict(), "step": 0, "args": args,
                           "model_config": cfg.to_dict()})
    return path


# ----------------------------------------------------------------------------- running

def build_banks(a: argparse.Namespace, train_dir: str, results: dict) -> dict[str, list[str]]:
    """The memory banks the memory configs need (built once, reused) -> each config's extra train.py flags."""
    from dataset import read_manifest
    from preprocessing.memory import default_name

    flags: dict[str, list[str]] = {"class": []}
    for config in [c for c in a.configs if c.startswith("memory-")]:
        if config == "memory-repulsor":
            ckpt, name = a.encoder_ckpt, default_name(argparse.Namespace(encoder=f"sit:{a.encoder_ckpt}"))
        else:
            name = f"random-sit-s{a.random_seed}"
            ckpt = os.path.join(a.data_root, "encoders", f"{name}.pt")
            if not os.path.isfile(ckpt):
                dims = dict(zip(MODEL_FLAGS[::2], MODEL_FLAGS[1::2]))
                manifest = read_manifest(train_dir)
                random_encoder_checkpoint(ckpt, latent_shape=manifest["latent_shape"],
                                          num_classes=manifest["num_classes"], depth=int(dims["--depth"]),
                                          hidden_size=int(dims["--hidden-size"]), num_heads=int(dims["--num-heads"]),
                                          patch_size=int(dims["--patch-size"]), seed=a.random_seed, **RANDOM_HEAD)
        run([sys.executable, "preprocessing/memory.py", "--data-dir", train_dir, "--encoder", f"sit:{ckpt}",
             "--name", name, "--device", "cpu", "--workers", "0", "--batch-size", "256"])
        describe_bank(a, train_dir, config, name, results)
        flags[config] = ["--cond", "memory", "--memory", name]
    return flags


def describe_bank(a: argparse.Namespace, train_dir: str, config: str, name: str, results: dict) -> None:
    """Mean pairwise cosine and leave-one-out 1-NN label agreement of --bank-probe random items (cached).
    A bank rebuilt from another encoder makes the cached runs of its config stale: refused."""
    import numpy as np
    import torch

    from dataset import LatentDataset
    from gmem import open_dataset_memory

    memory = open_dataset_memory(train_dir, name)
    key = f"bank/{config}"
    old = results.get(key)
    if old is not None:
        if old["fingerprint"] != memory.fingerprint:
            raise BenchmarkError(f"{a.out} holds {config} runs trained on bank fingerprint {old['fingerprint']}, "
                             f"the bank {name} is now {memory.fingerprint}: pass another --out")
        return
    n = min(a.bank_probe, len(memory))
    idx = np.sort(np.random.default_rng(BANK_PROBE_SEED).choice(len(memory), n, replace=False))
    s = memory[idx]
    ds = LatentDataset(train_dir)
    labels = torch.tensor([int(ds[int(i)][2]) for i in idx])
    cos = s @ s.T
    off = ~torch.eye(n, dtype=torch.bool)
    nn_index = cos.masked_fill(~off, -2.0).argmax(1)
    results[key] = {"kind": "bank", "config": config, "name": name, "fingerprint": memory.fingerprint,
                    "encoder": memory.meta["encoder_id"], "dim": memory.dim, "probe": n,
                    "mean_cos": float(cos[off].mean()), "nn_label_acc": float((labels[nn_index] == labels).float().mean())}
    save_results(a, results)


def save_results(a: argparse.Namespace, results: dict) -> None:
    path = os.path.join(a.out, "results.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(f"{path}.tmp", path)


def memorisation_reference(a: argparse.Namespace, train_dir: str) -> tuple[str, "np.ndarray", "np.ndarray"]:
    """The training images the memorisation check searches: the first --train-ref, plus the source image
    of every snippet the FID sets draw (the bank rows of sample seed 0), so a memory model that copies the
    very image it was conditioned on is found even outside the subset. The same set for every config.
    Returns (its .npz, the training item of each of its images, the source item of each generated image)."""
    import numpy as np
    import torch

    from dataset import LatentDataset
    from gmem import snippet_indices
    from samplers import to_uint8

    ds = LatentDataset(train_dir)
    sources = snippet_indices(SAMPLE_SEED, range(a.fid_samples), len(ds))
    rows = np.concatenate([np.arange(min(a.train_ref, len(ds))), np.unique(sources[sources >= a.train_ref])])
    npz = os.path.join(a.data_root, f"fmnist-train-memref{a.train_ref}-{a.fid_samples}.npz")
    if not os.path.isfile(npz):
        np.savez(npz, arr_0=to_uint8(torch.stack([ds[int(i)][0] for i in rows]).float()))
    return npz, rows, sources


def run_all(a: argparse.Namespace, results: dict) -> None:
    """Banks; every (seed, config): train, FID at every eval step; then memorisation at the last step of
    each run (after all FIDs, so a cut budget loses the memorisation numbers first). Everything cached."""
    import numpy as np

    import evaluations
    from evaluations.memorisation import memorisation_stats, save_closest_pairs

    train_dir, test_dir = (os.path.join(a.data_root, f"fmnist-{s}") for s in ("train", "test"))
    for split, d in (("train", train_dir), ("test", test_dir)):
        run([sys.executable, "preprocessing/encode.py", "--dataset", "fashion-mnist", "--split", split,
             "--vae", "none", "--resolution", "32", "--out", d, "--device", "cpu"])
    cond_flags = build_banks(a, train_dir, results)

    extractor = evaluations.load_inception(device="cpu")
    ref_npz = os.path.join(a.data_root, f"fmnist-test-ref{a.fid_ref}.npz")
    if not os.path.isfile(ref_npz):
        np.savez(ref_npz, arr_0=real_images(test_dir, a.fid_ref))
    ref = evaluations.reference_statistics(ref_npz, extractor, cache_dir=a.data_root, progress=True)

    runs = [(seed, config) for seed in a.seeds for config in a.configs]  # seed-major: a cut run has seed 0
    for seed, config in runs:  # phase 1: training and FIDs (the last step's samples are kept for phase 2)
        exp = f"{config}-s{seed}"
        run([sys.executable, "train.py", "--data-dir", train_dir, "--results-dir", a.out, "--exp-name", exp,
             *MODEL_FLAGS, "--reg", "none", *cond_flags[config], "--seed", str(seed),
             "--global-batch-size", str(a.batch), "--lr", str(a.lr), "--max-steps", str(a.steps),
             "--ckpt-every", str(a.eval_every), "--log-every", "50", "--ema-warmup", "--num-workers", "0",
             "--device", "cpu", "--mixed-precision", "no"])
        for step in eval_steps(a):
            key, npz = f"{exp}/{step}", sample_path(a, exp, step)
            keep = step == a.steps and memo_key(exp, step) not in results
            if key in results and (not keep or os.path.isfile(npz)):
                continue
            fid = checkpoint_fid(os.path.join(a.out, exp, "checkpoints", f"{step:07d}.pt"), npz, ref, extractor,
                                 a.fid_samples, a.sample_steps)
            results[key] = {"kind": "fid", "config": config, "seed": seed, "step": step, "fid": fid}
            save_results(a, results)
            print(f"{key}: FID-{a.fid_samples} {fid:.2f}", flush=True)
            if not keep:
                os.remove(npz)  # keep only the number (and the grid)

    todo = [(seed, config) for seed, config in runs if memo_key(f"{config}-s{seed}", a.steps) not in results]
    if not todo:
        return
    train_npz, train_rows, sources = memorisation_reference(a, train_dir)  # phase 2: memorisation
    train_pool = evaluations.reference_statistics(train_npz, extractor, cache_dir=a.data_root, progress=True)["pool"]
    for seed, config in todo:
        exp = f"{config}-s{seed}"
        npz = sample_path(a, exp, a.steps)
        gen_pool = evaluations.compute_features(npz, extractor, progress=True)["pool"]
        memo = memorisation_stats(gen_pool, train_pool, ref["pool"])
        save_closest_pairs(os.path.join(a.out, exp, "closest_pairs.png"), npz, train_npz, memo)
        results[memo_key(exp, a.steps)] = {
            "kind": "memorisation", "config": config, "seed": seed, "step": a.steps, "train_images": len(train_rows),
            "samples": a.fid_samples, **memo.metrics(),
            "nn_is_source": float(np.mean(train_rows[memo.gen_index] == sources))}
        save_results(a, results)
        print(f"{memo_key(exp, a.steps)}: {results[memo_key(exp, a.steps)]}", flush=True)
        os.remove(npz)


def memo_key(exp: str, step: int) -> str:
    return f"{exp}/memorisation-{step}"


def sample_path(a: argparse.Namespace, exp: str, step: int) -> str:
    return os.path.join(a.out, exp, "fid_samples", f"{step:07d}.npz")


# ----------------------------------------------------------------------------- report

def first_reach(curve: dict[int, float], target: float) -> int | None:
    """First evaluated step whose FID is at or below target, or None."""
    return next((s for s in sorted(curve) if curve[s] <= target), None)


def report(a: argparse.Namespace, results: dict) -> str:
    """FID table (seed mean ± spread), FID minus class's at the same seed, GMem's claim (the first step
    each memory config's seed-mean FID reaches class's final seed-mean FID), memorisation and bank tables,
    and the plot of seed means."""
    from plots import plot_fid_curves

    rows = [r for r in results.values() if r.get("kind", "fid") == "fid" and r["step"] <= a.steps]
    fid = {(r["config"], r["seed"], r["step"]): r["fid"] for r in rows}
    names = [c for c in CONFIGS if c in a.configs]
    steps = sorted({s for c, _, s in fid if c in names})
    seeds = sorted({seed for c, seed, _ in fid if c in names})
    table, paired, means = fid_tables(fid, names, steps, "class")
    out = [f"FID-{a.fid_samples} against {a.fid_ref} held-out images, mean ± half-range over seeds {seeds}:", "",
           *table, "", "FID minus class's FID at the same seed:", "", *paired, ""]

    base = means.get("class", {})
    if base:
        final_step = max(base)
        target = base[final_step]
        out.append(f"GMem's claim: class's final FID is {target:.1f} (step {final_step}, seed mean).")
        for name in [n for n in names if n != "class"]:
            if name not in means:
                continue
            s = first_reach(means[name], target)
            out.append(f"- {name}: " + (f"first reaches it at step {s} ({s / final_step:.2f} of the baseline's steps)"
                                        if s is not None else f"does not reach it by step {max(means[name])}"))
        out.append("")

    memo = sorted((r for r in results.values() if r.get("kind") == "memorisation" and r["step"] == a.steps),
                  key=lambda r: r["seed"])
    if memo:
        out += [f"Memorisation at step {a.steps}: {memo[0]['samples']} samples vs {memo[0]['train_images']} training "
                "images (the first --train-ref and the sources of the drawn snippets), calibrated on the held-out "
                "images; nn_is_source: share of samples whose nearest training image is the one whose snippet "
                "they were drawn with (for class: chance):", "",
                "| config | nn_median_ratio | nn_close_share | nn_is_source |", "|---|---|---|---|"]
        for name in names:
            vals = [r for r in memo if r["config"] == name]
            if vals:
                out.append("| " + " | ".join([name] + [mean_spread([r[k] for r in vals], digits=3) for k in
                                                       ("nn_median_ratio", "nn_close_share", "nn_is_source")]) + " |")
        out.append("")
    banks = [results[f"bank/{n}"] for n in names if f"bank/{n}" in results]
    if banks:
        out += ["Memory banks (random probe of bank items):", "",
                "| config | bank | dim | mean cosine | 1-NN label agreement |", "|---|---|---|---|---|"]
        out += [f"| {b['config']} | {b['name']} | {b['dim']} | {b['mean_cos']:.3f} | {b['nn_label_acc']:.3f} |"
                for b in banks]
        out.append("")
    text = "\n".join(out)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text)
    curves = {n: (sorted(m), [m[s] for s in sorted(m)]) for n, m in means.items()}
    png = plot_fid_curves(curves, os.path.join(a.out, "memory.png"),
                          title=f"FID-{a.fid_samples} (mean over seeds {seeds}), --reg none")
    print(f"\n{text}\nplot: {png}")
    return text


if __name__ == "__main__":
    sys.exit(main())
