"""``run(cfg)`` behind ``train.py``: assemble the run (:mod:`diffsweep.assembly`), resume, fit."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from diffsweep.assembly import (build_callbacks, build_datamodule, build_loggers, build_module,
                                build_trainer, check_shapes)
from diffsweep.checkpoints import check_compatible, find_resume_checkpoint, read_checkpoint
from diffsweep.hydra_utils import hydra_signature, print_config_tree
from diffsweep.module import count_parameters
from diffsweep.resume import run_status

log = logging.getLogger(__name__)


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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one configuration; returns the final callback metrics as floats."""
    output_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_tree.log")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))

    datamodule = build_datamodule(cfg)
    module = build_module(cfg)
    check_shapes(module.image_shape, datamodule)
    log.info("Model: %s with %.2fM parameters; schedule %s; sampler %s",
             type(module.net).__name__, count_parameters(module.net) / 1e6, module.schedule,
             module.sampler)

    loggers = build_loggers(cfg)
    trainer: L.Trainer = build_trainer(cfg, build_callbacks(cfg), loggers)
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
