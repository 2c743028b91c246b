"""The bad-input table: every bad value of ``train.py``, ``evaluate.py`` and ``python -m
diffsweep.export`` is refused before any expensive work with one line naming the key.

Each case composes the real config in-process and hands it to the entry function
(``diffsweep.train.run``, ``diffsweep.evaluate.run``, ``diffsweep.export.main``), with the first
expensive step replaced by a stop
(:class:`ReachedExpensiveWork`: training's first step after the data set-up and the optimizer,
evaluation's first sample, the export's conversion). The error must be a user error for
:func:`diffsweep.console.user_error_lines`: exactly one line that names the key (or the file).
Two real commands, a ``python train.py -m`` sweep and a ``python evaluate.py`` run, check what
a terminal shows: one stderr line per problem, no traceback, a non-zero exit status (they start
in the background when this module starts and overlap the table).
docs/ERRORS.md gives the table's totals.

Composing: a Hydra compose takes 0.1-0.3 s, too slow for 200 cases, so each set of config-group
choices is composed once (``tests.conftest.compose_config``) and a case's ``key=value`` overrides
are applied to a copy of its task config (without the ``hydra`` node, as Hydra passes it to the
task) by Hydra's own override code, as ``compose`` applies them after the groups: the same values
(``nan``, ``1.5``, ``abc``, ``[2,3]``), the same ``+``/``++``/``~`` rules.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from diffsweep.console import user_error_lines
from tests.conftest import CONFIGS, FAST, REPO, compose_config

pytestmark = pytest.mark.usefixtures("single_thread")

#: Tiny training runs (steps, grids, no logger); a case's overrides come after these.
TRAIN_BASE = [*FAST, "logger=none"]
#: Evaluation of the table's checkpoint, no FID and the results file in the case's folder.
EVAL_BASE = ["ckpt_path={ckpt}", "metrics=none", "logger=none", "grid_samples=2",
             "sampler.num_steps=2", "results_file={tmp}/results.csv"]


class ReachedExpensiveWork(Exception):
    """The bad input got past every check: training, sampling or the export would start."""


@dataclass(frozen=True)
class Bad:
    """One bad input: the entry point (``train``, ``evaluate``, ``export``), its arguments
    (``{name}`` placeholders are files of the :func:`files` fixture) and the texts the one-line
    message must contain (default: the key of the last argument)."""

    entry: str
    args: tuple[str, ...]
    names: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.entry}:{' '.join(self.args)}"


def bad(entry: str, *args: str, names: tuple[str, ...] | None = None) -> Bad:
    key = args[-1].split("=", 1)[0].lstrip("+~")
    return Bad(entry, args, names or (key,))


def train(*args: str, **kwargs: tuple[str, ...]) -> Bad:
    return bad("train", *args, **kwargs)


def evaluate(*args: str, **kwargs: tuple[str, ...]) -> Bad:
    return bad("evaluate", *args, **kwargs)


def export(*args: str, **kwargs: tuple[str, ...]) -> Bad:
    return bad("export", *args, **kwargs)


TRAIN_CASES = [
    # the trainer
    train("trainer.gradient_clip_val=-1"), train("trainer.gradient_clip_val=abc"),
    train("trainer.gradient_clip_val=nan"),
    train("trainer.log_every_n_steps=0"), train("trainer.log_every_n_steps=abc"),
    train("trainer.val_check_interval=0"), train("trainer.val_check_interval=-5"),
    train("trainer.val_check_interval=abc"),
    train("trainer.max_steps=0"), train("trainer.max_steps=abc"), train("trainer.max_steps=2.5"),
    train("trainer.max_epochs=0"),
    train("trainer.precision=abc"), train("trainer.precision=8"),
    train("++trainer.accumulate_grad_batches=0"), train("++trainer.limit_val_batches=-1"),
    train("++trainer.limit_train_batches=abc"), train("trainer.num_sanity_val_steps=-5"),
    train("trainer.check_val_every_n_epoch=0"), train("trainer.deterministic=maybe"),
    train("trainer.benchmark=abc"), train("trainer.num_nodes=0"),
    train("trainer.devices=0"), train("trainer.devices=abc"), train("trainer.devices=-2"),
    train("trainer.devices=1.5"), train("trainer.accelerator=abacus"),
    # seeds
    train("seed=abc"), train("seed=-1"), train("seed=1.5"), train("seed=4294967296"),
    train("data.seed=abc"), train("callbacks.sample_grid.seed=-1"),
    train("data.source.split_seed=abc"),
    # top-level run options
    train("num_threads=0"), train("num_threads=-2"), train("num_threads=abc"),
    train("resume=maybe"), train("resume_allow_changes=5"), train("resume_allow_changes=[5]"),
    train("matmul_precision=fast"), train("console.config_tree=long"),
    train("console.show_warnings=maybe"), train("optimized_metric=5"),
    # the optimizer and the module
    train("module.optimizer.lr=0"), train("module.optimizer.lr=1e10"),
    train("module.optimizer.lr=abc"), train("module.optimizer.lr=-1"),
    train("module.optimizer.lr=nan"),
    train("module.optimizer.betas=[2,3]"), train("module.optimizer.betas=[0.9]"),
    train("module.optimizer.betas=abc"), train("module.optimizer.betas=[0.9,1.0]"),
    train("module.optimizer.eps=-1"), train("module.optimizer.weight_decay=abc"),
    train("module.label_dropout=1.5"), train("module.label_dropout=-0.1"),
    train("module.label_dropout=abc"),
    train("module.compile=no"), train("module.sample_compile=maybe"),
    train("module.sample_precision=64"), train("module.denoiser.prediction_type=noise"),
    # the model
    train("model.num_classes=0"), train("model.num_classes=-3"), train("model.num_classes=abc"),
    train("model.base_channels=0"), train("model.dropout=1.5"), train("model.channel_mults=[]"),
    train("model.num_res_blocks=-1"), train("model.attention_resolutions=abc"),
    train("model.resolution=17"), train("model.in_channels=3"),
    # the data
    train("data.batch_size=1.5"), train("data.batch_size=abc"), train("data.batch_size=0"),
    train("data.batch_size=-4"), train("data.val_batch_size=0"), train("data.num_workers=-1"),
    train("data.source.val_fraction=1.5"), train("data.resolution=0"),
    train("data.drop_last=maybe"),
    train("data=image_folder", "data.root={missing}", names=("data.root",)),
    train("data=image_folder", "data.root={file}", names=("data.root",)),
    train("data=image_folder", "data.root={empty_folder}", names=("data.root",)),
    # paths and checkpoints
    train("ckpt_path={missing}"), train("ckpt_path={folder}"),
    train("ckpt_path={zero_ckpt}", names=("{zero_ckpt}",)),
    train("ckpt_path={state_dict_ckpt}", names=("{state_dict_ckpt}",)),
    train("ckpt_path={no_state_dict_ckpt}", names=("{no_state_dict_ckpt}",)),
    train("ckpt_path={module_ckpt}", names=("{module_ckpt}",)),
    train("ckpt_path={text_ckpt}", names=("{text_ckpt}",)),
    train("callbacks.model_checkpoint.dirpath={file}"),
    # the sampler of the validation grids
    train("sampler.eta=5"), train("sampler.eta=abc"), train("sampler.eta=-1"),
    train("sampler.num_steps=0"), train("sampler.num_steps=abc"),
    train("sampler.num_steps=1.5"), train("sampler.spacing=sideways"), train("sampler.rho=0"),
    train("sampler.rho=abc"), train("sampler.steps_offset=-1"),
    train("sampler.clip_sample=maybe"), train("sampler.clip_sample_range=0"),
    train("sampler.thresholding=abc"), train("sampler.dynamic_thresholding_ratio=2"),
    train("sampler.sample_max_value=0"), train("sampler.use_clipped_model_output=abc"),
    train("sampler=unipc", "sampler.order=5"), train("sampler=lms", "sampler.order=0"),
    train("sampler=dpmpp_2m_sde", "sampler.eta=-1"),
    train("sampler=dpmpp_2m_sde", "sampler.s_noise=abc"),
    train("sampler=euler_ancestral", "sampler.eta=abc"),
    train("sampler=heun", "sampler.s_churn=-1"), train("sampler=heun", "sampler.s_noise=abc"),
    train("sampler=ddpm", "sampler.num_steps=0"), train("sampler.method=rk45"),
    train("+sampler.order=3"),
    # the schedule
    train("scheduler.num_train_timesteps=0"), train("scheduler.num_train_timesteps=abc"),
    train("scheduler.beta_start=-1"), train("scheduler.beta_end=2"),
    train("scheduler.beta_start=0.1", "scheduler.beta_end=0.01",
          names=("scheduler.beta_start", "scheduler.beta_end")),
    train("scheduler.beta_schedule=quadratic"), train("scheduler.rescale_betas_zero_snr=maybe"),
    train("scheduler=ve", "scheduler.sigma_min=-1"),
    train("scheduler=ve", "scheduler.sigma_min=100", names=("scheduler.sigma_min",)),
    train("scheduler=edm", "scheduler.sigma_data=0"),
    train("scheduler=edm", "scheduler.p_std=abc"),
    train("scheduler=vp_continuous", "scheduler.beta_min=-1"),
    train("scheduler=flow", "scheduler.shift=0"), train("scheduler=flow", "scheduler.density=abc"),
    # the loss and the LR schedule
    train("loss=min_snr", "loss.weighting.gamma=-1"),
    train("loss=target_mse", "loss.weighting.target=noise"),
    train("lr_schedule.warmup_steps=-1"), train("lr_schedule.warmup_steps=abc"),
    train("lr_schedule=cosine", "lr_schedule.total_steps=0"),
    train("lr_schedule=cosine", "lr_schedule.min_factor=2"),
    train("lr_schedule=inverse_sqrt", "lr_schedule.ref_steps=0"),
    # callbacks and metrics
    train("callbacks.ema.max_decay=1.5"), train("callbacks.ema.power=abc"),
    train("callbacks.ema.update_every_n_steps=0"),
    train("callbacks.sample_grid.num_samples=0"),
    train("callbacks.model_checkpoint.every_n_train_steps=-1"),
    train("callbacks.model_checkpoint.save_top_k=-5"),
    train("callbacks.preemption.check_every_n_steps=0"),
    train("+callbacks.progress_bar.refresh_rate=-1"),
    train("metrics=fid_tiny", "metrics.fid.evaluator.num_samples=0"),
    train("metrics=fid_tiny", "metrics.fid.evaluator.num_samples=abc"),
    train("metrics=fid_tiny", "metrics.fid.evaluator.batch_size=0"),
    train("metrics=fid_tiny", "metrics.fid.pairs=[{sampler:rk45,num_steps:10}]",
          names=("metrics.fid.pairs",)),
]

EVAL_CASES = [
    evaluate("guidance_scale=nan"), evaluate("guidance_scale=-5"), evaluate("guidance_scale=abc"),
    evaluate("compile=no"), evaluate("weights=foo"), evaluate("precision=64"),
    evaluate("device=tpu"), evaluate("device=cuda:99"), evaluate("grid_samples=0"),
    evaluate("grid_samples=abc"), evaluate("batch_size=0"), evaluate("batch_size=abc"),
    evaluate("seed=-1"), evaluate("seed=abc"), evaluate("seed=null"),
    evaluate("console.config_tree=long"), evaluate("console.show_warnings=maybe"),
    evaluate("ema.sigma_rel=5"), evaluate("ema.sigma_rel=abc"),
    evaluate("pretrained_image_seq_len=0"),
    # checkpoints and pretrained folders
    evaluate("ckpt_path={missing}"), evaluate("ckpt_path={folder}"),
    evaluate("ckpt_path={zero_ckpt}", names=("{zero_ckpt}",)),
    evaluate("ckpt_path={state_dict_ckpt}", names=("{state_dict_ckpt}",)),
    evaluate("ckpt_path={no_state_dict_ckpt}", names=("{no_state_dict_ckpt}",)),
    evaluate("ckpt_path={no_config_ckpt}", names=("{no_config_ckpt}",)),
    evaluate("ckpt_path={module_ckpt}", names=("{module_ckpt}",)),
    evaluate("ckpt_path={text_ckpt}", names=("{text_ckpt}",)),
    evaluate("ckpt_path=null", names=("ckpt_path",)),
    evaluate("pretrained={empty_folder}", names=("pretrained",)),
    evaluate("ckpt_path=null", "pretrained={missing}", names=("pretrained",)),
    # the results file
    evaluate("results_file={results_symlink}", names=("results_file",)),
    evaluate("results_file={foreign_file}", names=("results_file",)),
    evaluate("results_file={lightning_csv}", names=("results_file",)),
    evaluate("results_file={folder}", names=("results_file",)),
    evaluate("results_file={file}/results.csv", names=("results_file",)),
    # the sampler and the metrics
    evaluate("sampler.eta=5"), evaluate("sampler.eta=abc"), evaluate("sampler.num_steps=0"),
    evaluate("sampler.spacing=sideways"), evaluate("sampler=unipc", "sampler.order=9"),
    evaluate("sampler=heun", "sampler.s_noise=-1"), evaluate("+sampler.order=3"),
    evaluate("metrics=fid_tiny", "metrics.fid.evaluator.num_samples=0"),
    evaluate("metrics=fid_tiny", "metrics.fid.evaluator.kid_subset_size=abc"),
]

EXPORT_CASES = [
    export("ckpt_path={ckpt}", "out={tmp}/out", "overwrite=banana"),
    export("ckpt_path={ckpt}", "out={tmp}/out", "weights=foo"),
    export("ckpt_path={ckpt}", "out={tmp}/out", "pipeline=bar"),
    export("ckpt_path={ckpt}", "out={tmp}/out", "pipeline=flow"),
    export("ckpt_path={missing}", "out={tmp}/out", names=("ckpt_path",)),
    export("ckpt_path={folder}", "out={tmp}/out", names=("ckpt_path",)),
    export("ckpt_path={zero_ckpt}", "out={tmp}/out", names=("{zero_ckpt}",)),
    export("ckpt_path={state_dict_ckpt}", "out={tmp}/out", names=("{state_dict_ckpt}",)),
    export("ckpt_path={no_state_dict_ckpt}", "out={tmp}/out", names=("{no_state_dict_ckpt}",)),
    export("ckpt_path={no_config_ckpt}", "out={tmp}/out", names=("{no_config_ckpt}",)),
    export("ckpt_path={module_ckpt}", "out={tmp}/out", names=("{module_ckpt}",)),
    export("ckpt_path={text_ckpt}", "out={tmp}/out", names=("{text_ckpt}",)),
    export("ckpt_path={ckpt}", "out={file}", names=("out",)),
    export("ckpt_path={ckpt}", "out={full_folder}", names=("out",)),
    export("ckpt_path={ckpt}", "out={full_folder}", "overwrite=true", names=("out",)),
    export("ckpt_path={ckpt}", names=("out",)),
    export("out={tmp}/out", names=("ckpt_path",)),
    export("ckpt_path={ckpt}", "out={tmp}/out", "weight=raw", names=("weight",)),
    export("ckpt_path={ckpt}", "{tmp}/out", names=("{tmp}/out",)),
    export("ckpt_path={ckpt}", "out=[1,2]", names=("out",)),
]

CASES = [*TRAIN_CASES, *EVAL_CASES, *EXPORT_CASES]
#: The table's size by entry point (docs/ERRORS.md quotes these numbers).
TOTALS = Counter(case.entry for case in CASES)


# ------------------------------------------------------------------------------------ files

def _tiny_checkpoint(folder: Path) -> dict:
    """A train.py-style checkpoint of a freshly built unet_tiny run (no training needed)."""
    import lightning as L

    from diffsweep.assembly import build_module

    cfg = compose_config("train", TRAIN_BASE, folder / "ckpt_run")
    module = build_module(cfg)
    state = module.state_dict()
    return {"state_dict": state, "current_model_state": state,
            "diffsweep_config": module.config, "global_step": 0, "epoch": 0,
            "pytorch-lightning_version": L.__version__}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The placeholders of the table: a good checkpoint and bad files of every kind."""
    root = tmp_path_factory.mktemp("bad_inputs")
    checkpoint = _tiny_checkpoint(root)
    paths = {name: root / name for name in (
        "ckpt.ckpt", "zero.ckpt", "state_dict.ckpt", "no_state_dict.ckpt", "no_config.ckpt",
        "module.ckpt", "text.ckpt", "folder", "empty_folder", "file.txt", "full_folder",
        "results_target.csv", "results_symlink.csv", "foreign.csv", "metrics.csv")}
    torch.save(checkpoint, paths["ckpt.ckpt"])
    paths["zero.ckpt"].write_bytes(b"")
    torch.save(checkpoint["state_dict"], paths["state_dict.ckpt"])
    torch.save({key: value for key, value in checkpoint.items() if key != "state_dict"},
               paths["no_state_dict.ckpt"])
    torch.save({key: value for key, value in checkpoint.items() if key != "diffsweep_config"},
               paths["no_config.ckpt"])
    torch.save(torch.nn.Linear(2, 2), paths["module.ckpt"])
    paths["text.ckpt"].write_text("not a checkpoint\n")
    for name in ("folder", "empty_folder", "full_folder"):
        paths[name].mkdir()
    (paths["folder"] / "notes.txt").write_text("a folder with a file\n")
    (paths["full_folder"] / "thesis.tex").write_text("\\documentclass{article}\n")
    paths["file.txt"].write_text("a plain file\n")
    paths["results_target.csv"].write_text("sampler,num_steps,seed\nddim,2,0\n")
    paths["results_symlink.csv"].symlink_to(paths["results_target.csv"])
    paths["foreign.csv"].write_text("#!/bin/sh\necho 'my own script'\n")
    paths["metrics.csv"].write_text("epoch,step,train/loss\n0,1,0.5\n")
    return {"ckpt": str(paths["ckpt.ckpt"]), "zero_ckpt": str(paths["zero.ckpt"]),
            "state_dict_ckpt": str(paths["state_dict.ckpt"]),
            "no_state_dict_ckpt": str(paths["no_state_dict.ckpt"]),
            "no_config_ckpt": str(paths["no_config.ckpt"]),
            "module_ckpt": str(paths["module.ckpt"]), "text_ckpt": str(paths["text.ckpt"]),
            "folder": str(paths["folder"]), "empty_folder": str(paths["empty_folder"]),
            "full_folder": str(paths["full_folder"]), "file": str(paths["file.txt"]),
            "missing": str(root / "no_such_file.ckpt"),
            "results_symlink": str(paths["results_symlink.csv"]),
            "foreign_file": str(paths["foreign.csv"]), "lightning_csv": str(paths["metrics.csv"])}


