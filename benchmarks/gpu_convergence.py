"""Short convergence runs on one GPU: Fashion-MNIST pixels, a SiT-S/2-sized model, --reg none vs Repulsor heads.

Device command (the working tree travels with .gpu_carry/, which benchmarks/gpu_prepare.sh fills):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_carry/whl/*.whl && \
        PYTHONPATH=/tmp/site python3 benchmarks/gpu_convergence.py --out $OUT

Then, here on the CPU, FID of every run against the 1,000 held-out test images (about 0.2 s per image):

    .venv/bin/python benchmarks/gpu_convergence.py --fid-from DIR_OF_THE_RETURNED_FILES

CPU dry run (tiny model, a few steps and images; tests/test_gpu_scripts.py runs it):

    .venv/bin/python benchmarks/gpu_convergence.py --dry-run --out /tmp/gpu-conv-dry
    .venv/bin/python benchmarks/gpu_convergence.py --fid-from /tmp/gpu-conv-dry --out /tmp/gpu-conv-dry \
        --fid-samples 8 --fid-ref 8 --fid-runs none

Every stage is the real command (printed and recorded): preprocessing/encode.py --vae none --resolution 32 for
the train and test splits of the IDX files in --fmnist-dir; `python3 train.py` for each run (one process each,
custom SiT depth 12 / width 384 / 6 heads / patch 2, about 33M parameters, global batch 256, bf16, --compile,
--ema-warmup, the same seed and --steps for every run, metrics every 100 steps); sample_ddp.py for each run
at the newest step that every run has a checkpoint of (EMA weights, Heun ODE 25 steps, as demo.py's
checkpoint_fid). The runs train concurrently on the one GPU by default (a 33M model leaves much of an H200
idle, so three at once take far less than three times one; --sequential trains them one after another and
skips a run that would not fit): their steps/s are then shares of one GPU, comparable with each other but
not with a run alone.

Budget (--budget-s, hard): training is stopped --reserve-s before the deadline (a stopped run keeps its
checkpoints, every --ckpt-every steps, and is sampled from one); a watchdog ends everything at the deadline. The
JSON and markdown in --out are rewritten after every stage. --out receives three files: gpu_convergence.json
(per run: command, status, steps, seconds, steps/s, every metrics.jsonl row, config), gpu_convergence.md and
gpu_convergence_samples.npz (compressed uint8, one 1-channel N x 32 x 32 array per run plus "reference", the
first --ref-images test images; the images are grey, so the channel is not repeated).
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from gpu_check import Report, log, md_table, report_only, stop_process  # noqa: E402  (benchmarks/)

MODEL = ["--model", "custom", "--depth", "12", "--hidden-size", "384", "--num-heads", "6", "--patch-size", "2"]
DRY_MODEL = ["--model", "custom", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "8"]
DEFAULT_RUNS = ["none=--reg none", "repulsor=--reg repulsor --bank-size 8192",
                "repulsor-mlp-head=--reg repulsor --bank-size 8192 --proj-head mlp"]
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
SAMPLES_NPZ = "gpu_convergence_samples.npz"
FINAL_KEYS = ("velocity", "loss", "reg", "batch_cos_mean", "bank_cos_mean", "proj_eff_rank", "batch_eff_rank",
              "grad_norm")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output directory (default: $OUT, else benchmarks/results/gpu)")
    p.add_argument("--budget-s", type=float, default=330, help="hard wall-clock budget of the whole run")
    p.add_argument("--fmnist-dir", default=os.path.join(ROOT, ".gpu_carry", "fmnist"),
                   help="directory with the four Fashion-MNIST *-ubyte.gz files")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, metavar="NAME=FLAGS",
                   help="runs as name=extra train.py flags (quoted), all with the same seed and --steps")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default 1500; dry run 4)")
    p.add_argument("--batch", type=int, default=256, help="global batch size")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-flags", default=None,
                   help="train.py model flags replacing the SiT-S/2-sized default (quoted), e.g. the demo's SiT: "
                        "'--model custom --depth 6 --hidden-size 128 --num-heads 4 --patch-size 4'")
    p.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"], help="train.py --mixed-precision")
    p.add_argument("--no-compile", action="store_true", help="train without --compile (small models, many runs)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=500, help="checkpoints (a run stopped by the budget is sampled "
                                                               "from its newest)")
    p.add_argument("--num-workers", type=int, default=2, help="data-loader workers per run")
    p.add_argument("--samples", type=int, default=1000, help="images sampled per run")
    p.add_argument("--sample-steps", type=int, default=25, help="Heun ODE steps")
    p.add_argument("--sample-batch", type=int, default=500)
    p.add_argument("--sample-at", type=int, nargs="+", default=None, metavar="STEP",
                   help="sample every run at each of these steps it has a checkpoint of (default: once, at the "
                        "newest step every run has a checkpoint of)")
    p.add_argument("--ref-images", type=int, default=1000, help="held-out test images stored as the FID reference")
    p.add_argument("--sequential", action="store_true", help="train the runs one after another, not concurrently")
    p.add_argument("--reserve-s", type=float, default=None,
                   help="seconds kept after training for sampling and packing (default 45; dry run 10)")
    p.add_argument("--work-dir", default=None, help="datasets and run directories (default: a temporary directory, "
                                                    "removed at the end)")
    p.add_argument("--dry-run", action="store_true", help="tiny model, few steps and images, CPU, no --compile, "
                                                          "synthetic IDX files")
    g = p.add_argument_group("FID on the CPU, after the GPU run")
    g.add_argument("--fid-from", default=None, metavar="DIR", help="read DIR's gpu_convergence.json and samples npz, "
                                                                   "compute FIDs, write --out's JSON and markdown")
    g.add_argument("--fid-samples", type=int, default=None, help="images per run (default: all)")
    g.add_argument("--fid-ref", type=int, default=None, help="reference images (default: all)")
    g.add_argument("--fid-runs", nargs="+", default=None, help="only these runs (default: every run in the npz)")
    g.add_argument("--fid-device", default="cpu")
    p.add_argument("--report-only", action="store_true", help="only rewrite --out's gpu_convergence.md from its JSON")
    a = p.parse_args()
    a.out = a.out or os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results", "gpu")
    a.runs = parse_runs(p, a.runs)
    a.steps = a.steps or (4 if a.dry_run else 1500)
    if a.dry_run:
        a.batch, a.log_every, a.ckpt_every, a.num_workers = 16, 2, 2, 0
        a.samples, a.sample_steps, a.sample_batch, a.ref_images = 16, 2, 8, 16
    a.reserve_s = a.reserve_s if a.reserve_s is not None else (10 if a.dry_run else 45)
    a.device = "cpu" if a.dry_run else "cuda"
    a.model = shlex.split(a.model_flags) if a.model_flags else (DRY_MODEL if a.dry_run else MODEL)
    a.compile = not (a.dry_run or a.no_compile)
    return a


def parse_runs(p: argparse.ArgumentParser, specs: list[str]) -> dict[str, list[str]]:
    runs: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, flags = spec.partition("=")
        name = name.strip()
        if not sep or not name or name == "reference" or "/" in name or name in runs:
            p.error(f"--runs {spec!r}: expected a new NAME=FLAGS (name not 'reference', no '/')")
        runs[name] = shlex.split(flags)
    return runs


def write_synthetic_idx(path: str, train: int = 256, test: int = 64, seed: int = 0) -> str:
    """Fashion-MNIST-like IDX .gz files (10 classes, each a fixed blob pattern plus noise) for the dry run."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    patterns = (rng.uniform(0, 1, (10, 7, 7)) > 0.5).repeat(4, axis=1).repeat(4, axis=2) * 200.0
    for prefix, n in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.clip(patterns[labels] + rng.normal(0, 20, (n, 28, 28)), 0, 255).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            with gzip.open(os.path.join(path, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
                f.write(head + arr.tobytes())
    return path


def launch(report: Report, cmd: list[str], log_path: str, concurrent: int = 1) -> subprocess.Popen:
    """Start cmd; with `concurrent` processes at once each gets its share of the host's cores as CPU threads
    (the default, all cores each, makes their host-side work, e.g. a LAPACK call at a log step, spin
    against each other)."""
    f = open(log_path, "w")
    threads = str(max(1, (os.cpu_count() or 1) // concurrent))
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads})
    f.close()  # the child keeps its own descriptor
    report.children.append(p)
    return p


def wait_all(report: Report, procs: dict[str, subprocess.Popen], deadline: float,
             progress=None) -> tuple[set[str], dict[str, float]]:
    """Wait for every process until `deadline` (time.time()) and stop the rest then.
    Returns the names stopped and when each process ended."""
    stopped, ended, last = set(), {}, 0.0
    while len(ended) < len(procs):
        now = time.time()
        for name, p in procs.items():
            if name not in ended and p.poll() is not None:
                ended[name] = now
        if now >= deadline:
            for name, p in procs.items():
                if name not in ended:
                    stop_process(p)
                    stopped.add(name)
                    ended[name] = time.time()
            break
        if progress is not None and now - last > 15:
            progress()
            last = now
        time.sleep(0.5)
    for p in procs.values():
        if p in report.children:
            report.children.remove(p)
    return stopped, ended


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])[-3000:]
    except OSError:
        return ""


