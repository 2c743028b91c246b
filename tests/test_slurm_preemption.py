"""Stop signals (SIGTERM, SIGINT, SIGUSR1/2) save a resumable checkpoint of the current step:
in-process runs signalled at a known step, signals during validation, during a checkpoint write
and after the last step, SLURM requeue with a stand-in ``scontrol``, and (slow) real ``train.py``
processes signalled from outside, single-process and 2-rank DDP, rerun with the same command.

Every run stays inside epoch 0 (digits: 101 batches of 16 per epoch), away from the epoch-boundary
resume case that tests/test_resume.py covers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from diffsweep.callbacks.preemption import (
    EXIT_STATUS_BASE,
    Preempted,
    Preemption,
    ignore_stop_signals,
    signal_number,
    slurm_job_id,
    worker_init,
)
from diffsweep.checkpoints import AtomicCheckpointIO, find_resume_checkpoint
from diffsweep.resume import read_status
from diffsweep.train import run
from tests.conftest import REPO, compose_config

#: A tiny net and no validation: a run of 9 steps takes about a second (last.ckpt at step 9).
RUN = ["model.base_channels=8", "model.channel_mults=[1,2]", "model.num_res_blocks=1",
       "model.attention_resolutions=[]", "data.resolution=8", "trainer.accelerator=cpu",
       "trainer.max_steps=9", "trainer.val_check_interval=1000", "trainer.log_every_n_steps=1",
       "trainer.enable_model_summary=false", "data.batch_size=16", "lr_schedule.warmup_steps=2",
       "callbacks.sample_grid.at_train_end=false",
       "callbacks.model_checkpoint.every_n_train_steps=3", "~callbacks.progress_bar",
       "logger.csv.flush_logs_every_n_steps=1"]
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR2]


#: ``<signal number>:<step>:<hook>[:<repeat>]`` for :class:`SendSignal` (unset: it does nothing).
SEND_SIGNAL_ENV = "DIFFSWEEP_TEST_SEND_SIGNAL"


class SendSignal(L.Callback):
    """Test helper: send a signal to this process once, in a hook at a step, as
    ``$DIFFSWEEP_TEST_SEND_SIGNAL`` says (read when built, so the interrupted run and its rerun
    have the same config: a changed config is refused on resume)."""

    def __init__(self) -> None:
        spec = os.environ.get(SEND_SIGNAL_ENV)
        signum, step, self.hook, repeat = (spec.split(":") + ["1"])[:4] if spec else (
            0, -1, "", 0)
        self.signum, self.step, self.repeat = int(signum), int(step), int(repeat)
        self.sent = False

    def _maybe_send(self, trainer: L.Trainer) -> None:
        if not self.sent and trainer.global_step == self.step:
            self.sent = True
            for _ in range(self.repeat):
                os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.hook == "on_train_batch_start":
            self._maybe_send(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.hook == "on_validation_batch_start":
            self._maybe_send(trainer)

    def on_train_end(self, trainer, pl_module):
        if self.hook == "on_train_end":
            self._maybe_send(trainer)


#: In-process runs carry the signal sender (the same config with or without a signal).
IN_PROCESS = [*RUN, "+callbacks.send_signal._target_=tests.test_slurm_preemption.SendSignal",
              "trusted_targets=[tests.test_slurm_preemption.SendSignal]"]


@pytest.fixture
def send_signal(monkeypatch):
    """``send_signal(signum, step, hook="on_train_batch_start", repeat=1)``: the next in-process
    run sends it; ``send_signal(None)``: no signal."""
    def arm(signum: int | None, step: int = 0, hook: str = "on_train_batch_start",
            repeat: int = 1) -> None:
        if signum is None:
            monkeypatch.delenv(SEND_SIGNAL_ENV, raising=False)
        else:
            monkeypatch.setenv(SEND_SIGNAL_ENV, f"{int(signum)}:{step}:{hook}:{repeat}")
    return arm


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same_weights(expected: dict, actual: dict) -> None:
    assert actual["global_step"] == expected["global_step"]
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        assert expected[key].keys() == actual[key].keys()
        for name, value in expected[key].items():
            assert torch.equal(value, actual[key][name]), f"{key}.{name}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The final checkpoint of an uninterrupted run of ``RUN``."""
    out = tmp_path_factory.mktemp("reference") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(compose_config("train", IN_PROCESS, out))
    finally:
        torch.set_num_threads(previous)
    return _load(out / "checkpoints" / "last.ckpt")


