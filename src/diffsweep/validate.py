"""Checks of a composed run config before any expensive work.

``train.py`` and ``evaluate.py`` call :func:`validate_train_config` / :func:`validate_eval_config`
first thing: before data loading, model building, VAE encoding or sampling. They check what no
single object can see:

- cross-key consistency (``model.resolution`` vs ``data.resolution``, ``min_decay`` vs
  ``max_decay``, ``max_steps`` vs ``max_epochs``);
- values that arrive as the wrong type from the command line (``seed=abc`` is a string) or that an
  object would only use late (``grid_samples``, ``callbacks.sample_grid.num_samples``);
- the environment: a GPU for ``trainer.accelerator=gpu``, enough GPUs for ``trainer.devices``,
  writable output files and free disk space where checkpoints go, a readable image folder that
  holds at least one training batch (``data=image_folder``);
- types and ranges of every value a run reads late or silently misreads: booleans are true or
  false (``compile=no`` is the string 'no', which ``bool()`` reads as true), counts and batch
  sizes are integers (``data.batch_size=1.5`` would become 1), rates and scales are finite
  numbers in their range (``guidance_scale=nan``, ``trainer.gradient_clip_val=-1``,
  ``module.optimizer.lr=0``, a beta outside (0, 1), ``sampler.eta=5``);
- whether the run can produce ``optimized_metric`` (``val/loss`` needs a validation within
  ``trainer.max_steps``; ``fid/<pair>`` a configured FID pair).

Objects keep checking their own arguments where they are built (samplers, schedules, the FID
evaluator); the cheap ones are also built here (the schedule, the samplers and their sigma
grids), and the EMA's argument check (:func:`diffsweep.callbacks.ema.check_ema_arguments`) is
called here too, so a bad ``callbacks.ema.*`` fails before the data is built.

Every problem is one line naming the key, the value and what is allowed; all problems of a config
are raised together in one :class:`ConfigError`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from numbers import Integral, Real
from pathlib import Path
from typing import Any

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
#: ``module.optimizer.lr`` outside this open range is refused unless the run config sets
#: ``allow_unusual_lr=true`` (an lr <= 0, NaN or inf is always refused).
LR_RANGE = (0.0, 1.0)
#: Samplers whose ``eta`` interpolates DDIM (0) and DDPM/ancestral (1): above 1 the added noise
#: is capped at the whole next noise level (``sigma_down = 0``), a degenerate step.
ANCESTRAL_ETA_METHODS = ("ddim", "ddpm", "euler_ancestral")
#: Config keys that hold a boolean wherever they appear, with the other values they may take.
#: ``bool('no')`` is True: a string here would silently switch the option on.
BOOLEAN_KEYS: dict[str, tuple[Any, ...]] = {
    key: () for key in (
        "compile", "sample_compile", "allow_unusual_lr", "drop_last", "shuffle", "download",
        "random_flip", "in_memory", "sample_posterior", "progress", "rescale_betas_zero_snr",
        "use_dynamic_shifting", "kid", "precision_recall", "at_train_end", "requeue",
        "use_distributed_sampler", "sync_batchnorm", "find_unused_parameters", "flip_sin_to_cos",
        "clip_sample", "thresholding", "use_clipped_model_output", "show_warnings",
        "default_hp_metric", "auto_insert_metric_name", "validation_bar", "overwrite")}
BOOLEAN_KEYS.update({"fused": (None,), "benchmark": (None,), "enable_model_summary": (None,),
                     "enable_progress_bar": (None,), "enable_checkpointing": (None,),
                     "deterministic": (None, "warn"), "save_last": (None, "link"),
                     "log_model": ("all",)})
#: Lightning's ``Trainer(accelerator=...)`` names (``gpu`` is ``cuda``).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
#: Lightning's ``Trainer(precision=...)`` values, and diffsweep's ``auto``.
TRAINER_PRECISIONS = ("auto", "64", "32", "16", "bf16", "64-true", "32-true", "16-true",
                      "bf16-true", "16-mixed", "bf16-mixed", "transformer-engine",
                      "transformer-engine-float16")
_FOLDER_SOURCE = "diffsweep.data.folder.ImageFolderSource"
_SAMPLER_TARGET = "diffsweep.samplers.Sampler"
_SCHEDULE_MODULE = "diffsweep.schedules."
_FID_CALLBACK = "diffsweep.callbacks.fid.FIDCallback"
#: ``optimized_metric`` families the FID callback logs (``<family>/<pair name>``).
FID_METRIC_FAMILIES = ("fid", "kid", "kid_std", "precision", "recall", "nfe")
_DURATION = re.compile(r"^\d+:\d+:\d+:\d+$")  # Lightning's time-based 'DD:HH:MM:SS'


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
        *trainer_value_problems(cfg.get("trainer")),
        *model_data_problems(cfg),
        *ema_problems(cfg),
        check_count("callbacks.sample_grid.num_samples",
                    _select(cfg, "callbacks.sample_grid.num_samples", 1)),
        *run_value_problems(cfg),
        *boolean_problems(cfg),
        *optimizer_problems(cfg),
        *module_problems(cfg),
        *data_problems(cfg, training=True),
        *lr_schedule_problems(cfg.get("lr_schedule")),
        *callback_value_problems(cfg.get("callbacks")),
        *metrics_problems(cfg.get("metrics")),
        *schedule_and_sampler_problems(cfg),
        *optimized_metric_problems(cfg),
    ]
    checkpoint_dir = _checkpoint_dir(cfg)
    if checkpoint_dir is not None:
        key = "callbacks.model_checkpoint.dirpath"
        problems += [check_writable_dir(key, checkpoint_dir), check_free_space(key, checkpoint_dir)]
    return _first_per_key(problems)


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
        _results_file_problem(_select(cfg, "results_file")),  # a symlink or someone else's file
        check_number("guidance_scale", _select(cfg, "guidance_scale", 1.0), minimum=0,
                     meaning="classifier-free guidance: 1 plain conditional, 0 unconditional, "
                             "> 1 stronger"),
        check_choice("weights", _select(cfg, "weights", "ema"), ("ema", "raw")),
        check_choice("precision", _select(cfg, "precision", 32), _sample_precisions(),
                     as_text=True),
        check_integer("pretrained_image_seq_len", _select(cfg, "pretrained_image_seq_len"), 1,
                      allow_null=True),
        *sigma_rel_problems(_select(cfg, "ema.sigma_rel")),
        *run_value_problems(cfg),
        *boolean_problems(cfg),
        *data_problems(cfg, training=False),
        *metrics_problems(cfg.get("metrics")),
        *sampler_problems(_plain(_select(cfg, "sampler")), "sampler"),
    ]
    return _first_per_key(problems)


def _results_file_problem(path: Any) -> str | None:
    """:func:`diffsweep.results.results_file_problem`, imported here: diffsweep.results imports
    torch (through diffsweep.files), and importing this module stays light."""
    from diffsweep.results import results_file_problem

    return results_file_problem(path)


def _register_resolvers() -> None:
    """The configs use diffsweep's resolvers (``${diffsweep.div:...}``); imported here, not at the
    top, so that importing this module stays light."""
    from diffsweep.hydra_utils import register_resolvers

    register_resolvers()


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError("\n".join(problems))


def _first_per_key(problems: list[str | None]) -> list[str]:
    """The problems in order, None dropped, one per key (two checks may see the same value: the
    boolean scan and a sampler's own checks)."""
    seen, kept = set(), []
    for problem in problems:
        if not problem:
            continue
        key = problem.split("=", 1)[0] if "=" in problem.split(" ", 1)[0] else problem
        if key not in seen:
            seen.add(key)
            kept.append(problem)
    return kept


# ------------------------------------------------------------------------------------ value checks

def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return repr(value) if isinstance(value, str) else str(value)


def _number(value: float) -> str:
    return f"{value:g}"


def check_integer(key: str, value: Any, minimum: int, allow_null: bool = False,
                  meaning: str = "") -> str | None:
    """An integer >= ``minimum`` (None too with ``allow_null``); ``meaning`` says what it
    counts. ``1.5`` and ``true`` are not integers; ``2.0`` is not either (a batch size or a count
    written as a float is most likely a typo, and Python would truncate ``1.5`` silently)."""
    if value is None and allow_null:
        return None
    if not _is_int(value) or value < minimum:
        null = " or null" if allow_null else ""
        why = f" ({meaning})" if meaning else ""
        return (f"{key}={_show(value)} is not allowed: it must be an integer >= "
                f"{minimum}{null}{why}.")
    return None


def check_number(key: str, value: Any, minimum: float | None = None,
                 maximum: float | None = None, min_open: bool = False, max_open: bool = False,
                 allow_null: bool = False, allow_inf: bool = False,
                 meaning: str = "") -> str | None:
    """A real number (not a bool, not NaN, finite unless ``allow_inf``) within the bounds given
    (``min_open``/``max_open``: the bound itself excluded); None too with ``allow_null``."""
    if value is None and allow_null:
        return None
    ok = _is_real(value) and not math.isnan(value) and (allow_inf or math.isfinite(value))
    if ok and minimum is not None:
        ok = value > minimum if min_open else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if max_open else value <= maximum
    if ok:
        return None
    if minimum is not None and maximum is not None:
        allowed = (f"a number in {'(' if min_open else '['}{_number(minimum)}, "
                   f"{_number(maximum)}{')' if max_open else ']'}")
    elif minimum is not None:
        allowed = f"a finite number {'>' if min_open else '>='} {_number(minimum)}"
    elif maximum is not None:
        allowed = f"a finite number {'<' if max_open else '<='} {_number(maximum)}"
    else:
        allowed = "a finite number"
    if allow_inf:
        allowed = allowed.replace("a finite number", "a number")
    null = " or null" if allow_null else ""
    why = f" ({meaning})" if meaning else ""
    return f"{key}={_show(value)} is not allowed: it must be {allowed}{null}{why}."


def check_bool(key: str, value: Any, also: tuple[Any, ...] = ()) -> str | None:
    """True or false (or one of ``also``); a string such as 'no' would read as true."""
    if isinstance(value, bool) or any(value is other or (isinstance(other, str) and value == other)
                                      for other in also):
        return None
    others = "".join(f", {'null' if other is None else other}" for other in also)
    return f"{key}={_show(value)} is not allowed: it must be true or false{others}."


def _plain(node: Any) -> Any:
    """A config node as plain Python (resolved); other values unchanged."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


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
    """Every ``*.seed`` / ``*_seed`` below the top level (``data.seed``,
    ``callbacks.sample_grid.seed``, ``data.source.split_seed``, ...): null or an integer in
    [0, 2**32 - 1]. Interpolations (``module.seed: ${seed}``) are skipped:
    their source is checked."""
    problems = []
    for key, value in _seed_entries(cfg, prefix=""):
        if "." in key:
            problems.append(check_seed(key, value, allow_null=True))
    return [problem for problem in problems if problem]


def _seed_entries(node: DictConfig | ListConfig, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every ``seed`` / ``*_seed`` leaf below ``node`` (:func:`_leaves`)."""
    for dotted, value in _leaves(node, prefix):
        name = dotted.rsplit(".", 1)[-1]
        if name == "seed" or name.endswith("_seed"):
            yield dotted, value


def check_count(key: str, value: Any, allow_null: bool = False) -> str | None:
    """A count (samples, batch size) must be an integer >= 1."""
    return check_integer(key, value, 1, allow_null=allow_null)


def check_choice(key: str, value: Any, choices: tuple[str, ...],
                 as_text: bool = False) -> str | None:
    """``value`` must be one of ``choices`` (``as_text``: its ``str``, for values such as a
    precision that may be written 32 or '32')."""
    text = str(value) if as_text and not isinstance(value, (bool, DictConfig, ListConfig)) \
        else value
    if not isinstance(text, str) or text not in choices:
        listed = " or ".join(choices) if len(choices) <= 2 else \
            f"{', '.join(choices[:-1])} or {choices[-1]}"
        return f"{key}={_show(value)} is not allowed: choose {listed}."
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


def accelerator_problems(trainer: DictConfig | None,
                         cuda_device_count: Callable[[], int]) -> list[str]:
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


def check_devices(key: str, value: Any) -> str | None:
    """A Lightning ``devices`` value: an integer >= 1, -1 (all), ``auto``, a list of indices or a
    comma-separated string of them."""
    if isinstance(value, bool) or (_is_real(value) and not _is_int(value)):
        count: int | None = 0  # true, 1.5: not a device count
    else:
        try:
            count, _ = _requested_gpus(value)
        except (TypeError, ValueError):
            count = 0
    if count is not None and count < 1:
        return (f"{key}={_show(value)} is not allowed: a number of devices >= 1, -1 or auto (all), "
                f"or a list of device indices.")
    return None


def check_val_check_interval(trainer: DictConfig) -> str | None:
    """``trainer.val_check_interval``: every N training batches (an integer >= 1), a fraction of
    an epoch in (0, 1] (only with ``check_val_every_n_epoch`` set: Lightning refuses a fraction
    otherwise), a 'DD:HH:MM:SS' duration, or null (once per epoch). 0 divides by zero inside
    Lightning once training has started."""
    value = trainer.get("val_check_interval")
    if value is None or isinstance(value, DictConfig):
        return None
    if isinstance(value, str) and _DURATION.match(value):
        return None
    by_epoch = trainer.get("check_val_every_n_epoch") is not None
    if _is_int(value) and value >= 1:
        return None
    if _is_real(value) and not isinstance(value, Integral) and 0 < value <= 1 and by_epoch:
        return None
    fraction = ("a fraction of an epoch in (0, 1]" if by_epoch else
                "a fraction of an epoch in (0, 1] (with trainer.check_val_every_n_epoch set)")
    return (f"trainer.val_check_interval={_show(value)} is not allowed: validate every N training "
            f"batches (an integer >= 1), {fraction}, or a duration 'DD:HH:MM:SS'.")


def check_batch_limit(key: str, value: Any, allow_zero: bool = True) -> str | None:
    """A Lightning batch limit: an integer number of batches or a fraction in [0, 1]."""
    if value is None:
        return None
    low = 0 if allow_zero else 1
    if _is_int(value) and value >= low:
        return None
    if _is_real(value) and (0 <= value <= 1 if allow_zero else 0 < value <= 1):
        return None
    zero = "" if allow_zero else " (0 would train nothing)"
    return (f"{key}={_show(value)} is not allowed: an integer number of batches >= {low} or a "
            f"fraction in {'[0' if allow_zero else '(0'}, 1]{zero}.")


def trainer_value_problems(trainer: DictConfig | None) -> list[str]:
    """Types and ranges of the Lightning Trainer's arguments that would otherwise fail after the
    data and the model are built (or never fail): gradient clipping (a negative norm ascends),
    logging and validation cadence (``val_check_interval=0`` divides by zero once training runs),
    batch limits, precision, device and node counts."""
    if not isinstance(trainer, DictConfig):
        return []
    get = trainer.get
    problems = [
        check_number("trainer.gradient_clip_val", get("gradient_clip_val"), minimum=0,
                     allow_null=True, meaning="the largest gradient norm; 0 or null: no "
                                              "clipping"),
        None if get("gradient_clip_algorithm") is None else check_choice(
            "trainer.gradient_clip_algorithm", get("gradient_clip_algorithm"), ("norm", "value")),
        check_integer("trainer.log_every_n_steps", get("log_every_n_steps", 50), 1,
                      meaning="log every N optimizer steps"),
        check_val_check_interval(trainer),
        check_integer("trainer.check_val_every_n_epoch", get("check_val_every_n_epoch", 1), 1,
                      allow_null=True, meaning="null: validate by trainer.val_check_interval "
                                               "batches"),
        check_batch_limit("trainer.limit_val_batches", get("limit_val_batches")),
        check_batch_limit("trainer.limit_train_batches", get("limit_train_batches"),
                          allow_zero=False),
        check_batch_limit("trainer.overfit_batches", get("overfit_batches")),
        check_integer("trainer.accumulate_grad_batches", get("accumulate_grad_batches", 1), 1),
        check_integer("trainer.num_sanity_val_steps", get("num_sanity_val_steps", 0), -1,
                      meaning="-1: every validation batch"),
        check_integer("trainer.num_nodes", get("num_nodes", 1), 1),
        check_devices("trainer.devices", get("devices", "auto")),
        None if isinstance(get("accelerator"), DictConfig) else check_choice(
            "trainer.accelerator", get("accelerator", "auto"), ACCELERATORS),
        check_choice("trainer.precision", get("precision", "auto"), TRAINER_PRECISIONS,
                     as_text=True),
    ]
    fast_dev_run = get("fast_dev_run", False)
    if not isinstance(fast_dev_run, bool) and (not _is_int(fast_dev_run) or fast_dev_run < 0):
        problems.append(f"trainer.fast_dev_run={_show(fast_dev_run)} is not allowed: true, false "
                        f"or a number of batches >= 0.")
    return [problem for problem in problems if problem]


def run_value_problems(cfg: DictConfig) -> list[str]:
    """Top-level keys of either entry point: ``num_threads``, ``matmul_precision``,
    ``resume_allow_changes``, ``optimized_metric`` (its type), ``console.config_tree``."""
    problems = []
    if "num_threads" in cfg:
        problems.append(check_integer("num_threads", _select(cfg, "num_threads"), 1,
                                      allow_null=True, meaning="torch CPU threads; null: all "
                                                               "cores"))
    if "matmul_precision" in cfg:
        problems.append(check_choice("matmul_precision", _select(cfg, "matmul_precision"),
                                     ("highest", "high", "medium")))
    allowed = _plain(_select(cfg, "resume_allow_changes"))
    if allowed is not None and not isinstance(allowed, str) and not (
            isinstance(allowed, list) and all(isinstance(item, str) for item in allowed)):
        problems.append(f"resume_allow_changes={_show(allowed)} is not allowed: a list of config "
                        f"keys (fnmatch patterns), e.g. "
                        f"resume_allow_changes=[module.optimizer.lr,data.batch_size].")
    metric = _select(cfg, "optimized_metric")
    if metric is not None and (not isinstance(metric, str) or not metric.strip()):
        problems.append(f"optimized_metric={_show(metric)} is not allowed: a logged metric's name "
                        f"(e.g. val/loss, fid/ddim_20) or null.")
    tree = _select(cfg, "console.config_tree")
    if tree is not None:
        problems.append(check_choice("console.config_tree", tree, ("short", "full", "none")))
    return [problem for problem in problems if problem]


def boolean_problems(cfg: DictConfig) -> list[str]:
    """Every key of :data:`BOOLEAN_KEYS`, wherever it is (``module.compile``, ``compile``,
    ``data.drop_last``, ``sampler.clip_sample``, ...): true or false (or its listed extras).
    Interpolations are skipped: their source is checked."""
    return [problem for key, value in _leaves(cfg, prefix="")
            if key.rsplit(".", 1)[-1] in BOOLEAN_KEYS
            and (problem := check_bool(key, value, BOOLEAN_KEYS[key.rsplit(".", 1)[-1]]))]


def _leaves(node: DictConfig | ListConfig, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf below ``node``, except ``hydra`` and interpolations."""
    keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    for key in keys:
        dotted = f"{prefix}{key}"
        if (dotted == "hydra" or OmegaConf.is_interpolation(node, key)
                or OmegaConf.is_missing(node, key)):
            continue
        child = node[key]
        if isinstance(child, (DictConfig, ListConfig)):
            yield from _leaves(child, dotted + ".")
        else:
            yield dotted, child


# ------------------------------------------------------------------------------------ module

def optimizer_problems(cfg: DictConfig) -> list[str]:
    """``module.optimizer``: ``lr`` a finite number > 0 and, unless ``allow_unusual_lr=true``,
    below 1 (:data:`LR_RANGE`); ``betas`` two numbers in [0, 1); ``eps`` and ``weight_decay``
    finite numbers >= 0."""
    optimizer = _select(cfg, "module.optimizer")
    if not isinstance(optimizer, DictConfig):
        return []
    problems = []
    if "lr" in optimizer:
        lr = optimizer.get("lr")
        low, high = LR_RANGE
        if check_number("module.optimizer.lr", lr, minimum=low, min_open=True):
            problems.append(f"module.optimizer.lr={_show(lr)} is not allowed: the learning rate "
                            f"is a finite number > 0 (e.g. 1e-3; 0 trains nothing, < 0 ascends "
                            f"the loss).")
        elif lr >= high and _select(cfg, "allow_unusual_lr", False) is not True:
            problems.append(f"module.optimizer.lr={_show(lr)} is not allowed: learning rates "
                            f"outside ({_number(low)}, {_number(high)}) make Adam-type training "
                            f"diverge (e.g. 1e-3); set allow_unusual_lr=true to use it anyway.")
    if "betas" in optimizer:
        betas = _plain(optimizer.get("betas"))
        if not (isinstance(betas, list) and len(betas) == 2
                and all(_is_real(beta) and 0 <= beta < 1 for beta in betas)):
            problems.append(f"module.optimizer.betas={_show(betas)} is not allowed: two numbers "
                            f"in [0, 1), e.g. [0.9,0.999].")
    for name in ("eps", "weight_decay"):
        if name in optimizer:
            problems.append(check_number(f"module.optimizer.{name}", optimizer.get(name),
                                         minimum=0))
    return [problem for problem in problems if problem]


def module_problems(cfg: DictConfig) -> list[str]:
    """``module.label_dropout`` in [0, 1) (1 would never show the net a label),
    ``module.sample_precision`` a sampling precision, ``module.denoiser.prediction_type`` a
    prediction type, and the net's numbers (:func:`model_value_problems`)."""
    problems = []
    module = cfg.get("module")
    if isinstance(module, DictConfig):
        if "label_dropout" in module:
            problems.append(check_number(
                "module.label_dropout", module.get("label_dropout"), minimum=0, maximum=1,
                max_open=True, meaning="the probability of training a class-conditional net "
                                       "without its label"))
        if "sample_precision" in module:
            problems.append(check_choice("module.sample_precision",
                                         module.get("sample_precision"), _sample_precisions(),
                                         as_text=True))
        prediction = _select(cfg, "module.denoiser.prediction_type")
        if prediction is not None:
            from diffsweep.denoiser import PREDICTION_TYPES

            problems.append(check_choice("module.denoiser.prediction_type", prediction,
                                         ("auto", *PREDICTION_TYPES)))
    return [problem for problem in problems if problem] + model_value_problems(cfg.get("model"))


def model_value_problems(model: DictConfig | None) -> list[str]:
    """The net's architecture numbers (``configs/model/``, diffsweep's UNet or diffusers'
    UNet2DModel): channel counts, blocks per level and GroupNorm groups are integers >= 1 (0
    channels builds a net that "trains" on nothing), ``dropout`` in [0, 1),
    ``attention_resolutions`` feature-map sizes, ``num_classes`` null or >= 1, and the resolution
    divisible by the total down-sampling (2 ** (levels - 1))."""
    if not isinstance(model, DictConfig) or model.get("pretrained") is not None:
        return []
    get = model.get
    counts = ("in_channels", "out_channels", "base_channels", "num_res_blocks",
              "layers_per_block", "num_groups", "norm_num_groups", "attention_head_dim")
    nullable = ("out_channels", "attention_head_dim")  # null: in_channels / one head per layer
    problems = [check_integer(f"model.{name}", get(name), 1, allow_null=name in nullable)
                for name in counts if name in model]
    if "num_classes" in model:
        problems.append(check_integer("model.num_classes", get("num_classes"), 1,
                                      allow_null=True, meaning="classes of a class-conditional "
                                                               "net; null: unconditional"))
    if "dropout" in model:
        problems.append(check_number("model.dropout", get("dropout"), minimum=0, maximum=1,
                                     max_open=True))
    levels = None
    for name in ("channel_mults", "block_out_channels", "attention_resolutions"):
        if name not in model:
            continue
        values = _plain(get(name))
        empty_ok = name == "attention_resolutions"
        if not (isinstance(values, list) and (values or empty_ok)
                and all(_is_int(value) and value >= 1 for value in values)):
            problems.append(f"model.{name}={_show(values)} is not allowed: a list of integers "
                            f">= 1{' (may be empty)' if empty_ok else ', one per level'}.")
        elif name != "attention_resolutions":
            levels = (name, len(values))
    resolution = get("resolution")
    problems = [problem for problem in problems if problem]
    if levels is not None and _is_int(resolution) and resolution >= 1 and not problems:
        factor = 2 ** (levels[1] - 1)
        if resolution % factor:
            problems.append(f"model.resolution={resolution} is not allowed with model.{levels[0]} "
                            f"of {levels[1]} levels: it must be a multiple of {factor} (the "
                            f"total down-sampling); change data.resolution or use fewer levels.")
    groups = get("norm_num_groups")
    channels = _plain(get("block_out_channels"))
    if not problems and _is_int(groups) and isinstance(channels, list):
        bad = [value for value in channels if value % groups]
        if bad:
            problems.append(f"model.norm_num_groups={groups} is not allowed with "
                            f"model.block_out_channels={channels}: it must divide every entry "
                            f"({bad} are not multiples).")
    return problems


def _sample_precisions() -> tuple[str, ...]:
    from diffsweep.inference import SAMPLE_PRECISIONS

    return tuple(SAMPLE_PRECISIONS)


def lr_schedule_problems(lr_schedule: DictConfig | None) -> list[str]:
    """``lr_schedule.warmup_steps`` >= 0, ``total_steps`` and ``ref_steps`` >= 1 (integers),
    ``min_factor`` in [0, 1]."""
    if not isinstance(lr_schedule, DictConfig):
        return []
    problems = []
    if "warmup_steps" in lr_schedule:
        problems.append(check_integer("lr_schedule.warmup_steps", lr_schedule.get("warmup_steps"),
                                      0, meaning="0: no warmup"))
    if "total_steps" in lr_schedule:
        follows = (" (it follows trainer.max_steps; with trainer.max_steps=-1 set "
                   "lr_schedule.total_steps)"
                   if OmegaConf.is_interpolation(lr_schedule, "total_steps") else "")
        problem = check_integer("lr_schedule.total_steps", lr_schedule.get("total_steps"), 1)
        problems.append(problem and problem[:-1] + follows + ".")
    if "ref_steps" in lr_schedule:
        problems.append(check_integer("lr_schedule.ref_steps", lr_schedule.get("ref_steps"), 1))
    if "min_factor" in lr_schedule:
        problems.append(check_number("lr_schedule.min_factor", lr_schedule.get("min_factor"),
                                     minimum=0, maximum=1))
    return [problem for problem in problems if problem]


def callback_value_problems(callbacks: DictConfig | None) -> list[str]:
    """Cadences of the checkpoint, preemption and progress-bar callbacks."""
    if not isinstance(callbacks, DictConfig):
        return []
    problems = []
    checkpoint = callbacks.get("model_checkpoint")
    if isinstance(checkpoint, DictConfig):
        problems += [
            check_integer("callbacks.model_checkpoint.every_n_train_steps",
                          checkpoint.get("every_n_train_steps"), 0, allow_null=True,
                          meaning="0 or null: not by steps"),
            check_integer("callbacks.model_checkpoint.save_top_k", checkpoint.get("save_top_k", 1),
                          -1, meaning="-1: keep every checkpoint")]
    preemption = callbacks.get("preemption")
    if isinstance(preemption, DictConfig) and "check_every_n_steps" in preemption:
        problems.append(check_integer("callbacks.preemption.check_every_n_steps",
                                      preemption.get("check_every_n_steps"), 1))
    progress = callbacks.get("progress_bar")
    if isinstance(progress, DictConfig) and "refresh_rate" in progress:
        problems.append(check_integer("callbacks.progress_bar.refresh_rate",
                                      progress.get("refresh_rate"), 0, meaning="0: no bar"))
    return [problem for problem in problems if problem]


def sigma_rel_problems(sigma_rel: Any) -> list[str]:
    """``ema.sigma_rel`` (evaluate): null or a relative EMA width the post-hoc EMA can make."""
    if sigma_rel is None:
        return []
    from diffsweep.posthoc_ema import check_sigma_rel

    try:
        check_sigma_rel(sigma_rel, "ema.sigma_rel")
    except ValueError as error:
        return [str(error)]
    return []


# ------------------------------------------------------------------------------------ data

def data_problems(cfg: DictConfig, training: bool) -> list[str]:
    """``data.*``: integer batch sizes >= 1 (a GLOBAL batch divisible by the processes of
    ``trainer.devices`` x ``trainer.num_nodes`` when training), ``num_workers`` >= 0,
    ``source.val_fraction`` in [0, 1); an image folder that exists, is readable and, for
    training with ``drop_last``, holds at least one batch of training images."""
    data = cfg.get("data")
    if not isinstance(data, DictConfig):
        return []
    batch_size = data.get("batch_size", 128)
    problems = [
        check_integer("data.batch_size", batch_size, 1, meaning="the GLOBAL batch size"),
        check_integer("data.val_batch_size", data.get("val_batch_size"), 1, allow_null=True,
                      meaning="null: data.batch_size"),
        check_integer("data.num_workers", data.get("num_workers", 0), 0,
                      meaning="loader processes; 0: load in the main process"),
        check_integer("data.resolution", data.get("resolution"), 1, allow_null=True,
                      meaning="image side in pixels"),
        check_integer("data.channels", data.get("channels"), 1, allow_null=True),
    ]
    for data_key, node in _data_nodes(data, "data"):
        source = node.get("source")
        if isinstance(source, DictConfig) and "val_fraction" in source:
            problems.append(check_number(f"{data_key}.source.val_fraction",
                                         source.get("val_fraction"), minimum=0, maximum=1,
                                         max_open=True, meaning="0: validate on the training "
                                                                "images"))
    if training and not problems[0]:
        problems += process_batch_problems(cfg)
    problems += image_folder_problems(cfg, training=training and not problems[0])
    return [problem for problem in problems if problem]


def _data_nodes(data: DictConfig, key: str) -> Iterator[tuple[str, DictConfig]]:
    """``data`` and the image data configs inside it (``data.source.images`` of latents)."""
    yield key, data
    source = data.get("source")
    if isinstance(source, DictConfig) and isinstance(source.get("images"), DictConfig):
        yield from _data_nodes(source.images, f"{key}.source.images")


def process_batch_problems(cfg: DictConfig) -> list[str]:
    """``data.batch_size`` / ``data.val_batch_size`` are GLOBAL batches split evenly across the
    ``trainer.devices x trainer.num_nodes`` processes (when that number is known up front)."""
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig) or trainer.get("fast_dev_run"):
        return []
    nodes = trainer.get("num_nodes", 1)
    try:
        devices, _ = _requested_gpus(trainer.get("devices", "auto"))
    except (TypeError, ValueError):
        return []
    if devices is None or not _is_int(nodes) or devices * nodes <= 1:
        return []
    processes = devices * nodes
    problems = []
    for key in ("data.batch_size", "data.val_batch_size"):
        size = _select(cfg, key)
        if _is_int(size) and size % processes:
            problems.append(f"{key}={size} is not allowed with trainer.devices="
                            f"{_show(trainer.get('devices'))} x trainer.num_nodes={nodes}: the "
                            f"GLOBAL batch is split evenly across the {processes} processes; use a "
                            f"multiple of {processes}.")
    return problems


def _training_count(count: int, val_fraction: float) -> int:
    """Images in the training split of ``count`` files (:func:`diffsweep.data.base.split_indices`:
    ``round(count * val_fraction)`` held out, at least 1 and at most ``count - 1``; 0 holds none
    out)."""
    if val_fraction == 0 or count < 2:
        return count
    return count - min(max(1, round(count * val_fraction)), count - 1)


def image_folder_problems(cfg: DictConfig, training: bool) -> list[str]:
    """An image folder source (``data=image_folder``, or its images under ``data=latents``):
    ``root`` an existing, readable folder with image files; for training with
    ``data.drop_last``, at least ``data.batch_size`` of them in the training split (counting stops
    there: a directory listing, no image is opened)."""
    data = cfg.get("data")
    problems = []
    for data_key, node in _data_nodes(data, "data"):
        source = node.get("source")
        if not isinstance(source, DictConfig) or source.get("_target_") != _FOLDER_SOURCE:
            continue
        from diffsweep.data.folder import IMAGE_EXTENSIONS, UnreadableFolderError, count_images

        root_key = (f"{data_key}.root" if "root" in node and
                    OmegaConf.is_interpolation(source, "root") else f"{data_key}.source.root")
        root = source.get("root")
        folder = Path(os.path.expanduser(str(root)))
        if not folder.is_dir():
            what = "a file" if folder.exists() else "no such folder"
            problems.append(f"{root_key}={root} is not allowed: {what}; set {root_key}="
                            f"/path/to/images (a folder searched recursively for image files).")
            continue
        extensions = tuple(_plain(source.get("extensions")) or IMAGE_EXTENSIONS)
        batch_size, val_fraction = data.get("batch_size"), source.get("val_fraction", 0.01)
        needed = 1  # files to find: one, or enough for one training batch
        drop_last = data.get("drop_last", True) is True
        if training and drop_last and _is_int(batch_size) and _is_real(val_fraction) \
                and 0 <= val_fraction < 1:
            needed = max(1, batch_size)
            while _training_count(needed, val_fraction) < batch_size:
                needed += 1
        unreadable: list[str] = []
        try:
            count = count_images(folder, extensions, stop_at=needed, unreadable=unreadable)
            if count == 0 and unreadable:
                raise UnreadableFolderError(unreadable[0])
        except UnreadableFolderError as error:
            problems.append(f"{root_key}={root} is not allowed: {error.folder} is not readable "
                            f"(permission denied); make it readable (chmod -R u+rX) or set "
                            f"{root_key} to a folder you can read.")
            continue
        if count == 0:
            problems.append(f"{root_key}={root} is not allowed: no image files "
                            f"({', '.join(extensions)}) below it (searched recursively); set "
                            f"{root_key} to a folder of images.")
        elif count < needed:
            train = _training_count(count, val_fraction)
            problems.append(f"data.batch_size={batch_size} is not allowed with {root_key}={root}: "
                            f"the folder holds {count} image(s), {train} in the training split "
                            f"({data_key}.source.val_fraction={_show(val_fraction)}), fewer than "
                            f"one batch, and data.drop_last=true drops it (no training batch); "
                            f"use data.batch_size <= {train} or data.drop_last=false.")
    return problems


# ------------------------------------------------------------------------------------ FID metrics

def metrics_problems(metrics: DictConfig | None) -> list[str]:
    """``metrics.fid``: ``every_n_val_epochs`` >= 0, each pair a sampler with its options
    (:func:`sampler_problems`), and the evaluator's counts (``num_samples`` >= 2, ...)."""
    fid = metrics.get("fid") if isinstance(metrics, DictConfig) else None
    if not isinstance(fid, DictConfig):
        return []
    problems = []
    if "every_n_val_epochs" in fid:
        problems.append(check_integer("metrics.fid.every_n_val_epochs",
                                      fid.get("every_n_val_epochs"), 0,
                                      meaning="0: only at train end"))
    for index, pair in enumerate(_plain(fid.get("pairs")) or []):
        key = f"metrics.fid.pairs[{index}]"
        if not isinstance(pair, dict) or "sampler" not in pair:
            problems.append(f"{key}={_show(pair)} is not allowed: a mapping with a sampler and "
                            f"num_steps, e.g. {{sampler: ddim, num_steps: 20}}.")
            continue
        options = {("method" if name == "sampler" else name): value
                   for name, value in pair.items() if name != "name"}
        problems += sampler_problems(options, key, method_key="sampler")
    evaluator = fid.get("evaluator")
    if isinstance(evaluator, DictConfig):
        key = "metrics.fid.evaluator"
        counts = (("num_samples", 2, "generated samples per pair; FID needs 2"),
                  ("batch_size", 1, ""), ("real_features", 0, ""), ("kid_subsets", 1, ""),
                  ("kid_subset_size", 2, ""), ("prc_neighborhood", 1, ""))
        problems += [check_integer(f"{key}.{name}", evaluator.get(name), minimum, meaning=meaning)
                     for name, minimum, meaning in counts if name in evaluator]
        problems.append(check_integer(f"{key}.real_max_count", evaluator.get("real_max_count"),
                                      2, allow_null=True, meaning="null: the whole split"))
    return [problem for problem in problems if problem]


# ------------------------------------------------------------------------------------ sampling

def _typed_option_problems(key: str, function: Callable[..., Any],
                           values: Mapping[str, Any]) -> list[str]:
    """Each of ``values`` that ``function`` takes with a bool, int or float default must be of
    that type (``eta=abc`` arrives as a string and would fail deep inside sampling)."""
    parameters = inspect.signature(function).parameters
    problems = []
    for name, value in values.items():
        default = parameters[name].default if name in parameters else None
        if isinstance(default, bool):
            problems.append(check_bool(f"{key}.{name}", value))
        elif isinstance(default, int) and not _is_int(value):
            problems.append(f"{key}.{name}={_show(value)} is not allowed: it must be an integer.")
        elif isinstance(default, float) and not _is_real(value):
            problems.append(f"{key}.{name}={_show(value)} is not allowed: it must be a number.")
    return [problem for problem in problems if problem]


def sampler_problems(values: Any, key: str, method_key: str = "method") -> list[str]:
    """A sampler's keys (``method``, ``num_steps``, ``spacing``, options) as
    :class:`diffsweep.samplers.Sampler` takes them: their types, then ``num_steps`` >= 1,
    ``eta`` in [0, 1] for DDIM/DDPM/Euler ancestral (>= 0 for dpmpp_2m_sde), ``s_noise``,
    ``s_churn``, ``s_tmin`` finite >= 0, ``s_tmax`` >= ``s_tmin``, ``rho`` > 0,
    ``steps_offset`` >= 0; then the Sampler's own checks (unknown options, orders, clipping).
    ``method_key``: what the config calls the method (``sampler`` in an FID pair)."""
    if not isinstance(values, dict):
        return []
    values = dict(values)
    target = values.pop("_target_", _SAMPLER_TARGET)
    if target != _SAMPLER_TARGET:
        return []
    from diffsweep.grids import SPACINGS
    from diffsweep.samplers import SAMPLERS, Sampler

    method = values.get("method", "ddim")
    if not isinstance(method, str) or method not in SAMPLERS:
        return [f"{key}.{method_key}={_show(method)} is not allowed: choose one of "
                f"{', '.join(sorted(SAMPLERS))}."]
    options = {name: value for name, value in values.items()
               if name not in ("method", "num_steps", "spacing", "rho", "steps_offset")}
    ranged = ("eta", "s_noise", "s_churn", "s_tmin", "s_tmax")  # checked below, with the range
    problems = _typed_option_problems(key, SAMPLERS[method].fn,
                                      {name: options[name] for name in options
                                       if name not in ranged})
    num_steps = values.get("num_steps", 50)
    if isinstance(num_steps, bool) or not _is_real(num_steps) or not float(num_steps).is_integer() \
            or num_steps < 1:
        problems.append(f"{key}.num_steps={_show(num_steps)} is not allowed: it must be an integer "
                        f">= 1 (grid intervals).")
    problems += [
        None if values.get("spacing", "auto") in SPACINGS else
        f"{key}.spacing={_show(values.get('spacing'))} is not allowed: choose one of "
        f"{', '.join(SPACINGS)}.",
        check_number(f"{key}.rho", values.get("rho", 7.0), minimum=0, min_open=True,
                     meaning="the karras grid exponent"),
        check_integer(f"{key}.steps_offset", values.get("steps_offset", 0), 0)]
    eta_max = 1 if method in ANCESTRAL_ETA_METHODS else None
    ranges = (("eta", dict(minimum=0, maximum=eta_max),
               "0: deterministic, 1: DDPM/ancestral noise"),
              ("s_noise", dict(minimum=0), "std multiplier of the added noise"),
              ("s_churn", dict(minimum=0), "0: deterministic"),
              ("s_tmin", dict(minimum=0), ""))
    for name, bounds, meaning in ranges:
        if name in options:
            problems.append(check_number(f"{key}.{name}", options[name], meaning=meaning,
                                         **bounds))
    s_tmin = options.get("s_tmin", 0.0)
    if "s_tmax" in options:
        problems.append(check_number(f"{key}.s_tmax", options["s_tmax"],
                                     minimum=s_tmin if _is_real(s_tmin) else 0, allow_inf=True,
                                     meaning=f"at least {key}.s_tmin; .inf: no upper bound"))
    problems = [problem for problem in problems if problem]
    if problems:
        return problems
    try:
        Sampler(**values)
    except (TypeError, ValueError) as error:
        return [_keyed(key, error)]
    return []


def _keyed(key: str, error: Exception) -> str:
    """An object's own one-line error, prefixed with the config node it came from unless it
    names a key below that node already."""
    message = " ".join(str(error).split())
    return message if message.startswith(f"{key}.") else f"{key}: {message}"


def _schedule(cfg: DictConfig) -> tuple[Any, list[str]]:
    """(the noise schedule of ``cfg.scheduler``, []) or (None, its problems); built here because
    it is cheap (a 1000-entry table at most) and checks its own arguments."""
    schedule = cfg.get("scheduler")
    if not isinstance(schedule, DictConfig):
        return None, []
    values = _plain(schedule)
    target = values.pop("_target_", "")
    if not isinstance(target, str) or not target.startswith(_SCHEDULE_MODULE):
        return None, []
    module_name, _, class_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not isinstance(cls, type):
        return None, [f"scheduler._target_={target} is not allowed: no such schedule class."]
    arguments = [name for name in inspect.signature(cls).parameters if name != "self"]
    unknown = sorted(set(values) - set(arguments))
    if unknown:
        return None, [f"scheduler.{unknown[0]}={_show(values[unknown[0]])} is not allowed: "
                      f"{cls.__name__} has no argument {unknown[0]} (its arguments: "
                      f"{', '.join(arguments)})."]
    typed = _typed_option_problems("scheduler", cls, values)
    try:
        schedule = cls(**values)
    except (TypeError, ValueError) as error:
        message = _keyed("scheduler", error)
        # the schedule's own line names key, value and range: better than a bare type problem
        own = message.startswith("scheduler.") and "=" in message.split(" ", 1)[0]
        return None, [message] if own or not typed else typed
    return (None, typed) if typed else (schedule, [])


def schedule_and_sampler_problems(cfg: DictConfig) -> list[str]:
    """The schedule (built: its own argument checks), the validation sampler and every FID pair
    (:func:`sampler_problems`), and each sampler's sigma grid on this schedule (a discrete
    spacing on a continuous schedule, more steps than training indices, ...)."""
    schedule, problems = _schedule(cfg)
    values = _plain(cfg.get("sampler"))
    sampler_problem = sampler_problems(values, "sampler")
    problems += sampler_problem
    if schedule is None or sampler_problem or not isinstance(values, dict):
        return problems
    from diffsweep.samplers import Sampler

    values = dict(values)
    if values.pop("_target_", _SAMPLER_TARGET) != _SAMPLER_TARGET:
        return problems
    try:
        Sampler(**values).sigmas(schedule)
    except (TypeError, ValueError) as error:
        problems.append(_keyed("sampler", error))
    return problems


# ------------------------------------------------------------------------------------ sweeps

def validations_within_run(trainer: DictConfig) -> int | None:
    """How many validation loops the run makes: a number when the config decides it, None when
    it depends on the data (epoch lengths) or on time. 0: ``optimized_metric`` from validation
    can never exist."""
    if trainer.get("fast_dev_run"):
        return 1
    limit = trainer.get("limit_val_batches", 1.0)
    overfit = trainer.get("overfit_batches", 0)
    if _is_real(overfit) and overfit > 0:
        limit = overfit
    if limit is not None and _is_real(limit) and limit == 0:
        return 0
    interval = trainer.get("val_check_interval", 1.0)
    every_epoch = trainer.get("check_val_every_n_epoch", 1)
    max_steps, max_epochs = trainer.get("max_steps", -1), trainer.get("max_epochs")
    if every_epoch is None:
        accumulate = trainer.get("accumulate_grad_batches", 1)
        if _is_int(interval) and interval >= 1 and _is_int(max_steps) and max_steps >= 1 \
                and _is_int(accumulate) and accumulate >= 1:
            return max_steps * accumulate // interval
        return None
    if _is_int(every_epoch) and every_epoch >= 1 and _is_int(max_epochs) \
            and 0 <= max_epochs < every_epoch:
        return 0
    return None


def _no_validation_reason(trainer: DictConfig) -> str:
    limit = trainer.get("limit_val_batches", 1.0)
    if _is_real(limit) and limit == 0 and not trainer.get("overfit_batches"):
        return "trainer.limit_val_batches=0 turns validation off"
    if trainer.get("check_val_every_n_epoch") is None:
        return (f"trainer.val_check_interval={_show(trainer.get('val_check_interval'))} batches is "
                f"more than the run's trainer.max_steps={trainer.get('max_steps')}")
    return (f"trainer.max_epochs={trainer.get('max_epochs')} ends the run before the first "
            f"validation (trainer.check_val_every_n_epoch="
            f"{trainer.get('check_val_every_n_epoch')})")


def optimized_metric_problems(cfg: DictConfig) -> list[str]:
    """``optimized_metric`` (what train.py returns to a Hydra sweeper) must be a metric the run
    logs: ``val/*`` needs a validation within the run; ``fid/<pair>`` (and ``kid``,
    ``precision``, ``recall``, ``nfe``) a ``metrics.fid`` pair of that name computed at train
    end or at a validation. Otherwise the sweeper fails only after training ('Return value must
    be float-castable. Got None')."""
    metric = _select(cfg, "optimized_metric")
    trainer = cfg.get("trainer")
    if not isinstance(metric, str) or not isinstance(trainer, DictConfig):
        return []
    family, _, name = metric.partition("/")
    validations = validations_within_run(trainer)
    if family == "val" and validations == 0:
        return [f"optimized_metric={metric} is not allowed with this trainer config: "
                f"{_no_validation_reason(trainer)}, so no validation runs and {metric} is never "
                f"logged; let a validation run (e.g. trainer.val_check_interval <= "
                f"trainer.max_steps) or set optimized_metric=train/loss."]
    if family not in FID_METRIC_FAMILIES:
        return []
    fid = _select(cfg, "metrics.fid")
    if not isinstance(fid, DictConfig) or fid.get("_target_") != _FID_CALLBACK:
        return [f"optimized_metric={metric} is not allowed without FID: set metrics=fid, "
                f"fid_classifier or fid_tiny (or optimized_metric=val/loss)."]
    pairs = [pair for pair in (_plain(fid.get("pairs")) or []) if isinstance(pair, dict)]
    names = [str(pair.get("name") or f"{pair.get('sampler')}_{pair.get('num_steps')}")
             for pair in pairs]
    if name not in names:
        return [f"optimized_metric={metric} is not allowed: metrics.fid.pairs logs "
                f"{', '.join(f'{family}/{known}' for known in names) or 'nothing'}; choose one "
                f"of those or add the pair."]
    every = fid.get("every_n_val_epochs", 1)
    if fid.get("at_train_end", True) is not True and validations is not None and (
            not _is_int(every) or every == 0 or validations < every):
        return [f"optimized_metric={metric} is not allowed: metrics.fid.at_train_end=false and "
                f"no validation of the run computes FID ({validations} validation(s), "
                f"metrics.fid.every_n_val_epochs={_show(every)}); set "
                f"metrics.fid.at_train_end=true."]
    return []


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


__all__ = ["ACCELERATORS", "ANCESTRAL_ETA_METHODS", "BOOLEAN_KEYS", "ConfigError",
           "FID_METRIC_FAMILIES", "LOW_FREE_BYTES", "LR_RANGE", "MAX_SEED", "MIN_FREE_BYTES",
           "TRAINER_PRECISIONS",
           "accelerator_problems", "boolean_problems", "callback_value_problems", "check_bool",
           "check_batch_limit", "check_choice", "check_count", "check_devices",
           "check_free_space", "check_integer", "check_number", "check_seed",
           "check_torch_device", "check_val_check_interval", "check_writable_dir",
           "check_writable_file", "data_problems", "ema_problems", "eval_config_problems",
           "free_bytes", "image_folder_problems", "lr_schedule_problems", "metrics_problems",
           "model_data_problems", "model_value_problems", "module_problems",
           "nested_seed_problems",
           "optimized_metric_problems", "optimizer_problems", "process_batch_problems",
           "run_value_problems", "sampler_problems", "schedule_and_sampler_problems",
           "sigma_rel_problems", "train_config_problems", "trainer_value_problems",
           "training_length_problems", "validate_eval_config", "validate_train_config",
           "validations_within_run"]
