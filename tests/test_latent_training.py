"""Latent diffusion through train.py: the same run on 1 and 2 processes (gloo), and a run resumed
mid-epoch (in process, and after SIGKILL) continues at the same latents.

Tiny everything: digits 16x16 -> tiny random VAE -> 4x8x8 latents, a 2-level UNet, epochs of 3
batches (``trainer.limit_train_batches``) so a few steps cross epochs and the posterior noise's
epoch dependence is exercised. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from diffsweep.resume import read_status  # noqa: E402
from diffsweep.train import run  # noqa: E402
from tests.conftest import FAST, REPO, compose_config, run_entry_point  # noqa: E402

LATENT = ["data=latents", "data.source.progress=false", "data.source.sample_posterior=true",
          "++trainer.limit_train_batches=3"]
TINY = ["model.base_channels=8", "model.channel_mults=[1,2]", "model.num_res_blocks=1",
        "model.attention_resolutions=[]", "++trainer.limit_val_batches=0",
        "callbacks.sample_grid=null", "trainer.accelerator=cpu",
        # the 1-vs-2-process equality (1e-5) is an fp32 claim: bf16 autocast (precision auto on
        # this CPU) rounds each rank's half-batch gradient differently (~5e-4 after 4 steps)
        "trainer.precision=32-true"]


def _losses_by_step(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle)
                if row.get("train/loss")}


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a
               if a[k].is_floating_point())


@pytest.mark.slow  # > 15 s: runs in .ci/run's slow step
def test_latent_run_resumed_mid_epoch_matches_the_uninterrupted_run(tmp_path):
    """Checkpoint at step 4 = epoch 1, batch 1 of 3: the resumed run sees the same latents
    (shuffle order and posterior noise of that epoch) and ends with the same weights."""
    overrides = [*FAST, *LATENT, *TINY, "trainer.max_steps=8",
                 "callbacks.model_checkpoint.every_n_train_steps=4"]
    reference = tmp_path / "reference"
    run(compose_config("train", overrides, reference))
    checkpoint = reference / "checkpoints" / "step_0000004.ckpt"
    position = _checkpoint(checkpoint)["loops"]["fit_loop"]
    assert position["epoch_progress"]["current"]["completed"] == 1  # mid-epoch 1

    resumed = tmp_path / "resumed"
    run(compose_config("train", [*overrides, f"ckpt_path={checkpoint}"], resumed))
    expected, got = _losses_by_step(reference), _losses_by_step(resumed)
    assert sorted(got) == [4, 5, 6, 7] and max(expected) == 7
    assert {step: got[step] for step in got} == {step: expected[step] for step in got}
    final_reference = _checkpoint(reference / "checkpoints" / "last.ckpt")
    final_resumed = _checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert final_reference["global_step"] == 8 and final_resumed["global_step"] == 8
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        for name, value in final_reference[key].items():
            assert torch.equal(value, final_resumed[key][name]), (key, name)


@pytest.mark.slow
def test_latent_two_processes_match_one_process_at_equal_global_batch(train_config, tmp_path):
    """4 steps over 2 epochs with posterior sampling: rank-averaged losses, EMA and raw weights of
    a 2-process gloo run agree with the 1-process run within 1e-5."""
    overrides = [*LATENT, *TINY, "data.batch_size=16",
                 "callbacks.model_checkpoint.every_n_train_steps=4"]
    cfg = train_config(*overrides)
    run(cfg)
    single = Path(cfg.paths.output_dir)

    work = tmp_path / "ddp_cwd"
    work.mkdir()
    result = run_entry_point("train.py", *FAST, *overrides, "trainer=ddp", "trainer.devices=2",
                             "hydra.run.dir=ddp", cwd=work)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    ddp = work / "ddp"

    losses_1, losses_2 = _losses_by_step(single), _losses_by_step(ddp)
    assert sorted(losses_1) == sorted(losses_2) and len(losses_1) == 4
    assert max(abs(losses_1[s] - losses_2[s]) for s in losses_1) < 1e-5, (losses_1, losses_2)
    ckpt_1 = _checkpoint(single / "checkpoints" / "last.ckpt")
    ckpt_2 = _checkpoint(ddp / "checkpoints" / "last.ckpt")
    assert ckpt_1["global_step"] == ckpt_2["global_step"] == 4
    assert ckpt_1["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1
    assert _max_abs_diff(ckpt_1["state_dict"], ckpt_2["state_dict"]) < 1e-5  # EMA weights
    assert _max_abs_diff(ckpt_1["current_model_state"], ckpt_2["current_model_state"]) < 1e-5
    assert len(list((work / ".cache" / "latents").glob("train-*/manifest.json"))) == 1


RESUME_RUN = [*LATENT, "trainer.max_steps=14", "trainer.val_check_interval=1000",
              "trainer.log_every_n_steps=1", "trainer.enable_model_summary=false",
              "data.batch_size=16", "model.base_channels=16",
              "callbacks.sample_grid.at_train_end=false",
              "callbacks.model_checkpoint.every_n_train_steps=2", "~callbacks.progress_bar",
              "lr_schedule.warmup_steps=3", "logger.csv.flush_logs_every_n_steps=1"]


def _train_command(run_dir: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *RESUME_RUN, f"hydra.run.dir={run_dir}"]


@pytest.mark.slow
def test_latent_sigkill_then_same_command_continues_the_identical_loss_curve(tmp_path):
    """Killed after the step-8 checkpoint (epoch 2, 2 of 3 batches done), the same command resumes
    and logs the uninterrupted run's losses bit for bit."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    reference = tmp_path / "reference"
    subprocess.run(_train_command(reference), cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=600)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(_train_command(interrupted), cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = interrupted / "checkpoints" / "step_0000008.ckpt"
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

    with open(reference / "csv" / "metrics.csv") as handle:
        expected = {int(r["step"]): r["train/loss"] for r in csv.DictReader(handle)
                    if r.get("train/loss")}
    with open(interrupted / "csv" / "metrics.csv") as handle:
        resumed = {int(r["step"]): r["train/loss"] for r in csv.DictReader(handle)
                   if r.get("train/loss")}
    assert max(resumed) == max(expected) == 13
    assert {s: resumed[s] for s in range(9, 14)} == {s: expected[s] for s in range(9, 14)}
    final_reference = _checkpoint(reference / "checkpoints" / "last.ckpt")
    final_resumed = _checkpoint(interrupted / "checkpoints" / "last.ckpt")
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        for name, value in final_reference[key].items():
            assert torch.equal(value, final_resumed[key][name]), (key, name)
