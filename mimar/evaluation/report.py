"""Result tables for the terminal and atomic JSON files for the run directory."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

COLUMNS: tuple[str, ...] = ("model", "protocol", "layer", "top-1", "notes")


def results_table(rows: list[dict], title: str) -> Table:
    """A rich table with columns model / protocol / layer / top-1 / notes.

    Rows are dicts keyed by those column names; missing keys or None print as "". For
    convenience the "top-1" cell falls back to a row's "top1" (the key the probes return).
    Floats print with two decimals.
    """
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ("layer", "top-1") else "left")
    for row in rows:
        cells = {column: row.get(column) for column in COLUMNS}
        if cells["top-1"] is None:
            cells["top-1"] = row.get("top1")
        table.add_row(*(_cell(cells[column]) for column in COLUMNS))
    return table


def print_results(rows: list[dict], title: str, console: Console | None = None) -> None:
    """Print :func:`results_table` with a rich Console (a new stdout console by default)."""
    (console or Console()).print(results_table(rows, title))


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as JSON to ``path`` atomically, creating parent directories.

    The JSON goes to a temporary file in the same directory, is flushed and fsync-ed, then
    ``os.replace``-d over ``path``, so readers see either the old file or the complete new one.
    Tensors and paths are converted (``tolist()`` / ``str``); other unknown types raise
    TypeError and leave no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=_to_json)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _to_json(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
