"""Figures from logged metrics (metrics.jsonl, timing.jsonl); the trainer never imports this."""

from __future__ import annotations

import os

import numpy as np

from sflam_jax.metrics import atomic_write_text, read_jsonl


def load_run(workdir: str) -> dict[str, list]:
    """Evaluated rounds of a run: ``{"round", "test_accuracy", "test_loss", "elapsed_s"}`` lists."""
    metrics = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    timing = read_jsonl(os.path.join(workdir, "timing.jsonl"))
    elapsed = {t["round"]: t["elapsed_s"] for t in timing}
    evaluated = [m for m in metrics if "test_accuracy" in m]
    return {
        "round": [m["round"] for m in evaluated],
        "test_accuracy": [m["test_accuracy"] for m in evaluated],
        "test_loss": [m["test_loss"] for m in evaluated],
        "elapsed_s": [elapsed.get(m["round"], float("nan")) for m in evaluated],
        # The simulated clock and energy start at 0 before round 1.
        "sim_time_s": [m.get("sim_time_s", 0.0) for m in evaluated],
        "sim_energy_j": [m.get("sim_energy_j", 0.0) for m in evaluated],
    }


def _save(fig, out_path: str | None):
    if out_path:
        tmp = out_path + ".tmp.png"
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out_path)
    return fig


def plot_progress(workdir: str, out_path: str | None = None, title: str = ""):
    """Test accuracy against rounds, simulated wall-clock (s) and cumulative device energy (J).

    Returns the matplotlib ``Figure`` (shown inline in a notebook); also a PNG when ``out_path``.
    """
    from matplotlib.figure import Figure

    run = load_run(workdir)
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    series = [
        ("round", "round"),
        ("sim_time_s", "simulated wall-clock (s)"),
        ("sim_energy_j", "cumulative device energy (J)"),
    ]
    for ax, (key, label) in zip(axes, series, strict=True):
        ax.plot(run[key], run["test_accuracy"], marker=".")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    fig.suptitle(title or os.path.basename(os.path.normpath(workdir)))
    return _save(fig, out_path)


def plot_sweep(results: dict, x_label: str, out_path: str | None = None, title: str = ""):
    """Mean round latency and device energy (with 10-90% bands over draws) against a swept value.

    Args:
      results: ``{label: {x: metrics of allocation.planner.sweep}}``, one line per label.
      x_label: the swept quantity with its unit.
    """
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    quantities = [("round_latency_s", "round latency (s)"), ("round_energy_j", "device energy (J)")]
    for label, by_x in results.items():
        xs = sorted(by_x)
        for ax, (key, y_label) in zip(axes, quantities, strict=True):
            values = [np.asarray(by_x[x][key]) for x in xs]
            ax.plot(xs, [v.mean() for v in values], marker="o", label=label)
            ax.fill_between(
                xs,
                [np.percentile(v, 10) for v in values],
                [np.percentile(v, 90) for v in values],
                alpha=0.2,
            )
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    if title:
        fig.suptitle(title)
    return _save(fig, out_path)


def plot_accuracy(workdirs: list[str], labels: list[str], out_path: str, title: str = "") -> None:
    """Test accuracy against rounds and against wall-clock minutes, one line per run (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_t) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for workdir, label in zip(workdirs, labels, strict=True):
        run = load_run(workdir)
        ax_r.plot(run["round"], run["test_accuracy"], marker=".", label=label)
        ax_t.plot([s / 60 for s in run["elapsed_s"]], run["test_accuracy"], marker=".", label=label)
    ax_r.set_xlabel("round")
    ax_t.set_xlabel("wall-clock time (min)")
    ax_r.set_ylabel("test accuracy")
    for ax in (ax_r, ax_t):
        ax.grid(alpha=0.3)
    ax_r.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_path)


def _note(fig, note: str) -> None:
    """A small grey line under the axes (space reserved by the layout engine)."""
    if note:
        fig.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))
        fig.text(0.01, 0.005, note, fontsize=6, color="0.35", va="bottom")


def _finish(fig, ax, out_stem: str, title: str, note: str, rows: list) -> None:
    """Title and note, then ``out_stem.png`` and the plotted values as ``out_stem.csv``."""
    import csv
    import io

    if title:
        ax.set_title(title, fontsize=10)
    _note(fig, note)
    _save(fig, out_stem + ".png")
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    atomic_write_text(out_stem + ".csv", buffer.getvalue())


def bar_figure(values: dict, y_label: str, out_stem: str, title: str = "", note: str = ""):
    """One bar per label (log scale), written as ``out_stem.png`` and ``out_stem.csv``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    labels = list(values)
    bars = ax.bar(range(len(labels)), [values[k] for k in labels], color="C0")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(y_label)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y", which="both")
    _finish(fig, ax, out_stem, title, note, [["protocol", y_label], *values.items()])


def line_figure(
    series: dict,
    x_label: str,
    y_label: str,
    out_stem: str,
    title: str = "",
    log_x: bool = False,
    log_y: bool = False,
    note: str = "",
):
    """One line per label, written as ``out_stem.png`` and ``out_stem.csv`` (label, x, y rows).

    Args:
      series: ``{label: (xs, ys)}``.
      x_label, y_label: axis labels with units.
      out_stem: output path without extension.
      note: a line printed under the axes (e.g. the config that made the figure).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    rows = [["series", x_label, y_label]]
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
        rows.extend([label, x, y] for x, y in zip(xs, ys, strict=True))
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _finish(fig, ax, out_stem, title, note, rows)


def scatter_figure(
    series: dict,
    x_label: str,
    y_label: str,
    out_stem: str,
    title: str = "",
    log_x: bool = False,
    note: str = "",
):
    """One cloud of points per label (``{label: (xs, ys)}``), written as ``out_stem.png`` and
    ``out_stem.csv`` (label, x, y rows); integer ys (cut layers) get a small vertical jitter
    between labels so clouds at the same level stay apart."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    rows = [["series", x_label, y_label]]
    offsets = np.linspace(-0.12, 0.12, len(series)) if len(series) > 1 else [0.0]
    for (label, (xs, ys)), dy in zip(series.items(), offsets, strict=True):
        ax.scatter(xs, np.asarray(ys, float) + dy, s=10, alpha=0.7, label=label)
        rows.extend([label, x, y] for x, y in zip(xs, ys, strict=True))
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if log_x:
        ax.set_xscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _finish(fig, ax, out_stem, title, note, rows)
