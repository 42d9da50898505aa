"""benchmarks/gpu_check.py and gpu_convergence.py run once on a rented GPU: their CPU dry runs take the same
code path at tiny sizes, so a broken section shows up here, not after the GPU time is spent.

The --fid-from step is tested only with RUN_FID_TESTS=1: one FID costs a 2048 x 2048 matrix square root
(about 20-40 s on 2 cores) whatever the image count.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GPU_CHECK_SECTIONS = ["machine", "matrix_eager", "repa_style", "nonfinite_guard", "resume", "speed_eager", "inception",
                      "sampling", "sample_ddp_e2e", "matrix_compiled", "speed_compiled"]


def _run(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, REPULSOR_SIT_OFFLINE="1")
    env.pop("OUT", None)  # the scripts default to $OUT
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{args[0]} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _load(out, name: str) -> dict:
    with open(os.path.join(out, f"{name}.json")) as f:
        return json.load(f)


def test_gpu_check_dry_run(tmp_path):
    _run(["benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)])
    data = _load(tmp_path, "gpu_check")
    assert data["errors"] == []
    assert list(data["sections"]) == GPU_CHECK_SECTIONS
    assert {k: v["status"] for k, v in data["sections"].items()} == {k: "ok" for k in GPU_CHECK_SECTIONS}
    assert [c for c in data["checks"] if c["pass"] is False] == []
    passed = {c["name"] for c in data["checks"] if c["pass"]}
    assert {"non-finite guard skips the step (nan_input)", "non-finite guard skips the step (nan_grad)",
            "save/resume round trip: the next step is bitwise equal"} <= passed
    assert all(f"compiled first step matches eager within bf16 tolerance, --reg {r}" in passed
               for r in ("none", "dispersive", "repulsor", "repa"))
    res = {k: v["result"] for k, v in data["sections"].items()}
    for mode in ("eager", "compiled"):
        rows = res[f"matrix_{mode}"]
        assert set(rows) == {"none", "dispersive", "repulsor", "repa"}
        assert all(r["status"] == "ok" and r["finite"] and r["ms_per_step"] > 0 for r in rows.values())
    assert res["resume"]["bitwise_equal"] is True
    assert res["nonfinite_guard"]["nan_grad"]["flags_input_loss_grad"] == [False, False, True]
    assert len(res["speed_eager"]) == 4 and all(r["status"] == "ok" for r in res["speed_eager"].values())
    assert res["repa_style"]["ms_per_step"] > 0 and math.isfinite(res["repa_style"]["last_loss"])
    assert res["sampling"]["bf16"]["finite"] and res["sampling"]["bf16"]["images_per_s"] > 0
    assert res["sample_ddp_e2e"]["ratio_sampling_loop"] > 0 and res["inception"]["images_per_s"] > 0
    md = open(tmp_path / "gpu_check.md").read()
    assert "## Regularisers, SiT-B/2" in md and "REPA's choices" in md and "## Errors" not in md


def test_gpu_check_budget_skips_sections(tmp_path):
    """With no time left every section is recorded as skipped, and the JSON is still written."""
    _run(["benchmarks/gpu_check.py", "--dry-run", "--budget-s", "3", "--out", str(tmp_path)], timeout=60)
    data = _load(tmp_path, "gpu_check")
    statuses = [v["status"] for k, v in data["sections"].items() if k != "machine"]
    assert len(statuses) == len(GPU_CHECK_SECTIONS) - 1 and all(s.startswith("skipped: budget") for s in statuses)


@pytest.fixture(scope="module")
def convergence_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    _run(["benchmarks/gpu_convergence.py", "--dry-run", "--out", str(out)])
    return out


def test_gpu_convergence_dry_run(convergence_out):
    out = convergence_out
    data = _load(out, "gpu_convergence")
    assert data["errors"] == []
    assert {k: v["status"] for k, v in data["sections"].items()} == {
        k: "ok" for k in ("machine", "data", "reference", "train", "sample")}
    runs = data["runs"]
    assert list(runs) == ["none", "repulsor", "repulsor-mlp-head"]
    for name, run in runs.items():
        assert run["status"] == "ok" and run["steps"] == 4 and run["sample"]["status"] == "ok", name
        assert [r["step"] for r in run["metrics"]] == [2, 4] and "velocity" in run["final"]
        assert "--compile" not in run["command"] and "--ema-warmup" in run["command"]
    assert "batch_cos_mean" in runs["repulsor"]["final"] and runs["repulsor-mlp-head"]["config"]["proj_head"] == "mlp"
    with np.load(out / "gpu_convergence_samples.npz") as f:
        assert sorted(f.files) == ["none", "reference", "repulsor", "repulsor-mlp-head"]
        assert f["none"].shape == (16, 32, 32) and f["none"].dtype == np.uint8 and f["reference"].shape == (16, 32, 32)
    assert sorted(os.listdir(out)) == ["gpu_convergence.json", "gpu_convergence.md", "gpu_convergence_samples.npz"]


def test_gpu_convergence_sample_at_and_run_budgets(tmp_path):
    """The demo-protocol session (benchmarks/gpu_session.sh demo): runs with their own --max-steps, each sampled
    at every --sample-at step it has a checkpoint of, one npz array per run and step."""
    _run(["benchmarks/gpu_convergence.py", "--dry-run", "--out", str(tmp_path), "--sample-at", "2", "4",
          "--runs", "none-s0=--reg none --seed 0", "repulsor-s1=--reg repulsor --seed 1 --max-steps 2"])
    data = _load(tmp_path, "gpu_convergence")
    assert data["errors"] == []
    runs = data["runs"]
    assert runs["none-s0"]["status"] == "ok" and runs["none-s0"]["steps"] == 4
    assert runs["repulsor-s1"]["status"] == "ok" and runs["repulsor-s1"]["steps"] == 2  # its own budget
    assert runs["repulsor-s1"]["config"]["seed"] == 1  # a run's flags come last and win
    assert sorted(runs["none-s0"]["samples"]) == ["2", "4"] and sorted(runs["repulsor-s1"]["samples"]) == ["2"]
    assert all(s["status"] == "ok" for r in runs.values() for s in r["samples"].values())
    with np.load(tmp_path / "gpu_convergence_samples.npz") as f:
        assert sorted(f.files) == ["none-s0@2", "none-s0@4", "reference", "repulsor-s1@2"]
        assert f["none-s0@4"].shape == (16, 32, 32)
    md = open(tmp_path / "gpu_convergence.md").read()
    assert "| none-s0 | ok | 4 |" in md and "step 2 | FID (--fid-from on CPU) step 4 |" in md


@pytest.mark.skipif(os.environ.get("RUN_FID_TESTS") != "1", reason="slow (a 2048 x 2048 sqrtm): RUN_FID_TESTS=1")
def test_gpu_convergence_fid_from(convergence_out, tmp_path):
    """FID on the CPU from the returned files, for one run."""
    out, fid_out = convergence_out, tmp_path / "fid"
    _run(["benchmarks/gpu_convergence.py", "--fid-from", str(out), "--out", str(fid_out), "--fid-samples", "8",
          "--fid-ref", "8", "--fid-runs", "none"])
    data = _load(fid_out, "gpu_convergence")
    assert data["errors"] == [] and data["sections"]["fid"]["status"] == "ok"
    assert math.isfinite(data["runs"]["none"]["fid"]) and "fid" not in data["runs"]["repulsor"]
    assert "FID-8 (vs 8 test)" in open(fid_out / "gpu_convergence.md").read()


def test_committed_gpu_tables_are_rendered_from_the_committed_json():
    """The GPU session's markdown (README's "On a GPU" numbers) is exactly what the scripts render from
    the committed JSON, so a table can be re-checked without a GPU."""
    import json

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check
    import gpu_convergence

    base = os.path.join(ROOT, "benchmarks", "results", "gpu")
    for module, sub, name in ((gpu_check, "", "gpu_check"), (gpu_convergence, "s2", "gpu_convergence"),
                              (gpu_convergence, "heads", "gpu_convergence")):
        with open(os.path.join(base, sub, f"{name}.json")) as f:
            data = json.load(f)
        with open(os.path.join(base, sub, f"{name}.md")) as f:
            assert module.render(data) == f.read(), (sub, name)


@pytest.mark.parametrize("record", ["gpu_check", "s2/gpu_convergence", "heads/gpu_convergence",
                                    "demo/gpu_convergence"])
def test_committed_gpu_tables_are_what_report_only_prints(tmp_path, record):
    """Each committed GPU record's markdown (what the README and docs quote) is rebuilt exactly from its JSON."""
    committed = os.path.join(ROOT, "benchmarks", "results", "gpu", f"{record}.json")
    name = os.path.basename(record)
    with open(committed) as f, open(tmp_path / f"{name}.json", "w") as g:
        g.write(f.read())
    r = subprocess.run([sys.executable, f"benchmarks/{name}.py", "--report-only", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / f"{name}.md").read_text() == open(committed[:-len(".json")] + ".md").read()


def test_gpu_report_only_without_a_record_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/gpu_convergence.py", "--report-only", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == (f"error: {tmp_path}/gpu_convergence.json does not exist: "
                                                      "run without --report-only first (or pass --out)")
