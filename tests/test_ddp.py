"""DDP on CPU (gloo) with 2 processes: same training as 1 process at equal global batch; ranks > 0
rebuild the Hydra job (no re-run of argv), so ``-m`` sweeps run each job once;
rank 0 alone writes."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from diffsweep import launch
from diffsweep.train import run
from tests.conftest import FAST, run_entry_point

#: A tiny net, no validation, no grids: the DDP tests measure training only.
TINY = ["model.base_channels=8", "model.channel_mults=[1,2]", "model.num_res_blocks=1",
        "model.attention_resolutions=[]", "data.resolution=8", "++trainer.limit_val_batches=0",
        "callbacks.sample_grid=null", "trainer.accelerator=cpu",
        # the 1-vs-2-process equality (1e-5) is an fp32 claim: bf16 autocast (precision auto on
        # this CPU) rounds each rank's half-batch gradient differently (~5e-4 after 4 steps)
        "trainer.precision=32-true"]
DDP2 = ["trainer=ddp", "trainer.devices=2"]


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a
               if a[k].is_floating_point())


# ------------------------------------------------------------------ launcher units (fast)


def record_task(cfg) -> dict:
    """A task for ``rank_main``: what a rank process sees."""
    return {"config": cfg, "cwd": os.getcwd(),
            "output_dir": (HydraConfig.get().runtime.output_dir if HydraConfig.initialized()
                           else None)}


def test_job_file_rebuilds_the_jobs_config_in_a_rank_process(train_config, tmp_path, monkeypatch):
    cfg = train_config("scheduler=cosine")
    with launch.hydra_job(cfg, "tests.test_ddp:record_task"):
        job = launch._current_job
        path = launch.write_job_file(job, launch.job_file_path(job))
    assert path == Path(cfg.paths.output_dir) / ".hydra" / launch.JOB_FILE
    assert launch._current_job is None
    monkeypatch.chdir(tmp_path)  # rank_main changes directory: restore it after the test
    seen = launch.rank_main(path, job.task)
    expected = {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value)
                else value for key, value in cfg.items() if key != "hydra"}
    assert OmegaConf.to_container(seen["config"]) == expected  # same config, resolved
    assert seen["config"].scheduler.beta_schedule == "squaredcos_cap_v2"
    assert seen["output_dir"] == str(cfg.paths.output_dir)  # the same job directory
    assert seen["cwd"] == job.cwd


def test_a_rank_runs_the_task_its_launcher_names_not_the_job_files(train_config, tmp_path,
                                                                    monkeypatch):
    """An edited job file cannot choose what a rank process calls: the task comes from the
    launching process's command line."""
    cfg = train_config("scheduler=cosine")
    with launch.hydra_job(cfg, "tests.test_ddp:record_task"):
        path = launch.write_job_file(launch._current_job, launch.job_file_path(launch._current_job))
    document = OmegaConf.load(path)
    document.task = "os:system"
    OmegaConf.save(document, path)
    monkeypatch.chdir(tmp_path)
    seen = launch.rank_main(path, "tests.test_ddp:record_task")
    assert seen["config"].scheduler.beta_schedule == "squaredcos_cap_v2"


def test_job_scope_restores_the_ddp_environment(train_config, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "example")
    for key in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with launch.hydra_job(train_config(), "diffsweep.train:run"):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", LOCAL_RANK="0",
                          WORLD_SIZE="2")
    # Otherwise the next job of a sweep would think its ranks exist already (LOCAL_RANK set).
    assert os.environ["MASTER_ADDR"] == "example"
    assert not {"LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"} & set(os.environ)


def test_trainer_ddp_config_selects_the_hydra_aware_strategy(train_config):
    from hydra.utils import instantiate

    from diffsweep.assembly import resolve_precision

    cfg = train_config(*DDP2, "trainer.accelerator=cpu")
    trainer = instantiate(cfg.trainer, logger=False, precision=resolve_precision(cfg.trainer))
    assert isinstance(trainer.strategy, launch.HydraDDPStrategy)
    assert isinstance(trainer.strategy.launcher, launch._HydraJobLauncher)
    assert trainer.world_size == 2 and trainer.strategy.process_group_backend in (None, "gloo")


