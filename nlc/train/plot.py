"""`loss.png`: training loss and validation bits-per-byte against the step."""

from __future__ import annotations

import io
import math
from pathlib import Path

from nlc.fsutil import write_atomic

PLOT = "loss.png"


def plot_losses(rows: list[dict], out_dir: str | Path) -> None:
    """Draw the curves of the metrics rows; the file is replaced atomically, so a viewer never sees half of it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    steps = [row["step"] for row in rows]
    # the training loss is in nats; shown in bits per token so that it shares the axis with validation
    axes.plot(steps, [row["loss"] / math.log(2) for row in rows], label="train (bits per token)", linewidth=1)
    evaluated = [row for row in rows if "val_bpb" in row]
    if evaluated:
        axes.plot([row["step"] for row in evaluated], [row["val_bpb"] for row in evaluated], "o-", label="validation (bits per token)")
    axes.set_xlabel("step")
    axes.set_ylabel("bits per token")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(Path(out_dir) / PLOT, buffer.getvalue())