def read_jsonl(path: str) -> list[dict]:
    rows = []
    if os.path.isfile(path):
        for line in open(path):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a stop
    return rows


# ----------------------------------------------------------------------------------------------
# Stages


def stage_data(g, report: Report, res: dict) -> None:
    """preprocessing/encode.py for the train and test splits (pixels, 32 x 32, 1 channel), concurrently."""
    src = g.fmnist_dir
    if g.dry_run:
        src = write_synthetic_idx(os.path.join(g.work, "idx"))
        res["source"] = "synthetic IDX files (dry run)"
    missing = [f for f in IDX_FILES if not os.path.isfile(os.path.join(src, f))]
    if missing:
        raise FileNotFoundError(f"{src} lacks {', '.join(missing)}: run benchmarks/gpu_prepare.sh "
                                "(or pass --fmnist-dir)")
    procs, cmds = {}, {}
    for split in ("train", "test"):
        cmds[split] = [sys.executable, "preprocessing/encode.py", "--dataset", "fashion-mnist", "--split", split,
                       "--vae", "none", "--resolution", "32", "--data-path", src, "--out", g.data[split],
                       "--device", "cpu"]
        log("$ " + shlex.join(cmds[split][1:]))
        procs[split] = launch(report, cmds[split], os.path.join(g.work, f"encode-{split}.log"))
    wait_all(report, procs, report.deadline)
    for split, p in procs.items():
        res[split] = {"command": shlex.join(cmds[split][1:]), "returncode": p.returncode}
        if p.returncode != 0:
            raise RuntimeError(f"encode.py --split {split} exited with {p.returncode}: "
                               f"{tail(os.path.join(g.work, f'encode-{split}.log'))}")
        res[split]["items"] = json.load(open(os.path.join(g.data[split], "manifest.json")))["count"]


