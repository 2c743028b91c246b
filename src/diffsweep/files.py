"""The one home for file infrastructure: atomic writes, locks and stable hashes.

Every file diffsweep writes that a reader may open while a writer dies (checkpoints, results
tables, caches, manifests, status files, grids) goes through :func:`atomic_writer`: the data is
written to a hidden ``.<name>.<pid>.partial`` file beside the target, flushed and fsynced, renamed
over the target with ``os.replace`` and the directory fsynced. A reader sees the old file or the
new one, never a truncated one; a crash leaves at most a ``.partial`` file, which never shadows
the real one. Nothing else in the package calls ``os.replace`` or ``flock``. Append-only logs
(``metrics.csv``) grow through :func:`append_text`: an append is kept whole or not at all. A full
disk is :class:`DiskFullError` (one line) whichever way the writer reported it.

Stable hashes (cache keys, fingerprints) are sha256 hex digests of a canonical JSON encoding
(:func:`stable_hash`), of a file's bytes (:func:`file_sha256`) or of tensors
(:func:`tensors_sha256`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

PathLike = str | os.PathLike


class DiskFullError(OSError):
    """An atomic write ran out of disk space (ENOSPC / EDQUOT); the target file is unchanged."""

    def __init__(self, path: PathLike) -> None:
        path = Path(path)
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        kept = "the previous file there is unchanged" if path.exists() else "no file was left"
        self.path = path
        self.message = (f"No space left on device writing {path} ({free} on its file system); "
                        f"{kept}.")
        super().__init__(errno.ENOSPC, self.message)

    def __str__(self) -> str:
        return self.message


#: A file system with less free space than this (bytes) right after a write failed counts as
#: full: writers that report errors without an errno (torch's zip writer) failed for lack of space.
DISK_FULL_MARGIN_BYTES = 1 << 20


def free_bytes(directory: PathLike) -> int | None:
    """Bytes an unprivileged writer may still use on ``directory``'s file system (None: unknown)."""
    try:
        status = os.statvfs(directory)
    except OSError:
        return None
    return status.f_bavail * status.f_frsize


def is_disk_full(error: BaseException | None, directory: PathLike | None = None) -> bool:
    """Whether ``error`` comes from a full disk: it (or an error it was raised from) is an
    ENOSPC/EDQUOT OSError, or, given the ``directory`` written to, it is a write error without
    that errno (a RuntimeError such as torch's ``enforce fail at inline_container.cc`` or
    ``PytorchStreamWriter failed writing file``, or another OSError) while that file system has
    less than :data:`DISK_FULL_MARGIN_BYTES` free. Probe before removing what the failed write
    left, whose space counts as used."""
    first = error
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    if directory is None or not isinstance(first, (OSError, RuntimeError)):
        return False
    if isinstance(first, OSError) and first.errno not in (None, errno.EIO, errno.EFBIG):
        return False  # an errno that names another cause (EACCES, EROFS, ...)
    free = free_bytes(directory)
    return free is not None and free < DISK_FULL_MARGIN_BYTES


