"""Run records written by rank 0: ``config.json``, timm-style ``summary.csv`` and the ``summary.png`` curves."""
import csv
import io
import json
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write, write_text

__all__ = ["plot_summary", "write_config", "write_summary"]


def write_config(run_dir: Path, config: dict[str, Any]) -> Path:
    """Write the resolved configuration as ``config.json``."""
    return write_text(Path(run_dir) / "config.json", json.dumps(config, indent=2, default=str) + "\n")


def write_summary(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """Rewrite ``summary.csv`` (one row per epoch, timm's columns plus throughput) atomically."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(Path(run_dir) / "summary.csv", buffer.getvalue())


def plot_summary(run_dir: Path, rows: list[dict[str, Any]], metric: str) -> Path:
    """Plot the train/eval loss and the evaluation ``metric`` (model and EMA) per epoch as ``summary.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train"), ("eval_loss", "eval"), ("ema_eval_loss", "eval (EMA)")):
        if any(key in row for row in rows):
            loss_axis.plot(epochs, [row.get(key) for row in rows], marker="o", label=label)
    for key, label in ((f"eval_{metric}", "model"), (f"ema_eval_{metric}", "EMA")):
        if any(key in row for row in rows):
            metric_axis.plot(epochs, [row.get(key) for row in rows], marker="o", label=label)
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    metric_axis.set(xlabel="epoch", ylabel=metric, title=f"Evaluation {metric}")
    for axis in (loss_axis, metric_axis):
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path = Path(run_dir) / "summary.png"
    with atomic_write(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)
    return path