# ------------------------------------------------------------------ end to end (2 processes)


@pytest.mark.slow
def test_two_processes_match_one_process_at_equal_global_batch(train_config, tmp_path):
    """After 4 steps: logged (rank-averaged) losses, EMA and raw weights agree within 1e-5."""
    overrides = [*FAST, *TINY, "data.batch_size=16",
                 "callbacks.model_checkpoint.every_n_train_steps=4"]
    cfg = train_config(*TINY, "data.batch_size=16",
                       "callbacks.model_checkpoint.every_n_train_steps=4")
    run(cfg)
    single = Path(cfg.paths.output_dir)

    work = tmp_path / "ddp_cwd"
    work.mkdir()
    result = run_entry_point("train.py", *overrides, *DDP2, "hydra.run.dir=ddp", cwd=work)
    assert result.returncode == 0, result.stderr[-4000:]
    ddp = work / "ddp"
    log = result.stdout + result.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "Starting with 2 processes" in log

    losses_1, losses_2 = _losses(single), _losses(ddp)
    assert len(losses_1) == len(losses_2) == 4
    assert max(abs(a - b) for a, b in zip(losses_1, losses_2)) < 1e-5, (losses_1, losses_2)
    ckpt_1, ckpt_2 = _checkpoint(single), _checkpoint(ddp)
    assert ckpt_1["global_step"] == ckpt_2["global_step"] == 4
    assert _max_abs_diff(ckpt_1["state_dict"], ckpt_2["state_dict"]) < 1e-5  # EMA weights
    assert _max_abs_diff(ckpt_1["current_model_state"], ckpt_2["current_model_state"]) < 1e-5

    # Rank 0 alone wrote: one run dir (no Hydra dirs from rank 1), one metrics file.
    assert sorted(p.name for p in work.iterdir()) == ["ddp"]
    assert (ddp / ".hydra" / launch.JOB_FILE).is_file()
    assert len(list(ddp.rglob("metrics.csv"))) == 1


@pytest.mark.slow
def test_multirun_with_ddp_runs_each_job_once_with_two_ranks(tmp_path):
    overrides = [*FAST, *TINY, "callbacks.model_checkpoint.every_n_train_steps=4"]
    result = run_entry_point("train.py", "-m", "scheduler=linear,cosine", *DDP2, *overrides,
                             "hydra.sweep.dir=sweep", cwd=tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    # Each job: 2 ranks, started once (Lightning's default would re-run the sweep per rank).
    assert len(re.findall(r"GLOBAL_RANK: 0, MEMBER: 1/2", log)) == 2, log[-4000:]
    assert len(re.findall(r"GLOBAL_RANK: 1, MEMBER: 2/2", log)) == 2, log[-4000:]
    assert log.count("Launching 2 jobs") == 1

    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no stray run/sweep dirs
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job, schedule in (("0", "linear"), ("1", "squaredcos_cap_v2")):
        job_dir = sweep / job
        assert len(_losses(job_dir)) == 4  # trained once: max_steps rows
        assert _checkpoint(job_dir)["global_step"] == 4
        rank_job = OmegaConf.load(job_dir / ".hydra" / launch.JOB_FILE)
        assert rank_job.config.scheduler.beta_schedule == schedule  # rank 1 ran this job's config
        assert rank_job.config.paths.output_dir == str(job_dir.resolve())


def test_several_devices_without_trainer_ddp_also_use_the_hydra_aware_strategy(train_config):
    from diffsweep.assembly import default_strategy
    from diffsweep.launch import HydraDDPStrategy

    assert isinstance(default_strategy(train_config("trainer.devices=4").trainer)["strategy"],
                      HydraDDPStrategy)
    assert default_strategy(train_config("trainer.devices=1").trainer) == {}
    assert default_strategy(train_config("trainer=ddp").trainer) == {}  # its own strategy
