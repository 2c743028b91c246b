"""End-to-end behaviour of ``train.py``: runs, checkpoints, reproducibility, clear errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from diffsweep.checkpoints import CheckpointMismatchError, load_module
from diffsweep.generate import generate
from diffsweep.train import run
from tests.conftest import FAST, run_entry_point


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


def _sample(module, num_samples: int, seed: int, **kwargs) -> torch.Tensor:
    return generate(module.denoiser, module.sampler, num_samples, module.image_shape,
                    generator=torch.Generator().manual_seed(seed), **kwargs)


def test_entry_point_smoke_run_writes_grid_checkpoint_and_config(tmp_path):
    result = run_entry_point("train.py", *FAST, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert (run_dir / "samples" / "final.png").is_file()
    assert (run_dir / "samples" / "step_0000002.png").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config_tree.log").read_text().count("scheduler") >= 1
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert len(_losses(run_dir)) == 4


@pytest.mark.slow  # > 5 s: runs in .ci/run's slow step
def test_unknown_config_option_names_the_choices(tmp_path):
    result = run_entry_point("train.py", "scheduler=cosinus", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("error: scheduler=cosinus is not an option")
    assert "linear" in result.stderr and "cosine" in result.stderr  # the available options
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # > 5 s: runs in .ci/run's slow step
def test_missing_image_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_folder"
    result = run_entry_point("train.py", "data=image_folder", f"data.root={missing}", cwd=tmp_path)
    assert result.returncode != 0
    assert str(missing) in result.stderr and "data.root" in result.stderr


@pytest.mark.slow  # > 5 s: runs in .ci/run's slow step
def test_loss_decreases_when_overfitting(train_config):
    cfg = train_config("debug=overfit", "trainer.max_steps=80", "trainer.val_check_interval=80",
                       "module.optimizer.lr=2e-3", "callbacks.sample_grid.at_train_end=false",
                       "callbacks.model_checkpoint.every_n_train_steps=1000")
    run(cfg)
    losses = _losses(Path(cfg.paths.output_dir))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_checkpoint_reloads_and_samples_identically(train_config):
    cfg = train_config()
    run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    first = load_module(run_dir / "checkpoints" / "last.ckpt")
    again = load_module(run_dir / "checkpoints" / "last.ckpt")
    samples = _sample(first, 4, 3)
    assert torch.equal(samples, _sample(again, 4, 3))
    # EMA and raw weights are both stored, and differ after training.
    raw = load_module(run_dir / "checkpoints" / "last.ckpt", weights="raw")
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), raw.parameters()))
    # The checkpoint's config names the schedule it was trained with.
    assert first.config["scheduler"]["beta_schedule"] == "linear"


def test_same_seed_gives_identical_weights(train_config, tmp_path):
    cfg = train_config("callbacks.sample_grid.at_train_end=false")
    run(cfg)
    weights_a = load_module(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").state_dict()
    cfg_b = train_config("callbacks.sample_grid.at_train_end=false",
                         f"hydra.run.dir={tmp_path / 'run_b'}")
    cfg_b.paths.output_dir = str(tmp_path / "run_b")
    cfg_b.callbacks.model_checkpoint.dirpath = str(tmp_path / "run_b" / "checkpoints")
    run(cfg_b)
    weights_b = load_module(tmp_path / "run_b" / "checkpoints" / "last.ckpt").state_dict()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_resume_with_other_model_config_is_refused(train_config):
    cfg = train_config()
    run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    other = train_config("model.base_channels=16", f"ckpt_path={ckpt}")
    with pytest.raises(CheckpointMismatchError, match="model"):
        run(other)


def test_class_conditional_training_and_guided_sampling(train_config):
    cfg = train_config("model.num_classes=10", "callbacks.sample_grid.at_train_end=false")
    run(cfg)
    module = load_module(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    labels = torch.arange(4)
    plain = _sample(module, 4, 0, class_labels=labels)
    guided = _sample(module, 4, 0, class_labels=labels, guidance_scale=3.0)
    assert plain.shape == guided.shape == (4, 1, 16, 16)
    assert torch.isfinite(guided).all() and not torch.equal(plain, guided)


@pytest.mark.slow  # > 5 s: runs in .ci/run's slow step
def test_plain_multirun_without_sweep_dir_override(tmp_path):
    """``python train.py -m ...`` with the default sweep dir (under the launch directory)."""
    result = run_entry_point("train.py", "-m", "debug=fast_dev_run", "scheduler=linear,cosine",
                             "data.batch_size=16", "sampler.num_steps=2",
                             "callbacks.sample_grid.num_samples=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "logs" / "debug" / "multiruns").glob("*/*")
                  if p.is_dir())
    assert jobs == ["0", "1"]


def test_a_run_without_loggers_trains_and_checkpoints(train_config):
    cfg = train_config("logger=none", "callbacks.sample_grid.at_train_end=false")
    run(cfg)  # the LR monitor, which needs a logger, is left out
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()