# ------------------------------------------------------------------------------------ composing

def _is_group_choice(arg: str) -> bool:
    key = arg.split("=", 1)[0]
    return "." not in key and not key.startswith(("+", "~")) and (CONFIGS / key).is_dir()


@functools.cache
def _override_parser() -> OverridesParser:
    return OverridesParser.create()


@functools.cache
def _composed(config_name: str, choices: tuple[str, ...]) -> tuple[DictConfig, DictConfig]:
    """(the composed config with its ``hydra`` node, the task config without it: what Hydra
    passes to the task function)."""
    base = TRAIN_BASE if config_name == "train" else []
    composed = compose_config(config_name, [*base, *choices], Path("/nonexistent/base"))
    task = copy.deepcopy(composed)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return composed, task


def compose_case(config_name: str, args: list[str], output_dir: Path) -> DictConfig:
    """The task config of ``compose_config(config_name, [*base, *args], output_dir)`` from a
    cached composition of the case's group choices (see the module docstring); ``HydraConfig``
    holds that composition (its group choices; its overrides and run dir are the base's)."""
    choices = tuple(arg for arg in args if _is_group_choice(arg))
    values = [arg for arg in args if not _is_group_choice(arg)]
    composed, task = _composed(config_name, choices)
    if not HydraConfig.initialized() or \
            HydraConfig.get().runtime.choices != composed.hydra.runtime.choices:
        HydraConfig.instance().set_config(composed)
    cfg = copy.deepcopy(task)
    overrides = _override_parser().parse_overrides([*values, f"paths.root_dir={output_dir}"])
    ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def test_a_cached_composition_equals_a_full_compose(tmp_path):
    args = ["sampler=unipc", "sampler.order=5", "++trainer.limit_val_batches=-1",
            "module.optimizer.betas=[2,3]", "~callbacks.ema"]
    full = compose_config("train", [*TRAIN_BASE, *args], tmp_path)
    cached = compose_case("train", args, tmp_path)
    assert "hydra" not in cached and HydraConfig.get().runtime.choices.sampler == "unipc"
    assert OmegaConf.to_yaml(cached) == OmegaConf.to_yaml(
        {key: value for key, value in full.items() if key != "hydra"})


