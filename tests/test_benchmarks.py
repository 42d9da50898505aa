"""benchmarks/convergence.py's report: the README tables are built from it, so its arithmetic is tested."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report(out: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/convergence.py", "--out", out, "--report-only", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _write_results(out: str, rows: list[tuple[str, int, int, float]]) -> None:
    results = {f"{c}-s{seed}/{step}": {"config": c, "seed": seed, "step": step, "fid": fid}
               for c, seed, step, fid in rows}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)


def test_convergence_report_table_and_plots(tmp_path):
    out = str(tmp_path)
    _write_results(out, [
        ("none", 0, 500, 199.0), ("none", 1, 500, 201.0), ("none", 0, 1000, 150.0), ("none", 1, 1000, 154.0),
        ("none", 0, 3000, 90.0),  # beyond --steps 1000: left out of the table
        ("repulsor", 0, 1000, 170.0),  # one seed: no spread, and "-" where nothing was run
        ("repulsor-K0", 0, 1000, 160.0), ("repulsor-K0", 1, 1000, 161.0), ("repulsor-K0", 2, 1000, 165.0),
    ])
    r = _report(out)
    assert r.returncode == 0, r.stderr
    table = open(os.path.join(out, "table.md")).read().splitlines()
    assert table[0] == "| config | step 500 | step 1000 |"
    assert "| none | 200.0 ± 1.0 | 152.0 ± 2.0 |" in table  # mean ± half-range of two seeds
    assert "| repulsor | - | 170.0 |" in table
    assert "| dispersive | - | - |" in table
    paired = table[table.index("FID minus none's FID at the same seed:"):]
    assert "| repulsor | - | +20.0 |" in paired and not any(row.startswith("| none |") for row in paired)
    assert os.path.isfile(os.path.join(out, "convergence.png"))

    r = _report(out, "--ablation")
    assert r.returncode == 0, r.stderr
    table = open(os.path.join(out, "table.md")).read().splitlines()
    assert table[0] == "| config | step 500 | step 1000 |"
    assert [row.split(" |")[0] for row in table[2:4]] == ["| none", "| repulsor"]  # the references first
    assert "| repulsor-K0 | - | 162.0 ± 2.6 |" in table  # three seeds: mean ± sample std
    assert "| repulsor-K0 | - | +8.5 ± 1.5 |" in table  # paired with none only where none ran that seed
    assert os.path.isfile(os.path.join(out, "ablation.png"))

    r = _report(out, "--steps", "3000")
    assert "| config | step 500 | step 1000 | step 3000 |" in open(os.path.join(out, "table.md")).read()


def test_convergence_scale_and_pairs_reports(tmp_path):
    """Scale study: each regulariser minus none at the SAME width and seed, against the parameter count
    (width 128 is the main comparison's none/repulsor); pairs study: paired with pairs-none."""
    out = str(tmp_path)
    _write_results(out, [
        ("w64-none", 0, 500, 200.0), ("w64-none", 1, 500, 210.0),
        ("w64-repulsor", 0, 500, 203.0), ("w64-repulsor", 1, 500, 211.0),  # +3, +1
        ("none", 0, 500, 150.0), ("none", 1, 500, 152.0), ("repulsor", 0, 500, 149.0), ("repulsor", 1, 500, 149.0),
        ("w256-none", 0, 500, 120.0), ("w256-dispersive", 0, 500, 126.0),  # no w256 repulsor: no row
        ("pairs-none", 0, 500, 160.0), ("pairs-none", 1, 500, 162.0),
        ("pairs-repulsor", 0, 500, 150.0), ("pairs-repulsor", 1, 500, 158.0),
    ])
    r = _report(out, "--study", "scale", "--steps", "500", "--widths", "64", "128", "256")
    assert r.returncode == 0, r.stderr
    text = open(os.path.join(out, "table.md")).read()
    rows = text[text.index("FID minus none's FID at the same width and seed:"):].splitlines()
    assert "| width | SiT parameters | regulariser | step 500 |" in rows
    assert "| 64 | 0.48M | repulsor | +2.0 ± 1.0 |" in rows
    assert "| 128 | 1.88M | repulsor | -2.0 ± 1.0 |" in rows
    assert "| 256 | 7.39M | dispersive | +6.0 |" in rows
    assert not any(row.startswith("| 256 |") and "repulsor" in row for row in rows)
    assert "FID minus none's FID at the same seed:" not in text  # never across widths
    assert os.path.isfile(os.path.join(out, "scale.png"))

    r = _report(out, "--study", "pairs", "--steps", "500")
    assert r.returncode == 0, r.stderr
    table = open(os.path.join(out, "table.md")).read().splitlines()
    assert [row.split(" |")[0] for row in table[2:6]] == ["| none", "| repulsor", "| pairs-none", "| pairs-repulsor"]
    paired = table[table.index("FID minus pairs-none's FID at the same seed:"):]
    assert "| pairs-repulsor | -7.0 ± 3.0 |" in paired and "| none | -10.0 ± 0.0 |" in paired
    assert os.path.isfile(os.path.join(out, "pairs.png"))


def test_convergence_unknown_config_is_a_clear_error(tmp_path):
    r = _report(str(tmp_path), "--configs", "repulsr")
    assert r.returncode != 0
    assert "unknown configs ['repulsr']" in r.stderr and "repulsor" in r.stderr


# ----------------------------------------------------------------------------- benchmarks/memory.py

def _memory(out: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/memory.py", "--out", out, *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_memory_report_tables_and_claim(tmp_path):
    out = str(tmp_path)
    results = {f"{c}-s{seed}/{step}": {"kind": "fid", "config": c, "seed": seed, "step": step, "fid": fid}
               for c, seed, step, fid in [
                   ("class", 0, 400, 200.0), ("class", 1, 400, 204.0), ("class", 0, 1200, 150.0),
                   ("class", 1, 1200, 152.0),  # final seed mean 151.0: the target
                   ("memory-repulsor", 0, 400, 160.0), ("memory-repulsor", 1, 400, 150.0),  # mean 155.0 > 151
                   ("memory-repulsor", 0, 800, 151.0), ("memory-repulsor", 1, 800, 149.0),  # mean 150.0: reached
                   ("memory-repulsor", 0, 1200, 140.0), ("memory-repulsor", 1, 1200, 142.0),
                   ("memory-random", 0, 400, 210.0), ("memory-random", 0, 1200, 151.5),  # never below 151
                   ("class", 0, 2400, 90.0)]}  # beyond --steps: left out
    results["memory-repulsor-s0/memorisation-1200"] = {"kind": "memorisation", "config": "memory-repulsor", "seed": 0,
                                                  "step": 1200, "train_images": 5000, "samples": 250,
                                                  "nn_median_ratio": 0.91, "nn_close_share": 0.012,
                                                  "nn_is_source": 0.1}
    results["memory-repulsor-s1/memorisation-1200"] = {**results["memory-repulsor-s0/memorisation-1200"], "seed": 1,
                                                  "nn_median_ratio": 0.95, "nn_close_share": 0.004,
                                                  "nn_is_source": 0.0}
    results["bank/memory-random"] = {"kind": "bank", "config": "memory-random", "name": "random-sit-s0",
                                     "fingerprint": "f" * 16, "encoder": "x.pt", "dim": 128, "probe": 5000,
                                     "mean_cos": 0.97, "nn_label_acc": 0.6}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)
    r = _memory(out, "--report-only")
    assert r.returncode == 0, r.stderr
    text = open(os.path.join(out, "table.md")).read()
    lines = text.splitlines()
    assert lines[2] == "| config | step 400 | step 800 | step 1200 |"
    assert "| class | 202.0 ± 2.0 | - | 151.0 ± 1.0 |" in lines  # mean ± half-range of two seeds
    assert "| memory-repulsor | 155.0 ± 5.0 | 150.0 ± 1.0 | 141.0 ± 1.0 |" in lines
    assert "| memory-random | 210.0 | - | 151.5 |" in lines  # one seed: no spread
    paired = lines[lines.index("FID minus class's FID at the same seed:"):]
    assert "| memory-repulsor | -47.0 ± 7.0 | - | -10.0 ± 0.0 |" in paired  # "-" where class has no FID
    assert "| memory-random | +10.0 | - | +1.5 |" in paired
    assert not any(row.startswith("| class |") for row in paired)
    assert "class's final FID is 151.0 (step 1200, seed mean)" in text
    assert "- memory-repulsor: first reaches it at step 800 (0.67 of the baseline's steps)" in lines
    assert "- memory-random: does not reach it by step 1200" in lines
    assert "| memory-repulsor | 0.930 ± 0.020 | 0.008 ± 0.004 | 0.050 ± 0.050 |" in lines  # three decimals
    assert "| memory-random | random-sit-s0 | 128 | 0.970 | 0.600 |" in lines
    assert os.path.isfile(os.path.join(out, "memory.png"))


def test_committed_memory_table_is_what_report_only_prints(tmp_path):
    """The committed GMem benchmark (benchmarks/results/memory/) is reprinted exactly by --report-only from its
    results.json, and every FID and memorisation row of it is in docs/benchmarks.md."""
    committed = os.path.join(ROOT, "benchmarks", "results", "memory")
    with open(os.path.join(committed, "results.json")) as f, open(tmp_path / "results.json", "w") as g:
        g.write(f.read())
    r = _memory(str(tmp_path), "--report-only")
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "table.md").read_text()
    assert table == open(os.path.join(committed, "table.md")).read()
    docs = open(os.path.join(ROOT, "docs", "benchmarks.md")).read()
    rows = [line for line in table.splitlines() if line.startswith(("| class", "| memory-"))]
    assert rows and all(line in docs for line in rows)


