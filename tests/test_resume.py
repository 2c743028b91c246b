"""Auto-resume after SIGKILL, atomic checkpoints, run-directory reuse, NaN stop."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffsweep.checkpoints import AtomicCheckpointIO, find_resume_checkpoint
from diffsweep.module import DiffusionModule, NonFiniteLossError
from diffsweep.resume import read_status, resumable_run_dir, run_status
from diffsweep.train import run
from tests.conftest import REPO

RESUME_RUN = [
    "trainer.max_steps=14", "trainer.val_check_interval=1000", "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false", "data.batch_size=16", "model.base_channels=16",
    "callbacks.sample_grid.at_train_end=false", "callbacks.model_checkpoint.every_n_train_steps=2",
    "~callbacks.progress_bar", "lr_schedule.warmup_steps=3",
    "logger.csv.flush_logs_every_n_steps=1",
]


def _train_command(run_dir: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *RESUME_RUN, f"hydra.run.dir={run_dir}"]


def _losses_by_step(run_dir: Path) -> dict[int, str]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return {int(row["step"]): row["train/loss"] for row in csv.DictReader(handle)
                if row.get("train/loss")}


@pytest.mark.slow
def test_sigkill_then_same_command_continues_the_identical_loss_curve(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    reference = tmp_path / "reference"
    subprocess.run(_train_command(reference), cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=600)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(_train_command(interrupted), cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = interrupted / "checkpoints" / "step_0000006.ckpt"
    deadline = time.monotonic() + 300
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert read_status(interrupted)["status"] == "running"

    result = subprocess.run(_train_command(interrupted), cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from" in result.stdout + result.stderr
    assert read_status(interrupted)["status"] == "finished"

    expected, resumed = _losses_by_step(reference), _losses_by_step(interrupted)
    assert max(resumed) == max(expected) == 13
    assert {step: resumed[step] for step in range(7, 14)} == {step: expected[step]
                                                              for step in range(7, 14)}
    final_reference = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=False)
    final_resumed = torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=False)
    for key, value in final_reference["state_dict"].items():  # EMA weights
        assert torch.equal(value, final_resumed["state_dict"][key]), key
    for key, value in final_reference["current_model_state"].items():  # raw weights
        assert torch.equal(value, final_resumed["current_model_state"][key]), key


def test_atomic_checkpoint_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"loops": {}, "value": 1}, path)

    def failing_save(obj, handle):
        handle.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"loops": {}, "value": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["value"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_resume_skips_an_unreadable_checkpoint_without_deleting_it(tmp_path):
    good = tmp_path / "step_0000002.ckpt"
    torch.save({"loops": {}, "global_step": 2}, good)
    time.sleep(0.01)
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"truncated")
    assert find_resume_checkpoint(tmp_path) == good
    assert bad.exists()


def test_run_directory_is_reused_only_for_an_unfinished_run_of_the_same_command(tmp_path):
    runs = tmp_path / "runs"
    first = Path(resumable_run_dir(str(runs), "t1", "auto", "a=1"))
    assert first == runs / "t1"
    with pytest.raises(RuntimeError), run_status(first, "a=1"):
        # while it runs (locked), the same command gets a new directory
        assert resumable_run_dir(str(runs), "t2", "auto", "a=1") == str(runs / "t2")
        raise RuntimeError("crash")
    assert read_status(first)["status"] == "failed"
    assert resumable_run_dir(str(runs), "t3", "auto", "a=1") == str(first)
    assert resumable_run_dir(str(runs), "t3", "auto", "a=2") == str(runs / "t3")
    assert resumable_run_dir(str(runs), "t3", "never", "a=1") == str(runs / "t3")
    with run_status(first, "a=1"):
        pass
    assert json.loads((first / "run_status.json").read_text())["status"] == "finished"
    assert resumable_run_dir(str(runs), "t4", "auto", "a=1") == str(runs / "t4")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(train_config,
                                                                        monkeypatch):
    real_loss = DiffusionModule.batch_loss

    def diverging_loss(self, *args, **kwargs):
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if self.training and self.global_step >= 3 else loss

    monkeypatch.setattr(DiffusionModule, "batch_loss", diverging_loss)
    cfg = train_config("trainer.max_steps=8", "callbacks.model_checkpoint.every_n_train_steps=2",
                       "callbacks.sample_grid.at_train_end=false")
    with pytest.raises(NonFiniteLossError, match=r"nan at step 3.*last good checkpoint") as error:
        run(cfg)
    checkpoint = Path(str(error.value).split("last good checkpoint is ")[1].split(";")[0])
    assert checkpoint.is_file()
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert all(torch.isfinite(value).all() for value in state.values())


def test_a_checkpoint_of_the_last_step_of_an_unfinished_run_resumes_from_the_one_before(
        tmp_path):
    """Killed after its last checkpoint (in the final validation, grid or FID): resumed there,
    Lightning would end at once and none of those would run; the run resumes from the
    checkpoint before and ends once. Anything else resumes from the newest checkpoint."""
    from omegaconf import OmegaConf

    from diffsweep.resume import find_resume_point, newest_checkpoint_before

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step in (8, 10, 12):
        torch.save({"loops": {}, "global_step": step, "state_dict": {}},
                   folder / f"step_{step:07d}.ckpt")
    torch.save({"global_step": 11}, folder / "weights_only.ckpt")  # not a resume point
    (folder / "last.ckpt").write_bytes(b"cut short by the kill")  # unreadable: skipped

    def resume_point(max_steps):
        cfg = OmegaConf.create({"trainer": {"max_steps": max_steps}, "resume": "auto",
                                "ckpt_path": None,
                                "callbacks": {"model_checkpoint": {"dirpath": str(folder)}}})
        return Path(find_resume_point(cfg, tmp_path).ckpt_path).name

    assert newest_checkpoint_before(folder, 12) == folder / "step_0000010.ckpt"
    assert newest_checkpoint_before(folder, 8) is None
    assert resume_point(12) == "step_0000010.ckpt"
    assert resume_point(20) == "step_0000012.ckpt"  # a longer run: continues from its newest
    assert resume_point(-1) == "step_0000012.ckpt"
