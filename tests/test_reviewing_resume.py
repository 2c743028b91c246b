"""Reviewing a run that was killed and rerun: the same command continues the same W&B run, and
metrics.csv, the W&B history and the TensorBoard events hold every step once (the history from
before the kill is kept, nothing is repeated)."""

from __future__ import annotations

import csv
import os
import signal
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from diffsweep import loggers
from tests.conftest import run_entry_point


class KillAtStep(Callback):
    """SIGKILLs its own process at optimizer step ``step`` (once: ``marker`` records it), once
    W&B's transaction log holds ``train/loss`` of every step before ``step - 1`` (on a long run its
    periodic flushes have written them; on a busy test machine the first flush can be late)."""

    def __init__(self, step: int, marker: str, timeout_s: float = 60.0) -> None:
        self.step, self.marker, self.timeout_s = int(step), Path(marker), float(timeout_s)

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step != self.step or self.marker.exists():
            return
        self.marker.write_text("killed")
        (wandb_logger,) = [lg for lg in trainer.loggers if isinstance(lg, loggers.WandbLogger)]
        save_dir, run_id = wandb_logger._wandb_init["dir"], wandb_logger._wandb_init["id"]
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            logged = loggers.wandb_logged_steps(save_dir, run_id)
            if all("train/loss" in logged.get(step, ()) for step in range(self.step - 1)):
                break
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)


def _pairs(rows, step_key):
    return [(int(float(row[step_key])), key) for row in rows for key, value in row.items()
            if key not in (step_key, "epoch") and not key.startswith("_")
            and value not in ("", None)]


@pytest.mark.slow  # two train.py processes
def test_kill_and_rerun_continues_one_wandb_run_and_keeps_every_step_once(tmp_path, monkeypatch):
    # each train.py starts its own wandb service, as from a shell: an earlier W&B test in this
    # process exported WANDB_SERVICE, and a killed run's id stays "in use" in a shared service
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    command = ["logger=many", "trainer.max_steps=8", "trainer.val_check_interval=4",
               "trainer.log_every_n_steps=1", "trainer.enable_model_summary=false",
               "data.batch_size=16", "sampler.num_steps=2", "callbacks.sample_grid.num_samples=4",
               "callbacks.model_checkpoint.every_n_train_steps=2", "lr_schedule.warmup_steps=0",
               "logger.wandb.flush_interval_s=0.2",
               "+callbacks.kill._target_=tests.test_reviewing_resume.KillAtStep",
               "trusted_targets=[tests.test_reviewing_resume.KillAtStep]",
               "+callbacks.kill.step=5", f"+callbacks.kill.marker={tmp_path / 'killed'}"]
    killed = run_entry_point("train.py", *command, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    before = (run_dir / "csv" / "metrics.csv").read_text()
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()

    rerun = run_entry_point("train.py", *command, cwd=tmp_path)  # the same command
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [p.name for p in (tmp_path / "logs" / "train" / "runs").iterdir()] == [run_dir.name]
    assert "Resuming from" in (run_dir / "train.log").read_text()

    # CSV: appended (the first attempt's rows are still there, in place), every step once
    after = (run_dir / "csv" / "metrics.csv").read_text()
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    pairs = _pairs(rows, "step")
    assert len(pairs) == len(set(pairs))
    assert sorted(step for step, key in pairs if key == "train/loss") == list(range(8)), after
    assert sorted(step for step, key in pairs if key == "val/loss") == [3, 7], after
    first_rows = before.splitlines()[1:]
    assert all(line in after.splitlines() for line in first_rows) and len(first_rows) >= 8

    # W&B: one run id, one transaction log per attempt, the history of both = every step once
    logs = loggers.wandb_transaction_logs(run_dir, run_id)
    assert len(logs) == 2
    infos = [record.run for path in logs for record in loggers.wandb_records(path)
             if record.WhichOneof("record_type") == "run"]
    assert {info.run_id for info in infos} == {run_id}
    assert {(info.job_type, info.run_group) for info in infos} == {("train", run_dir.name)}
    history = [row for path in logs for row in loggers.wandb_history(path)]
    wandb_pairs = _pairs(history, "trainer/global_step")
    assert len(wandb_pairs) == len(set(wandb_pairs)), wandb_pairs
    assert sorted(step for step, key in wandb_pairs if key == "train/loss") == list(range(8)), \
        wandb_pairs
    first_attempt = _pairs(loggers.wandb_history(logs[0]), "trainer/global_step")
    assert any(step >= 4 for step, _ in first_attempt)  # logged before the kill, kept
    grids = sorted(row["trainer/global_step"] for row in history if "samples/_type" in row)
    assert grids == [4, 8]  # one per validation; final.png copies the step-8 grid

    # TensorBoard: an event file per attempt, every (step, tag) once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) >= 2
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars("train/loss")]
    assert steps == list(range(8))