def test_memory_flag_errors_come_before_any_work(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    r = _memory(str(tmp_path / "out"), "--configs", "memory-dino")
    assert r.returncode == 2 and "unknown configs ['memory-dino']; known: class, memory-repulsor" in r.stderr
    r = _memory(str(tmp_path / "out"), "--data-root", str(data), "--encoder-ckpt", str(tmp_path / "no.pt"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: --encoder-ckpt {tmp_path / 'no.pt'} does not exist: run the demo first")
    assert not os.listdir(data) and not (tmp_path / "out").exists()  # nothing encoded, no run directory
    r = _memory(str(tmp_path / "out"), "--report-only")
    assert r.returncode == 2 and "results.json does not exist: run without --report-only first" in r.stderr
    r = _memory(str(tmp_path / "out"), "--report-only", "--eval-every", "0")
    assert r.returncode == 2 and "--eval-every must be >= 1" in r.stderr


def test_memory_random_encoder_is_not_degenerate(tmp_path):
    """The control's SiT: every block changes its input (no adaLN-Zero identity), the snippet depends
    on the image, and preprocessing/memory.py finds the Repulsor head on the Repulsor block."""
    import importlib.util

    import torch

    from checkpoint import load_checkpoint, model_from_checkpoint
    from preprocessing.memory import sit_block_and_head

    spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(ROOT, "benchmarks", "memory.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = bench.random_encoder_checkpoint(str(tmp_path / "rand.pt"), latent_shape=[1, 16, 16], num_classes=10,
                                           depth=3, hidden_size=32, num_heads=2, patch_size=4, proj_dim=8,
                                           proj_hidden=16, seed=0)
    ckpt = load_checkpoint(path)
    sit = model_from_checkpoint(ckpt, "ema", log=lambda m: None).eval()
    for name, w in sit.state_dict().items():  # DiT's zero and std-0.02 inits are all gone
        if name.endswith("weight") and w.ndim == 2:
            assert w.std() > 0.05, name
    block, head = sit_block_and_head(ckpt, sit.config.depth, None)
    assert block == 1 and head is not None and head.head[-1].out_features == 8  # depth // 3, like train.py
    x = torch.randn(4, 1, 16, 16)
    t, y, drop = torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool)
    with torch.no_grad():
        tokens = sit.x_embedder(x) + sit.pos_embed
        out, hidden = sit(x, t, y, return_hidden_at=1, drop=drop)
        z = head.project(hidden)
    assert (hidden - tokens).abs().mean() > 0.1 * tokens.abs().mean()  # block 1 is far from the identity
    assert out.abs().mean() > 0  # nor is the output zero
    assert (z[0] - z[1]).norm() > 1e-3 and torch.allclose(z.norm(dim=1), torch.ones(4))


def test_scale_study_configs_and_dispersive_at_the_largest_width(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_convergence", os.path.join(ROOT, "benchmarks", "convergence.py"))
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    monkeypatch.setattr(sys, "argv", ["convergence.py", "--study", "scale", "--widths", "64", "256"])
    configs = conv.study_configs(conv.get_args())
    assert set(configs) == {"w64-none", "w64-repulsor", "w256-none", "w256-repulsor", "w256-dispersive"}
    assert configs["w256-dispersive"] == ["--hidden-size", "256", "--reg", "dispersive"]
    monkeypatch.setattr(sys, "argv", ["convergence.py", "--study", "scale"])  # width 128 is the demo's SiT
    assert conv.study_configs(conv.get_args())["repulsor"] == ["--reg", "repulsor"]


COMMITTED_STUDIES = {  # benchmarks/results/<dir>: the --report-only flags that print its table
    "heads": ["--study", "heads", "--steps", "1600"],
    "rivals": ["--study", "rivals", "--steps", "2000"],
    "ablation": ["--study", "ablation", "--steps", "1000"],
    "scale": ["--study", "scale", "--steps", "1000"],
    "pairs": ["--study", "pairs", "--steps", "1000"],
}


@pytest.mark.parametrize("study", sorted(COMMITTED_STUDIES))
def test_committed_study_table_is_what_report_only_prints(tmp_path, study):
    """Each committed study table (README and docs) is reproduced exactly by --report-only from the
    committed per-run results (FIDs and second-half health), so the numbers can be re-checked without
    re-running; its rows are the ones the docs show."""
    committed = os.path.join(ROOT, "benchmarks", "results", study)
    out = str(tmp_path)
    with open(os.path.join(committed, "results.json")) as f, open(os.path.join(out, "results.json"), "w") as g:
        g.write(f.read())
    r = _report(out, *COMMITTED_STUDIES[study])
    assert r.returncode == 0, r.stderr
    table = open(os.path.join(out, "table.md")).read()
    assert table == open(os.path.join(committed, "table.md")).read()
    docs = open(os.path.join(ROOT, "README.md")).read() + open(os.path.join(ROOT, "docs", "benchmarks.md")).read()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    assert rows and all(line in docs for line in rows if "run_health" not in line)


def _gpu_run(method: str, fids: dict, steps: int, **metrics) -> dict:
    rows = [{"step": s, "velocity": 0.3, **metrics} for s in range(50, steps + 1, 50)]
    return {"status": "ok", "steps": steps, "fids": fids, "metrics": rows,
            "config": {"reg": method, "temperature": 0.5}}


def test_convergence_from_gpu_imports_runs_fids_and_health(tmp_path):
    """--from-gpu takes a gpu_convergence.json's CONFIG-sSEED runs (FIDs per sampled step, health from the
    metrics rows) into results.json exactly as run_all writes them; other runs and steps beyond --steps are
    left out, and --report-only then reprints the same table."""
    gpu = {"machine": {"name": "NVIDIA H200", "torch": "2.11.0", "date": "2026-12-04T18:15:00"}, "runs": {
        "none-s0": _gpu_run("none", {"1000": 150.0, "2000": 120.0}, 2000),
        "none-s1": _gpu_run("none", {"1000": 154.0, "2000": 124.0}, 2000),
        "repulsor-s0": _gpu_run("repulsor", {"1000": 140.0, "2000": 118.0, "3000": 1.0}, 2000,
                                reg=0.4, batch_cos_mean=-0.03, proj_eff_rank=20.0),
        "repulsor-s1": _gpu_run("repulsor", {"1000": 146.0, "2000": 124.0}, 2000,
                                reg=0.5, batch_cos_mean=-0.02, proj_eff_rank=18.0),
        "dfm-s0": {"status": "error", "steps": 0, "metrics": []},  # not a rivals config: ignored
        "w32-none-s0": _gpu_run("none", {"1000": 300.0}, 1000),  # another study's run: ignored
    }}
    path = tmp_path / "gpu_convergence.json"
    path.write_text(json.dumps(gpu))
    out = str(tmp_path / "rivals")
    r = subprocess.run([sys.executable, "benchmarks/convergence.py", "--study", "rivals", "--steps", "2000",
                        "--out", out, "--from-gpu", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["repulsor-s1/2000"] == {"config": "repulsor", "seed": 1, "step": 2000, "fid": 124.0}
    assert "repulsor-s0/3000" not in results and not any(k.startswith(("dfm", "w32")) for k in results)
    health = results["repulsor-s0/health"]  # over the second half, steps 1000-2000
    assert health["batch_cos_mean_max"] == -0.03 and health["proj_eff_rank_min"] == 20.0
    assert abs(health["reg_gap_to_collapse_min"] - 1.6) < 1e-9  # |0.4 - 1/0.5|
    table = open(os.path.join(out, "table.md")).read()
    assert "| none | 152.0 ± 2.0 | 122.0 ± 2.0 |" in table
    assert "| repulsor | -9.0 ± 1.0 | -1.0 ± 1.0 |" in table.split("FID minus none's")[1]  # paired per seed
    assert "Runs: gpu_convergence.json: trained on NVIDIA H200 (torch 2.11.0, 2026-12-04), FID on the CPU." in table
    assert os.path.isfile(os.path.join(out, "rivals.png"))
    r = _report(out, "--study", "rivals", "--steps", "2000")
    assert r.returncode == 0, r.stderr
    assert open(os.path.join(out, "table.md")).read() == table