def _stopped_run(tmp_path: Path, extra: list[str] = ()) -> tuple[Path, Preempted]:
    out = tmp_path / "run"
    with pytest.raises(Preempted) as stopped:
        run(compose_config("train", [*IN_PROCESS, *extra], out))
    return out, stopped.value


# ------------------------------------------------------------------ in-process runs (fast)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_signal_saves_the_current_step_and_the_same_command_resumes_to_identical_weights(
        signum, reference, tmp_path, single_thread, send_signal):
    handlers_before = signal.getsignal(signum)
    send_signal(signum, step=4)
    out, stopped = _stopped_run(tmp_path)
    # The step in progress when the signal came (5) finished, then was saved.
    assert stopped.code == EXIT_STATUS_BASE + signum and stopped.step == 5
    assert not stopped.requeued  # not on SLURM
    checkpoint = out / "checkpoints" / "step_0000005.ckpt"
    assert stopped.checkpoint == str(checkpoint)
    saved = _load(checkpoint)
    # A full training checkpoint: loops, optimizer, EMA, data position.
    assert saved["global_step"] == 5 and saved["optimizer_states"]
    assert {"loops", "averaging_state", "current_model_state"} <= set(saved)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "batches_done": 5}]
    assert find_resume_checkpoint(out / "checkpoints") == checkpoint
    assert read_status(out)["status"] != "finished"  # the same command resumes it
    assert signal.getsignal(signum) == handlers_before  # handlers restored after fit

    send_signal(None)
    run(compose_config("train", IN_PROCESS, out))  # the same command again
    assert read_status(out)["status"] == "finished"
    _assert_same_weights(reference, _load(out / "checkpoints" / "last.ckpt"))


def test_signal_during_validation_stops_after_the_next_step(reference, tmp_path, single_thread,
                                                            send_signal):
    # Validation every 2 steps with a sample grid; the signal arrives in step 2's validation,
    # which runs to its end (grid written), then step 3 trains and is saved.
    validate = ["trainer.val_check_interval=2", "++trainer.limit_val_batches=1",
                "callbacks.sample_grid.num_samples=4", "sampler.num_steps=2"]
    send_signal(signal.SIGTERM, step=2, hook="on_validation_batch_start")
    out, stopped = _stopped_run(tmp_path, validate)
    assert stopped.step == 3
    assert (out / "samples" / "step_0000002.png").is_file()
    assert _load(out / "checkpoints" / "step_0000003.ckpt")["global_step"] == 3
    send_signal(None)
    run(compose_config("train", [*IN_PROCESS, *validate], out))
    # Validation draws from its own generators and leaves the weights alone: the weights equal
    # those of the run without validation.
    _assert_same_weights(reference, _load(out / "checkpoints" / "last.ckpt"))


def test_signal_while_a_checkpoint_is_written_keeps_it_whole_and_saves_the_next_step(
        tmp_path, monkeypatch, single_thread):
    real_save = AtomicCheckpointIO.save_checkpoint
    writes = []

    def save_and_get_signalled(self, checkpoint, path, storage_options=None):
        writes.append(Path(path).name)
        if len(writes) == 1:  # ModelCheckpoint's step 3, signalled while it writes
            os.kill(os.getpid(), signal.SIGTERM)
        real_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_and_get_signalled)
    out, stopped = _stopped_run(tmp_path)
    assert writes == ["step_0000003.ckpt", "last.ckpt", "step_0000004.ckpt"]
    assert stopped.step == 4
    for name, step in (("step_0000003.ckpt", 3), ("last.ckpt", 3), ("step_0000004.ckpt", 4)):
        assert _load(out / "checkpoints" / name)["global_step"] == step
    assert not list((out / "checkpoints").glob("*.partial*"))


def test_signals_repeated_while_stopping_stop_once_and_requeue_wins(tmp_path, single_thread,
                                                                  send_signal):
    # SIGTERM twice, then (below) SIGTERM + SIGUSR2 as SLURM sends at preemption: one stop.
    send_signal(signal.SIGTERM, step=2, repeat=2)
    out, stopped = _stopped_run(tmp_path)
    assert stopped.step == 3 and stopped.code == EXIT_STATUS_BASE + signal.SIGTERM
    callback = Preemption()
    callback._install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert callback.received == signal.SIGTERM
        code = callback._local_code()
        assert code % 64 == signal.SIGTERM and code >= 128  # first signal, requeue requested
    finally:
        callback._uninstall()


