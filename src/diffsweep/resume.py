"""Auto-resume: the same command after a crash continues the crashed run.

Every training run keeps ``run_status.json`` (its override signature and ``running``/``finished``/
``failed``) and holds an exclusive lock on ``run.lock`` while it runs. When Hydra picks the run
directory, :func:`resumable_run_dir` returns the newest unfinished, unlocked run with the same
signature (so training resumes there from its last checkpoint) or a new timestamped directory.
A finished run is never reopened: the same command after success starts a new run.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from diffsweep.files import atomic_write_json, file_lock, is_locked

log = logging.getLogger(__name__)

STATUS_FILE = "run_status.json"
LOCK_FILE = "run.lock"


def read_status(run_dir: str | Path) -> dict[str, str] | None:
    """The run's status record, or None if absent/unreadable."""
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def resumable_run_dir(runs_dir: str, new_name: str, resume: str, signature: str) -> str:
    """Hydra resolver for ``hydra.run.dir``: an unfinished run of the same command, or a new one.

    Args:
        runs_dir: folder holding one sub-folder per run.
        new_name: name of a new run's folder (a timestamp).
        resume: ``auto`` (look for an unfinished run) or ``never``.
        signature: the command's overrides (Hydra's ``override_dirname``).
    """
    if resume not in ("auto", "never"):
        raise ValueError(f"resume must be 'auto' or 'never', got {resume!r}.")
    root = Path(runs_dir)
    if resume == "auto" and root.is_dir():
        candidates = sorted(root.glob(f"*/{STATUS_FILE}"), key=lambda p: p.stat().st_mtime,
                            reverse=True)
        for status_path in candidates:
            status = read_status(status_path.parent)
            if (status and status.get("signature") == signature
                    and status.get("status") != "finished" and not is_locked(status_path.parent / LOCK_FILE)):
                log.info("Resuming the unfinished run in %s", status_path.parent)
                return str(status_path.parent)
    return str(root / new_name)


def _write_status(run_dir: Path, signature: str, status: str) -> None:
    atomic_write_json(run_dir / STATUS_FILE,
                      {"signature": signature, "status": status, "pid": os.getpid()})


@contextmanager
def run_status(run_dir: str | Path, signature: str) -> Iterator[None]:
    """Mark ``run_dir`` running (and locked) inside the block; finished or failed after it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(run_dir / LOCK_FILE, blocking=False) as held:
        if not held:
            raise RuntimeError(f"Another process is training in {run_dir}; wait for it or choose "
                               f"another run directory (hydra.run.dir=...).")
        _write_status(run_dir, signature, "running")
        try:
            yield
        except BaseException:
            _write_status(run_dir, signature, "failed")
            raise
        _write_status(run_dir, signature, "finished")
