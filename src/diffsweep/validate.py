"""Checks of a composed run config before any expensive work.

``train.py`` and ``evaluate.py`` call :func:`validate_train_config` / :func:`validate_eval_config`
first thing: before data loading, model building, VAE encoding or sampling. They check what no
single object can see:

- cross-key consistency (``model.resolution`` vs ``data.resolution``, ``min_decay`` vs
  ``max_decay``, ``max_steps`` vs ``max_epochs``);
- values that arrive as the wrong type from the command line (``seed=abc`` is a string) or that an
  object would only use late (``grid_samples``, ``callbacks.sample_grid.num_samples``);
- the environment: a GPU for ``trainer.accelerator=gpu``, enough GPUs for ``trainer.devices``,
  writable output files and free disk space where checkpoints go.

Objects keep checking their own arguments where they are built (samplers, schedules, the FID
evaluator); the EMA's argument check (:func:`diffsweep.callbacks.ema.check_ema_arguments`) is
called here too, so a bad ``callbacks.ema.*`` fails before the data is built.

Every problem is one line naming the key, the value and what is allowed; all problems of a config
are raised together in one :class:`ConfigError`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

#: Seeds go to Lightning's ``seed_everything`` and numpy, which take [0, 2**32 - 1].
MAX_SEED = 2**32 - 1
#: Less free space than this where checkpoints go is an error (a checkpoint of unet_tiny with EMA
#: and Adam state is ~18 MB, unet_ddpm_cifar10's ~570 MB).
MIN_FREE_BYTES = 100 * 2**20
#: Less free space than this is a warning.
LOW_FREE_BYTES = 2**30
_GPU_ACCELERATORS = ("gpu", "cuda")


class ConfigError(ValueError):
    """A config value that cannot work; the message has one line per problem, each naming the key,
    the value and what is allowed."""


# ------------------------------------------------------------------------------------ entry points

def validate_train_config(cfg: DictConfig, *, cuda_device_count: int | None = None) -> None:
    """Raise :class:`ConfigError` listing every problem of a composed ``train`` config.

    Args:
        cfg: the composed config (``configs/train.yaml``), interpolations unresolved.
        cuda_device_count: GPUs available (None: ``torch.cuda.device_count()``).
    """
    _raise_problems(train_config_problems(cfg, cuda_device_count=cuda_device_count))
    _warn_low_disk(_checkpoint_dir(cfg))


def validate_eval_config(cfg: DictConfig, *, cuda_device_count: int | None = None) -> None:
    """Raise :class:`ConfigError` listing every problem of a composed ``evaluate`` config.

    Args:
        cfg: the composed config (``configs/evaluate.yaml``).
        cuda_device_count: GPUs available (None: ``torch.cuda.device_count()``).
    """
    _raise_problems(eval_config_problems(cfg, cuda_device_count=cuda_device_count))


def train_config_problems(cfg: DictConfig, *, cuda_device_count: int | None = None) -> list[str]:
    """The problems :func:`validate_train_config` raises, one line each (empty: valid)."""
    _register_resolvers()
    gpus = _CudaCount(cuda_device_count)
    problems = [
        check_seed("seed", _select(cfg, "seed"), allow_null=True, null_means="a random seed"),
        *nested_seed_problems(cfg),
        check_choice("resume", _select(cfg, "resume", "auto"), ("auto", "never")),
        check_existing_file("ckpt_path", _select(cfg, "ckpt_path")),
        *training_length_problems(cfg.get("trainer")),
        *accelerator_problems(cfg.get("trainer"), gpus),
        *model_data_problems(cfg),
        *ema_problems(cfg),
        check_count("callbacks.sample_grid.num_samples",
                    _select(cfg, "callbacks.sample_grid.num_samples", 1)),
    ]
    checkpoint_dir = _checkpoint_dir(cfg)
    if checkpoint_dir is not None:
        key = "callbacks.model_checkpoint.dirpath"
        problems += [check_writable_dir(key, checkpoint_dir), check_free_space(key, checkpoint_dir)]
    return [problem for problem in problems if problem]


def eval_config_problems(cfg: DictConfig, *, cuda_device_count: int | None = None) -> list[str]:
    """The problems :func:`validate_eval_config` raises, one line each (empty: valid)."""
    _register_resolvers()
    gpus = _CudaCount(cuda_device_count)
    problems = [
        check_seed("seed", _select(cfg, "seed"), allow_null=False),
        *nested_seed_problems(cfg),
        check_count("grid_samples", _select(cfg, "grid_samples")),
        check_count("batch_size", _select(cfg, "batch_size"), allow_null=True),
        check_torch_device("device", _select(cfg, "device", "auto"), gpus),
        check_writable_file("results_file", _select(cfg, "results_file")),
    ]
    return [problem for problem in problems if problem]


def _register_resolvers() -> None:
    """The configs use diffsweep's resolvers (``${diffsweep.div:...}``); imported here, not at the
    top, so that importing this module stays light."""
    from diffsweep.hydra_utils import register_resolvers

    register_resolvers()


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError("\n".join(problems))


# ------------------------------------------------------------------------------------ value checks

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_seed(key: str, value: Any, allow_null: bool = False,
               null_means: str = "") -> str | None:
    """A seed must be an integer in [0, 2**32 - 1] (``seed=abc`` arrives as the string 'abc');
    None too with ``allow_null`` (``null_means`` says what it does)."""
    if value is None and allow_null:
        return None
    if not _is_int(value) or not 0 <= value <= MAX_SEED:
        null = f" or null{f' ({null_means})' if null_means else ''}" if allow_null else ""
        return (f"{key}={_show(value)} is not allowed: a seed is an integer in [0, {MAX_SEED}]"
                f"{null}.")
    return None


def nested_seed_problems(cfg: DictConfig) -> list[str]:
    """Every ``*.seed`` / ``*_seed`` below the top level (``data.seed``, ``callbacks.sample_grid.seed``,
    ``data.source.split_seed``, ...): null or an integer in [0, 2**32 - 1]. Interpolations
    (``module.seed: ${seed}``) are skipped: their source is checked."""
    problems = []
    for key, value in _seed_entries(cfg, prefix=""):
        if "." in key:
            problems.append(check_seed(key, value, allow_null=True))
    return [problem for problem in problems if problem]


def _seed_entries(node: DictConfig | ListConfig, prefix: str) -> Iterator[tuple[str, Any]]:
    keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    for key in keys:
        dotted = f"{prefix}{key}"
        if (dotted == "hydra" or OmegaConf.is_interpolation(node, key)
                or OmegaConf.is_missing(node, key)):
            continue
        child = node[key]
        if isinstance(child, (DictConfig, ListConfig)):
            yield from _seed_entries(child, dotted + ".")
        elif isinstance(key, str) and (key == "seed" or key.endswith("_seed")):
            yield dotted, child


def check_count(key: str, value: Any, allow_null: bool = False) -> str | None:
    """A count (samples, batch size) must be an integer >= 1."""
    if value is None and allow_null:
        return None
    if not _is_int(value) or value < 1:
        null = " or null" if allow_null else ""
        return f"{key}={_show(value)} is not allowed: it must be an integer >= 1{null}."
    return None


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> str | None:
    if value not in choices:
        return f"{key}={_show(value)} is not allowed: choose {' or '.join(choices)}."
    return None


def check_existing_file(key: str, value: Any) -> str | None:
    """``value`` (a path) must name an existing file; None passes."""
    if value is None:
        return None
    if not Path(str(value)).expanduser().is_file():
        return f"{key}={value} is not allowed: no such file (pass an existing checkpoint or null)."
    return None


# ------------------------------------------------------------------------------------ the trainer

def training_length_problems(trainer: DictConfig | None) -> list[str]:
    """``trainer.max_steps``: an integer >= 1, or -1 (no step limit: Lightning then stops at
    ``max_epochs``, so ``max_epochs`` or ``max_time`` must be set); ``max_epochs``: null, -1
    (no limit) or an integer >= 1. 0 of either trains nothing."""
    if trainer is None or trainer.get("fast_dev_run"):
        return []
    problems = []
    max_steps = trainer.get("max_steps", -1)
    max_epochs = trainer.get("max_epochs")
    if not _is_int(max_steps) or max_steps == 0 or max_steps < -1:
        problems.append(f"trainer.max_steps={_show(max_steps)} is not allowed: the number of "
                        f"optimizer steps is an integer >= 1, or -1 for no step limit "
                        f"(then trainer.max_epochs decides).")
    if max_epochs is not None and (not _is_int(max_epochs) or max_epochs == 0 or max_epochs < -1):
        problems.append(f"trainer.max_epochs={_show(max_epochs)} is not allowed: an integer >= 1, "
                        f"-1 for no epoch limit, or null.")
    if max_steps == -1 and max_epochs == -1 and trainer.get("max_time") is None:
        problems.append("trainer.max_steps=-1 is not allowed with trainer.max_epochs=-1: the run "
                        "would never stop; set trainer.max_steps to an integer >= 1 (or "
                        "trainer.max_epochs / trainer.max_time).")
    return problems


class _CudaCount:
    """``torch.cuda.device_count()``, asked once and only when a check needs it."""

    def __init__(self, count: int | None) -> None:
        self._count = count

    def __call__(self) -> int:
        if self._count is None:
            import torch

            self._count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return self._count


def _requested_gpus(devices: Any) -> tuple[int | None, list[int]]:
    """(number of devices, explicit indices) of a Lightning ``devices`` value; number None: all
    (-1, "-1") or "auto"."""
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return None, []
        if "," in text:
            indices = [int(part) for part in text.split(",") if part.strip()]
            return len(indices), indices
        return int(text), []
    if isinstance(devices, (list, tuple, ListConfig)):
        indices = [int(index) for index in devices]
        return len(indices), indices
    if devices == -1:
        return None, []
    return int(devices), []


def accelerator_problems(trainer: DictConfig | None, cuda_device_count: Callable[[], int]) -> list[str]:
    """``trainer.accelerator=gpu|cuda`` needs a CUDA GPU, and ``trainer.devices`` at most as many
    GPUs (or indices below that count) as this machine has."""
    if trainer is None:
        return []
    accelerator = trainer.get("accelerator", "auto")
    if not isinstance(accelerator, str) or accelerator.lower() not in _GPU_ACCELERATORS:
        return []
    available = cuda_device_count()
    if available == 0:
        return [f"trainer.accelerator={accelerator} is not allowed on this machine: "
                f"torch.cuda.is_available() is False (no CUDA GPU, or a CPU-only torch); use "
                f"trainer.accelerator=cpu or auto."]
    devices = trainer.get("devices", "auto")
    try:
        count, indices = _requested_gpus(devices)
    except (TypeError, ValueError):
        return [f"trainer.devices={_show(devices)} is not allowed: a number of GPUs (1.."
                f"{available}), a list of GPU indices, -1 or auto."]
    if count is not None and not 1 <= count <= available:
        return [f"trainer.devices={_show(devices)} is not allowed: this machine has {available} "
                f"GPU(s); use 1..{available}, -1 or auto."]
    bad = [index for index in indices if not 0 <= index < available]
    if bad:
        return [f"trainer.devices={_show(devices)} is not allowed: GPU index {bad[0]} does not "
                f"exist; indices go from 0 to {available - 1} on this machine."]
    return []


def check_torch_device(key: str, value: Any, cuda_device_count: Callable[[], int]) -> str | None:
    """``auto``, ``cpu`` or a torch device string; ``cuda[:i]`` needs that GPU."""
    if value == "auto":
        return None
    import torch

    try:
        device = torch.device(str(value))
    except (RuntimeError, TypeError, ValueError):
        return f"{key}={_show(value)} is not allowed: use auto, cpu, cuda or cuda:<index>."
    if device.type != "cuda":
        return None
    available = cuda_device_count()
    if available == 0:
        return (f"{key}={value} is not allowed on this machine: torch.cuda.is_available() is "
                f"False; use {key}=cpu or auto.")
    if device.index is not None and device.index >= available:
        return (f"{key}={value} is not allowed: this machine has {available} GPU(s), indices 0.."
                f"{available - 1}.")
    return None


# ------------------------------------------------------------------------------------ model vs data

def model_data_problems(cfg: DictConfig) -> list[str]:
    """The net's ``in_channels`` / ``out_channels`` / ``resolution`` and ``module.image_shape``
    must equal what the data serves (``data.channels``, ``data.resolution``)."""
    model, data = cfg.get("model"), cfg.get("data")
    if not isinstance(data, DictConfig):
        return []
    channels, resolution = data.get("channels"), data.get("resolution")
    problems = []
    if isinstance(model, DictConfig):
        pairs = (("model.in_channels", model.get("in_channels"), "data.channels", channels),
                 ("model.out_channels", model.get("out_channels"), "data.channels", channels),
                 ("model.resolution", model.get("resolution"), "data.resolution", resolution))
        for key, value, data_key, served in pairs:
            if value is not None and served is not None and value != served:
                problems.append(f"{key}={value} is not allowed with {data_key}={served}: the net "
                                f"must see what the data serves; set {key}={served} or leave it at "
                                f"its default ${{{data_key}}}.")
    image_shape = _select(cfg, "module.image_shape")
    if image_shape is not None and channels is not None and resolution is not None:
        shape = [int(size) for size in image_shape]
        served_shape = [int(channels), int(resolution), int(resolution)]
        if shape != served_shape:
            problems.append(f"module.image_shape={shape} is not allowed: data.channels and "
                            f"data.resolution give {served_shape} (C, H, W); leave it at its "
                            f"default [${{data.channels}}, ${{data.resolution}}, "
                            f"${{data.resolution}}].")
    return problems


# ------------------------------------------------------------------------------------ callbacks

_EMA_TARGET = "diffsweep.callbacks.ema.EMA"


def ema_problems(cfg: DictConfig) -> list[str]:
    """``callbacks.ema.*`` through the EMA's own argument check (a decay in [0, 1), ...)."""
    ema = _select(cfg, "callbacks.ema")
    if not isinstance(ema, DictConfig) or ema.get("_target_") != _EMA_TARGET:
        return []
    import inspect

    from diffsweep.callbacks.ema import check_ema_arguments

    accepted = inspect.signature(check_ema_arguments).parameters
    arguments = {key: ema[key] for key in ema if key in accepted and key != "key"}
    try:
        check_ema_arguments(**arguments, key="callbacks.ema")
    except ValueError as error:
        return [str(error)]
    return []


