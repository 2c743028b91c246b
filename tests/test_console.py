"""A quiet console: harmless warnings filtered in one place (with a switch), the short config
tree, one progress bar per run in steps, readable schedule reprs, quick debug configs."""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from diffsweep import console
from diffsweep.hydra_utils import print_config_tree
from tests.conftest import CONFIGS, REPO, compose_config, run_entry_point


@pytest.fixture
def no_show_env(monkeypatch):
    monkeypatch.delenv(console.SHOW_WARNINGS_ENV, raising=False)


def _emit(message: str) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet()
        warnings.warn(message, UserWarning)
    return [str(w.message) for w in caught]


def test_quiet_filters_each_harmless_warning_in_one_place(no_show_env, monkeypatch):
    samples = {
        "The `srun` command is available on your system but is not used. HINT: ...",
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
        "The number of training batches (12) is smaller than the logging interval Trainer(...)",
        "Checkpoint directory /x/checkpoints exists and is not empty.",
    }
    assert len([h for h in console.HARMLESS if h.kind == "warning"]) == len(samples)
    for message in samples:
        assert _emit(message) == [], message
    assert _emit("Something else went wrong") == ["Something else went wrong"]
    assert all(item.why for item in console.HARMLESS)
    # the switch: DIFFSWEEP_SHOW_WARNINGS=1 (or console.show_warnings=true) installs nothing
    monkeypatch.setenv(console.SHOW_WARNINGS_ENV, "1")
    for message in samples:
        assert _emit(message) == [message]


def test_quiet_silences_the_real_emitters(no_show_env, monkeypatch, caplog, tmp_path):
    """The patterns match what Lightning and torch really say (srun hint, LeafSpec, the
    litlogger/litmodels tips); Lightning's other lines stay."""
    import lightning as L
    from lightning.fabric.plugins.environments.slurm import SLURMEnvironment

    def trainer():
        L.Trainer(logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path)

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/srun")
    for name in console._LIGHTNING_INFO_LOGGERS:  # as before any quiet() in this process
        for existing in list(logging.getLogger(name).filters):
            logging.getLogger(name).removeFilter(existing)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        SLURMEnvironment._validate_srun_used()
        torch.utils._pytree.LeafSpec()
        trainer()
        assert len(caught) >= 2 and "Tip: For seamless cloud" in caplog.text  # without filters
        caught.clear()
        caplog.clear()
        console.quiet()
        SLURMEnvironment._validate_srun_used()
        torch.utils._pytree.LeafSpec()
        trainer()
    assert [str(w.message) for w in caught] == []
    assert "Tip" not in caplog.text and "GPU available" in caplog.text  # only the ads go


def test_console_options_defaults_and_bad_values():
    assert console.console_options({}) == {"config_tree": "short", "show_warnings": False}
    assert console.console_options({"console": {"config_tree": "full"}})["config_tree"] == "full"
    with pytest.raises(ValueError, match="console.config_tree must be short, full or none; "
                                         "got 'long'"):
        console.console_options({"console": {"config_tree": "long"}})
    evaluate = (CONFIGS / "evaluate.yaml").read_text()
    assert "config_tree: short" in evaluate and "show_warnings: false" in evaluate


def test_config_tree_is_short_on_screen_and_full_in_the_run_dir(tmp_path, capsys):
    cfg = compose_config("train", ["scheduler=cosine", "trainer.max_steps=7"], tmp_path)
    saved = tmp_path / "config_tree.log"
    print_config_tree(cfg, save_to=saved)
    short = capsys.readouterr().out
    assert len(short.splitlines()) <= 12, short
    assert "scheduler=cosine" in short and "trainer.max_steps=7" in short
    assert str(saved) in short and str(tmp_path) in short
    full = saved.read_text()
    assert len(full.splitlines()) > 100 and "beta_schedule: squaredcos_cap_v2" in full
    print_config_tree(cfg, save_to=None, style="full")
    assert len(capsys.readouterr().out.splitlines()) > 100
    print_config_tree(cfg, save_to=tmp_path / "again.log", style="none")
    assert capsys.readouterr().out == "" and (tmp_path / "again.log").read_text() == full
    with pytest.raises(ValueError, match="short, full or none"):
        print_config_tree(cfg, style="tall")


class _Steps(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, index):
        return torch.zeros(1)


def _toy_fit(tmp_path, bar, max_steps=7, ckpt_path=None):
    import lightning as L

    class Toy(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, index):
            loss = (self.w - 1).pow(2).sum()
            self.log("train/loss", loss, prog_bar=True)
            return loss

        def train_dataloader(self):
            return torch.utils.data.DataLoader(_Steps(), batch_size=2)  # 3 batches per epoch

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_steps=max_steps, max_epochs=-1, callbacks=[bar], logger=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        enable_checkpointing=ckpt_path is None, accelerator="cpu")
    trainer.fit(Toy(), ckpt_path=ckpt_path)
    return trainer