def stage_reference(g, report: Report, res: dict) -> None:
    from demo import real_images  # the first n held-out images as uint8, as the demo's FID reference

    g.reference = real_images(g.data["test"], g.ref_images)[..., 0]
    res.update(images=len(g.reference), shape=list(g.reference.shape), source=f"first {g.ref_images} test images")


def train_command(g, name: str, flags: list[str]) -> list[str]:
    compile_flags = ["--compile"] if g.compile else []
    return [sys.executable, "train.py", "--data-dir", g.data["train"], "--results-dir", g.runs_dir, "--exp-name", name,
            *g.model, "--global-batch-size", str(g.batch), "--lr", str(g.lr),
            "--max-steps", str(g.steps), "--mixed-precision", g.precision, *compile_flags, "--ema-warmup",
            "--log-every", str(g.log_every), "--ckpt-every", str(g.ckpt_every), "--num-workers", str(g.num_workers),
            "--seed", str(g.seed), "--device", g.device, *flags]


def run_steps(g, flags: list[str]) -> int:
    """A run's step budget: its own --max-steps if its flags set one (the last wins, as in argparse), else --steps."""
    given = [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == "--max-steps"]
    return int(given[-1]) if given else g.steps


def collect_run(g, report: Report, name: str, p: subprocess.Popen, wall: float, stopped: bool) -> None:
    """Record one finished (or stopped) run: metrics rows, final values, newest checkpoint, status."""
    from checkpoint import latest_checkpoint

    run = report.data["runs"][name]
    run_dir = os.path.join(g.runs_dir, name)
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    ckpt = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    steps = max([r.get("step", 0) for r in rows] + [int(os.path.basename(ckpt)[:-3]) if ckpt else 0])
    later = [r["steps_per_s"] for r in rows[1:] if "steps_per_s" in r]  # the first window includes compilation
    run.update(returncode=p.returncode, wall_s=round(wall, 1), steps=steps, metrics=rows, checkpoint=ckpt,
               steps_per_s=round(float(np.median(later)), 2) if later else None,
               final={k: rows[-1][k] for k in FINAL_KEYS if rows and k in rows[-1]})
    config = os.path.join(run_dir, "config.json")
    if os.path.isfile(config):
        run["config"] = json.load(open(config)).get("args")
    if stopped and steps >= run_steps(g, g.runs[name]):  # trained in full, then still running at the deadline
        run["status"] = "ok; stopped by the budget after its last step"
        run["log_tail"] = tail(run["log"], 8)
    elif stopped:
        run["status"] = f"stopped: budget at step {steps}"
        run["log_tail"] = tail(run["log"], 8)  # the work directory goes: keep what the run was doing
    elif p.returncode == 0 and steps >= run_steps(g, g.runs[name]):
        run["status"] = "ok"
    else:
        run["status"] = "error"
        run["error"] = report.error(f"train/{name}", RuntimeError(
            f"train.py exited with {p.returncode}: {tail(run['log'], 8).strip()}"))
    log(f"  {name}: {run['status']}, {steps} steps in {wall:.0f} s")


