"""Run assembly: configs -> the objects of a run, each by
:func:`diffsweep.targets.safe_instantiate` (``hydra.utils.instantiate`` after a check of every
``_target_``).

A run is ``cfg.data`` (the DataModule), ``cfg.module`` (the DiffusionModule: its ``denoiser.net``,
``denoiser.schedule``, ``loss``, ``lr_schedule`` and ``sampler`` are interpolations of the
``model``, ``scheduler``, ``loss``, ``lr_schedule`` and ``sampler`` groups, so one instantiate
builds it), ``cfg.callbacks`` + ``cfg.metrics`` (callbacks), ``cfg.logger`` (loggers) and
``cfg.trainer``. ``train.py`` and ``evaluate.py`` only call these functions.

Checkpoints store the resolved run config (``diffsweep_config``); :func:`build_module` rebuilds
the module from it. Configs written before the module config named its parts (the net, schedule
and sampler were put together in code then) are upgraded by :func:`upgrade_run_config`.

A composed config (a ``DictConfig``: the current command's) may name every registered target and
its own ``trusted_targets``; a stored one (a plain dict, from a checkpoint) only model and data
targets and no interpolations (:mod:`diffsweep.targets`), checked before anything is built.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from diffsweep.callbacks.ema import EMA
from diffsweep.hydra_utils import hydra_choices, instantiate_dict, run_config_dict
from diffsweep.module import DiffusionModule
from diffsweep.targets import TRUSTED_KEY, TargetPolicy, check_targets, safe_instantiate

#: The module config of runs whose config predates ``module.denoiser`` (see upgrade_run_config).
_LEGACY_MODULE_KEYS = ("prediction_type", "lr_warmup_steps")


def upgrade_run_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stored run config in today's layout (a copy; configs already in it are returned as is).

    Earlier configs had ``module: {prediction_type, lr_warmup_steps, ...}`` beside ``model``,
    ``scheduler``, ``sampler`` and ``image_shape``; the same run is now
    ``module: {denoiser: {net, schedule, prediction_type}, loss, lr_schedule, sampler,
    image_shape, ...}`` (a constant LR schedule with the same warmup, the uniform MSE loss).
    """
    module = config.get("module") or {}
    if "denoiser" in module:
        return config
    upgraded = copy.deepcopy(config)
    old = upgraded["module"]
    new = {key: value for key, value in old.items() if key not in _LEGACY_MODULE_KEYS}
    new["denoiser"] = {"_target_": "diffsweep.denoiser.Denoiser", "net": upgraded["model"],
                       "schedule": upgraded["scheduler"],
                       "prediction_type": old.get("prediction_type", "epsilon")}
    new["loss"] = {"_target_": "diffsweep.loss.DenoisingLoss", "weighting": None}
    new["lr_schedule"] = {"_target_": "diffsweep.lr_schedules.constant", "_partial_": True,
                          "warmup_steps": int(old.get("lr_warmup_steps", 0) or 0)}
    new["sampler"] = upgraded.get("sampler")
    shape = upgraded.get("image_shape") or [upgraded["data"]["channels"],
                                            upgraded["data"]["resolution"],
                                            upgraded["data"]["resolution"]]
    new["image_shape"] = list(shape)
    upgraded["module"] = new
    upgraded.setdefault("loss", new["loss"])
    upgraded.setdefault("lr_schedule", new["lr_schedule"])
    return upgraded


