"""Does Repulsor speed up convergence? Same SiT, data, seeds and budget for every config; FID at
several step counts (fixed sample count, reference and sampler), paired with --reg none by seed.

    python benchmarks/convergence.py                                  # none, dispersive, repulsor; 1000 steps
    python benchmarks/convergence.py --study rivals --steps 2000 --eval-every 1000   # + sra, deltafm, --reg-until
    python benchmarks/convergence.py --study ablation --seeds 0       # one setting of the default changed per row
    python benchmarks/convergence.py --study scale                    # none vs repulsor at widths 32, 64, 128
    python benchmarks/convergence.py --study pairs                    # the noise-pair positive (--noise-pairs)
    python benchmarks/convergence.py --study heads --steps 1600 --eval-every 800 \
        --configs none repulsor-mlp repulsor-centred repulsor             # the collapse fix (--proj-head)

The same runs on a GPU (many at once; docs/benchmarks.md lists the commands behind each table):
--gpu-runs prints a study's runs for benchmarks/gpu_convergence.py --runs (benchmarks/gpu_session.sh demo),
and --from-gpu JSON takes them back from its gpu_convergence.json (FIDs computed on the CPU with its
--fid-from) into OUT/results.json, exactly as this script would have written them here.

Data: Fashion-MNIST pixels (the demo's preprocessing). Every run is a real `train.py` run in
OUT/<config>-s<seed>; re-running skips finished training and cached FIDs, so the benchmark can be
stopped and resumed. Writes OUT/results.json (FIDs, and each run's health over its second half),
OUT/table.md (FID, FID minus the baseline's at the same seed, health) and a plot; --report-only
rebuilds the last two from results.json alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from demo import checkpoint_fid, real_images, run  # noqa: E402

# The demo's SiT (depth 6, width 128, patch 4 on 1x32x32 pixels): 5 steps/s at batch 32 on 2 cores.
# A config's own flags come after these on the train.py command line, and argparse keeps the last
# value, so a config may override the width (the scale study).
MODEL = ["--model", "custom", "--depth", "6", "--hidden-size", "128", "--num-heads", "4", "--patch-size", "4"]
MAIN = {
    "none": ["--reg", "none"],
    "dispersive": ["--reg", "dispersive"],
    "repulsor": ["--reg", "repulsor"],  # the defaults: lambda 0.1, tau 0.5, d 128, block 2 = depth // 3
}
# The ablation changes one setting of today's default Repulsor ("repulsor": lambda 0.1, tau 0.5, d 128,
# block 2 = depth // 3, K 1024 = 32 global batches here, the standardised head).
ABLATION = {
    "repulsor-w0.05": ["--reg", "repulsor", "--reg-weight", "0.05"],
    "repulsor-w0.5": ["--reg", "repulsor", "--reg-weight", "0.5"],
    "repulsor-K0": ["--reg", "repulsor", "--bank-size", "0"],
    "repulsor-K256": ["--reg", "repulsor", "--bank-size", "256"],
    "repulsor-K4096": ["--reg", "repulsor", "--bank-size", "4096"],
    "repulsor-tau0.2": ["--reg", "repulsor", "--temperature", "0.2"],
    "repulsor-tau1.0": ["--reg", "repulsor", "--temperature", "1.0"],
    "repulsor-d32": ["--reg", "repulsor", "--proj-dim", "32"],
    "repulsor-block1": ["--reg", "repulsor", "--reg-depth", "1"],
    "repulsor-block4": ["--reg", "repulsor", "--reg-depth", "4"],
}

# Scale study: --reg none vs repulsor (today's defaults) at several widths, depth 6, 4 heads, patch 4.
# Width 128 is the demo's SiT, so its runs are the main comparison's "none" and "repulsor". Width 256
# (7.4M parameters) costs about 31 minutes a run on one core, FIDs included: too long for the default.
SCALE_WIDTHS = (32, 64, 128)
SCALE_REGS = ("none", "repulsor")


def scale_config(width: int, reg: str) -> tuple[str, list[str]]:
    name = reg if width == 128 else f"w{width}-{reg}"
    return name, ([] if width == 128 else ["--hidden-size", str(width)]) + ["--reg", reg]


# Noise pairs: each image twice in the batch (B/2 images at two independent times and noises).
# "pairs-repulsor" makes the twin the InfoNCE positive; "pairs-none" is plain SiT on the same batches.
PAIRS = {
    "pairs-none": ["--reg", "none", "--noise-pairs"],
    "pairs-repulsor": ["--reg", "repulsor", "--noise-pairs"],
}
# Projection heads (the collapse fix): the head before the fix (mlp) collapses within the batch; each
# candidate fix changes only --proj-head (or the in-batch weight); "repulsor" is today's default
# (standardised, the winner of this study).
HEADS = {
    "repulsor-mlp": ["--reg", "repulsor", "--proj-head", "mlp"],
    "repulsor-centred": ["--reg", "repulsor", "--proj-head", "centred"],
    "repulsor": ["--reg", "repulsor"],
    "repulsor-running": ["--reg", "repulsor", "--proj-head", "running"],
    "repulsor-mlp-bw32": ["--reg", "repulsor", "--proj-head", "mlp", "--repulsor-batch-weight", "32"],
}
# The encoder-free rivals on the same protocol, each with its published defaults scaled to the demo's SiT
# (SRA: student block 2 -> EMA teacher block 4 of 6 at t - 0.2, weight 0.5; ΔFM: lambda 0.05), and
# Repulsor switched off after step 500 (--reg-until, as HASTE stops REPA).
RIVALS = {
    "none": ["--reg", "none"],
    "repulsor": ["--reg", "repulsor"],
    "dispersive": ["--reg", "dispersive"],
    "sra": ["--reg", "sra"],
    "deltafm": ["--reg", "deltafm"],
    "repulsor-until500": ["--reg", "repulsor", "--reg-until", "500"],
}
STUDIES = ("main", "ablation", "scale", "pairs", "heads", "rivals")


def study_configs(a: argparse.Namespace) -> dict[str, list[str]]:
    if a.study == "pairs":
        return PAIRS
    if a.study == "heads":
        return {"none": MAIN["none"], **HEADS}
    if a.study == "rivals":
        return RIVALS
    if a.study == "ablation":
        return {"none": MAIN["none"], "repulsor": MAIN["repulsor"], **ABLATION}
    if a.study == "scale":
        configs = dict(scale_config(w, reg) for w in a.widths for reg in SCALE_REGS)
        if a.dispersive_width in a.widths:  # the in-batch baseline at one width (default: the largest)
            configs.update([scale_config(a.dispersive_width, "dispersive")])
        return configs
    return MAIN


def study_names(a: argparse.Namespace, configs: dict) -> list[str]:
    """The rows of a study's tables: its reference runs first (the ablation's baseline and base, today's
    default; the plain runs beside the noise-pair runs), then its configs."""
    names = {"ablation": ["none", "repulsor"], "pairs": ["none", "repulsor"], "heads": ["none"]}.get(a.study, [])
    return names + [n for n in configs if n not in names]


def known_configs(a: argparse.Namespace) -> dict[str, list[str]]:
    widths = sorted({*SCALE_WIDTHS, *a.widths})
    scale = dict(scale_config(w, reg) for w in widths for reg in (*SCALE_REGS, "dispersive"))
    return {**MAIN, **ABLATION, **PAIRS, **HEADS, **RIVALS, **scale}


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/convergence")
    p.add_argument("--data-root", default="data")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bank-size", type=int, default=1024, help="Repulsor K at this scale (32 global batches)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--configs", nargs="+", default=None, help="subset of config names to run")
    p.add_argument("--study", default="main", choices=STUDIES,
                   help="main comparison, Repulsor ablation, scale trend (--widths), or the noise-pair positive")
    p.add_argument("--ablation", action="store_true", help="same as --study ablation")
    p.add_argument("--widths", type=int, nargs="+", default=list(SCALE_WIDTHS), help="--study scale: SiT widths")
    p.add_argument("--dispersive-width", type=int, default=None,
                   help="--study scale: also run dispersive at this width (default: the largest of --widths)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from results.json")
    p.add_argument("--gpu-runs", action="store_true",
                   help="print the runs as benchmarks/gpu_convergence.py --runs specs and exit")
    p.add_argument("--from-gpu", default=None, metavar="JSON",
                   help="take the runs from a gpu_convergence.json (with FIDs from its --fid-from), then report")
    p.add_argument("--fid-samples", type=int, default=250)
    p.add_argument("--fid-ref", type=int, default=1000)
    p.add_argument("--sample-steps", type=int, default=25)
    a = p.parse_args()
    if a.ablation:
        a.study = "ablation"
    if min(a.widths) < 4 or any(w % 4 for w in a.widths):
        p.error(f"--widths {a.widths}: every width must be a positive multiple of the 4 heads")
    if a.dispersive_width is None:
        a.dispersive_width = max(a.widths)
    return a


def main() -> None:
    a = get_args()
    configs = study_configs(a)
    if a.configs:
        known = known_configs(a)
        unknown = set(a.configs) - set(known)
        if unknown:
            raise SystemExit(f"error: unknown configs {sorted(unknown)}; known: {', '.join(known)}")
        configs = {k: v for k, v in known.items() if k in a.configs}
    if a.gpu_runs:
        return gpu_runs(a, configs)
    os.makedirs(a.out, exist_ok=True)
    results_path = os.path.join(a.out, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    if a.from_gpu:
        import_gpu(a, configs, results, a.from_gpu)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=2)
    elif not a.report_only:
        run_all(a, configs, results, results_path)
    report(a, configs, results)


def run_all(a: argparse.Namespace, configs: dict, results: dict, results_path: str) -> None:
    """Train every (config, seed) and evaluate FID at every --eval-every step (cached in results)."""
    train_dir, test_dir = (os.path.join(a.data_root, f"fmnist-{s}") for s in ("train", "test"))
    for split, d in (("train", train_dir), ("test", test_dir)):
        run([sys.executable, "preprocessing/encode.py", "--dataset", "fashion-mnist", "--split", split,
             "--vae", "none", "--resolution", "32", "--out", d, "--device", "cpu"])

    import numpy as np

    import evaluations

    from plots import read_jsonl

    extractor = evaluations.load_inception(device="cpu")
    ref_npz = os.path.join(a.data_root, f"fmnist-test-ref{a.fid_ref}.npz")
    if not os.path.isfile(ref_npz):
        np.savez(ref_npz, arr_0=real_images(test_dir, a.fid_ref))
    ref = evaluations.reference_statistics(ref_npz, extractor, cache_dir=a.data_root, progress=True)

    for name, flags in configs.items():
        for seed in a.seeds:
            exp = f"{name}-s{seed}"
            run([sys.executable, "train.py", "--data-dir", train_dir, "--results-dir", a.out, "--exp-name", exp,
                 *MODEL, *protocol_flags(a, flags, seed), "--num-workers", "0", "--device", "cpu"])
            ckpt_dir = os.path.join(a.out, exp, "checkpoints")
            for step in range(a.eval_every, a.steps + 1, a.eval_every):
                key = f"{exp}/{step}"
                if key in results:
                    continue
                npz = os.path.join(a.out, exp, "fid_samples", f"{step:07d}.npz")
                fid = checkpoint_fid(os.path.join(ckpt_dir, f"{step:07d}.pt"), npz, ref, extractor,
                                     a.fid_samples, a.sample_steps)
                results[key] = {"config": name, "seed": seed, "step": step, "fid": fid}
                with open(results_path, "w") as f:
                    json.dump(results, f, indent=2)
                os.remove(npz)  # keep only the number (and the grid)
                print(f"{key}: FID-{a.fid_samples} {fid:.2f}", flush=True)
            health = run_health(read_jsonl(os.path.join(a.out, exp, "metrics.jsonl")),
                                json.load(open(os.path.join(a.out, exp, "config.json")))["args"], a.steps)
            if health:
                results[f"{exp}/health"] = {"config": name, "seed": seed, "step": a.steps, **health}
                with open(results_path, "w") as f:
                    json.dump(results, f, indent=2)


def protocol_flags(a: argparse.Namespace, flags: list[str], seed: int) -> list[str]:
    """train.py flags of one (config, seed) run of the protocol, after the data, run directory and MODEL
    flags: the same on the CPU (run_all) and on the GPU (--gpu-runs)."""
    return [*flags, "--seed", str(seed), "--global-batch-size", str(a.batch), "--lr", str(a.lr),
            "--max-steps", str(a.steps), "--ckpt-every", str(a.eval_every), "--log-every", "50", "--ema-warmup",
            "--mixed-precision", "no", *([] if "--bank-size" in flags else ["--bank-size", str(a.bank_size)]),
            "--proj-hidden", "512"]


def gpu_runs(a: argparse.Namespace, configs: dict) -> None:
    """Print the study's runs as benchmarks/gpu_convergence.py --runs specs (NAME=FLAGS, one per line)."""
    import shlex

    for name, flags in configs.items():
        for seed in a.seeds:
            print(f"{name}-s{seed}={shlex.join(protocol_flags(a, flags, seed))}")


