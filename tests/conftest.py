"""Shared fixtures: composing the real Hydra configs for in-process runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("WANDB_MODE", "offline")

#: Overrides that make a training run take seconds on a CPU.
FAST = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "data.batch_size=16",
    "sampler.num_steps=3",
    "callbacks.sample_grid.num_samples=4",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "~callbacks.progress_bar",
    "lr_schedule.warmup_steps=0",
]


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` as Hydra would, with the run dir at ``output_dir``."""
    from diffsweep.hydra_utils import register_resolvers

    register_resolvers()  # as train.py / evaluate.py have them: a test run alone needs them too
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=config_name, return_hydra_config=True,
                      overrides=[*overrides, f"hydra.run.dir={output_dir}",
                                 f"hydra.runtime.output_dir={output_dir}",
                                 f"paths.root_dir={output_dir}"])
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(autouse=True)
def restore_rank_zero():
    """A Trainer built as rank > 0 (SLURM/DDP tests) sets Lightning's process-global rank; later
    tests in this process would silently skip every rank-zero-only action (logs, checkpoints)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    rank = getattr(rank_zero_only, "rank", 0)
    yield
    rank_zero_only.rank = rank


@pytest.fixture
def single_thread():
    """One intra-op thread: tiny CPU kernels run several times faster than with two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def train_config(tmp_path):
    """``train_config(*overrides)`` -> a composed train config writing under tmp_path."""
    def make(*overrides: str, fast: bool = True) -> DictConfig:
        return compose_config("train", [*(FAST if fast else []), *overrides], tmp_path / "run")
    return make


#: Fashion-MNIST idx files beside the repository (../shared/data), for the time-to-quality tests
FASHION = REPO.parent / "shared" / "data" / "fashion-mnist"


def require_race_inputs() -> Path:
    """The Fashion-MNIST folder for a time-to-quality race, or skip (no data, or a peer missing)."""
    for package in ("diffusers", "denoising_diffusion_pytorch"):
        pytest.importorskip(package)
    if not any(FASHION.glob("train-images-idx3-ubyte*")):
        pytest.skip(f"no Fashion-MNIST idx files in {FASHION}")
    return FASHION


def run_entry_point(script: str, *args: str, cwd: Path,
                    timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python <repo>/<script> args...`` in ``cwd``; returns the completed process."""
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