# ------------------------------------------------------------------------------------ entry points

def _train_error(cfg, monkeypatch) -> BaseException:
    """``diffsweep.train.run(cfg)`` up to the first training step: what Lightning's fit does
    first with the data and the optimizer, then a stop."""
    import lightning as L

    from diffsweep.train import run

    def fit_until_first_step(trainer, model, datamodule=None, ckpt_path=None, **kwargs):
        datamodule.prepare_data()
        datamodule.setup("fit")
        model.configure_optimizers()
        raise ReachedExpensiveWork("training would start")

    monkeypatch.setattr(L.Trainer, "fit", fit_until_first_step)
    with pytest.raises(Exception) as caught:
        run(cfg)
    return caught.value


def _error_before(monkeypatch, owner, name: str, work: str, call) -> BaseException:
    """The error ``call()`` raises, with ``owner.name`` (its first expensive step) replaced by a
    stop (:class:`ReachedExpensiveWork` saying ``work`` would start)."""
    def stop(*args, **kwargs):
        raise ReachedExpensiveWork(f"{work} would start")

    monkeypatch.setattr(owner, name, stop)
    with pytest.raises(Exception) as caught:
        call()
    return caught.value


def _evaluate_error(cfg, monkeypatch) -> BaseException:
    """``diffsweep.evaluate.run(cfg)`` up to the first sample."""
    from diffsweep import evaluate

    return _error_before(monkeypatch, evaluate, "generate", "sampling", lambda: evaluate.run(cfg))