def import_gpu(a: argparse.Namespace, configs: dict, results: dict, path: str) -> None:
    """Take the study's runs from a gpu_convergence.json (runs named CONFIG-sSEED, FIDs per sampled step
    from its --fid-from) into results, as run_all would have written them."""
    data = json.load(open(path))
    machine = data.get("machine", {})
    results["meta"] = {"source": f"{os.path.basename(path)}: trained on {machine.get('name', '?')} "
                                 f"(torch {machine.get('torch', '?')}, {machine.get('date', '?')[:10]}), "
                                 "FID on the CPU"}
    for exp, r in data.get("runs", {}).items():
        name, _, seed = exp.rpartition("-s")
        if name not in study_names(a, configs) or not seed.isdigit():
            continue
        for step, fid in sorted((r.get("fids") or {}).items(), key=lambda kv: int(kv[0])):
            if int(step) <= a.steps:
                results[f"{exp}/{step}"] = {"config": name, "seed": int(seed), "step": int(step), "fid": fid}
        steps = min(r.get("steps") or 0, a.steps)
        health = run_health(r.get("metrics") or [], r.get("config") or {}, steps)
        if health:
            results[f"{exp}/health"] = {"config": name, "seed": int(seed), "step": steps, **health}


def run_health(rows: list[dict], args: dict, steps: int) -> dict:
    """The regulariser's health over the second half of a run, from its metrics.jsonl rows and config
    args: the largest mean in-batch cosine (1 = collapsed), the smallest effective rank of the
    projections, and the closest the Repulsor term came to its collapse value 1 / tau."""
    rows = [r for r in rows if steps / 2 <= r["step"] <= steps]
    out = {}
    for key, pick in (("batch_cos_mean", max), ("bank_cos_mean", max), ("proj_eff_rank", min),
                      ("batch_eff_rank", min)):
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[f"{key}_{pick.__name__}"] = pick(vals)
    if args.get("reg") == "repulsor" and any("reg" in r for r in rows) and not args.get("reg_until"):
        out["reg_gap_to_collapse_min"] = min(abs(r["reg"] - 1 / args["temperature"]) for r in rows if "reg" in r)
    vel = [r["velocity"] for r in rows]
    if vel:
        out["velocity_mean"] = sum(vel) / len(vel)
    return out


