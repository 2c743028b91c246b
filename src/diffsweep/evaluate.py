"""``run(cfg)`` behind ``evaluate.py``: sample a trained checkpoint with any sampler, write a grid,
compute FID and append one row to the sweep's results file."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffsweep.assembly import build_datamodule
from diffsweep.callbacks.samples import save_grid
from diffsweep.checkpoints import module_from_checkpoint, read_checkpoint
from diffsweep.generate import generate
from diffsweep.grids import resolve_spacing
from diffsweep.inference import autocast_dtype
from diffsweep.hydra_utils import instantiate_dict, print_config_tree, run_config_dict
from diffsweep.results import append_row

log = logging.getLogger(__name__)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _train_choices(train_cfg: dict[str, Any]) -> dict[str, Any]:
    """The training run's config-group choices (data, model, scheduler) for the results row."""
    choices = train_cfg.get("choices") or {}
    return {f"train_{group}": choices.get(group, "") for group in ("data", "model", "scheduler")}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` with ``cfg.sampler``; returns the results row."""
    job_started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_tree.log")
    device = _device(cfg.device)
    precision = str(cfg.precision)
    autocast_dtype(precision)  # an unknown precision fails before any work
    checkpoint = read_checkpoint(cfg.ckpt_path)
    train_cfg = checkpoint.get("diffsweep_config") or {}
    module = module_from_checkpoint(checkpoint, cfg.weights, source=str(cfg.ckpt_path)).to(device)
    denoiser = module.denoiser
    # grid and FID sampling alike; one checkpoint: its weights can be compiled in
    sampling = {"precision": precision, "compile": bool(cfg.compile), "freeze_weights": True,
                "compile_options": module.compile_options}
    sampler = instantiate(cfg.sampler)
    datamodule = build_datamodule(train_cfg)
    datamodule.prepare_data()
    datamodule.setup("validate")

    generator = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    samples = generate(denoiser, sampler, cfg.grid_samples, module.image_shape,
                       generator=generator, batch_size=cfg.batch_size, **sampling)
    grid_seconds = time.perf_counter() - started
    images = datamodule.decode(samples).clamp(-1, 1)
    grid_path = save_grid(images, output_dir / f"samples_{sampler.name}.png")

    row: dict[str, Any] = {
        "ckpt_path": str(cfg.ckpt_path), "step": checkpoint.get("global_step", ""),
        **_train_choices(train_cfg), "sampler": sampler.method_name,
        "num_steps": sampler.num_steps, "spacing": resolve_spacing(denoiser.schedule, sampler.spacing), "nfe": sampler.nfe,
        "options": ";".join(f"{k}={v}" for k, v in sampler.options.items()),
        "seed": cfg.seed, "precision": precision,
        "compile": sampling["compile"], "grid": str(grid_path),
        "samples_per_s": round(cfg.grid_samples / grid_seconds, 3),
    }
    fid_config = (cfg.get("metrics") or {}).get("fid")
    if fid_config is not None:
        evaluator = instantiate(fid_config.evaluator, seed=cfg.seed)
        started = time.perf_counter()
        results = evaluator.evaluate(denoiser, [sampler], datamodule,
                                     image_shape=module.image_shape, **sampling)
        row.update({"fid": results[f"fid/{sampler.name}"],
                    "fid_extractor": evaluator.extractor.name,
                    "fid_samples": evaluator.num_samples,
                    "fid_seconds": round(time.perf_counter() - started, 2)})
    row["wall_time_s"] = round(time.perf_counter() - job_started, 2)
    results_file = Path(cfg.results_file).resolve()
    append_row(results_file, row)
    log.info("Results row appended to %s: %s", results_file, row)
    _log_to_loggers(cfg, row, grid_path)
    return row


def _log_to_loggers(cfg: DictConfig, row: dict[str, Any], grid_path: Path) -> None:
    from diffsweep.loggers import log_image
    from diffsweep.results import read_rows

    loggers = instantiate_dict(cfg.get("logger"), "logger")
    scalars = {key: float(row[key]) for key in ("fid", "nfe", "samples_per_s") if key in row}
    for logger in loggers:
        logger.log_hyperparams(run_config_dict(cfg))
        logger.log_metrics(scalars, step=0)
        if type(logger).__name__ == "WandbLogger":
            rows = read_rows(cfg.results_file)
            columns = list(rows[0]) if rows else []
            logger.log_table(key="fid_vs_nfe", columns=columns,
                             data=[[r.get(c, "") for c in columns] for r in rows])
        logger.save()
    log_image(loggers, "samples", grid_path, 0)
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