def _export_error(args: list[str], monkeypatch) -> BaseException:
    """``python -m diffsweep.export args...`` (its ``main``) up to the conversion."""
    from diffsweep import export

    return _error_before(monkeypatch, export, "diffusers_net", "the export",
                         lambda: export.main(args))


def _placed(text: str, places: dict[str, str]) -> str:
    """``text`` with each ``{name}`` of ``places`` replaced (other braces, e.g. Hydra's dicts,
    stay)."""
    return re.sub(r"\{(\w+)\}", lambda match: places.get(match.group(1), match.group(0)), text)


def _error_of(case: Bad, files: dict[str, str], tmp_path: Path, monkeypatch) -> BaseException:
    places = {**files, "tmp": str(tmp_path)}
    args = [_placed(arg, places) for arg in case.args]
    if case.entry == "train":
        cfg = compose_case("train", args, tmp_path / "run")
        return _train_error(cfg, monkeypatch)
    if case.entry == "evaluate":
        base = [_placed(arg, places) for arg in EVAL_BASE]
        cfg = compose_case("evaluate", [*base, *args], tmp_path / "eval")
        return _evaluate_error(cfg, monkeypatch)
    return _export_error(args, monkeypatch)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_naming_the_key(case, files, tmp_path, monkeypatch):
    error = _error_of(case, files, tmp_path, monkeypatch)
    assert not isinstance(error, ReachedExpensiveWork), f"not refused: {error}"
    lines = user_error_lines(error)
    assert lines is not None, f"a traceback, not one line: {type(error).__name__}: {error}"
    assert len(lines) == 1, lines
    places = {**files, "tmp": str(tmp_path)}
    for name in case.names:
        assert _placed(name, places) in lines[0], lines[0]