def stage_train(g, report: Report, res: dict) -> None:
    deadline = report.deadline - g.reserve_s
    runs = report.data["runs"]
    for name, flags in g.runs.items():
        cmd = train_command(g, name, flags)
        runs[name] = {"flags": shlex.join(flags), "command": shlex.join(cmd[1:]), "status": "pending",
                      "log": os.path.join(g.work, f"train-{name}.log")}
    res.update(mode="sequential" if g.sequential else "concurrent (one GPU)", runs=list(runs))

    def progress() -> None:
        parts = []
        for name in runs:
            rows = read_jsonl(os.path.join(g.runs_dir, name, "metrics.jsonl"))
            parts.append(f"{name} step {rows[-1]['step']} loss {rows[-1].get('loss', 0):.4f}" if rows else f"{name} -")
        log("  " + "; ".join(parts) + f" ({deadline - time.time():.0f} s of training budget left)")

    if not g.sequential:
        procs, t0 = {}, time.time()
        for name in runs:
            log("$ " + runs[name]["command"])
            procs[name] = launch(report, train_command(g, name, g.runs[name]), runs[name]["log"], len(runs))
            runs[name]["status"] = "running"
        report.write()
        stopped, ended = wait_all(report, procs, deadline, progress)
        for name, p in procs.items():
            collect_run(g, report, name, p, ended[name] - t0, name in stopped)
        return
    last_wall = 0.0
    for name in runs:
        if deadline - time.time() < max(last_wall, 1.0):
            runs[name]["status"] = f"skipped: budget ({deadline - time.time():.0f} s of training left)"
            continue
        log("$ " + runs[name]["command"])
        t0 = time.time()
        p = launch(report, train_command(g, name, g.runs[name]), runs[name]["log"])
        runs[name]["status"] = "running"
        report.write()
        stopped, _ = wait_all(report, {name: p}, deadline, progress)
        last_wall = time.time() - t0
        collect_run(g, report, name, p, last_wall, name in stopped)
        report.write()


