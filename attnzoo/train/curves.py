"""Training curves from a CSV log (Lightning's ``CSVLogger`` ``metrics.csv``) as a PNG."""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["plot_curves", "read_metrics"]


def read_metrics(metrics_csv: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` -> {metric name: [(step, value), ...]} for every metric column with values."""
    series: dict[str, list[tuple[int, float]]] = {}
    with Path(metrics_csv).open(newline="") as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(name, []).append((int(row["step"]), float(value)))
    return series


def plot_curves(metrics_csv: str | Path, out: str | Path, metrics: tuple[str, ...] = ("loss", "acc")) -> Path:
    """One panel per kind in ``metrics`` (a metric belongs to a kind if its name ends with ``_<kind>``):
    each panel plots those metrics (train_loss, val_loss, ...) against the optimizer step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = read_metrics(metrics_csv)
    fig = Figure(figsize=(4.5 * len(metrics), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    for i, kind in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for name in sorted(n for n in series if n.endswith(f"_{kind}")):
            steps, values = zip(*series[name], strict=True)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=name)
        ax.set_xlabel("step")
        ax.set_title(kind)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    return Path(out)
