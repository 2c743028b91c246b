"""``run(cfg)`` behind ``evaluate.py``: sample a trained checkpoint (or a diffusers folder) with any
sampler, write a grid, compute FID and append one row to the sweep's results file."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from diffsweep.assembly import build_datamodule, check_shapes
from diffsweep.callbacks.samples import save_grid
from diffsweep.checkpoints import module_from_checkpoint, read_checkpoint
from diffsweep.console import console_options, quiet
from diffsweep.denoiser import Denoiser
from diffsweep.generate import generate
from diffsweep.grids import resolve_spacing
from diffsweep.hydra_utils import (
    hydra_choices,
    instantiate_dict,
    print_config_tree,
    run_config_dict,
)
from diffsweep.inference import autocast_dtype
from diffsweep.metrics.evaluator import balanced_labels
from diffsweep.results import EVAL_ROW_KEY, append_row
from diffsweep.resume import finished_evaluation, mark_evaluation_done
from diffsweep.samplers import Sampler
from diffsweep.targets import TargetPolicy, command_trusted_targets, safe_instantiate
from diffsweep.validate import validate_eval_config

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
    train_config: dict[str, Any] = field(default_factory=dict)  # the checkpoint's run config


def load_model(cfg: DictConfig, device: torch.device) -> EvaluatedModel:
    """The model of ``cfg.ckpt_path`` (a train.py checkpoint) or ``cfg.pretrained`` (a diffusers
    folder), on ``device``; exactly one of them must be set."""
    ckpt_path, pretrained = cfg.get("ckpt_path"), cfg.get("pretrained")
    if (ckpt_path is None) == (pretrained is None):
        raise ValueError(f"Pass exactly one of ckpt_path=<train.py checkpoint> or "
                         f"pretrained=<diffusers folder>; got ckpt_path={ckpt_path!r}, "
                         f"pretrained={pretrained!r}.")
    sigma_rel = OmegaConf.select(cfg, "ema.sigma_rel", default=None)
    if sigma_rel is not None:  # post-hoc EMA: this profile, reconstructed from the run's snapshots
        from diffsweep.posthoc_ema import check_sigma_rel, load_profile

        check_sigma_rel(sigma_rel, "ema.sigma_rel")
        if pretrained is not None or cfg.weights != "ema":
            raise ValueError(f"ema.sigma_rel={sigma_rel} reconstructs the EMA of a train.py run "
                             f"with ema=posthoc: it needs ckpt_path=... and weights=ema (got "
                             f"pretrained={pretrained!r}, weights={cfg.weights!r}).")
    data = cfg.get("data")
    data_config = OmegaConf.to_container(data, resolve=True) if data else None
    if pretrained is not None:
        from diffsweep.diffusers_bridge import load_pretrained

        model = load_pretrained(pretrained, scheduler=cfg.get("pretrained_scheduler"),
                                image_seq_len=cfg.get("pretrained_image_seq_len"))
        head = {"ckpt_path": "", "step": "", **model.row_fields(),
                "train_data": hydra_choices().get("data", ""), "train_model": "pretrained",
                "train_scheduler": model.info.get("scheduler_class", "")}
        return EvaluatedModel(model.denoiser.to(device), tuple(model.image_shape), data_config,
                              head, adapt_sampler=model.adapt_sampler)
    checkpoint = read_checkpoint(ckpt_path)
    train_cfg = checkpoint.get("diffsweep_config") or {}
    module = module_from_checkpoint(checkpoint, cfg.weights, source=str(ckpt_path),
                                    trusted_targets=command_trusted_targets(cfg)).to(device)
    if sigma_rel is not None:
        module.load_state_dict(load_profile(ckpt_path, sigma_rel, checkpoint=checkpoint))
    head = {"ckpt_path": str(ckpt_path), "step": checkpoint.get("global_step", ""),
            "sigma_rel": "" if sigma_rel is None else sigma_rel, **_train_choices(train_cfg)}
    return EvaluatedModel(module.denoiser, tuple(module.image_shape),
                          data_config or train_cfg.get("data"), head,
                          compile_options=module.compile_options, train_config=train_cfg)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` (or ``cfg.pretrained``) with ``cfg.sampler``; returns the
    results row."""
    job_started = time.perf_counter()
    validate_eval_config(cfg)  # bad input fails here, before loading or sampling anything
    output_dir = Path(cfg.paths.output_dir)
    finished = finished_evaluation(cfg, output_dir)  # a rerun sweep's finished job: nothing to redo
    if finished is not None:
        append_row(Path(cfg.results_file).absolute(), finished, key=EVAL_ROW_KEY)  # no-op if there
        return finished
    console = console_options(cfg)
    quiet(console["show_warnings"])
    print_config_tree(cfg, save_to=output_dir / "config_tree.log", style=console["config_tree"])
    device = _device(cfg.device)
    precision = str(cfg.precision)
    autocast_dtype(precision)  # an unknown precision fails before any work
    fid_config = (cfg.get("metrics") or {}).get("fid")
    # built before anything is sampled, so a bad metrics.fid.evaluator option fails first
    evaluator = safe_instantiate(fid_config.evaluator, policy=TargetPolicy.command(cfg),
                                 config_key="metrics.fid.evaluator",
                                 seed=cfg.seed) if fid_config is not None else None
    model = load_model(cfg, device)
    if model.data_config is None and fid_config is not None:
        raise ValueError("pretrained=... needs data=<dataset> for FID real statistics (e.g. "
                         "data=cifar10), or metrics=none.")
    denoiser, image_shape = model.denoiser, model.image_shape
    guidance_scale = _guidance_scale(cfg, denoiser)
    # grid and FID sampling alike; one model: its weights can be compiled in
    sampling = {"precision": precision, "compile": bool(cfg.compile), "freeze_weights": True,
                "compile_options": model.compile_options}
    sampler = model.adapt_sampler(safe_instantiate(cfg.sampler, policy=TargetPolicy.command(cfg),
                                                   config_key="sampler"))
    datamodule = None
    if model.data_config is not None:
        datamodule = build_datamodule({"data": model.data_config},
                                      trusted_targets=command_trusted_targets(cfg))
        check_shapes(image_shape, datamodule)
        datamodule.prepare_data()
        datamodule.setup("validate")

    generator = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    grid_conditioning = ({} if guidance_scale is None else {
        "class_labels": balanced_labels(cfg.grid_samples, denoiser.num_classes),
        "guidance_scale": guidance_scale})
    samples = generate(denoiser, sampler, cfg.grid_samples, image_shape,
                       generator=generator, batch_size=cfg.batch_size, **sampling,
                       **grid_conditioning)
    grid_seconds = time.perf_counter() - started
    images = (datamodule.decode(samples) if datamodule is not None else samples).clamp(-1, 1)
    grid_path = save_grid(images, output_dir / f"samples_{sampler.name}.png")

    row: dict[str, Any] = {
        **model.row_head, "sampler": sampler.method_name,
        "num_steps": sampler.num_steps,
        "spacing": resolve_spacing(denoiser.schedule, sampler.spacing),
        "nfe": sampler.nfe_on(denoiser.schedule),
        "options": ";".join(f"{k}={v}" for k, v in sampler.options.items()),
        "guidance_scale": "" if guidance_scale is None else guidance_scale,
        "seed": cfg.seed, "precision": precision,
        "compile": sampling["compile"], "grid": str(grid_path),
        "samples_per_s": round(cfg.grid_samples / grid_seconds, 3),
    }
    if evaluator is not None:
        started = time.perf_counter()
        results = evaluator.evaluate(denoiser, [sampler], datamodule,
                                     image_shape=image_shape, guidance_scale=guidance_scale,
                                     **sampling)
        row.update({"fid": results[f"fid/{sampler.name}"],
                    **{column: results[f"{metric}/{sampler.name}"]
                       for metric, column in (("kid", "kid"), ("kid_std", "kid_std"),
                                              ("precision", "prc_precision"),
                                              ("recall", "prc_recall"))
                       if f"{metric}/{sampler.name}" in results},
                    "fid_extractor": evaluator.extractor.name,
                    "fid_samples": evaluator.num_samples,
                    "fid_seconds": round(time.perf_counter() - started, 2)})
    row["wall_time_s"] = round(time.perf_counter() - job_started, 2)
    if cfg.get("ckpt_path"):
        row.setdefault("weights", cfg.weights)  # ema and raw are two measurements
    results_file = Path(cfg.results_file).absolute()  # not resolve(): the writer refuses a symlink
    append_row(results_file, row, key=EVAL_ROW_KEY)  # a rerun replaces its row: no duplicates
    log.info("%s; row written to %s", result_summary(row), os.path.normpath(results_file))
    _log_to_loggers(cfg, row, grid_path, model.train_config)
    mark_evaluation_done(cfg, output_dir, row)  # last: a rerun of this job is a no-op
    return row


