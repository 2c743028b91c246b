"""``run(cfg)`` behind ``evaluate.py``: sample a trained checkpoint (or a diffusers folder) with any
sampler, write a grid, compute FID and append one row to the sweep's results file."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffsweep.assembly import build_datamodule, check_shapes
from diffsweep.callbacks.samples import save_grid
from diffsweep.checkpoints import module_from_checkpoint, read_checkpoint
from diffsweep.generate import generate
from diffsweep.grids import resolve_spacing
from diffsweep.inference import autocast_dtype
from diffsweep.denoiser import Denoiser
from diffsweep.hydra_utils import hydra_choices, instantiate_dict, print_config_tree, run_config_dict
from diffsweep.samplers import Sampler
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


@dataclass
class EvaluatedModel:
    """What an evaluation samples: a denoiser, its sample shape, the data config for decoding and
    FID statistics (None: no data), and the columns that name it in the results row."""

    denoiser: Denoiser
    image_shape: tuple[int, ...]
    data_config: dict[str, Any] | None
    row_head: dict[str, Any]
    compile_options: dict[str, Any] = field(default_factory=dict)
    adapt_sampler: Callable[[Sampler], Sampler] = lambda sampler: sampler


def load_model(cfg: DictConfig, device: torch.device) -> EvaluatedModel:
    """The model of ``cfg.ckpt_path`` (a train.py checkpoint) or ``cfg.pretrained`` (a diffusers
    folder), on ``device``; exactly one of them must be set."""
    ckpt_path, pretrained = cfg.get("ckpt_path"), cfg.get("pretrained")
    if (ckpt_path is None) == (pretrained is None):
        raise ValueError(f"Pass exactly one of ckpt_path=<train.py checkpoint> or "
                         f"pretrained=<diffusers folder>; got ckpt_path={ckpt_path!r}, "
                         f"pretrained={pretrained!r}.")
    data = cfg.get("data")
    data_config = OmegaConf.to_container(data, resolve=True) if data else None
    if pretrained is not None:
        from diffsweep.diffusers_bridge import load_pretrained

        model = load_pretrained(pretrained, scheduler=cfg.get("pretrained_scheduler"))
        head = {"ckpt_path": "", "step": "", **model.row_fields(),
                "train_data": hydra_choices().get("data", ""), "train_model": "pretrained",
                "train_scheduler": model.info.get("scheduler_class", "")}
        return EvaluatedModel(model.denoiser.to(device), tuple(model.image_shape), data_config,
                              head, adapt_sampler=model.adapt_sampler)
    checkpoint = read_checkpoint(ckpt_path)
    train_cfg = checkpoint.get("diffsweep_config") or {}
    module = module_from_checkpoint(checkpoint, cfg.weights, source=str(ckpt_path)).to(device)
    head = {"ckpt_path": str(ckpt_path), "step": checkpoint.get("global_step", ""),
            **_train_choices(train_cfg)}
    return EvaluatedModel(module.denoiser, tuple(module.image_shape),
                          data_config or train_cfg.get("data"), head,
                          compile_options=module.compile_options)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` (or ``cfg.pretrained``) with ``cfg.sampler``; returns the
    results row."""
    job_started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_tree.log")
    device = _device(cfg.device)
    precision = str(cfg.precision)
    autocast_dtype(precision)  # an unknown precision fails before any work
    fid_config = (cfg.get("metrics") or {}).get("fid")
    model = load_model(cfg, device)
    if model.data_config is None and fid_config is not None:
        raise ValueError("pretrained=... needs data=<dataset> for FID real statistics (e.g. "
                         "data=cifar10), or metrics=none.")
    denoiser, image_shape = model.denoiser, model.image_shape
    # grid and FID sampling alike; one model: its weights can be compiled in
    sampling = {"precision": precision, "compile": bool(cfg.compile), "freeze_weights": True,
                "compile_options": model.compile_options}
    sampler = model.adapt_sampler(instantiate(cfg.sampler))
    datamodule = None
    if model.data_config is not None:
        datamodule = build_datamodule({"data": model.data_config})
        check_shapes(image_shape, datamodule)
        datamodule.prepare_data()
        datamodule.setup("validate")

    generator = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    samples = generate(denoiser, sampler, cfg.grid_samples, image_shape,
                       generator=generator, batch_size=cfg.batch_size, **sampling)
    grid_seconds = time.perf_counter() - started
    images = (datamodule.decode(samples) if datamodule is not None else samples).clamp(-1, 1)
    grid_path = save_grid(images, output_dir / f"samples_{sampler.name}.png")

    row: dict[str, Any] = {
        **model.row_head, "sampler": sampler.method_name,
        "num_steps": sampler.num_steps, "spacing": resolve_spacing(denoiser.schedule, sampler.spacing), "nfe": sampler.nfe,
        "options": ";".join(f"{k}={v}" for k, v in sampler.options.items()),
        "seed": cfg.seed, "precision": precision,
        "compile": sampling["compile"], "grid": str(grid_path),
        "samples_per_s": round(cfg.grid_samples / grid_seconds, 3),
    }
    if fid_config is not None:
        evaluator = instantiate(fid_config.evaluator, seed=cfg.seed)
        started = time.perf_counter()
        results = evaluator.evaluate(denoiser, [sampler], datamodule,
                                     image_shape=image_shape, **sampling)
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