def mean_spread(vals: list[float], signed: bool = False, digits: int = 1) -> str:
    """'m', 'm ± half-range' for two values, 'm ± sample std' for more."""
    m = f"{statistics.mean(vals):{'+' if signed else ''}.{digits}f}"
    if len(vals) == 2:
        return f"{m} ± {abs(vals[0] - vals[1]) / 2:.{digits}f}"
    return f"{m} ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 2 else m


def fid_tables(fid: dict[tuple[str, int, int], float], names: list[str], steps: list[int],
               baseline: str) -> tuple[list[str], list[str], dict[str, dict[int, float]]]:
    """Markdown rows of FID per config and step (mean and spread over seeds), rows of FID minus the
    baseline's at the same seed (paired: a seed fixes the SiT's init and data order for every config,
    so most seed noise cancels), and the seed means {config: {step: mean}}. fid: {(config, seed, step): FID}."""
    header = [f"| config | {' | '.join(f'step {s}' for s in steps)} |", "|---|" + "---|" * len(steps)]
    lines, paired, means = list(header), list(header), {}
    for name in names:
        row, prow = [], []
        for s in steps:
            vals = [v for (c, _, step), v in sorted(fid.items()) if c == name and step == s]
            diffs = [v - fid[baseline, seed, s] for (c, seed, step), v in sorted(fid.items())
                     if c == name and step == s and (baseline, seed, s) in fid]
            row.append(mean_spread(vals) if vals else "-")
            prow.append(mean_spread(diffs, signed=True) if diffs else "-")
            if vals:
                means.setdefault(name, {})[s] = statistics.mean(vals)
        lines.append(f"| {name} | {' | '.join(row)} |")
        if name != baseline:
            paired.append(f"| {name} | {' | '.join(prow)} |")
    return lines, paired, means


