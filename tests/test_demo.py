"""The README's demo, CI-sized: the same preprocess -> torchrun train -> sample -> FID -> plots path."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_smoke_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "demo.py", "--smoke", "--data-root", str(tmp_path / "data"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.load(open(out / "results.json"))
    assert sorted(results["fid"], key=int) == ["2", "4"]
    assert all(0 < f < 1000 for f in results["fid"].values())
    for png in ("loss_curve.png", "fid_vs_step.png", "samples/0000004.png", "fid_samples/0000004.grid.png"):
        assert (out / png).stat().st_size > 1000, png
    manifest = json.load(open(tmp_path / "data" / "fmnist-train-smoke" / "manifest.json"))
    assert manifest["latent_shape"] == [1, 32, 32] and manifest["count"] == 512
    assert "Pictures:" in proc.stdout and str(out / "fid_vs_step.png") in proc.stdout


def test_smoke_and_full_demo_never_share_data_or_run_directories():
    """CI runs `demo.py --smoke` in the checkout; the README's full demo run afterwards must neither
    meet the smoke run's 512-image datasets (encode.py refuses other settings) nor its tiny run."""
    import demo

    smoke, full = demo.get_args(["--smoke"]), demo.get_args([])
    assert set(demo.data_dirs(smoke)).isdisjoint(demo.data_dirs(full))
    assert (smoke.out, full.out) == ("results/demo-smoke", "results/demo")
    assert demo.data_dirs(full) == (os.path.join("data", "fmnist-train"), os.path.join("data", "fmnist-test"))


def test_readme_quotes_the_committed_demo_results():
    """The README's demo FIDs and pictures are the committed record of a full `python demo.py` run
    (benchmarks/results/demo/results.json), so its numbers can be checked without re-running it."""
    committed = os.path.join(ROOT, "benchmarks", "results", "demo")
    results = json.load(open(os.path.join(committed, "results.json")))
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert sorted(results["fid"], key=int) == ["800", "1600"]
    for step, fid in results["fid"].items():
        assert f"{fid:.1f} at step {step}" in readme, (step, fid)
    assert results["args"]["steps"] == 1600 and not results["args"]["smoke"]
    for png in ("samples.png", "loss_curve.png", "fid_vs_step.png"):
        assert f"benchmarks/results/demo/{png}" in readme and os.path.getsize(os.path.join(committed, png)) > 1000
