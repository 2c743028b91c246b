"""``run(cfg)`` behind ``train.py``: assemble the run (:mod:`diffsweep.assembly`), resume, fit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from diffsweep.assembly import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_module,
    build_trainer,
    check_shapes,
)
from diffsweep.checkpoints import explain_state_dict_errors
from diffsweep.console import console_options, quiet
from diffsweep.hydra_utils import hydra_signature, print_config_tree
from diffsweep.loggers import finish_loggers
from diffsweep.module import count_parameters
from diffsweep.resume import ResumePoint, find_resume_point, run_status
from diffsweep.validate import validate_train_config

log = logging.getLogger(__name__)


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> ResumePoint:
    """Where this run starts (:func:`diffsweep.resume.find_resume_point`): ``ckpt_path`` if given,
    else with ``resume=auto`` the newest checkpoint in this run's checkpoint folder, or nothing to
    do when the job already finished; the checkpoint's config is compared with ``cfg`` (a change
    that is not safe on resume is refused)."""
    return find_resume_point(cfg, output_dir)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one configuration; returns the final callback metrics as floats."""
    validate_train_config(cfg)  # bad input fails here, before data, model or checkpoints
    output_dir = Path(cfg.paths.output_dir)
    # before anything is written: a refused config change or an already finished job stops here
    resume = resume_checkpoint(cfg, output_dir)
    if resume.finished is not None:
        return {key: float(value) for key, value in (resume.finished.get("metrics") or {}).items()}
    console = console_options(cfg)
    quiet(console["show_warnings"])
    print_config_tree(cfg, save_to=output_dir / "config_tree.log", style=console["config_tree"])
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
    callbacks = build_callbacks(cfg, with_loggers=bool(loggers)) + resume.callbacks()
    trainer: L.Trainer = build_trainer(cfg, callbacks, loggers)
    for logger in loggers:
        logger.log_hyperparams(module.config)

    ckpt_path = resume.ckpt_path
    # One status file and lock per run: DDP ranks > 0 (and other SLURM tasks) run this same job.
    # Its done marker (done.json, written last) makes a rerun of this job a no-op.
    with run_status(output_dir, signature=hydra_signature(),
                    enabled=trainer.is_global_zero) as record, \
            explain_state_dict_errors(ckpt_path):  # a mismatch: one line, not hundreds
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        record.conclude(trainer, metrics, module.config)
    log.info("Run directory: %s", output_dir)
    finish_loggers(loggers, module.config, metrics, trainer.global_step)
    return metrics