def result_summary(row: dict[str, Any]) -> str:
    """One line for the console from a results row: sampler, steps, NFE, guidance, FID/KID with
    their extractor and sample count, throughput and wall time (the whole row is in the results
    file)."""
    parts = [f"{row['sampler']} {row['num_steps']} steps (NFE {row['nfe']})"]
    if row.get("guidance_scale") not in (None, ""):
        parts.append(f"guidance {row['guidance_scale']:g}")
    if row.get("weights"):
        parts.append(f"{row['weights']} weights")
    if row.get("fid") is not None:
        quality = f"FID[{row.get('fid_extractor', '?')}] {row['fid']:.4g}"
        if row.get("kid") is not None:
            quality += f", KID {row['kid']:.4g}"
        parts.append(f"{quality} ({row.get('fid_samples', '?')} samples)")
    parts.append(f"{row['samples_per_s']:g} samples/s")
    parts.append(f"{row['wall_time_s']:g} s")
    return "Result: " + ", ".join(parts)


def _guidance_scale(cfg: DictConfig, denoiser: Denoiser) -> float | None:
    """``cfg.guidance_scale`` for a class-conditional net (balanced labels, classifier-free
    guidance; 1 = plain conditional), None for an unconditional one (which must keep 1)."""
    scale = float(cfg.get("guidance_scale", 1.0))
    if denoiser.num_classes is None:
        if scale != 1.0:
            raise ValueError(f"guidance_scale={scale:g} needs a class-conditional checkpoint "
                             f"(trained with model.num_classes set); this one is unconditional: "
                             f"leave guidance_scale=1.")
        return None
    return scale


def _log_to_loggers(cfg: DictConfig, row: dict[str, Any], grid_path: Path,
                    train_config: dict[str, Any]) -> None:
    """The job's config (with the checkpoint's training config under ``train``), the row's
    numbers at the checkpoint's step, the grid; the sweep's table is logged once, at the end of
    the sweep (:class:`diffsweep.loggers.ResultsSummary`)."""
    from diffsweep.loggers import log_evaluation

    loggers = instantiate_dict(cfg.get("logger"), "logger", policy=TargetPolicy.command(cfg))
    if not loggers:
        return
    step = row.get("step")
    log_evaluation(loggers, row, {**run_config_dict(cfg), "train": train_config}, grid_path,
                   step=int(step) if isinstance(step, int) else 0)