def test_the_table_covers_each_entry_point():
    assert len(CASES) >= 150 and len({case.id for case in CASES}) == len(CASES)
    assert TOTALS["train"] >= 90 and TOTALS["evaluate"] >= 35 and TOTALS["export"] >= 15
    errors_doc = " ".join((REPO / "docs" / "ERRORS.md").read_text().split())
    assert (f"{len(CASES)} bad inputs: {TOTALS['train']} for train.py, {TOTALS['evaluate']} "
            f"for evaluate.py, {TOTALS['export']} for the export") in errors_doc


# ------------------------------------------------------------------------------------ terminals

#: Real commands (in a scratch folder): (script, arguments, error lines expected on stderr).
COMMANDS = {
    "train_sweep": ("train.py", ["-m", "seed=abc,-1", "hydra.sweep.dir=sweep"], 2),
    "evaluate": ("evaluate.py", ["ckpt_path=no_such.ckpt", "metrics=none", "hydra.run.dir=eval"],
                 1),
}


@pytest.fixture(scope="module", autouse=True)
def terminal_runs(tmp_path_factory):
    """The :data:`COMMANDS`, started together in the background when this module starts."""
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    env.pop("DIFFSWEEP_DEBUG", None)
    folder = tmp_path_factory.mktemp("terminal")
    processes = {name: subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=folder,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                 for name, (script, args, _) in COMMANDS.items()}
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
        process.communicate()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_terminal_shows_one_line_per_problem_and_no_traceback(name, terminal_runs):
    process = terminal_runs[name]
    _, stderr = process.communicate(timeout=240)
    lines = stderr.splitlines()
    assert process.returncode != 0
    assert "Traceback" not in stderr and "HYDRA_FULL_ERROR" not in stderr, stderr
    assert len(lines) == COMMANDS[name][2] and all(line.startswith("error: ") for line in lines), \
        stderr
    if name == "train_sweep":
        assert lines[0].startswith("error: job #0: seed='abc'")
        assert lines[1].startswith("error: job #1: seed=-1")
