"""Run assembly: configs -> the objects of a run, each by ``hydra.utils.instantiate``.

A run is ``cfg.data`` (the DataModule), ``cfg.module`` (the DiffusionModule: its ``denoiser.net``,
``denoiser.schedule``, ``loss``, ``lr_schedule`` and ``sampler`` are interpolations of the
``model``, ``scheduler``, ``loss``, ``lr_schedule`` and ``sampler`` groups, so one instantiate builds
it), ``cfg.callbacks`` + ``cfg.metrics`` (callbacks), ``cfg.logger`` (loggers) and ``cfg.trainer``.
``train.py`` and ``evaluate.py`` only call these functions.

Checkpoints store the resolved run config (``diffsweep_config``); :func:`build_module` rebuilds
the module from it. Configs written before the module config named its parts (the net, schedule
and sampler were put together in code then) are upgraded by :func:`upgrade_run_config`.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from diffsweep.callbacks.ema import EMA
from diffsweep.hydra_utils import hydra_choices, instantiate_dict, run_config_dict
from diffsweep.module import DiffusionModule

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
    """The resolved run config as checkpoints store it (plus the Hydra group choices)."""
    config = run_config_dict(cfg)
    config["choices"] = hydra_choices()
    return config


def build_module(config: DictConfig | dict[str, Any]) -> DiffusionModule:
    """A freshly initialised DiffusionModule for a run config (composed or stored), carrying the
    resolved config so that checkpoints can rebuild it."""
    stored = stored_run_config(config) if isinstance(config, DictConfig) else \
        upgrade_run_config(config)
    # partial: instantiate would also build every _target_ inside a keyword argument
    module_factory = instantiate(OmegaConf.create(stored["module"]), _partial_=True)
    return module_factory(run_config=stored)


def build_datamodule(config: DictConfig | dict[str, Any]) -> L.LightningDataModule:
    """The run's DataModule (``cfg.data``)."""
    data = config["data"]
    return instantiate(data if isinstance(data, DictConfig) else OmegaConf.create(data))


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
    callbacks = (instantiate_dict(cfg.get("callbacks"), "callbacks")
                 + instantiate_dict(cfg.get("metrics"), "metrics"))
    if not with_loggers:
        callbacks = [callback for callback in callbacks
                     if not isinstance(callback, LearningRateMonitor)]
    return order_callbacks(callbacks)


def build_loggers(cfg: DictConfig) -> list[Any]:
    """``cfg.logger``: Lightning loggers by name."""
    return instantiate_dict(cfg.get("logger"), "logger")


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

    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                       precision=resolve_precision(cfg.trainer),
                       **default_strategy(cfg.trainer),
                       **progress_bar_kwargs(cfg.trainer, callbacks))


__all__ = ["build_callbacks", "build_datamodule", "build_loggers", "build_module", "build_trainer",
           "check_shapes", "cpu_has_bf16", "default_strategy", "order_callbacks",
           "resolve_precision", "stored_run_config", "upgrade_run_config"]
