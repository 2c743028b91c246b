"""Reading and writing training checkpoints.

A checkpoint holds the EMA weights as ``state_dict`` and the raw weights as
``current_model_state`` (Lightning's WeightAveraging format), plus ``diffsweep_config``: the
resolved run config, so a model is rebuilt without the original command line
(:func:`diffsweep.assembly.build_module`). Reading never executes code: ``torch.load`` with
``weights_only=True`` (tensors, containers and primitives only), for our own reads and for
Lightning's resume alike (:class:`AtomicCheckpointIO`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from diffsweep.files import DiskFullError, atomic_torch_save

if TYPE_CHECKING:
    from diffsweep.module import DiffusionModule

log = logging.getLogger(__name__)

COMPILE_PREFIX = "_orig_mod."


class CheckpointMismatchError(ValueError):
    """A checkpoint was trained with a different model/schedule than the config asks for."""


class StateDictMismatchError(CheckpointMismatchError):
    """A checkpoint's weights do not fit the model: one line naming the first differing tensors
    (``details`` keeps torch's full report)."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class CheckpointDiskFullError(OSError):
    """A checkpoint write ran out of disk space; the previous file at that path is unchanged."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


#: How many differing tensors a state-dict mismatch names.
MISMATCH_EXAMPLES = 3
#: Likely causes, for the two places a state dict is loaded.
STORED_CONFIG_CAUSE = ("its weights and its stored diffsweep_config disagree (an edited "
                       "checkpoint, or one written by another version of the net's code)")
RESUME_CAUSE = ("it was trained with a different model config (model.*, data.channels, "
                "data.resolution, model.num_classes): rerun with the training run's overrides, "
                "or start a new run without ckpt_path")

_SIZE_MISMATCH = re.compile(r"size mismatch for ([^:\s]+): copying a param with shape "
                            r"torch\.Size\(\[([^\]]*)\]\) from checkpoint, the shape in current "
                            r"model is torch\.Size\(\[([^\]]*)\]\)")
_KEY_LIST = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: ((?:\"[^\"]*\"(?:, )?)+)")


def summarize_state_dict_error(error: BaseException) -> str | None:
    """One line from torch's ``load_state_dict`` RuntimeError (one line per tensor, often
    hundreds): the count of shape mismatches, missing and unexpected keys, each with its first
    few names (and shapes, checkpoint vs model). None if ``error`` is not such an error."""
    text = str(error)
    if not isinstance(error, RuntimeError) or "Error(s) in loading state_dict" not in text:
        return None
    parts = []
    sizes = _SIZE_MISMATCH.findall(text)
    if sizes:
        shown = ", ".join(f"{key} checkpoint [{old}] vs model [{new}]"
                          for key, old, new in sizes[:MISMATCH_EXAMPLES])
        more = ", ..." if len(sizes) > MISMATCH_EXAMPLES else ""
        parts.append(f"{len(sizes)} tensor(s) differ in shape ({shown}{more})")
    for kind, listed in _KEY_LIST.findall(text):
        keys = re.findall(r'"([^"]*)"', listed)
        more = ", ..." if len(keys) > MISMATCH_EXAMPLES else ""
        where = "missing from the checkpoint" if kind == "Missing" else "not in the model"
        parts.append(f"{len(keys)} key(s) {where} ({', '.join(keys[:MISMATCH_EXAMPLES])}{more})")
    return "; ".join(parts) if parts else text.splitlines()[0]


def state_dict_mismatch_error(error: BaseException, source: str,
                              likely_cause: str = RESUME_CAUSE) -> StateDictMismatchError | None:
    """The one-line :class:`StateDictMismatchError` for torch's load_state_dict ``error`` of the
    checkpoint ``source``, or None if ``error`` is another error."""
    summary = summarize_state_dict_error(error)
    if summary is None:
        return None
    return StateDictMismatchError(f"Checkpoint {source} does not fit the model: {summary}. "
                                  f"Likely {likely_cause}.", details=str(error))


@contextlib.contextmanager
def explain_state_dict_errors(source: str | Path | None,
                              likely_cause: str = RESUME_CAUSE) -> Iterator[None]:
    """Turn torch's load_state_dict RuntimeError raised in the block (e.g. Lightning restoring
    ``ckpt_path`` inside ``trainer.fit``) into a one-line :class:`StateDictMismatchError` naming
    ``source``; other errors pass unchanged. ``source=None``: no checkpoint, nothing to explain."""
    try:
        yield
    except RuntimeError as error:
        explained = state_dict_mismatch_error(error, str(source), likely_cause) if source else None
        if explained is None:
            raise
        raise explained from None  # torch's report is in .details; it would bury the message


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU, with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; pass ckpt_path=<run dir>/"
                                f"checkpoints/last.ckpt of a train.py run.")
    return load_weights_only(path)


def load_weights_only(path: str | Path,
                      map_location: str | torch.device | Callable[..., Any] = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: a file whose unpickling would run code (a pickled
    ``nn.Module``, any class outside torch's safe list) is refused with a ValueError naming it."""
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as error:  # not a zip archive (legacy or plain pickle): no mmap
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        unsafe = isinstance(error, pickle.UnpicklingError) and \
            "weights_only" in str(error)
        reason = ("it holds Python objects other than tensors and plain containers (a pickled "
                  "nn.Module or class), and loading it would execute code; diffsweep only reads "
                  "weights-only checkpoints (save state dicts, not modules)"
                  if unsafe else f"{type(error).__name__}: {str(error).splitlines()[0]}; it may "
                  f"be truncated or not a diffsweep/Lightning checkpoint")
        raise ValueError(f"Checkpoint {path} could not be read: {reason}.") from error