def stored_run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config as checkpoints store it (plus the Hydra group choices), without
    ``trusted_targets``: what a command trusts never travels with its checkpoints."""
    config = run_config_dict(cfg)
    config.pop(TRUSTED_KEY, None)
    config["choices"] = hydra_choices()
    return config


def config_policy(config: DictConfig | Mapping[str, Any], source: str,
                  trusted_targets: Iterable[str] = ()) -> TargetPolicy:
    """What ``config`` may instantiate: a ``DictConfig`` is the current command's composed config
    (every registered target and its own ``trusted_targets``), a plain mapping a stored one
    (model and data targets, no interpolations) named ``source``; ``trusted_targets`` (the
    command's) apply to both."""
    extra = frozenset(trusted_targets)
    if isinstance(config, DictConfig):
        command = TargetPolicy.command(config)
        return TargetPolicy(source=command.source, trusted=command.trusted | extra)
    return TargetPolicy(source=source, stored=True, trusted=extra)


def check_stored_module(config: Mapping[str, Any], policy: TargetPolicy) -> None:
    """Check the parts of a stored run config that rebuild its module: ``module`` and, in the
    earlier layout (no ``module.denoiser``), the ``model``, ``scheduler`` and ``sampler`` it is
    upgraded from; raise before anything is built."""
    module = config.get("module")
    if not isinstance(module, Mapping):
        raise ValueError(f"{policy.source}: module is {type(module).__name__}, not a mapping; "
                         f"the stored run config cannot rebuild a model.")
    check_targets(module, policy, key="module")
    if "denoiser" not in module:
        for key in ("model", "scheduler", "sampler"):
            check_targets(config.get(key), policy, key=key)


def build_module(config: DictConfig | Mapping[str, Any], *, source: str = "the stored run config",
                 trusted_targets: Iterable[str] = ()) -> DiffusionModule:
    """A freshly initialised DiffusionModule for a run config (composed or stored), carrying the
    resolved config so that checkpoints can rebuild it.

    Every ``_target_`` is checked first (:func:`config_policy`): a stored config (a plain mapping,
    from ``source``) may name model targets, the current command's ``trusted_targets`` and
    registered ones only (:class:`~diffsweep.targets.UntrustedConfigError` otherwise).
    """
    policy = config_policy(config, source, trusted_targets)
    if isinstance(config, DictConfig):
        stored = stored_run_config(config)
    else:
        check_stored_module(config, policy)
        stored = upgrade_run_config(dict(config))
    # partial: instantiate would also build every _target_ inside a keyword argument
    module_factory = safe_instantiate(OmegaConf.create(stored["module"]), policy=policy,
                                      config_key="module", _partial_=True)
    return module_factory(run_config=stored)


def build_datamodule(config: DictConfig | Mapping[str, Any], *,
                     source: str = "the stored run config",
                     trusted_targets: Iterable[str] = ()) -> L.LightningDataModule:
    """The run's DataModule (``config["data"]``), its targets checked as in :func:`build_module`."""
    policy = config_policy(config, source, trusted_targets)
    data = config.get("data")
    if not isinstance(data, (Mapping, DictConfig)):
        raise ValueError(f"{policy.source}: data is {type(data).__name__}, not a mapping; there "
                         f"is no data config to build a DataModule from.")
    return safe_instantiate(data if isinstance(data, DictConfig) else OmegaConf.create(data),
                            policy=policy, config_key="data")


def check_shapes(image_shape: tuple[int, ...], datamodule: L.LightningDataModule) -> None:
    """Refuse a model whose sample shape differs from what the data serves (model space)."""
    served = tuple(int(size) for size in getattr(datamodule, "image_shape", image_shape))
    if tuple(image_shape) != served:
        raise ValueError(f"module.image_shape={list(image_shape)} but the data serves "
                         f"{list(served)} (C, H, W); keep model/data channels and resolution equal "
                         f"(they follow data.channels and data.resolution by default).")


def order_callbacks(callbacks: list[L.Callback]) -> list[L.Callback]:
    """EMA first: its ``on_train_end`` must copy the averaged weights before others sample."""
    return sorted(callbacks, key=lambda callback: not isinstance(callback, EMA))


def build_callbacks(cfg: DictConfig, with_loggers: bool = True) -> list[L.Callback]:
    """``cfg.callbacks`` and ``cfg.metrics`` (FID callbacks), EMA first. Without loggers
    (``logger=none``) the LR monitor, which needs one, is left out."""
    policy = TargetPolicy.command(cfg)
    callbacks = (instantiate_dict(cfg.get("callbacks"), "callbacks", policy=policy)
                 + instantiate_dict(cfg.get("metrics"), "metrics", policy=policy))
    if not with_loggers:
        callbacks = [callback for callback in callbacks
                     if not isinstance(callback, LearningRateMonitor)]
    return order_callbacks(callbacks)


def build_loggers(cfg: DictConfig) -> list[Any]:
    """``cfg.logger``: Lightning loggers by name."""
    return instantiate_dict(cfg.get("logger"), "logger", policy=TargetPolicy.command(cfg))


def default_strategy(trainer_cfg: DictConfig) -> dict[str, Any]:
    """``strategy: auto`` with several devices -> our multirun-safe DDP (else Lightning's choice).

    So ``python train.py trainer.devices=4`` (no ``trainer=ddp``) runs DDP whose ranks rebuild the
    Hydra job instead of re-running the command line (Lightning #11300).
    """
    devices = trainer_cfg.get("devices", 1)
    many = (isinstance(devices, int) and devices > 1) or (
        OmegaConf.is_list(devices) and len(devices) > 1) or (
        isinstance(devices, str) and devices.isdigit() and int(devices) > 1)
    if trainer_cfg.get("strategy", "auto") == "auto" and many:
        from diffsweep.launch import HydraDDPStrategy

        return {"strategy": HydraDDPStrategy()}
    return {}


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX-512 BF16 or AMX-BF16, x86 Linux flags)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """``trainer.precision`` with ``auto`` made concrete: ``bf16-mixed`` on a CUDA device with bf16
    or on a CPU with native bf16 (AVX-512 BF16 / AMX), else ``32-true``; other values as given."""
    precision = str(trainer_cfg.get("precision", "32-true"))
    if precision != "auto":
        return precision
    import torch

    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() \
            else "32-true"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback], loggers: list[Any]) -> L.Trainer:
    """``cfg.trainer`` with the run's callbacks and loggers (``precision: auto`` resolved)."""
    from diffsweep.console import progress_bar_kwargs

    return safe_instantiate(cfg.trainer, policy=TargetPolicy.command(cfg), config_key="trainer",
                            callbacks=callbacks, logger=loggers or False,
                            precision=resolve_precision(cfg.trainer),
                            **default_strategy(cfg.trainer),
                            **progress_bar_kwargs(cfg.trainer, callbacks))


__all__ = ["build_callbacks", "build_datamodule", "build_loggers", "build_module", "build_trainer",
           "check_shapes", "check_stored_module", "config_policy", "cpu_has_bf16",
           "default_strategy", "order_callbacks",
           "resolve_precision", "stored_run_config", "upgrade_run_config"]
