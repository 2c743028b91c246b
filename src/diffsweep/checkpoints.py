"""Loading trained models from Lightning checkpoints written by ``train.py``.

A checkpoint holds the EMA weights as ``state_dict`` and the raw weights as
``current_model_state`` (Lightning's WeightAveraging format), plus ``diffsweep_config``: the composed
run config, so a model is rebuilt without the original command line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from diffsweep.hydra_utils import run_config_dict
from diffsweep.module import DiffusionModule

log = logging.getLogger(__name__)

COMPILE_PREFIX = "_orig_mod."
#: Config groups that define the weights' meaning: a checkpoint must agree with them to load.
ARCHITECTURE_KEYS = ("model", "scheduler", "module.prediction_type")


class CheckpointMismatchError(ValueError):
    """A checkpoint was trained with a different model/schedule than the config asks for."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU, with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; pass ckpt_path=<run dir>/"
                                f"checkpoints/last.ckpt of a train.py run.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"Checkpoint {path} could not be read ({error}); it may be truncated "
                         f"or not a diffsweep/Lightning checkpoint.") from error


def strip_compile_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``torch.compile``'s ``_orig_mod.`` from parameter names."""
    return {key.replace(COMPILE_PREFIX, ""): value for key, value in state_dict.items()}


def _select(cfg: dict[str, Any], dotted: str) -> Any:
    return OmegaConf.select(OmegaConf.create(cfg), dotted)


def check_compatible(checkpoint_cfg: dict[str, Any], cfg: DictConfig | dict[str, Any],
                     keys: tuple[str, ...] = ARCHITECTURE_KEYS) -> None:
    """Raise CheckpointMismatchError naming every differing architecture key."""
    requested = run_config_dict(cfg) if isinstance(cfg, DictConfig) else cfg
    differences = []
    for key in keys:
        old, new = _select(checkpoint_cfg, key), _select(requested, key)
        if old is not None and new is not None and old != new:
            differences.append(f"  {key}: checkpoint {old} vs config {new}")
    if differences:
        raise CheckpointMismatchError(
            "The checkpoint was trained with a different configuration:\n"
            + "\n".join(differences)
            + "\nUse the same model/scheduler overrides as the training run, or start a new run "
              "without ckpt_path.")


def load_module(path: str | Path, weights: str = "ema",
                map_location: str | torch.device = "cpu") -> DiffusionModule:
    """Rebuild the DiffusionModule of a checkpoint and load ``weights`` (``ema`` or ``raw``)."""
    return module_from_checkpoint(read_checkpoint(path), weights, source=str(path)).to(
        map_location).eval()


def module_from_checkpoint(checkpoint: dict[str, Any], weights: str = "ema",
                           source: str = "the checkpoint") -> DiffusionModule:
    """The DiffusionModule of an already loaded checkpoint dict, with ``weights`` loaded."""
    cfg = checkpoint.get("diffsweep_config")
    if cfg is None:
        raise ValueError(f"{source} has no diffsweep_config; it was not written by "
                         f"diffsweep's train.py.")
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}.")
    state_key = "state_dict"
    if weights == "raw" and "current_model_state" in checkpoint:
        state_key = "current_model_state"
    module = build_module_from_config(cfg)
    module.load_state_dict(strip_compile_prefix(checkpoint[state_key]))
    return module.eval()


def build_module_from_config(cfg: dict[str, Any]) -> DiffusionModule:
    """A freshly initialised DiffusionModule for a stored (resolved) run config."""
    conf = OmegaConf.create(cfg)
    net = instantiate(conf.model)
    schedule = instantiate(conf.scheduler)
    sampler = instantiate(conf.sampler)
    shape = tuple(cfg.get("image_shape") or (conf.data.channels, conf.data.resolution,
                                             conf.data.resolution))
    module_factory = instantiate(conf.module, _partial_=True)
    return module_factory(net=net, schedule=schedule, sampler=sampler, image_shape=shape,
                          config=cfg)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temp file beside the target, fsync, then ``os.replace``.

    A process killed at any point leaves the previous checkpoint intact (Lightning's own save goes
    through fsspec's local transaction: a temp file in /tmp that is *copied* into place when /tmp
    is another file system, and never fsynced).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def find_resume_checkpoint(directory: str | Path) -> Path | None:
    """The newest readable checkpoint in ``directory`` (``last.ckpt`` first), or None.

    An unreadable file (say, truncated by a full disk) is skipped with a warning, never deleted.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = sorted(directory.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt",
                                                                 -p.stat().st_mtime))
    for candidate in candidates:
        try:
            checkpoint = torch.load(candidate, map_location="cpu", weights_only=False, mmap=True)
        except Exception as error:  # noqa: BLE001 - any failure means: not resumable
            log.warning("Skipping unreadable checkpoint %s (%s).", candidate, error)
            continue
        if "loops" in checkpoint:  # a full training checkpoint, not a weights-only export
            return candidate
    return None
