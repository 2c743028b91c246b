"""Config changes on resume: safe keys apply, any other change is refused before work starts
(one line: the keys, old -> new, and how to override), allowed changes apply for real."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffsweep.checkpoints import CheckpointMismatchError
from diffsweep.resume import (
    ConfigChange,
    check_resume_config,
    config_changes,
    key_matches,
    read_done,
    read_status,
)
from diffsweep.train import run
from tests.conftest import compose_config
from tests.test_resume_kill import TINY

RUN = [*TINY, "trainer.max_steps=4", "data.source.val_fraction=0.98"]


def _cfg(run_dir: Path, *overrides: str):
    return compose_config("train", [*RUN, *overrides], run_dir)


def _stored(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)


def test_changes_are_listed_key_by_key_and_new_options_are_not_changes():
    stored = {"trainer": {"max_steps": 4, "devices": 1}, "module": {"denoiser": {}, "seed": 1},
              "model": {"channel_mults": [1, 2]}, "image_shape": [1, 8, 8]}
    requested = {"trainer": {"max_steps": 8, "devices": 1}, "module": {"denoiser": {}, "seed": 1,
                                                                        "sample_compile": False},
                 "model": {"channel_mults": [1, 2, 2]}}
    assert config_changes(stored, requested) == [
        ConfigChange("model.channel_mults", [1, 2], [1, 2, 2]),
        ConfigChange("trainer.max_steps", 4, 8)]
    # ...unless the command line names the added (or removed) key
    named = config_changes(stored, requested, ["+module.sample_compile=false", "~image_shape"])
    assert [change.key for change in named] == ["image_shape", "model.channel_mults",
                                                "module.sample_compile", "trainer.max_steps"]
    assert str(named[0]) == "image_shape: [1, 8, 8] -> <absent>"
    assert key_matches("callbacks.sample_grid.num_samples", ["callbacks.sample_grid"])
    assert key_matches("data.source.images.root", ["data*.root"])
    assert not key_matches("module.optimizer.lr", ["module.optimizer.l"])


def test_safe_changes_apply_and_others_are_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    run(_cfg(run_dir))
    stored = _stored(run_dir)["diffsweep_config"]
    safe = check_resume_config(stored, _cfg(run_dir, "trainer.max_steps=6", "num_threads=2",
                                            "callbacks.model_checkpoint.every_n_train_steps=3",
                                            "trainer.devices=1", "logger=csv"))
    assert {"trainer.max_steps", "num_threads",
            "callbacks.model_checkpoint.every_n_train_steps"} <= {c.key for c in safe}

    tree = (run_dir / "config_tree.log").read_bytes()
    before = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*") if path.is_file()}
    for overrides, shown in (
            (["module.optimizer.lr=2e-4"], "module.optimizer.lr: 0.001 -> 0.0002"),
            (["data.batch_size=16"], "data.batch_size: 8 -> 16"),
            (["scheduler=cosine"], "scheduler.beta_schedule: linear -> squaredcos_cap_v2"),
            (["model.base_channels=16"], "model.base_channels: 8 -> 16")):
        with pytest.raises(CheckpointMismatchError) as refused:
            run(_cfg(run_dir, "trainer.max_steps=6", *overrides))
        message = str(refused.value)
        assert "\n" not in message and shown in message, message
        assert "resume=never" in message and "resume_allow_changes=[" in message
        assert "trainer.max_steps" not in message  # a safe change is not listed
    assert (run_dir / "config_tree.log").read_bytes() == tree
    assert {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")
            if path.is_file()} == before  # nothing written, nothing rewritten


def test_a_longer_schedule_continues_a_finished_run(tmp_path):
    run_dir = tmp_path / "run"
    run(_cfg(run_dir))
    assert read_done(run_dir)["global_step"] == 4
    run(_cfg(run_dir, "trainer.max_steps=6"))
    assert _stored(run_dir)["global_step"] == 6
    assert read_done(run_dir)["global_step"] == 6 and read_status(run_dir)["status"] == "finished"


def test_an_allowed_learning_rate_change_is_applied_to_the_restored_optimizer(tmp_path):
    run_dir = tmp_path / "run"
    run(_cfg(run_dir))  # warmup 3 steps: at step 4 the factor is 1
    assert _stored(run_dir)["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    run(_cfg(run_dir, "trainer.max_steps=6", "module.optimizer.lr=2e-4",
             "module.optimizer.weight_decay=0.01",
             "resume_allow_changes=[module.optimizer.lr,module.optimizer.weight_decay]"))
    resumed = _stored(run_dir)
    assert resumed["global_step"] == 6
    group = resumed["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(2e-4) and group["weight_decay"] == 0.01
    assert resumed["lr_schedulers"][0]["base_lrs"] == [pytest.approx(2e-4)]
    assert resumed["diffsweep_config"]["module"]["optimizer"]["lr"] == 2e-4


def test_resume_never_in_a_directory_with_checkpoints_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run(_cfg(run_dir))
    with pytest.raises(CheckpointMismatchError, match="resume=never but .* already holds"):
        run(_cfg(run_dir, "resume=never"))
