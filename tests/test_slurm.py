"""SLURM: ``hydra/launcher=submitit_slurm`` composes, its launcher instantiates through Hydra's
plugin machinery and builds the sbatch script we expect (nothing is submitted: no cluster here);
DDP ranks started by SLURM are not relaunched by diffsweep's strategy."""

from __future__ import annotations

import lightning as L
import pytest
from hydra._internal.callbacks import Callbacks
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, RunMode
from lightning.fabric.plugins.environments import SLURMEnvironment

from diffsweep.launch import HydraDDPStrategy
from tests.conftest import CONFIGS

submitit = pytest.importorskip("submitit")
# Hydra validates our yaml against the plugin's schema of the same name, and says so.
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/submitit_slurm' is validated")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

SLURM_OVERRIDES = ["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4",
                   "trainer.num_nodes=2", "hydra.launcher.partition=gpu",
                   "hydra.launcher.timeout_min=30"]


def _load(overrides: list[str], tmp_path):
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONFIGS)))
    cfg = loader.load_configuration("train", overrides=[*overrides, f"hydra.sweep.dir={tmp_path}"],
                                    run_mode=RunMode.MULTIRUN)
    return loader, cfg


def test_submitit_slurm_config_follows_the_trainer(tmp_path):
    _, cfg = _load(SLURM_OVERRIDES, tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4  # one task per GPU
    assert launcher.nodes == 2 and launcher.partition == "gpu" and launcher.timeout_min == 30
    # Every key is one the plugin's schema knows.
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    from omegaconf import OmegaConf

    assert set(launcher) == set(OmegaConf.structured(SlurmQueueConf))


def test_submitit_slurm_config_composes_with_the_default_trainer(tmp_path):
    # The README's command has no trainer=ddp and no trainer.num_nodes: nodes come from the
    # default trainer config (InterpolationKeyError 'trainer.num_nodes' before it had one).
    _, cfg = _load(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug",
                    "trainer.accelerator=cpu", "hydra.launcher.gpus_per_node=null",
                    "trainer.devices=2"], tmp_path)
    assert cfg.trainer.num_nodes == 1
    launcher = cfg.hydra.launcher
    assert launcher.nodes == 1 and launcher.tasks_per_node == 2 and launcher.gpus_per_node is None


def test_submitit_launcher_instantiates_and_writes_the_expected_sbatch(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks srun exists
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{__import__('os').environ['PATH']}")
    loader, cfg = _load(SLURM_OVERRIDES, tmp_path)

    launcher = Plugins.instance().instantiate_launcher(
        hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks()),
        task_function=lambda c: None, config=cfg)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["tasks_per_node"] == 4 and launcher.params["nodes"] == 2

    executors = []
    monkeypatch.setattr(submitit.AutoExecutor, "map_array",
                        lambda self, fn, *args: executors.append(self) or [])
    assert launcher.launch([["scheduler=linear"], ["scheduler=cosine"]], initial_job_idx=0) == []
    sbatch = executors[0]._executor._make_submission_file_text("python -u job.py", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                 "--time=30", "--cpus-per-task=8"):
        assert f"#SBATCH {line}" in sbatch, sbatch


def test_ranks_started_by_slurm_are_not_relaunched(monkeypatch):
    for key, value in {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1",
                       "SLURM_JOB_NAME": "train", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
                       "SLURM_NODEID": "0", "SLURM_NODELIST": "node1", "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=HydraDDPStrategy(), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    strategy = trainer.strategy
    assert isinstance(strategy.cluster_environment, SLURMEnvironment)
    assert strategy.global_rank == 1 and not trainer.is_global_zero
    launcher = strategy.launcher
    assert launcher.launch(lambda: "ran", trainer=trainer) == "ran"
    assert launcher.procs == []  # SLURM started the ranks; nothing spawned