def fsync_directory(directory: PathLike) -> None:
    """fsync a directory so a rename inside it is durable (a no-op where unsupported)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def partial_path(path: PathLike) -> Path:
    """The temporary name :func:`atomic_writer` writes ``path`` under (hidden, per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


@contextlib.contextmanager
def atomic_writer(path: PathLike, mode: str = "wb", mode_bits: int | None = 0o644,
                  **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a file that replaces ``path`` atomically when the block exits without an error.

    ``mode`` is ``"wb"`` or ``"w"`` (text; ``open_kwargs`` such as ``newline`` pass through). On an
    error the partial file is removed and ``path`` is left as it was; a full disk raises
    :class:`DiskFullError` naming the path and the free space, whether the writer reported it as
    an ENOSPC OSError or otherwise (:func:`is_disk_full`: torch's zip writer raises a RuntimeError).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer mode must be 'w' or 'wb', got {mode!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        with open(partial, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if mode_bits is not None:
            os.chmod(partial, mode_bits)
        os.replace(partial, path)
    except (OSError, RuntimeError) as error:
        full = not isinstance(error, DiskFullError) and is_disk_full(error, partial.parent)
        partial.unlink(missing_ok=True)
        if full:
            raise DiskFullError(path) from error
        raise
    finally:
        partial.unlink(missing_ok=True)
    fsync_directory(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    with atomic_writer(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as indented JSON (sorted keys; non-JSON values as str)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically. A full disk raises :class:`DiskFullError`
    (not torch's ``RuntimeError: [enforce fail at inline_container.cc...]``); the temporary file
    is removed and a previous file at ``path`` is unchanged."""
    with atomic_writer(path, "wb") as handle:
        torch.save(obj, handle)


def append_text(path: PathLike, text: str, sync: bool = False) -> None:
    """Append ``text`` (UTF-8) to ``path`` (created, with its folder, if missing), all or nothing:
    a failed write truncates the file back to its previous length (or removes a file it created),
    and a full disk raises :class:`DiskFullError`. ``sync``: fsync the file before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.is_file()
    size = path.stat().st_size if existed else 0
    try:
        with open(path, "a", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
    except OSError as error:
        full = not isinstance(error, DiskFullError) and is_disk_full(error, path.parent)
        if existed:
            os.truncate(path, size)  # frees space, needs none
        else:
            path.unlink(missing_ok=True)
        if full:
            raise DiskFullError(path) from error
        raise


def replace_atomically(source: PathLike, target: PathLike) -> None:
    """Move a finished, already fsynced file ``source`` over ``target`` (same directory) durably.

    For files written in place over time (memory-mapped caches) rather than through
    :func:`atomic_writer`.
    """
    source = Path(source)
    with open(source, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(source, target)
    fsync_directory(Path(target).parent)


def fsync_file(path: PathLike) -> None:
    """Flush a file's data to disk (e.g. a memory map's backing file before committing it)."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.partial$")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(directory: str | Path, recursive: bool = True,
                          target: str | None = None) -> list[Path]:
    """Delete the ``.<name>.<pid>.partial`` files (:func:`diffsweep.files.partial_path`) under
    ``directory`` whose writer process is gone; returns them.

    Only files of exactly that form are touched (never a real file, never a live writer's
    partial). ``target``: only partials of that file name; ``recursive``: sub-folders too.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in (directory.rglob("*.partial") if recursive else directory.glob("*.partial")):
        match = _PARTIAL.match(path.name)
        if (match is None or path.is_symlink() or not path.is_file()
                or (target is not None and match["name"] != target)
                or _process_alive(int(match["pid"]))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _flock(handle: IO[Any], blocking: bool) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def file_lock(path: PathLike, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive advisory lock (``flock``) on ``path`` (created if missing) in the block.

    Yields True once held; with ``blocking=False`` yields False at once when another process
    holds it (the block then runs without the lock: check the value). The lock goes with the
    process, so a killed holder never leaves it stuck.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        held = _flock(handle, blocking)
        try:
            yield held
        finally:
            if held:
                fcntl.flock(handle, fcntl.LOCK_UN)


def is_locked(path: PathLike) -> bool:
    """Whether another process holds :func:`file_lock` on ``path`` right now."""
    path = Path(path)
    if not path.exists():
        return False
    with file_lock(path, blocking=False) as held:
        return not held


def stable_hash(obj: Any, length: int | None = None) -> str:
    """sha256 hex digest of ``obj`` as canonical JSON (sorted keys, non-JSON values as ``str``),
    cut to ``length`` characters. Equal for equal values on any machine and Python version."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    digest = hashlib.sha256(blob).hexdigest()
    return digest[:length] if length else digest


def bytes_sha256(*chunks: bytes) -> str:
    """sha256 hex digest of the concatenated ``chunks``."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: PathLike) -> str:
    """sha256 hex digest of a file's bytes (memoised on path, size and mtime)."""
    status = os.stat(path)
    key = (os.path.abspath(path), status.st_size, status.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def read_file_sha256(path: PathLike) -> str:
    """sha256 hex digest of a file's bytes as they are on disk now (read in 1 MiB chunks, never
    memoised: for checking that a cache still holds what its checksum recorded)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                   include_layout: bool = False) -> str:
    """sha256 over tensors in name order: each name, (with ``include_layout``) its dtype and
    shape, and its bytes. A state dict's digest changes with any weight."""
    items = dict(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
    digest = hashlib.sha256()
    for name in sorted(items):
        tensor = items[name].detach().cpu().contiguous()
        digest.update(name.encode())
        if include_layout:
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


__all__ = ["DISK_FULL_MARGIN_BYTES", "append_text", "free_bytes",
           "DiskFullError", "is_disk_full", "remove_stale_partials", "atomic_torch_save",
           "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "atomic_writer", "bytes_sha256", "file_lock", "file_sha256", "fsync_directory",
           "fsync_file", "is_locked", "partial_path", "read_file_sha256", "replace_atomically",
           "stable_hash", "tensors_sha256"]
