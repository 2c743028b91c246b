"""A results table (CSV) that several jobs of a sweep write to, safely and rerunnably.

Each write takes an exclusive lock, reads the current rows, adds (or replaces) one and replaces
the file atomically (:func:`diffsweep.files.atomic_writer`): a job killed at any point leaves
either the old or the new file, never a truncated one. With a ``key`` (columns naming what was
measured, :data:`EVAL_ROW_KEY` for ``evaluate.py``) a rerun of a job replaces its earlier row in
place instead of adding a duplicate, so a table holds one row per measurement however often a
sweep is rerun.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from diffsweep.files import atomic_write_text, file_lock

#: The columns that name one evaluation (the model, how it was sampled and measured): rows equal
#: in all of them are the same measurement. Anything else (FID, timings, the grid path) is its
#: result.
EVAL_ROW_KEY: tuple[str, ...] = (
    "ckpt_path", "step", "pretrained", "weights", "sigma_rel", "sampler", "num_steps", "spacing",
    "options", "guidance_scale", "seed", "precision", "compile", "fid_extractor", "fid_samples")
#: Key columns holding paths: compared after ``os.path.normpath`` (``a//b`` is ``a/b``).
_PATH_COLUMNS = ("ckpt_path", "pretrained")


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """All rows of a results CSV (empty list if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _cell(value: Any) -> str:
    """A value as the CSV stores it (and reads it back)."""
    return "" if value is None else str(value)


def row_key(row: Mapping[str, Any], key: Sequence[str]) -> tuple[str, ...]:
    """The values of ``row`` in the ``key`` columns as CSV text (a missing column is ``""``)."""
    values = []
    for column in key:
        value = _cell(row.get(column))
        values.append(os.path.normpath(value) if value and column in _PATH_COLUMNS else value)
    return tuple(values)


def append_row(path: str | Path, row: Mapping[str, Any],
               key: Sequence[str] | None = None) -> bool:
    """Add ``row`` to the CSV at ``path`` (columns are the union of all rows', in first-seen
    order); returns whether the file was written.

    With ``key``, an existing row with the same values in the ``key`` columns (:func:`row_key`)
    is replaced in place (further duplicates of it are dropped), and nothing is written when it
    already equals ``row``. Partial files left by writers killed mid-write are removed.
    """
    from diffsweep.files import remove_stale_partials

    path = Path(path)
    new_row = {column: _cell(value) for column, value in row.items()}
    with file_lock(path.with_name(path.name + ".lock")):
        remove_stale_partials(path.parent, recursive=False, target=path.name)
        rows = read_rows(path)
        if key is None:
            rows.append(new_row)
        else:
            wanted = row_key(new_row, key)
            same = [index for index, existing in enumerate(rows)
                    if row_key(existing, key) == wanted]
            if len(same) == 1 and all(rows[same[0]].get(column, "") == value
                                      for column, value in new_row.items()):
                return False
            if same:
                rows[same[0]] = new_row
                rows = [existing for index, existing in enumerate(rows) if index not in same[1:]]
            else:
                rows.append(new_row)
        write_rows(path, rows)
    return True


def write_rows(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Replace the CSV at ``path`` with ``rows`` atomically (columns: the union of the rows',
    in first-seen order). Callers that share the file hold its lock (:func:`append_row` does)."""
    columns = list(dict.fromkeys(column for row in rows for column in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows({column: _cell(value) for column, value in row.items()} for row in rows)
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


__all__ = ["EVAL_ROW_KEY", "append_row", "read_rows", "row_key", "write_rows"]