def sample_points(g, runs: dict) -> dict[str, list[int]]:
    """{run: the steps to sample it at}. --sample-at: each listed step the run has a checkpoint of. Otherwise
    one step for all: the newest that every run has a checkpoint of (runs stopped by the budget may have got
    to different steps; checkpoints come every --ckpt-every steps in every run)."""
    ckpts = {name: os.path.dirname(run["checkpoint"]) for name, run in runs.items() if run.get("checkpoint")}
    if g.sample_at:
        return {name: [s for s in g.sample_at if os.path.isfile(os.path.join(d, f"{s:07d}.pt"))]
                for name, d in ckpts.items()}
    newest = {name: int(os.path.basename(runs[name]["checkpoint"])[:-3]) for name in ckpts}
    common = min(newest.values(), default=0)
    return {name: [common if os.path.isfile(os.path.join(d, f"{common:07d}.pt")) else newest[name]]
            for name, d in ckpts.items()}


def stage_sample(g, report: Report, res: dict) -> None:
    """sample_ddp.py for every run at its sample_points (EMA, Heun ODE), concurrently; then one compressed npz
    with an array per run ("NAME") or, with --sample-at, per run and step ("NAME@STEP")."""
    runs = report.data["runs"]
    procs, outs, jobs = {}, {}, {}
    points = sample_points(g, runs)
    res["steps"] = sorted({s for steps in points.values() for s in steps})
    for name, steps in points.items():
        for step in steps:
            key = f"{name}@{step}" if g.sample_at else name
            ckpt = os.path.join(os.path.dirname(runs[name]["checkpoint"]), f"{step:07d}.pt")
            outs[key] = os.path.join(g.work, f"samples-{key}.npz")
            cmd = [sys.executable, "sample_ddp.py", "--ckpt", ckpt, "--num-samples", str(g.samples),
                   "--mode", "ode", "--heun", "--num-steps", str(g.sample_steps), "--per-proc-batch-size",
                   str(g.sample_batch), "--seed", str(g.seed), "--out", outs[key], "--device", g.device]
            job = {"command": shlex.join(cmd[1:]), "log": os.path.join(g.work, f"sample-{key}.log")}
            if g.sample_at:  # one record per sampled step
                runs[name].setdefault("samples", {})[str(step)] = job
            else:
                runs[name]["sample"] = job
            jobs[key] = job
            log("$ " + jobs[key]["command"])
            procs[key] = launch(report, cmd, jobs[key]["log"], sum(map(len, points.values())))
    t0 = time.time()
    stopped, ended = wait_all(report, procs, report.deadline - 8)
    arrays = {"reference": g.reference} if getattr(g, "reference", None) is not None else {}
    for key, p in procs.items():
        s = jobs[key]
        s["seconds"] = round(ended[key] - t0, 1)
        if p.returncode != 0 or key in stopped:
            s["status"] = "stopped: budget" if key in stopped else "error"
            if key not in stopped:
                s["error"] = report.error(f"sample/{key}", RuntimeError(
                    f"sample_ddp.py exited with {p.returncode}: {tail(s['log'], 8).strip()}"))
            continue
        with np.load(outs[key]) as f:
            arrays[key] = f["arr_0"][..., 0]  # grey images: one channel is enough
        info = json.load(open(outs[key][:-4] + ".json"))
        s.update(status="ok", images=len(arrays[key]), step=info["settings"].get("step"),
                 images_per_s=info.get("images_per_second"))
    path = os.path.join(g.out, SAMPLES_NPZ)
    np.savez_compressed(path, **arrays)
    res.update(npz=os.path.basename(path), keys={k: list(v.shape) for k, v in arrays.items()},
               mib=round(os.path.getsize(path) / 2 ** 20, 2))
    if res["mib"] > 16:
        log(f"warning: {path} is {res['mib']} MiB (> 16 MiB)")


