"""A full disk while a checkpoint or the logged history is written: one line naming the file and
the free space, the previous file unchanged, nothing of the history lost.

torch's zip writer reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc]``
(no errno); :func:`diffsweep.files.is_disk_full` recognises it by the free space left. The tmpfs
tests fill a real 2 MiB file system (root only: skipped where ``mount`` is not permitted).
"""

from __future__ import annotations

import csv
import errno
import subprocess
from pathlib import Path

import pytest
import torch

import diffsweep.files as files
from diffsweep.checkpoints import AtomicCheckpointIO, CheckpointDiskFullError
from diffsweep.files import DiskFullError, atomic_torch_save
from diffsweep.loggers import ResumableCSVLogger

TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def _torch_save_failing_like_a_full_disk(obj, handle):
    handle.write(b"PK\x03\x04 part of a zip archive")
    raise RuntimeError(TORCH_FULL_DISK)


def _free_space(monkeypatch, free: int) -> None:
    monkeypatch.setattr(files, "free_bytes", lambda directory: free)


def test_torch_writer_error_on_a_full_disk_is_one_line_and_keeps_the_previous_file(
        tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(files.torch, "save", _torch_save_failing_like_a_full_disk)
    _free_space(monkeypatch, 4096)
    with pytest.raises(DiskFullError) as caught:
        atomic_torch_save({"global_step": 2}, path)
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(CheckpointDiskFullError) as caught:
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    message = str(caught.value)
    assert "\n" not in message and "inline_container" not in message
    assert message.startswith(f"No space left on device writing {path} (")
    assert "the previous file there is unchanged" in message
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial file is gone


def test_torch_writer_error_with_space_left_passes_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(files.torch, "save", _torch_save_failing_like_a_full_disk)
    _free_space(monkeypatch, 10 * files.DISK_FULL_MARGIN_BYTES)
    with pytest.raises(RuntimeError, match="inline_container") as caught:
        atomic_torch_save({"global_step": 2}, tmp_path / "a.ckpt")
    assert not isinstance(caught.value, OSError)
    assert list(tmp_path.iterdir()) == []


class _HalfWritingFile:
    """A text file whose writes stop halfway with ENOSPC (a disk that fills mid-append)."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, text):
        self.handle.write(text[:len(text) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_history_append_on_a_full_disk_is_one_line_and_loses_no_row(tmp_path, monkeypatch):
    logger = ResumableCSVLogger(tmp_path, name="csv", version="", flush_logs_every_n_steps=100)
    path = tmp_path / "csv" / "metrics.csv"
    for step in range(3):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    logger.persist()
    before = path.read_bytes()
    monkeypatch.setattr(files, "open",
                        lambda *args, **kwargs: _HalfWritingFile(open(*args, **kwargs)),
                        raising=False)
    logger.log_metrics({"train/loss": 3.0}, step=3)
    with pytest.raises(DiskFullError) as caught:  # half the row written, then ENOSPC
        logger.persist()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"No space left on device writing {path}")
    assert "the previous file there is unchanged" in message
    assert path.read_bytes() == before
    logger.log_metrics({"val/loss": 0.5}, step=3)  # a new column: the header rewrite fails too
    with pytest.raises(DiskFullError):
        logger.persist()
    assert path.read_bytes() == before
    monkeypatch.undo()  # space freed: the next save writes the rows kept in memory, once
    logger.persist()
    rows = list(csv.DictReader(path.open()))
    assert [(row["step"], row["train/loss"], row["val/loss"]) for row in rows] == [
        ("0", "0.0", ""), ("1", "1.0", ""), ("2", "2.0", ""), ("3", "3.0", ""), ("3", "", "0.5")]
    assert not list(path.parent.glob(".*.partial"))


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs at ``tmp_path / "disk"`` (skipped where mounting is not permitted)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs",
                                 str(mount_point)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=30)


def _fill(disk: Path) -> Path:
    """Fill ``disk`` up with one file; returns it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as error:
                assert error.errno == errno.ENOSPC
    return filler


def test_a_real_full_disk_fails_checkpoint_and_history_writes_with_one_line(small_disk):
    checkpoint = small_disk / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "weights": torch.ones(100)}, checkpoint)
    before = checkpoint.read_bytes()
    with pytest.raises(CheckpointDiskFullError) as caught:  # 3 MB on a 2 MiB disk
        io.save_checkpoint({"global_step": 2, "weights": torch.zeros(750_000)}, checkpoint)
    message = str(caught.value)
    assert "\n" not in message and "No space left on device writing" in message
    assert "the previous file there is unchanged" in message
    assert checkpoint.read_bytes() == before
    assert [p.name for p in checkpoint.parent.iterdir()] == ["last.ckpt"]

    logger = ResumableCSVLogger(small_disk, name="csv", version="", flush_logs_every_n_steps=10**6)
    history = small_disk / "csv" / "metrics.csv"
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.persist()
    filler = _fill(small_disk)
    written = history.read_bytes()
    for step in range(1, 400):  # more than the last free page holds
        logger.log_metrics({"train/loss": 1.0 + step, "lr": 0.1}, step=step)
    with pytest.raises(DiskFullError) as caught:
        logger.persist()
    assert "\n" not in str(caught.value) and str(history) in str(caught.value)
    assert history.read_bytes() == written
    filler.unlink()
    logger.persist()
    steps = [int(row["step"]) for row in csv.DictReader(history.open())]
    assert steps == list(range(400))
