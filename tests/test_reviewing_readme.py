"""The README's commands that run on a CPU, each at tiny size (the README's overrides last, so
they win over the tiny ones). GPU, SLURM and download commands are composed only.

Covered elsewhere: ``python train.py`` (tests/test_console.py, tests/test_train.py),
``debug=fast_dev_run`` / ``debug=limit`` (tests/test_console.py), ``logger=wandb`` /
``logger=many`` (tests/test_loggers.py), a killed run rerun (tests/test_reviewing_resume.py,
tests/test_resume.py), ``-m hydra/launcher=joblib`` and ``hparams_search=lr_ema`` and the
evaluation sweep in W&B (tests/test_reviewing_sweeps.py), DDP on CPU (tests/test_ddp.py), SLURM
(tests/test_slurm.py), ``evaluate.py ... -m sampler=... sampler.num_steps=...``
(tests/test_evaluate.py), ``data=latents`` (tests/test_latent_training.py).
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, REPO, compose_config, run_entry_point

README = (REPO / "README.md").read_text()


def _train(train_config, *overrides):
    from diffsweep.train import run

    cfg = train_config(*overrides)
    return cfg, run(cfg)


def test_readme_change_anything_example(train_config):
    """``python train.py scheduler=cosine sampler=dpmpp_2m sampler.num_steps=20``"""
    cfg, metrics = _train(train_config, "scheduler=cosine", "sampler=dpmpp_2m",
                          "sampler.num_steps=20")
    assert cfg.scheduler.beta_schedule == "squaredcos_cap_v2" and cfg.sampler.num_steps == 20
    assert (Path(cfg.paths.output_dir) / "samples" / "final.png").is_file()
    assert "val/loss" in metrics


def test_readme_gpu_examples_compose(tmp_path):
    """``data=mnist data.root=/path/to/mnist model=unet_small trainer=gpu`` and
    ``scheduler=cosine trainer.devices=4``: GPU commands, composed (not run) here."""
    cfg = compose_config("train", ["data=mnist", "data.root=/path/to/mnist", "model=unet_small",
                                   "trainer=gpu"], tmp_path)
    assert cfg.data.root == "/path/to/mnist" and cfg.trainer.precision == "bf16-mixed"
    cfg = compose_config("train", ["scheduler=cosine", "trainer.devices=4"], tmp_path)
    assert cfg.trainer.devices == 4


@pytest.mark.slow  # > 5 s: runs in .ci/run's slow step
def test_readme_image_folder_example_uses_a_path_hydra_accepts(train_config, tmp_path):
    """``data=image_folder data.root=$HOME/pictures data.resolution=64 ...``: the shell expands
    ``$HOME``; Hydra's grammar rejects a bare ``~`` (the README never writes ``=~/``). Run here on
    a folder of PNGs at 16x16 on one CPU process."""
    from PIL import Image

    result = subprocess.run([sys.executable, str(REPO / "train.py"), "data=image_folder",
                             "data.root=~/pictures", "--cfg", "job"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "~" in result.stderr  # what the old README line did
    folder = tmp_path / "pictures" / "cats"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(40):
        pixels = (torch.rand(20, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
    cfg, metrics = _train(train_config, "data=image_folder", f"data.root={tmp_path / 'pictures'}",
                          "data.resolution=16", "data.num_workers=0", "data.batch_size=8")
    assert tuple(cfg.module.image_shape) == (3, 16, 16) and "val/loss" in metrics


@pytest.mark.slow  # > 5 s: runs in .ci/run's slow step
def test_readme_print_the_composed_config(tmp_path):
    """``python train.py --cfg job`` prints the config and trains nothing."""
    result = run_entry_point("train.py", "--cfg", "job", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scheduler:" in result.stdout and "trainer:" in result.stdout
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow  # a 3-job sweep in a subprocess
def test_readme_study_sweep_and_its_resume(tmp_path):
    """``python train.py -m experiment=vp_vs_ve scheduler=linear,cosine,ve`` (tiny), then the
    same with ``hydra.sweep.dir=<that folder>``: each job resumes from its own last checkpoint."""
    tiny = [override for override in FAST if override != "~callbacks.progress_bar"]
    command = ["-m", "experiment=vp_vs_ve", "scheduler=linear,cosine,ve", *tiny,
               "trainer.max_steps=2", "trainer.val_check_interval=2", "hydra.sweep.dir=study"]
    first = run_entry_point("train.py", *command, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    study = tmp_path / "study"
    assert sorted(p.name for p in study.iterdir() if p.is_dir()) == ["0", "1", "2"]
    written = {}
    for job in ("0", "1", "2"):
        written[job] = (study / job / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    again = run_entry_point("train.py", *command, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for job in ("0", "1", "2"):  # each job picks up its own state; none trains from scratch
        log = (study / job / "train.log").read_text()
        assert "Resuming from" in log or "already finished" in log
        assert (study / job / "checkpoints" / "last.ckpt").stat().st_mtime_ns == written[job]


def test_readme_wandb_sync_command_finds_the_offline_runs(train_config):
    """``wandb sync <run dir>/wandb/offline-run-*`` (what the offline notice says) names the
    run's offline runs (a dry run: no network)."""
    import glob

    cfg, _ = _train(train_config, "logger=wandb")
    runs = glob.glob(str(Path(cfg.paths.output_dir) / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    wandb_cli = Path(sys.executable).with_name("wandb")
    result = subprocess.run([str(wandb_cli), "sync", "--dry-run", *runs], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Would sync 1 run" in result.stdout + result.stderr


@pytest.mark.slow  # > 5 s: runs in .ci/run's slow step
def test_readme_guidance_scale_axis_for_class_conditional_checkpoints(train_config, tmp_path):
    """``python evaluate.py ckpt_path=... -m guidance_scale=1,2,4`` (one job of it here): a
    class-conditional checkpoint samples balanced labels with CFG; the row has guidance_scale,
    KID and precision/recall; an unconditional checkpoint refuses a scale."""
    from diffsweep.evaluate import run as evaluate

    cfg, _ = _train(train_config, "model.num_classes=10",
                    "callbacks.sample_grid.at_train_end=false")
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    rows = []
    for scale in (1.0, 3.0):
        eval_cfg = compose_config("evaluate", [f"ckpt_path={ckpt}", f"guidance_scale={scale}",
                                               "metrics=fid_tiny",
                                               "metrics.fid.evaluator.num_samples=20",
                                               "grid_samples=4", "sampler.num_steps=2"],
                                  tmp_path / f"eval{scale}")
        rows.append(evaluate(eval_cfg))
    assert [row["guidance_scale"] for row in rows] == [1.0, 3.0]
    assert rows[0]["fid"] != rows[1]["fid"]
    assert all({"kid", "kid_std", "prc_precision", "prc_recall"} <= set(row) for row in rows)
    with open(Path(rows[0]["grid"]).parent.parent / "results.csv") as handle:
        assert {"guidance_scale", "kid", "prc_recall"} <= set(next(csv.DictReader(handle)))
    from diffsweep.train import run

    plain = compose_config("train", [*FAST, "callbacks.sample_grid.at_train_end=false"],
                           tmp_path / "plain_run")
    run(plain)
    unconditional = compose_config("evaluate", [
        f"ckpt_path={Path(plain.paths.output_dir) / 'checkpoints' / 'last.ckpt'}",
        "guidance_scale=2", "metrics=none", "grid_samples=2", "sampler.num_steps=2"],
        tmp_path / "plain")
    with pytest.raises(ValueError, match=re.escape("guidance_scale=2 needs a class-conditional "
                                                   "checkpoint")):
        evaluate(unconditional)


def test_readme_has_none_of_the_false_lines_issue_16_found():
    """The README lines that failed or were false: ``data.root=~/pictures`` (Hydra rejects
    ``~``), ``wandb sync`` pointed at the run dir (the offline runs are in
    ``<run dir>/wandb/offline-run-*``), joblib and Optuna undocumented."""
    assert "=~/" not in README
    assert "offline-run-*" in README
    assert "hydra/launcher=joblib" in README and "hparams_search=lr_ema" in README
    assert '".[sweep]"' in README
