"""Results files of the timing benchmarks (train_throughput.py, sampling.py, encode_throughput.py,
fid_throughput.py, overhead.py), on the model of convergence.py's:

    OUT/results.json   the raw numbers of every row, the settings, the command and the machine
    OUT/table.md       exactly what the script printed: its render(results), a pure function of results.json

so `--report-only` rebuilds table.md from results.json, byte for byte, without measuring anything.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_args(p: argparse.ArgumentParser, name: str) -> None:
    """--out (default results/NAME: benchmarks/results/ holds the committed results) and --report-only."""
    p.add_argument("--out", default=os.path.join("results", name),
                   help="writes OUT/results.json (raw numbers, settings, machine) and OUT/table.md (the tables printed)")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rebuild OUT/table.md from OUT/results.json and print it")


def meta(script: str, args: argparse.Namespace, device: Any) -> dict:
    """What every results.json starts with: the script, its command line, its settings and the machine.
    Call it after torch.set_num_threads, so the thread count is the one measured with."""
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "report_only")}
    return {"script": os.path.relpath(os.path.abspath(script), ROOT), "argv": sys.argv[1:], "settings": settings,
            "machine": machine_facts(device)}


def machine_facts(device: Any) -> dict:
    import torch

    device = torch.device(device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": str(device), "device_name": name,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "commit": git_commit()}


def git_commit() -> str | None:
    """The checkout's commit, with -dirty if tracked files differ from it (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save(out: str, results: dict, render: Callable[[dict], str]) -> None:
    """Write OUT/results.json, then print and write OUT/table.md. The table is rendered from the
    results as read back from JSON, so --report-only (rebuild) prints the very same bytes."""
    os.makedirs(out, exist_ok=True)
    text = json.dumps(results, indent=1) + "\n"
    _write_atomic(os.path.join(out, "results.json"), text)
    publish(out, json.loads(text), render)


def rebuild(out: str, render: Callable[[dict], str], script: str) -> None:
    """--report-only: OUT/table.md and the printout from OUT/results.json alone."""
    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist: make it with "
                         f"python {os.path.relpath(os.path.abspath(script), ROOT)} --out {out} (without --report-only)")
    with open(path) as f:
        publish(out, json.load(f), render)


def publish(out: str, results: dict, render: Callable[[dict], str]) -> None:
    table = render(results)
    _write_atomic(os.path.join(out, "table.md"), table + "\n")
    print(table, flush=True)
    print(f"wrote {os.path.join(out, 'table.md')} (numbers: {os.path.join(out, 'results.json')})", file=sys.stderr)