def strip_compile_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``torch.compile``'s ``_orig_mod.`` from parameter names."""
    return {key.replace(COMPILE_PREFIX, ""): value for key, value in state_dict.items()}


def load_module(path: str | Path, weights: str = "ema",
                map_location: str | torch.device = "cpu") -> "DiffusionModule":
    """Rebuild the DiffusionModule of a checkpoint and load ``weights`` (``ema`` or ``raw``)."""
    return module_from_checkpoint(read_checkpoint(path), weights, source=str(path)).to(
        map_location).eval()


def module_from_checkpoint(checkpoint: dict[str, Any], weights: str = "ema",
                           source: str = "the checkpoint") -> "DiffusionModule":
    """The DiffusionModule of an already loaded checkpoint dict, with ``weights`` loaded."""
    from diffsweep.assembly import build_module

    cfg = checkpoint.get("diffsweep_config")
    if cfg is None:
        raise ValueError(f"{source} has no diffsweep_config; it was not written by "
                         f"diffsweep's train.py.")
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights={weights!r} is not allowed; choose ema or raw.")
    state_key = "state_dict"
    if weights == "raw" and "current_model_state" in checkpoint:
        state_key = "current_model_state"
    module = build_module(cfg)
    with explain_state_dict_errors(source, STORED_CONFIG_CAUSE):
        module.load_state_dict(strip_compile_prefix(checkpoint[state_key]))
    return module.eval()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically (:func:`diffsweep.files.atomic_writer`: temp file beside the
    target, fsync, ``os.replace``, fsync of the folder) and read weights-only.

    A process killed at any point leaves the previous checkpoint intact (Lightning's own save goes
    through fsspec's local transaction: a temp file in /tmp that is *copied* into place when /tmp
    is another file system, and never fsynced).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` atomically; a full disk raises :class:`CheckpointDiskFullError`
        naming the path and the free space, with the previous file at ``path`` unchanged."""
        try:
            atomic_torch_save(checkpoint, path)
        except DiskFullError as error:
            raise CheckpointDiskFullError(
                f"{error} Free disk space or set callbacks.model_checkpoint.dirpath=<a folder on "
                f"a disk with space>, then rerun the same command to resume.") from error

    def load_checkpoint(self, path: str | Path,
                        map_location: Callable[..., Any] | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_weights_only(path, map_location=map_location)


def find_resume_checkpoint(directory: str | Path) -> Path | None:
    """The readable training checkpoint in ``directory`` with the highest global step, or None.

    Ties go to ``last.ckpt``, then to the newer file. An unreadable file (say, truncated by a
    full disk) is skipped with a warning, never deleted; weights-only exports (no ``loops``) are
    not resume points.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    best: tuple[tuple[int, bool, float], Path] | None = None
    for candidate in directory.glob("*.ckpt"):
        try:
            checkpoint = load_weights_only(candidate)
        except ValueError as error:  # unreadable: not resumable
            log.warning("Skipping unreadable checkpoint %s (%s).", candidate, error)
            continue
        if "loops" not in checkpoint:
            continue
        rank = (int(checkpoint.get("global_step", 0)), candidate.name == "last.ckpt",
                candidate.stat().st_mtime)
        if best is None or rank > best[0]:
            best = (rank, candidate)
    return best[1] if best else None
