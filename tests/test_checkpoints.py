"""Checkpoints: the earlier layout keeps loading, reading executes no code, resume picks the newest.

``tests/fixtures/legacy_main.ckpt`` was written by ``train.py`` before the module config named its
parts (net ``net.*`` directly on the module, ``module.lr_warmup_steps``): a 3-step run of a tiny
UNet on 8x8 digits. ``legacy_main_reference.pt`` holds what that code computed from it: DDIM-3
samples of the EMA and raw weights (seed 0) and the training loss for fixed noise.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from diffsweep.assembly import upgrade_run_config
from diffsweep.checkpoints import (
    CheckpointMismatchError,
    find_resume_checkpoint,
    load_module,
    read_checkpoint,
)
from diffsweep.generate import generate
from diffsweep.samplers import Sampler
from diffsweep.train import run

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY = FIXTURES / "legacy_main.ckpt"
REFERENCE = torch.load(FIXTURES / "legacy_main_reference.pt", weights_only=True)
#: The overrides the fixture was trained with (its tiny net).
#: the legacy run's formulation (eps-MSE in fp32) was the default then; experiment=ddpm names it now
LEGACY_RUN = ["experiment=ddpm", "data.batch_size=8", "data.resolution=8", "model.base_channels=8",
              "model.channel_mults=[1,2]", "model.attention_resolutions=[4]", "model.num_groups=4",
              "sampler.num_steps=3"]


def _ddim3(module) -> torch.Tensor:
    return generate(module.denoiser, Sampler("ddim", num_steps=3), 4, module.image_shape,
                    generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_checkpoint_of_the_earlier_layout_loads_and_samples_as_before(weights):
    module = load_module(LEGACY, weights=weights)
    assert module.image_shape == (1, 8, 8) and module.prediction_type == "epsilon"
    torch.testing.assert_close(_ddim3(module), REFERENCE[f"{weights}_ddim3"], atol=1e-6, rtol=0)


def test_checkpoint_of_the_earlier_layout_gives_the_same_training_loss():
    module = load_module(LEGACY, weights="raw")
    x0 = REFERENCE["x0"]
    noise = module.training_noise(x0, torch.Generator().manual_seed(5), training=False)
    loss = module.batch_loss(x0, torch.full((8,), -1), noise)
    torch.testing.assert_close(loss.detach(), REFERENCE["loss_seed5"].detach(), atol=1e-6, rtol=0)


def test_earlier_run_config_is_upgraded_to_the_composed_module_config():
    stored = read_checkpoint(LEGACY)["diffsweep_config"]
    assert "denoiser" not in stored["module"]
    upgraded = upgrade_run_config(stored)
    module = upgraded["module"]
    assert module["denoiser"]["net"] == stored["model"]
    assert module["denoiser"]["schedule"] == stored["scheduler"]
    assert module["lr_schedule"]["warmup_steps"] == stored["module"]["lr_warmup_steps"]
    assert module["image_shape"] == [1, 8, 8]
    assert "denoiser" not in stored["module"]  # the stored dict itself is left alone
    assert upgrade_run_config(upgraded) is upgraded  # today's layout passes through


def test_training_resumes_from_a_checkpoint_of_the_earlier_layout(train_config, tmp_path):
    ckpt = tmp_path / "legacy.ckpt"
    shutil.copy(LEGACY, ckpt)
    cfg = train_config(*LEGACY_RUN, "trainer.max_steps=6", f"ckpt_path={ckpt}",
                       "lr_schedule.warmup_steps=100", "callbacks.sample_grid.at_train_end=false")
    run(cfg)
    resumed = read_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 6
    assert any(key.startswith("denoiser.net.") for key in resumed["state_dict"])


def test_resuming_an_earlier_default_run_with_todays_defaults_names_what_changed(train_config,
                                                                               tmp_path):
    ckpt = tmp_path / "legacy.ckpt"
    shutil.copy(LEGACY, ckpt)
    cfg = train_config(*LEGACY_RUN[1:], "trainer.max_steps=6", f"ckpt_path={ckpt}",
                       "lr_schedule.warmup_steps=100")
    with pytest.raises(CheckpointMismatchError, match=r"module\.denoiser\.prediction_type: "
                       r"epsilon -> auto.*trainer\.precision: 32-true -> auto.*experiment=ddpm"):
        run(cfg)
    assert ckpt.read_bytes() == LEGACY.read_bytes()


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_checkpoint_whose_unpickling_runs_code_is_refused(tmp_path):
    crafted = tmp_path / "crafted.ckpt"
    with open(crafted, "wb") as handle:
        pickle.dump({"state_dict": {}, "payload": _RunsCode()}, handle)
    with pytest.raises(ValueError, match="would execute code"):
        read_checkpoint(crafted)
    with pytest.raises(ValueError, match="crafted.ckpt"):
        load_module(crafted)


def test_resume_prefers_the_highest_global_step_over_last_ckpt(tmp_path):
    for name, step in (("last.ckpt", 4), ("step_0000006.ckpt", 6), ("step_0000002.ckpt", 2)):
        torch.save({"global_step": step, "loops": {}}, tmp_path / name)
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    torch.save({"global_step": 9}, tmp_path / "export.ckpt")  # weights only: no resume point
    assert find_resume_checkpoint(tmp_path).name == "step_0000006.ckpt"
    torch.save({"global_step": 6, "loops": {}}, tmp_path / "last.ckpt")
    assert find_resume_checkpoint(tmp_path).name == "last.ckpt"  # ties go to last.ckpt


def test_module_and_data_shapes_must_agree(train_config):
    cfg = train_config("module.image_shape=[1,8,8]")
    with pytest.raises(ValueError, match=r"module.image_shape=\[1, 8, 8\].*\[1, 16, 16\]"):
        run(cfg)

