"""``RUN_DIR/monitor.png``: loss, online kNN top-1 and RankMe against step and wall time."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mimar import runs, writes

PANELS = (("loss", "loss"), ("monitor/knn_top1", "kNN top-1 (%)"), ("monitor/rankme", "RankMe"))


def read_rows(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (torn lines skipped)."""
    rows = []
    path = run_dir / runs.METRICS
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def series(rows: list[dict], key: str) -> tuple[list, list, list]:
    """``(steps, minutes since the first row, values)`` of ``key``."""
    start = rows[0].get("time", 0.0) if rows else 0.0
    kept = [r for r in rows if key in r]
    minutes = [(r.get("time", start) - start) / 60 for r in kept]
    return [r["step"] for r in kept], minutes, [r[key] for r in kept]


def draw(run_dir: Path, extra: list[dict] = (), path: Path | None = None) -> Path:
    """Redraw the monitor figure from ``metrics.jsonl`` and ``extra`` rows not written yet
    (stamped now); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    now = time.time()
    rows = read_rows(run_dir) + [{"time": now, **row} for row in extra]
    path = path or run_dir / "monitor.png"
    fig, axes = plt.subplots(2, len(PANELS), figsize=(4 * len(PANELS), 6), squeeze=False)
    for col, (key, label) in enumerate(PANELS):
        steps, minutes, values = series(rows, key)
        style = "-" if key == "loss" else "o-"
        axes[0][col].plot(steps, values, style, markersize=3)
        axes[1][col].plot(minutes, values, style, markersize=3)
        axes[0][col].set(title=label, xlabel="step")
        axes[1][col].set(xlabel="wall time (min)", ylabel=label)
        if key == "loss" and values and min(values) > 0:
            axes[0][col].set_yscale("log")
            axes[1][col].set_yscale("log")
    fig.tight_layout()
    # a reader never sees half a picture; a picture is optional: a failed write is a warning
    with writes.optional("the monitor picture"):
        writes.save_with(path, lambda name: fig.savefig(name, dpi=80), "monitor picture")
    plt.close(fig)
    return path
