"""A results table (CSV) that several jobs of a sweep append to, safely.

Each append takes an exclusive lock, reads the current rows, adds one and replaces the file
atomically (temp file + fsync + ``os.replace``): a job killed at any point leaves either the old or
the new file, never a truncated one.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        rows = read_rows(path) + [{key: "" if value is None else value
                                   for key, value in row.items()}]
        columns: list[str] = []
        for existing in rows:
            columns.extend(key for key in existing if key not in columns)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "w", newline="") as handle:
                handle.write(buffer.getvalue())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
