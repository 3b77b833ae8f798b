"""Result tables for the terminal and atomic JSON files for the run directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mimar import writes

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
    """Write ``payload`` as JSON to ``path`` atomically (:func:`mimar.writes.write_text`).

    Tensors and paths are converted (``tolist()`` / ``str``); other unknown types raise
    TypeError before anything is written.
    """
    text = json.dumps(payload, indent=2, default=_to_json) + "\n"
    writes.write_text(path, text, "results")


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
