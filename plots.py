"""PNG plots: training loss curves and FID-versus-step curves (matplotlib, no display)."""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file; a line cut off by a crash mid-write is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # partial line (empty lines land here too)
    return rows


HEALTH_COSINES = ("batch_cos_mean", "bank_cos_mean")  # 1.0 = collapsed to one direction
HEALTH_RANKS = ("proj_eff_rank", "batch_eff_rank")  # 1 = every vector on one line


def plot_metrics(metrics_path: str, out_path: str, reg_collapse: float | None = None) -> str | None:
    """Velocity / total loss, the regulariser term (on its own axis; `reg_collapse` marks the value it
    takes when every projection is the same, e.g. the Repulsor's 1 / tau), and, when logged, the
    representation's health: mean cosines (collapse at 1.0) and effective ranks (log scale)."""
    if not os.path.isfile(metrics_path):
        return None
    rows = read_jsonl(metrics_path)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    has_reg = "reg" in rows[0]
    health = [k for k in HEALTH_COSINES + HEALTH_RANKS if any(k in r for r in rows)]
    panels = 1 + has_reg + bool(health)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, [r["velocity"] for r in rows], label="velocity loss")
    if has_reg:
        ax.plot(steps, [r["loss"] for r in rows], label="total loss", alpha=0.7)
        axes[0, 1].plot(steps, [r.get("reg", float("nan")) for r in rows], color="tab:red")
        if reg_collapse is not None:
            axes[0, 1].axhline(reg_collapse, color="gray", linestyle="--", linewidth=1,
                               label=f"collapsed ({reg_collapse:g} = 1/tau)")
            axes[0, 1].legend(fontsize=8)
        axes[0, 1].set(xlabel="step", ylabel="regulariser", title="regulariser term")
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax.legend()
    if health:
        hx = axes[0, -1]
        for k in health:
            if k in HEALTH_COSINES:
                hx.plot(steps, [r.get(k, float("nan")) for r in rows], label=k)
        hx.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="collapsed (cos 1)")
        hx.set(xlabel="step", ylabel="mean cosine", title="representation health", ylim=(-0.2, 1.05))
        ranks = [k for k in health if k in HEALTH_RANKS]
        if ranks:
            rx = hx.twinx()
            for k, style in zip(ranks, (":", "-.")):
                rx.plot(steps, [r.get(k, float("nan")) for r in rows], linestyle=style, color="black", label=k)
            rx.set_yscale("log")
            rx.set_ylabel("effective rank (black)")
            rx.legend(fontsize=7, loc="lower right")
        hx.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_fid_curves(curves: dict[str, tuple[list[int], list[float]]], out_path: str, title: str = "FID vs step") -> str:
    """One line per run: {label: (steps, fids)}."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, (steps, fids) in curves.items():
        ax.plot(steps, fids, marker="o", label=label)
    ax.set(xlabel="training step", ylabel="FID", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_fid_bars(values: dict[str, list[float]], out_path: str, title: str = "FID") -> str:
    """One horizontal bar per config at its seed mean, one dot per seed: {label: [fid per seed]}."""
    labels = list(values)
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(labels) + 1.2))
    ys = range(len(labels))
    ax.barh(ys, [sum(v) / len(v) for v in values.values()], color="tab:blue", alpha=0.5)
    for y, v in zip(ys, values.values()):
        ax.plot(v, [y] * len(v), "k.", markersize=6)
    ax.set_yticks(list(ys), labels)
    ax.invert_yaxis()
    lo = min(min(v) for v in values.values())
    ax.set_xlim(left=0.9 * lo)  # FIDs of comparable runs differ by far less than their size
    ax.set(xlabel="FID (bar: seed mean, dots: seeds; lower is better)", title=title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_paired_vs_params(series: dict[str, tuple[list[float], list[float], list[float]]], out_path: str,
                          title: str = "FID difference") -> str:
    """Paired FID differences against model size: {label: (parameter counts, means, half-ranges)}."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, (xs, means, spreads) in series.items():
        ax.errorbar(xs, means, yerr=spreads, marker="o", capsize=3, label=label)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xscale("log")
    sizes = sorted({x for xs, _, _ in series.values() for x in xs})
    ax.minorticks_off()  # one labelled tick per model size, not a log grid
    ax.set_xticks(sizes, [f"{x / 1e6:.2f}M" for x in sizes])
    ax.set(xlabel="SiT parameters", ylabel="FID minus plain SiT's (same seed)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