def stage_fid(g, report: Report, res: dict) -> None:
    """FID of every run's samples against the reference images, with evaluations (as demo.py)."""
    import evaluations

    src = os.path.join(g.fid_from, SAMPLES_NPZ)
    with np.load(src) as f:
        arrays = {k: f[k] for k in f.files}
    grey = lambda a: np.repeat(a[..., None], 3, axis=-1) if a.ndim == 3 else a  # noqa: E731
    ref = grey(arrays.pop("reference"))[: g.fid_ref]
    extractor = evaluations.load_inception(device=g.fid_device)
    t = time.time()
    feats = evaluations.compute_features(ref, extractor, progress=True)
    mu, sigma = evaluations.feature_statistics(feats["pool"], "reference pool features")
    ref_stats = {"mu": mu, "sigma": sigma}
    res.update(reference_images=len(ref), extractor=repr(extractor), reference_s=round(time.time() - t, 1))
    for name, images in arrays.items():
        if g.fid_runs and name.partition("@")[0] not in g.fid_runs:
            continue
        images = grey(images)[: g.fid_samples]
        t = time.time()
        fid = evaluations.evaluate(images, ref_stats, extractor, metrics=("fid",), progress=True)["fid"]
        run_name, _, step = name.partition("@")
        run = report.data["runs"].setdefault(run_name, {})
        run.update(fid_samples=len(images), fid_reference=len(ref))
        if step:  # --sample-at: one FID per sampled step
            run.setdefault("fids", {})[step] = round(float(fid), 3)
        else:
            run["fid"] = round(float(fid), 3)
        res[name] = {"fid": round(float(fid), 3), "samples": len(images), "seconds": round(time.time() - t, 1)}
        log(f"  {name}: FID-{len(images)} {fid:.2f} against {len(ref)} test images")
        report.write()


# ----------------------------------------------------------------------------------------------
# Markdown


def render(data: dict) -> str:
    s = data.get("settings", {})
    out = [f"# gpu_convergence ({'dry run, CPU' if s.get('dry_run') else data.get('machine', {}).get('name', '?')})\n",
           f"Fashion-MNIST pixels 1x32x32; {s.get('model')}; global batch {s.get('batch')}, lr {s.get('lr')}, "
           f"{s.get('steps')} steps, {'fp32' if s.get('precision') == 'no' else s.get('precision', 'bf16')}"
           f"{', --compile' if s.get('compile') else ''}, "
           f"--ema-warmup, seed "
           f"{s.get('seed')}; runs {s.get('mode', '')}; samples: EMA, Heun ODE {s.get('sample_steps')} steps. "
           f"Budget {data.get('budget_s')} s, used {data.get('gpu_elapsed_s', data.get('elapsed_s'))} s"
           + (" (stopped at the deadline)" if data.get("killed_at_deadline") else "") + ".\n\n"]
    runs = data.get("runs", {})
    if runs:
        n_fid = next((r.get("fid_samples") for r in runs.values() if r.get("fid_samples")), None)
        n_ref = next((r.get("fid_reference") for r in runs.values() if r.get("fid_reference")), None)
        fid_head = f"FID-{n_fid} (vs {n_ref} test)" if n_fid else "FID (--fid-from on CPU)"
        keys = [k for k in FINAL_KEYS if any(k in (r.get("final") or {}) for r in runs.values())]
        fid_steps = sorted({int(k) for r in runs.values() for k in (*(r.get("fids") or {}), *(r.get("samples") or {}))})
        if fid_steps:  # --sample-at: one FID column per sampled step
            fid_cols = [f"{fid_head} step {s}" for s in fid_steps]
            fids = lambda r: [(r.get("fids") or {}).get(str(s)) for s in fid_steps]  # noqa: E731
            sampled = lambda r: ", ".join(sorted(r.get("samples") or {}, key=int))  # noqa: E731
        else:
            fid_cols, fids = [fid_head], lambda r: [r.get("fid")]  # noqa: E731
            sampled = lambda r: (r.get("sample") or {}).get("step")  # noqa: E731
        rows = [[name, r.get("status"), r.get("steps"), r.get("wall_s"), r.get("steps_per_s"), sampled(r), *fids(r),
                 *[(r.get("final") or {}).get(k) for k in keys], r.get("flags")] for name, r in runs.items()]
        out.append(md_table(["run", "status", "steps", "train s", "steps/s", "sampled at step", *fid_cols,
                             *[f"final {k}" for k in keys], "flags"], rows))
    out.append("\n## Stages\n\n")
    out.append(md_table(["stage", "status", "s", "error"], [[k, v.get("status"), v.get("seconds"), v.get("error")]
                                                            for k, v in data["sections"].items()]))
    if data["errors"]:
        out.append("\n## Errors\n\n")
        out += [f"- {e['where']}: {e['error']}\n" for e in data["errors"]]
    return "".join(out)


