"""The loss curve of a training run as a PNG, from its train_log.jsonl.

Drawn with matplotlib's object API on an Agg canvas: no pyplot, no global backend switch, no display."""

from __future__ import annotations

import json
from pathlib import Path

from qwenlite.io.files import atomic_write


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(log_path: str | Path, png_path: str | Path, title: str | None = None) -> None:
    """Training loss (raw and smoothed) and held-out loss against step, the learning rate below; written
    atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_log(Path(log_path))
    train = [r for r in records if "loss" in r]
    held = [r for r in records if "val_loss" in r]
    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        # Smooth over about a 25th of the run: noisy per-step losses of a long run, untouched points of a short one.
        weight = max(0.0, 1 - 25 / len(losses))
        if weight:
            loss_ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train")
            loss_ax.plot(steps, _smooth(losses, weight), color="tab:blue", linewidth=1.5, label="train (smoothed)")
        else:
            loss_ax.plot(steps, losses, color="tab:blue", linewidth=1.2, label="train")
        lr_ax.plot(steps, [r["lr"] for r in train], color="tab:gray")
    if held:
        loss_ax.plot([r["step"] for r in held], [r["val_loss"] for r in held], "o-", color="tab:orange",
                     label="held-out")  # fmt: skip
    loss_ax.set_ylabel("cross-entropy (nats / token)")
    loss_ax.set_title(title or str(Path(log_path).parent.name))
    loss_ax.grid(alpha=0.3)
    if train or held:
        loss_ax.legend()
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.grid(alpha=0.3)
    atomic_write(Path(png_path), lambda p: fig.savefig(p, format="png"))


def _smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, bias-corrected so that the first points are not pulled toward zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out