# ------------------------------------------------------------------------------------ files, disk

def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _can_create_in(folder: Path) -> bool:
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".diffsweep-write-check-", dir=folder)
    except OSError:
        return False
    os.close(descriptor)
    os.unlink(probe)
    return True


def check_writable_dir(key: str, value: Any) -> str | None:
    """``value`` is a folder that exists and accepts new files, or can be created."""
    if value is None:
        return None
    folder = Path(str(value)).expanduser()
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        return f"{key}={value} is not allowed: {existing} is a file, not a folder."
    if not _can_create_in(existing):
        return (f"{key}={value} is not allowed: {existing} is not writable; pass a writable "
                f"folder.")
    return None


def check_writable_file(key: str, value: Any) -> str | None:
    """``value`` can be (re)written: its folder exists or can be created and accepts new files,
    and the file, if it exists, is writable."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if path.is_dir():
        return f"{key}={value} is not allowed: it is a folder; pass a file path."
    if path.exists() and not os.access(path, os.W_OK):
        return (f"{key}={value} is not allowed: the file is read-only; make it writable "
                f"(chmod u+w) or pass {key}=<another path>.")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        return f"{key}={value} is not allowed: {existing} is a file, not a folder."
    if not _can_create_in(existing):
        return (f"{key}={value} is not allowed: its folder {existing} is not writable; pass "
                f"{key}=<a path in a writable folder>.")
    return None


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    return shutil.disk_usage(_nearest_existing(path)).free


def check_free_space(key: str, value: Any, minimum: int = MIN_FREE_BYTES) -> str | None:
    """At least ``minimum`` bytes free where ``value`` (a folder) is or will be."""
    if value is None:
        return None
    free = free_bytes(Path(str(value)).expanduser())
    if free < minimum:
        return (f"{key}={value} is not allowed: its file system has {_mib(free)} free, checkpoints "
                f"need at least {_mib(minimum)} ({_mib(LOW_FREE_BYTES)} recommended); free space "
                f"or point {key} at another disk.")
    return None


def _warn_low_disk(folder: Path | None) -> None:
    if folder is None:
        return
    free = free_bytes(folder)
    if free < LOW_FREE_BYTES:
        log.warning("Only %s free where checkpoints go (%s); a checkpoint write that runs out of "
                    "space stops the run (the previous checkpoint is kept).", _mib(free), folder)


def _checkpoint_dir(cfg: DictConfig) -> Path | None:
    checkpoint = _select(cfg, "callbacks.model_checkpoint")
    if not isinstance(checkpoint, DictConfig):
        return None
    dirpath = checkpoint.get("dirpath")
    if dirpath is None:
        output_dir = _select(cfg, "paths.output_dir")
        return Path(str(output_dir)) / "checkpoints" if output_dir else None
    return Path(str(dirpath)).expanduser()


def _select(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


__all__ = ["ConfigError", "LOW_FREE_BYTES", "MAX_SEED", "MIN_FREE_BYTES", "accelerator_problems",
           "check_count", "check_free_space", "check_seed", "check_torch_device",
           "check_writable_dir", "check_writable_file", "ema_problems", "eval_config_problems",
           "free_bytes", "model_data_problems", "nested_seed_problems", "train_config_problems",
           "training_length_problems", "validate_eval_config", "validate_train_config"]
