"""Reading and writing training checkpoints.

A checkpoint holds the EMA weights as ``state_dict`` and the raw weights as
``current_model_state`` (Lightning's WeightAveraging format), plus ``diffsweep_config``: the
resolved run config, so a model is rebuilt without the original command line
(:func:`diffsweep.assembly.build_module`). Reading never executes code: ``torch.load`` with
``weights_only=True`` (tensors, containers and primitives only), for our own reads and for
Lightning's resume alike (:class:`AtomicCheckpointIO`); rebuilding never executes code either:
the stored config's ``_target_`` names are checked against :mod:`diffsweep.targets` first.

Every read checks the structure before anything uses it (:func:`check_checkpoint`): an empty
file, a plain state dict, a file without ``state_dict`` or with a ``diffsweep_config`` that is
not a mapping with ``module`` and ``data`` mappings is refused with one line naming the file and
what is wrong; a resume also needs Lightning's version stamp (:func:`check_resumable`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


#: What Lightning's resume reads first besides ``state_dict`` (a missing ``optimizer_states`` it
#: reports itself, after checking that the weights fit the model).
RESUME_KEYS = ("pytorch-lightning_version",)


class CheckpointStructureError(ValueError):
    """A checkpoint file that is not what its reader needs (one line naming the file)."""


def _what_it_holds(checkpoint: Mapping[Any, Any]) -> str:
    keys = [str(key) for key in list(checkpoint)[:4]]
    more = ", ..." if len(checkpoint) > 4 else ""
    return f"keys: {', '.join(keys)}{more}" if keys else "an empty dict"


def check_run_config(config: Any, source: str) -> dict[str, Any]:
    """``config`` (a checkpoint's ``diffsweep_config``) if it is a mapping with ``module`` and
    ``data`` mappings (and, in the earlier layout without ``module.denoiser``, ``model`` and
    ``scheduler`` mappings); else :class:`CheckpointStructureError` naming ``source``."""
    def refuse(what: str) -> CheckpointStructureError:
        return CheckpointStructureError(f"Checkpoint {source}: {what}; it was not written by "
                                        f"diffsweep's train.py, or it was edited.")

    if not isinstance(config, Mapping):
        raise refuse(f"diffsweep_config is a {type(config).__name__}, not a mapping of the run "
                     f"config")
    required = ["module", "data"]
    if isinstance(config.get("module"), Mapping) and "denoiser" not in config["module"]:
        required += ["model", "scheduler"]  # the earlier layout, upgraded from these
    for key in required:
        if key not in config:
            raise refuse(f"diffsweep_config has no {key}")
        if not isinstance(config[key], Mapping):
            raise refuse(f"diffsweep_config.{key} is a {type(config[key]).__name__}, not a "
                         f"mapping")
    return dict(config)


def check_checkpoint(checkpoint: Any, source: str | Path, need_config: bool = False
                     ) -> dict[str, Any]:
    """``checkpoint`` (a loaded file) if it is a dict with a ``state_dict`` mapping and, when
    present (or ``need_config``), a well-formed ``diffsweep_config`` (:func:`check_run_config`);
    else :class:`CheckpointStructureError`, one line naming ``source`` and what is wrong."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointStructureError(
            f"Checkpoint {source} holds a {type(checkpoint).__name__}, not a checkpoint dict; "
            f"pass a checkpoint written by train.py (<run dir>/checkpoints/last.ckpt).")
    if "state_dict" not in checkpoint:
        tensors = [key for key, value in checkpoint.items() if isinstance(value, torch.Tensor)]
        if checkpoint and len(tensors) == len(checkpoint):
            raise CheckpointStructureError(
                f"Checkpoint {source} is a plain state dict ({len(tensors)} tensors such as "
                f"{tensors[0]!r}), not a train.py checkpoint: it has no state_dict and no run "
                f"config to rebuild the model from; load it into a built model with "
                f"load_state_dict, or pass <run dir>/checkpoints/last.ckpt.")
        raise CheckpointStructureError(
            f"Checkpoint {source} has no state_dict ({_what_it_holds(checkpoint)}); it is not a "
            f"diffsweep/Lightning checkpoint.")
    if not isinstance(checkpoint["state_dict"], Mapping):
        raise CheckpointStructureError(
            f"Checkpoint {source}: state_dict is a {type(checkpoint['state_dict']).__name__}, not "
            f"a mapping of parameter names to tensors.")
    config = checkpoint.get("diffsweep_config")
    if config is None and need_config:
        raise CheckpointStructureError(f"Checkpoint {source} has no diffsweep_config; it was not "
                                       f"written by diffsweep's train.py.")
    if config is not None:
        check_run_config(config, str(source))
    return dict(checkpoint)