def test_one_progress_bar_per_run_in_steps(tmp_path, capsys):
    """3 batches per epoch, 7 steps: one bar of 7 steps, never reset at an epoch; a resumed run
    starts it at its step."""
    bar = console.StepProgressBar(refresh_rate=1)
    seen = []
    original = bar.on_train_batch_end

    def spy(trainer, *args):
        original(trainer, *args)
        seen.append((bar.train_progress_bar.n, bar.train_progress_bar.total))

    bar.on_train_batch_end = spy
    trainer = _toy_fit(tmp_path, bar)
    assert trainer.current_epoch >= 2 and seen == [(n, 7) for n in range(1, 8)]
    output = capsys.readouterr().out
    assert "Epoch" not in output and "7/7" in output and "step/s" in output
    assert "v_num" not in output and "train/loss" in output
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")  # written at step 7
    resumed = console.StepProgressBar(refresh_rate=1)
    starts = []
    original_start = resumed.on_train_start

    def spy_start(trainer, module):
        original_start(trainer, module)
        starts.append((resumed.train_progress_bar.n, resumed.train_progress_bar.total))

    resumed.on_train_start = spy_start
    _toy_fit(tmp_path / "more", resumed, max_steps=9, ckpt_path=str(ckpt))
    assert starts == [(7, 9)]


def test_without_a_progress_bar_callback_lightning_adds_none(tmp_path):
    """``~callbacks.progress_bar``: no bar at all, not Lightning's Rich bar (``Epoch 0/-2``)."""
    from diffsweep.assembly import build_callbacks, build_trainer

    assert console.progress_bar_kwargs({}, [console.StepProgressBar()]) == {}
    assert console.progress_bar_kwargs({}, []) == {"enable_progress_bar": False}
    assert console.progress_bar_kwargs({"enable_progress_bar": True}, []) == {}
    cfg = compose_config("train", ["~callbacks.progress_bar", "trainer=cpu"], tmp_path)
    trainer = build_trainer(cfg, build_callbacks(cfg), [])
    assert trainer.progress_bar_callback is None
    cfg = compose_config("train", ["trainer=cpu"], tmp_path)
    trainer = build_trainer(cfg, build_callbacks(cfg), [])
    assert isinstance(trainer.progress_bar_callback, console.StepProgressBar)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "scheduler").glob("*.yaml")))
def test_schedules_print_their_parameters(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    text = repr(instantiate(OmegaConf.load(CONFIGS / "scheduler" / f"{name}.yaml")))
    assert " object at 0x" not in text and re.match(r"^\w+Schedule\(\w+=", text), text


def test_fast_dev_run_draws_one_small_grid(train_config, monkeypatch):
    """debug=fast_dev_run: one grid, few sampler steps (the final grid copies the step-1 one)."""
    from diffsweep.callbacks import samples
    from diffsweep.train import run

    calls = []
    real_generate = samples.generate

    def spy(denoiser, sampler, num_samples, image_shape, **kwargs):
        calls.append((sampler.num_steps, num_samples))
        return real_generate(denoiser, sampler, num_samples, image_shape, **kwargs)

    monkeypatch.setattr(samples, "generate", spy)
    cfg = train_config("debug=fast_dev_run", fast=False)
    assert cfg.sampler.num_steps <= 4 and cfg.logger is None
    run(cfg)
    assert calls == [(cfg.sampler.num_steps, cfg.callbacks.sample_grid.num_samples)]
    grids = Path(cfg.paths.output_dir) / "samples"
    assert (grids / "final.png").read_bytes() == (grids / "step_0000001.png").read_bytes()


def test_debug_limit_runs_a_few_batches_of_every_loop(train_config):
    from diffsweep.train import run

    cfg = train_config("debug=limit", "data.batch_size=16", "logger=csv", fast=False)
    assert cfg.trainer.limit_train_batches == 4 and cfg.trainer.max_epochs == 2
    metrics = run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "final.png", "step_0000004.png", "step_0000008.png"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and "val/loss" in metrics
    rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    assert len(rows) > 8


@pytest.mark.slow  # a train.py process
def test_a_training_command_prints_no_harmless_warning(tmp_path):
    """README ``python train.py`` (tiny, logger=many): a short config tree, no known-harmless
    warning, no W&B anonymous notice, one bar in steps; with DIFFSWEEP_SHOW_WARNINGS=1 they are
    back."""
    import os

    command = ["logger=many", "trainer.max_steps=3", "trainer.val_check_interval=3",
               "data.batch_size=16", "sampler.num_steps=2", "callbacks.sample_grid.num_samples=2"]
    result = run_entry_point("train.py", *command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for item in console.HARMLESS:
        assert not re.search(item.pattern, output), item.pattern
    assert "anonymous" not in output and "Epoch 0" not in output and "3/3" in output
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("CONFIG"))
    end = next(i for i, line in enumerate(lines) if "run dir:" in line)
    assert end - start <= 15  # the short tree (long temporary paths wrap), not ~160 lines
    os.environ[console.SHOW_WARNINGS_ENV] = "1"
    try:
        shown = run_entry_point("train.py", *command, "resume=never", cwd=tmp_path)
    finally:
        del os.environ[console.SHOW_WARNINGS_ENV]
    assert shown.returncode == 0 and "LeafSpec" in shown.stdout + shown.stderr


@pytest.mark.parametrize("path", sorted(
    [*(CONFIGS / "logger").glob("*.yaml"), *(CONFIGS / "debug").glob("*.yaml"),
     *(CONFIGS / "hparams_search").glob("*.yaml")]), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_console_and_logger_configs_comment_every_option(path):
    """Every option (a key with a value) has a one-line comment; nodes and _target_ need none."""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        match = re.match(r"^([A-Za-z_@/.]+):\s*(\S.*)?$", stripped)
        if not match or match.group(1) in ("_target_", "defaults"):
            continue
        value = (match.group(2) or "").split("#")[0].strip()
        if value:
            assert "#" in line, f"{path.name}: no comment on {stripped!r}"
