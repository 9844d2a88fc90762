"""Progress and results: a tqdm bar, a CSV + JSON Lines log of every step, a loss plot, a summary.

Everything here runs on rank 0 only (the loop passes ``enabled=False`` elsewhere).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

COLUMNS = ["step", "loss", "val_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"]


class RunLog:
    """Step log in ``steps.csv`` and ``steps.jsonl`` (appends, so a resumed run continues it)."""

    def __init__(self, folder: Path, enabled: bool = True, resumed_rows: list | None = None):
        self.folder, self.enabled = folder, enabled
        self.rows: list[dict[str, Any]] = list(resumed_rows or [])
        if enabled:
            folder.mkdir(parents=True, exist_ok=True)
            self._rewrite()

    def add(self, row: dict[str, Any]) -> None:
        new_columns = set(row) - set(self.columns())
        self.rows.append(row)
        if self.enabled and new_columns:  # a hook added a metric: rewrite with the new header
            self._rewrite()
        elif self.enabled:
            with open(self.folder / "steps.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            with open(self.folder / "steps.csv", "a", newline="") as fh:
                csv.writer(fh).writerow([row.get(c, "") for c in self.columns()])

    def columns(self) -> list[str]:
        extra = sorted({k for r in self.rows for k in r} - set(COLUMNS))
        return COLUMNS + extra

    def _rewrite(self) -> None:
        """Start both files from the rows carried over from a checkpoint (or empty)."""
        with open(self.folder / "steps.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in self.rows)
        with open(self.folder / "steps.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(self.columns())
            writer.writerows([r.get(c, "") for c in self.columns()] for r in self.rows)


class Progress:
    """A tqdm bar over optimizer steps showing loss and tokens/s (tqdm supplies the ETA)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step")
        self.start = time.perf_counter()

    def update(self, loss: float, tokens_per_s: float, val_loss: float | None = None) -> None:
        post = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:.0f}"}
        if val_loss is not None:
            post["val"] = f"{val_loss:.4f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Training loss per step and validation loss where measured, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="training loss", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def append_lambda_rows(path: Path, step: int, layers: list[str], values) -> None:
    """One row ``step, λ_layer…`` of the hybrid method's per-layer λ (header on first write)."""
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(["step", *layers])
        writer.writerow([step, *(f"{float(v):.6g}" for v in values)])


def drop_lambda_rows_from(path: Path, step: int) -> None:
    """Remove rows of ``step`` and later (left by an interrupted run that is resumed)."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    kept = rows[:1] + [r for r in rows[1:] if int(r[0]) < step]
    if len(kept) < len(rows):
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows(kept)


def plot_lambdas(csv_path: Path, path: Path) -> Path | None:
    """λ per layer over training: mean and range on top, a layer × step heat map below."""
    if not csv_path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with open(csv_path, newline="") as fh:
        rows = list(csv.reader(fh))
    if len(rows) < 2:
        return None
    steps = np.array([int(r[0]) for r in rows[1:]])
    values = np.array([[float(v) for v in r[1:]] for r in rows[1:]])  # (steps, layers)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(steps, values.mean(axis=1), label="mean over layers")
    top.fill_between(steps, values.min(axis=1), values.max(axis=1), alpha=0.3, label="min–max")
    top.set_ylabel("λ (low-rank share)")
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend()
    extent = (steps[0] - 0.5, steps[-1] + 0.5, values.shape[1] - 0.5, -0.5)
    image = bottom.imshow(
        values.T, aspect="auto", vmin=0, vmax=1, cmap="viridis", extent=extent,
        interpolation="nearest",
    )  # fmt: skip
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("layer (order of lambda.csv)")
    fig.colorbar(image, ax=[top, bottom], label="λ")
    fig.suptitle("hybrid LoRA-GA / BOFT: λ per layer")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable end-of-run summary."""
    lines = [
        f"method        {summary['method']}  ({summary['trainable_params']:,} trainable "
        f"parameters, {summary['trainable_fraction']:.3%} of the base)",
        f"steps         {summary['steps']}  ({summary['tokens']:,} tokens, "
        f"{summary['train_time_s']:.1f} s, {summary['tokens_per_s']:.0f} tokens/s)",
        f"final loss    {_fmt(summary['final_loss'])}",
        f"best val loss {_fmt(summary['best_val_loss'])}",
    ]
    if summary.get("adapter_id"):
        lines.append(f"adapter       store id {summary['adapter_id']!r} v{summary['version']}")
    if summary.get("adapter_file"):
        lines.append(f"adapter file  {summary['adapter_file']}")
    lines.append(f"run folder    {summary['output_dir']}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"
