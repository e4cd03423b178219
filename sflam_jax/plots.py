"""Figures from logged metrics (metrics.jsonl, timing.jsonl); the trainer never imports this."""

from __future__ import annotations

import os

from sflam_jax.metrics import read_jsonl


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
    }


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
