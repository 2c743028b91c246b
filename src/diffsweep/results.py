"""A results table (CSV) that several jobs of a sweep write to, safely and rerunnably.

Each write takes an exclusive lock, reads the current rows, adds (or replaces) one and replaces
the file atomically (:func:`diffsweep.files.atomic_writer`): a job killed at any point leaves
either the old or the new file, never a truncated one. With a ``key`` (columns naming what was
measured, :data:`EVAL_ROW_KEY` for ``evaluate.py``) a rerun of a job replaces its earlier row in
place instead of adding a duplicate, so a table holds one row per measurement however often a
sweep is rerun.

A results file is (re)written only if it is ours: a path that does not exist yet (or an empty
file), or an existing CSV file we could have written (UTF-8 text, a header of distinct non-empty
column names, every row with the header's number of fields) which, for a keyed write, shares at
least two of the key's columns with its header (one for a one-column key).
A symlink (even to one of our tables), a folder, a file that is not such a CSV (a script, a
binary, a config) or another program's CSV (e.g. Lightning's ``metrics.csv``, which shares only
``step`` with :data:`EVAL_ROW_KEY`) is refused with a one-line :class:`ResultsFileError` before
anything is written. Tables grow columns as rows bring new ones (a first row of ``metrics=none``
has no ``fid_extractor``), so a keyed write asks for a share of the key, not all of it.
:func:`results_file_problem` states the rule for a config validator; :func:`append_row` (under
the file's lock) and :func:`write_rows` enforce it again. Writes without a key (the study
``analyze.py`` scripts replacing their own ``results.csv``) need the CSV rule only.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffsweep.files import atomic_write_text, file_lock

#: The columns that name one evaluation (the model, how it was sampled and measured): rows equal
#: in all of them are the same measurement. Anything else (FID, timings, the grid path) is its
#: result.
EVAL_ROW_KEY: tuple[str, ...] = (
    "ckpt_path", "step", "pretrained", "weights", "sigma_rel", "sampler", "num_steps", "spacing",
    "options", "guidance_scale", "seed", "precision", "compile", "fid_extractor", "fid_samples")
#: Key columns holding paths: compared after ``os.path.normpath`` (``a//b`` is ``a/b``).
_PATH_COLUMNS = ("ckpt_path", "pretrained")
#: Key columns an existing table's header must share with a keyed write (fewer if the key has
#: fewer columns): one generic name such as ``step`` does not make a CSV ours.
MIN_SHARED_KEY_COLUMNS = 2
_ALLOWED = ("a new file, or a results CSV diffsweep wrote (not a symlink; for evaluate.py one "
            "whose header holds its key columns such as sampler, num_steps, seed)")


class ResultsFileError(ValueError):
    """A results file that is not ours to (re)write; the message is one line naming the key
    ``results_file``, the path and what is allowed."""


def _csv_header_problem(path: Path) -> tuple[list[str] | None, str | None]:
    """(the header, None) if ``path`` holds a CSV file our writer could have written (empty:
    ``([], None)``), else (None, why not)."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        return None, "it is not a CSV file (not UTF-8 text)"
    except OSError as error:
        return None, f"it cannot be read ({error.strerror or error})"
    if not text:
        return [], None
    if "\0" in text:
        return None, "it is not a CSV file (it holds NUL bytes)"
    try:
        records = [record for record in csv.reader(io.StringIO(text, newline="")) if record]
        # (blank lines are no records: csv.DictReader skips them too)
    except csv.Error as error:
        return None, f"it is not a CSV file ({error})"
    if not records:
        return [], None
    header = records[0]
    if any(not column.strip() for column in header) or len(set(header)) != len(header):
        return None, (f"it is not a CSV results table (its first line {_brief(text)!r} is no "
                      f"header of distinct column names)")
    uneven = next((number for number, record in enumerate(records[1:], 2)
                   if len(record) != len(header)), None)
    if uneven is not None:
        return None, (f"it is not a CSV results table (record {uneven} has "
                      f"{len(records[uneven - 1])} fields, its header {len(header)})")
    return header, None


def _brief(text: str, length: int = 60) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= length else line[:length - 3] + "..."


def results_file_problem(path: str | os.PathLike[str] | None,
                         key: Sequence[str] | None = EVAL_ROW_KEY,
                         name: str = "results_file") -> str | None:
    """Why ``path`` may not be (re)written as a results table, in one line naming ``name``, the
    path and what is allowed; None if it may (the module docstring states the rule).

    ``key``: the columns a keyed writer identifies rows by (:data:`EVAL_ROW_KEY` for
    ``evaluate.py``); an existing table must share at least :data:`MIN_SHARED_KEY_COLUMNS` of
    them. None: any CSV our writer could have written. Reads at most the file itself (never a
    folder, FIFO or device); an unwritable file or folder is left to the caller's own checks
    (``validate.check_writable_file``).
    """
    if path is None:
        return None
    path = Path(path).expanduser()
    shown = f"{name}={path} is not allowed"
    allowed = f"pass {name}=<{_ALLOWED}>."
    lock = _lock_path(path)
    if path.is_symlink():
        return f"{shown}: it is a symlink (to {os.readlink(path)}); {allowed}"
    if lock.is_symlink():
        return f"{shown}: its lock file {lock} is a symlink; remove it or {allowed}"
    if not path.exists():
        return None
    if not path.is_file():
        return f"{shown}: it is not a regular file; {allowed}"
    header, problem = _csv_header_problem(path)
    if problem is not None:
        return f"{shown}: {problem}; {allowed}"
    if header and key:
        shared = [column for column in key if column in header]
        needed = min(MIN_SHARED_KEY_COLUMNS, len(key))
        if len(shared) < needed:
            return (f"{shown}: it is not a results table of ours (its header "
                    f"{_brief(','.join(header))!r} shares {len(shared)} of the key columns "
                    f"{', '.join(key)}, at least {needed} needed); {allowed}")
    return None


def _check_results_file(path: Path, key: Sequence[str] | None) -> None:
    problem = results_file_problem(path, key)
    if problem is not None:
        raise ResultsFileError(problem)


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


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

    Raises :class:`ResultsFileError` (nothing written) when ``path`` is not ours to rewrite
    (:func:`results_file_problem` with ``key``).
    """
    from diffsweep.files import remove_stale_partials

    path = Path(path)
    new_row = {column: _cell(value) for column, value in row.items()}
    _check_results_file(path, key)  # before the lock: a symlinked lock file is never opened
    with file_lock(_lock_path(path)):
        _check_results_file(path, key)  # again under the lock: what is rewritten is what passed
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
        _write_csv(path, rows)
    return True


def write_rows(path: str | Path, rows: Sequence[Mapping[str, Any]],
               key: Sequence[str] | None = None) -> Path:
    """Replace the CSV at ``path`` with ``rows`` atomically (columns: the union of the rows',
    in first-seen order). Callers that share the file hold its lock (:func:`append_row` does).

    Raises :class:`ResultsFileError` (nothing written) when ``path`` is not ours to replace:
    :func:`results_file_problem` with ``key`` (None: any CSV our writer could have written, as
    the study ``analyze.py`` scripts' own ``results.csv``).
    """
    path = Path(path)
    _check_results_file(path, key)
    return _write_csv(path, rows)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    columns = list(dict.fromkeys(column for row in rows for column in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows({column: _cell(value) for column, value in row.items()} for row in rows)
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


__all__ = ["EVAL_ROW_KEY", "MIN_SHARED_KEY_COLUMNS", "ResultsFileError", "append_row", "read_rows",
           "results_file_problem", "row_key", "write_rows"]
