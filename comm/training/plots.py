"""The training loss curve (and learning rate) from the Trainer's log history, as a PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def loss_points(log_history: Sequence[dict]) -> tuple[list[int], list[float]]:
    """``(steps, losses)`` of the per-step training loss entries of a Trainer log history."""
    steps, losses = [], []
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            steps.append(int(entry["step"]))
            losses.append(float(entry["loss"]))
    return steps, losses


def plot_loss(log_history: Sequence[dict], path: str | Path, title: str = "training loss") -> Path:
    """Write the loss curve (learning rate on a second axis when logged) to ``path``; return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = loss_points(log_history)
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    if steps:
        axis.plot(steps, losses, color="tab:blue", marker="." if len(steps) < 50 else None, label="loss")
    else:
        axis.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel("step")
    axis.set_ylabel("loss", color="tab:blue")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    lr_steps = [int(e["step"]) for e in log_history if "learning_rate" in e and "step" in e]
    lrs = [float(e["learning_rate"]) for e in log_history if "learning_rate" in e and "step" in e]
    if lr_steps:
        lr_axis = axis.twinx()
        lr_axis.plot(lr_steps, lrs, color="tab:orange", alpha=0.6, label="learning rate")
        lr_axis.set_ylabel("learning rate", color="tab:orange")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