# ----------------------------------------------------------------------------------------------


def fid_main(g) -> None:
    data = json.load(open(os.path.join(g.fid_from, "gpu_convergence.json")))
    data["sections"].pop("fid", None)
    data.setdefault("gpu_elapsed_s", data.get("elapsed_s"))  # elapsed_s becomes this step's time
    data["errors"] = [e for e in data["errors"] if not e["where"].startswith("fid")]
    report = Report(g.out, "gpu_convergence", float("inf"), render, data=data)
    report.section("fid", 0, lambda r: stage_fid(g, report, r))


def main() -> None:
    g = parse()
    if g.report_only:
        return report_only(g.out, "gpu_convergence", render)
    if g.fid_from:
        return fid_main(g)
    report = Report(g.out, "gpu_convergence", g.budget_s, render)
    report.data["runs"] = {}
    report.data["settings"] = {
        "dry_run": g.dry_run, "model": " ".join(g.model[1:]), "batch": g.batch,
        "precision": g.precision, "compile": g.compile,
        "lr": g.lr, "steps": g.steps, "seed": g.seed, "sample_steps": g.sample_steps, "samples": g.samples,
        "mode": "one after another" if g.sequential else "concurrently on one GPU"}
    report.start_watchdog()
    own_work = g.work_dir is None
    g.work = g.work_dir or tempfile.mkdtemp(prefix="gpu-convergence-")
    os.makedirs(g.work, exist_ok=True)
    if own_work:
        report.at_exit.append(lambda: shutil.rmtree(g.work, ignore_errors=True))
    g.data = {split: os.path.join(g.work, f"fmnist-{split}") for split in ("train", "test")}
    g.runs_dir = os.path.join(g.work, "runs")
    log(f"gpu_convergence: {len(g.runs)} runs x {g.steps} steps, budget {g.budget_s:.0f} s, work {g.work}, out {g.out}")
    try:
        for name, need, fn in (("machine", 1, machine), ("data", 5, stage_data)):
            report.section(name, need, lambda r: fn(g, report, r))
            if report.data["sections"][name]["status"] != "ok":
                return  # nothing to train on
        report.section("reference", 2, lambda r: stage_reference(g, report, r))
        report.section("train", 5 if g.dry_run else 60, lambda r: stage_train(g, report, r))
        report.section("sample", 8, lambda r: stage_sample(g, report, r))
    finally:
        report.data["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        report.write()
        if own_work:
            shutil.rmtree(g.work, ignore_errors=True)
    log(f"done in {time.time() - report.t0:.0f} s: {len(report.data['errors'])} errors; {report.json_path}")


def machine(g, report: Report, res: dict) -> None:
    import platform

    import torch

    res.update(torch=torch.__version__, python=platform.python_version(), cpus=os.cpu_count(),
               date=datetime.datetime.now().isoformat(timespec="seconds"))
    res["name"] = "CPU"
    report.data["machine"] = res
    if g.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device (torch.cuda.is_available() is False): use --dry-run for the CPU path")
        res["name"] = torch.cuda.get_device_name(0)


if __name__ == "__main__":
    main()