def check_resumable(checkpoint: Any, source: str | Path) -> dict[str, Any]:
    """:func:`check_checkpoint` plus :data:`RESUME_KEYS`: what ``trainer.fit(ckpt_path=...)``
    reads before restoring the weights."""
    checkpoint = check_checkpoint(checkpoint, source)
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointStructureError(
            f"Checkpoint {source} cannot be resumed: it has no {', '.join(missing)} (a weights "
            f"file, not a Lightning training checkpoint of train.py); start a new run without "
            f"ckpt_path, or pass <run dir>/checkpoints/last.ckpt.")
    return checkpoint


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU, with a clear error for a missing, unreadable or
    malformed file (:func:`check_checkpoint`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; pass ckpt_path=<run dir>/"
                                f"checkpoints/last.ckpt of a train.py run.")
    return check_checkpoint(load_weights_only(path), path)


def load_weights_only(path: str | Path,
                      map_location: str | torch.device | Callable[..., Any] = "cpu"
                      ) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: a file whose unpickling would run code (a pickled
    ``nn.Module``, any class outside torch's safe list) is refused with a ValueError naming it,
    and so is an empty or otherwise unreadable file."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise CheckpointStructureError(f"Checkpoint {path} is empty (0 bytes): a write that never "
                                       f"finished or a failed copy; use another checkpoint.")
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
        first_line = (str(error).splitlines() or [""])[0]
        reason = ("it holds Python objects other than tensors and plain containers (a pickled "
                  "nn.Module or class), and loading it would execute code; diffsweep only reads "
                  "weights-only checkpoints (save state dicts, not modules)"
                  if unsafe else f"{type(error).__name__}{': ' if first_line else ''}"
                  f"{first_line}; it may be truncated or not a diffsweep/Lightning checkpoint")
        raise ValueError(f"Checkpoint {path} could not be read: {reason}.") from error


def strip_compile_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``torch.compile``'s ``_orig_mod.`` from parameter names."""
    return {key.replace(COMPILE_PREFIX, ""): value for key, value in state_dict.items()}


def load_module(path: str | Path, weights: str = "ema",
                map_location: str | torch.device = "cpu",
                trusted_targets: Iterable[str] = ()) -> DiffusionModule:
    """Rebuild the DiffusionModule of a checkpoint and load ``weights`` (``ema`` or ``raw``);
    ``trusted_targets``: the command's own trusted ``_target_`` names (:mod:`diffsweep.targets`)."""
    return module_from_checkpoint(read_checkpoint(path), weights, source=str(path),
                                  trusted_targets=trusted_targets).to(map_location).eval()


def module_from_checkpoint(checkpoint: dict[str, Any], weights: str = "ema",
                           source: str = "(loaded in memory)",
                           trusted_targets: Iterable[str] = ()) -> DiffusionModule:
    """The DiffusionModule of an already loaded checkpoint dict, with ``weights`` loaded.

    The checkpoint's structure (:func:`check_checkpoint`) and every ``_target_`` of its stored
    ``module`` and ``data`` are checked before anything is built: only model and data targets,
    the registered ones and ``trusted_targets`` (the current command's), no interpolations
    (:class:`~diffsweep.targets.UntrustedConfigError`, one line naming the key path).
    """
    from omegaconf import DictConfig, OmegaConf

    from diffsweep.assembly import build_module, check_stored_module
    from diffsweep.targets import TargetPolicy, check_targets

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights={weights!r} is not allowed; choose ema or raw.")
    checkpoint = check_checkpoint(checkpoint, source, need_config=True)
    cfg = checkpoint["diffsweep_config"]
    if isinstance(cfg, DictConfig):  # built in memory: still a stored config, never resolved
        cfg = OmegaConf.to_container(cfg, resolve=False)
    policy = TargetPolicy(source=f"Checkpoint {source}", stored=True,
                          trusted=frozenset(trusted_targets))
    check_stored_module(cfg, policy)
    check_targets(cfg["data"], policy, key="data")  # evaluate builds it too: refuse it now
    state_key = "state_dict"
    if weights == "raw" and "current_model_state" in checkpoint:
        state_key = "current_model_state"
    module = build_module(cfg, source=policy.source, trusted_targets=trusted_targets)
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
        """Lightning's resume read: weights-only, and refused in one line
        (:func:`check_resumable`) unless it holds what ``trainer.fit`` restores."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return check_resumable(load_weights_only(path, map_location=map_location), path)


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