def test_signal_after_the_last_step_lets_the_run_finish(tmp_path, single_thread, send_signal):
    out = tmp_path / "run"
    send_signal(signal.SIGTERM, step=9, hook="on_train_end")
    metrics = run(compose_config("train", IN_PROCESS, out))
    assert "train/loss" in metrics
    assert read_status(out)["status"] == "finished"
    assert _load(out / "checkpoints" / "last.ckpt")["global_step"] == 9


def test_usr2_on_slurm_requeues_the_job_and_sigterm_does_not(tmp_path, monkeypatch,
                                                            single_thread, send_signal):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # A batch job's id (without SLURM_NTASKS Lightning does not switch to its SLURM environment).
    monkeypatch.setenv("SLURM_JOB_ID", "4242")

    send_signal(signal.SIGUSR2, step=1)
    _, stopped = _stopped_run(tmp_path / "usr2")
    assert stopped.requeued and "requeued" in str(stopped)
    assert calls.read_text().split("\n")[0] == "requeue 4242"

    calls.unlink()
    send_signal(signal.SIGTERM, step=1)
    _, stopped = _stopped_run(tmp_path / "term")
    assert not stopped.requeued and not calls.exists()  # scancel sends SIGTERM: stays cancelled


# ------------------------------------------------------------------ units (fast)


def test_slurm_job_id_names_array_tasks_as_scontrol_expects():
    assert slurm_job_id({"SLURM_JOB_ID": "17"}) == "17"
    assert slurm_job_id({"SLURM_JOB_ID": "18", "SLURM_ARRAY_JOB_ID": "17",
                         "SLURM_ARRAY_TASK_ID": "1"}) == "17_1"
    assert slurm_job_id({}) is None


def test_bad_settings_name_the_key_and_value():
    assert signal_number("TERM") == signal_number("sigterm") == signal.SIGTERM
    with pytest.raises(ValueError, match=r"callbacks.preemption: signal 'SIGFOO'"):
        Preemption(signals=["SIGFOO"])
    with pytest.raises(ValueError, match=r"requeue_signals: \['SIGUSR1'\] are not in signals"):
        Preemption(signals=["SIGTERM"], requeue_signals=["SIGUSR1"])
    with pytest.raises(ValueError, match=r"check_every_n_steps=0"):
        Preemption(check_every_n_steps=0)


def test_a_handler_left_installed_after_fit_forwards_to_the_previous_one():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        callback = Preemption()
        callback._install()
        callback._uninstall()
        signal.signal(signal.SIGUSR1, callback._handle)  # as if restored by someone else
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1] and callback.received is None
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_worker_init_ignores_stop_signals_and_keeps_lightnings_worker_seeding(monkeypatch):
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                                                 signal.SIGUSR2)}
    seeded = []
    monkeypatch.setattr("lightning.fabric.utilities.seed.pl_worker_init_function",
                        lambda worker_id, rank=None: seeded.append((worker_id, rank)))
    try:
        ignore_stop_signals(0, signals=["SIGTERM"])
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        monkeypatch.setenv("PL_SEED_WORKERS", "0")
        worker_init(3, rank=1)
        assert seeded == [] and all(signal.getsignal(s) == signal.SIG_IGN for s in previous)
        monkeypatch.setenv("PL_SEED_WORKERS", "1")  # seed_everything(workers=True)
        worker_init(3, rank=1)
        assert seeded == [(3, 1)]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_lightnings_sigterm_flag_from_before_training_is_taken_over():
    connector = SimpleNamespace(received_sigterm=True)  # Lightning's handler caught a SIGTERM
    trainer = SimpleNamespace(received_sigterm=True, _signal_connector=connector)
    callback = Preemption()
    callback.on_train_start(trainer, None)
    try:
        assert callback.received == signal.SIGTERM  # saved at the end of the first step
        assert connector.received_sigterm is False  # Lightning no longer stops without saving
    finally:
        callback._uninstall()


# ------------------------------------------------------------------ real processes (slow)

#: ``RUN`` long enough to be signalled mid-training from outside (~20 ms per step).
PROCESS_RUN = [*[o for o in RUN if not o.startswith("trainer.max_steps")],
               "trainer.max_steps=60"]