def sit_parameters(width: int) -> int:
    """Parameter count of the benchmark's SiT (MODEL) at this width: what the scale study plots against."""
    from models.sit import build_sit

    sit = build_sit(None, depth=6, hidden_size=width, num_heads=4, patch_size=4, input_size=32, in_channels=1,
                    num_classes=10)
    return sum(p.numel() for p in sit.parameters())


def scale_tables(fid: dict[tuple[str, int, int], float], widths: list[int], steps: list[int]
                 ) -> tuple[list[str], dict[str, tuple[list[float], list[float], list[float]]]]:
    """Rows of (regulariser minus none at the same width and seed) per width and step, and the plot
    series {label: (parameter counts, mean differences, half-ranges)}, one per step for repulsor
    and one for dispersive at the last step."""
    lines = [f"| width | SiT parameters | regulariser | {' | '.join(f'step {s}' for s in steps)} |",
             "|---|---|---|" + "---|" * len(steps)]
    series: dict[str, tuple[list[float], list[float], list[float]]] = {}
    for reg in ("repulsor", "dispersive"):
        for w in widths:
            name, base = scale_config(w, reg)[0], scale_config(w, "none")[0]
            diffs = {s: [v - fid[base, seed, s] for (c, seed, step), v in sorted(fid.items())
                         if c == name and step == s and (base, seed, s) in fid] for s in steps}
            if not any(diffs.values()):
                continue
            n_params = sit_parameters(w)
            cells = [mean_spread(d, signed=True) if d else "-" for d in diffs.values()]
            lines.append(f"| {w} | {n_params / 1e6:.2f}M | {reg} | {' | '.join(cells)} |")
            for s, d in diffs.items():
                if d and (reg == "repulsor" or s == steps[-1]):
                    xs, ms, hs = series.setdefault(f"{reg} - none, step {s}", ([], [], []))
                    xs.append(n_params)
                    ms.append(statistics.mean(d))
                    hs.append(abs(d[0] - d[-1]) / 2 if len(d) == 2 else (statistics.stdev(d) if len(d) > 2 else 0.0))
    return lines, series


