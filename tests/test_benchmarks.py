"""benchmarks/convergence.py's report: the README tables are built from it, so its arithmetic is tested."""
import json
import os
import subprocess
import sys

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
    assert [row.split(" |")[0] for row in table[2:5]] == ["| none", "| repulsor-tau0.2", "| repulsor"]  # references
    assert "| repulsor-K0 | - | 162.0 ± 2.6 |" in table  # three seeds: mean ± sample std
    assert "| repulsor-K0 | - | +8.5 ± 1.5 |" in table  # paired with none only where none ran that seed
    assert os.path.isfile(os.path.join(out, "ablation.png"))

    r = _report(out, "--steps", "3000")
    assert "| config | step 500 | step 1000 | step 3000 |" in open(os.path.join(out, "table.md")).read()


def test_convergence_unknown_config_is_a_clear_error(tmp_path):
    r = _report(str(tmp_path), "--configs", "repulsr")
    assert r.returncode != 0
    assert "unknown configs ['repulsr']" in r.stderr and "repulsor" in r.stderr
