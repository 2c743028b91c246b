"""A results table (CSV) that several jobs of a sweep append to, safely.

Each append takes an exclusive lock, reads the current rows, adds one and replaces the file
atomically (:func:`diffsweep.files.atomic_writer`): a job killed at any point leaves either the old
or the new file, never a truncated one.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from diffsweep.files import atomic_write_text, file_lock


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """All rows of a results CSV (empty list if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` to the CSV at ``path`` (columns are the union of all rows', in first-seen order)."""
    path = Path(path)
    with file_lock(path.with_name(path.name + ".lock")):
        rows = read_rows(path) + [{key: "" if value is None else value
                                   for key, value in row.items()}]
        columns: list[str] = []
        for existing in rows:
            columns.extend(key for key in existing if key not in columns)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())