HEALTH_COLUMNS = (("batch_cos_mean_max", "max batch cos", 3), ("proj_eff_rank_min", "min eff. rank (bank)", 1),
                  ("batch_eff_rank_min", "min eff. rank (batch)", 1),
                  ("reg_gap_to_collapse_min", "min abs(reg - 1/tau)", 3), ("velocity_mean", "velocity loss", 4))


def health_table(health: dict, names: list[str]) -> str:
    """Second-half health of each run (one row per config and seed), from run_health."""
    lines = ["Health over the second half of each run (run_health):", "",
             "| config | seed | " + " | ".join(c[1] for c in HEALTH_COLUMNS) + " |",
             "|---|---|" + "---|" * len(HEALTH_COLUMNS)]
    for name in names:
        for r in sorted((r for r in health.values() if r["config"] == name), key=lambda r: r["seed"]):
            cells = [f"{r[k]:.{d}f}" if k in r else "-" for k, _, d in HEALTH_COLUMNS]
            lines.append(f"| {name} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(a: argparse.Namespace, configs: dict, results: dict) -> None:
    """Tables: FID per config and step, and its difference to the study's baseline at the same seed
    (fid_tables: --reg none; pairs-none for the noise-pair study; none at the same width for the
    scale study, scale_tables); one plot."""
    from plots import plot_fid_bars, plot_fid_curves, plot_paired_vs_params

    names = study_names(a, configs)
    baseline = "pairs-none" if a.study == "pairs" else "none"
    source = results.get("meta", {}).get("source")
    health = {k: r for k, r in results.items() if k.endswith("/health")}
    results = {k: r for k, r in results.items() if not k.endswith("/health") and k != "meta"}
    if a.study == "heads":  # heads not run on the CPU (the GPU head study has them all) get no empty row
        names = [n for n in names if any(r["config"] == n for r in results.values())]
    steps = sorted({r["step"] for r in results.values() if r["config"] in names and r["step"] <= a.steps})
    fid = {(r["config"], r["seed"], r["step"]): r["fid"] for r in results.values()}
    lines, paired, means = fid_tables(fid, names, steps, baseline)
    curves = {n: (sorted(m), [m[s] for s in sorted(m)]) for n, m in means.items()}
    if a.study == "scale":  # paired within a width only
        rows, series = scale_tables(fid, sorted(a.widths), steps)
        table = "\n".join(lines) + "\n\nFID minus none's FID at the same width and seed:\n\n" + "\n".join(rows)
    else:
        table = "\n".join(lines) + f"\n\nFID minus {baseline}'s FID at the same seed:\n\n" + "\n".join(paired)
    if any(r["config"] in names for r in health.values()):
        table += "\n\n" + health_table(health, names)
    if source:
        table += f"\n\nRuns: {source}."
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table + "\n")
    seeds = sorted({seed for c, seed, _ in fid if c in names})
    if a.study == "ablation":  # many configs, one budget: bars at the last step read better than crossing curves
        final = {n: [v for (c, _, step), v in sorted(fid.items()) if c == n and step == a.steps] for n in names}
        png = plot_fid_bars({n: v for n, v in final.items() if v}, os.path.join(a.out, "ablation.png"),
                            title=f"Repulsor ablation: FID-{a.fid_samples} at step {a.steps}")
    elif a.study == "scale":
        png = plot_paired_vs_params(series, os.path.join(a.out, "scale.png"),
                                    title=f"FID-{a.fid_samples} difference to plain SiT (seeds {seeds})")
    elif a.study == "heads":
        png = plot_fid_curves(curves, os.path.join(a.out, "heads.png"),
                              title=f"Repulsor heads: FID-{a.fid_samples} (mean over seeds {seeds})")
    elif a.study == "rivals":
        png = plot_fid_curves(curves, os.path.join(a.out, "rivals.png"),
                              title=f"Encoder-free rivals: FID-{a.fid_samples} (mean over seeds {seeds})")
    elif a.study == "pairs":
        png = plot_fid_curves(curves, os.path.join(a.out, "pairs.png"),
                              title=f"Noise pairs: FID-{a.fid_samples} (mean over seeds {seeds})")
    else:
        png = plot_fid_curves(curves, os.path.join(a.out, "convergence.png"),
                              title=f"FID-{a.fid_samples} (mean over seeds {seeds})")
    print(f"\nFID-{a.fid_samples} against {a.fid_ref} held-out images, mean ± half-range over the seeds run "
          f"({seeds}):\n"
          f"{table}\nplot: {png}")


if __name__ == "__main__":
    main()
