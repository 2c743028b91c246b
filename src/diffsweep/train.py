"""``run(cfg)`` behind ``train.py``: build data, model, schedule, sampler, callbacks, loggers; fit."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffsweep.callbacks.ema import EMA
from diffsweep.checkpoints import (build_module_from_config, check_compatible,
                                   find_resume_checkpoint, read_checkpoint)
from diffsweep.hydra_utils import (hydra_choices, hydra_signature, instantiate_dict,
                                   print_config_tree, run_config_dict)
from diffsweep.module import DiffusionModule, count_parameters
from diffsweep.resume import run_status

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig, image_shape: tuple[int, int, int]) -> DiffusionModule:
    """The DiffusionModule for ``cfg``; the resolved config (and image shape) goes into checkpoints."""
    config = run_config_dict(cfg)
    config["image_shape"] = list(image_shape)
    config["choices"] = hydra_choices()
    return build_module_from_config(config)


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    """``ckpt_path`` if given (checked against the config), else with ``resume=auto`` the newest
    readable checkpoint already in this run's checkpoint folder."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path and cfg.get("resume", "auto") == "auto":
        folder = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath",
                                  default=str(output_dir / "checkpoints"))
        found = find_resume_checkpoint(folder)
        if found is not None:
            log.info("Resuming from %s", found)
            ckpt_path = str(found)
    if ckpt_path:
        stored = read_checkpoint(ckpt_path).get("diffsweep_config")
        if stored is not None:
            check_compatible(stored, cfg)
    return ckpt_path


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


def order_callbacks(callbacks: list[L.Callback]) -> list[L.Callback]:
    """EMA first: its ``on_train_end`` must copy the averaged weights before others sample."""
    return sorted(callbacks, key=lambda cb: not isinstance(cb, EMA))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one configuration; returns the final callback metrics as floats."""
    output_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_tree.log")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))

    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule.image_shape)
    log.info("Model: %s with %.2fM parameters; schedule %s; sampler %s",
             type(module.net).__name__, count_parameters(module.net) / 1e6, module.schedule,
             module.sampler)

    callbacks = order_callbacks(instantiate_dict(cfg.get("callbacks"), "callbacks")
                                + instantiate_dict(cfg.get("metrics"), "metrics"))
    loggers = instantiate_dict(cfg.get("logger"), "logger")
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     **default_strategy(cfg.trainer))
    for logger in loggers:
        logger.log_hyperparams(module.config)

    ckpt_path = resume_checkpoint(cfg, output_dir)
    # One status file and lock per run: DDP ranks > 0 (and other SLURM tasks) run this same job.
    status = (run_status(output_dir, signature=hydra_signature()) if trainer.is_global_zero
              else contextlib.nullcontext())
    with status:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    log.info("Run directory: %s", output_dir)
    _finish_loggers(loggers)
    return metrics


def _finish_loggers(loggers: list[Any]) -> None:
    """Close W&B runs so the next multirun job starts a fresh one."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