def _command(*overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def _run_dirs(cwd: Path) -> list[Path]:
    return sorted((cwd / "logs" / "train" / "runs").glob("*"))


def _newest_step(cwd: Path) -> int:
    """The highest step of the step checkpoints under ``cwd``'s run directories (0: none)."""
    return max((int(path.stem.split("_")[1]) for path in
                cwd.glob("logs/train/runs/*/checkpoints/step_*.ckpt")), default=0)


def _wait_for_step(process: subprocess.Popen, cwd: Path, after: int,
                   timeout: float = 240.0) -> None:
    """Wait until the run in ``cwd`` has a checkpoint past step ``after`` (it is training)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if _newest_step(cwd) > after:
            return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint past step {after} in {cwd} (exit code {process.poll()})")


@pytest.fixture(scope="module")
def process_reference(tmp_path_factory) -> dict:
    """The final checkpoint of an uninterrupted run of ``PROCESS_RUN`` (in this process: the
    weights do not depend on the process, one thread either way)."""
    out = tmp_path_factory.mktemp("process_reference") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(compose_config("train", PROCESS_RUN, out))
    finally:
        torch.set_num_threads(previous)
    return _load(out / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_train_py_signalled_three_times_resumes_each_time_to_the_uninterrupted_weights(
        process_reference, tmp_path):
    stopped_at, saved = 0, None
    for signum in SIGNALS:  # SIGTERM, then SIGINT to the rerun, then SIGUSR2 to the next one
        process = subprocess.Popen(_command(*PROCESS_RUN), cwd=tmp_path, env=_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _wait_for_step(process, tmp_path, after=stopped_at)
        os.kill(process.pid, signum)
        output, _ = process.communicate(timeout=300)
        name = signal.Signals(signum).name
        assert process.returncode == EXIT_STATUS_BASE + signum, output[-3000:]
        (run_dir,) = _run_dirs(tmp_path)  # every rerun continued in the same run directory
        if saved is not None:
            assert f"Resuming from {saved}" in output
        saved = find_resume_checkpoint(run_dir / "checkpoints")
        step = _load(saved)["global_step"]
        assert stopped_at < step < 60 and f"Stopped on {name} at step {step}" in output, output
        assert json.loads((run_dir / "run_status.json").read_text())["status"] != "finished"
        stopped_at = step

    rerun = subprocess.run(_command(*PROCESS_RUN), cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming from {saved}" in rerun.stdout + rerun.stderr
    assert _run_dirs(tmp_path) == [run_dir]
    assert json.loads((run_dir / "run_status.json").read_text())["status"] == "finished"
    _assert_same_weights(process_reference, _load(run_dir / "checkpoints" / "last.ckpt"))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(line) for line in out.stdout.split()]


@pytest.mark.slow
def test_ddp_rank_signalled_alone_stops_both_ranks_at_one_step_and_resumes(tmp_path):
    ddp = [*PROCESS_RUN, "trainer.devices=2", "trainer.max_steps=42"]
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    subprocess.run(_command(*ddp), cwd=reference_dir, env=_env(), check=True,
                   capture_output=True, timeout=600)
    expected = _load(_run_dirs(reference_dir)[0] / "checkpoints" / "last.ckpt")

    cwd = tmp_path / "interrupted"
    cwd.mkdir()
    process = subprocess.Popen(_command(*ddp), cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    _wait_for_step(process, cwd, after=0)
    (rank1,) = _children(process.pid)
    os.kill(rank1, signal.SIGTERM)  # only rank 1 knows: the ranks must agree, not hang
    output, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_STATUS_BASE + signal.SIGTERM, output[-3000:]
    assert not Path(f"/proc/{rank1}").exists()  # rank 1 exited too (rank 0 waited for it)
    (run_dir,) = _run_dirs(cwd)
    step = _load(find_resume_checkpoint(run_dir / "checkpoints"))["global_step"]
    assert 3 <= step < 42 and f"Stopped on SIGTERM at step {step}" in output

    rerun = subprocess.run(_command(*ddp), cwd=cwd, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_same_weights(expected, _load(run_dir / "checkpoints" / "last.ckpt"))


@pytest.mark.slow
def test_signal_to_the_whole_process_group_with_loader_workers_still_saves(tmp_path):
    process = subprocess.Popen(_command(*PROCESS_RUN, "data.num_workers=2"), cwd=tmp_path,
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    _wait_for_step(process, tmp_path, after=0)
    os.killpg(process.pid, signal.SIGUSR2)  # as SLURM signals every process of the job step
    output, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_STATUS_BASE + signal.SIGUSR2, output[-3000:]
    assert "Stopped on SIGUSR2 at step" in output
