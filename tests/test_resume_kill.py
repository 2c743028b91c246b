"""A run killed at any step and rerun with the same command ends with the uninterrupted run's
weights, bit for bit (CPU, one thread: the same operations in the same order).

Epochs here are 4 optimizer steps (36 training images in batches of 8, or
``++trainer.limit_train_batches=4``), checkpoints every 2 steps, validation every 4: step 4 is the
last batch of epoch 0 and has a checkpoint, the case that used to skip a whole epoch (or the first
4 batches of epoch 1) of data on resume.

The fast tests kill in-process by raising at a chosen point; the slow ones kill a ``train.py``
process with SIGKILL (and once SIGTERM) at many points, or as soon as a checkpoint or a sample grid
appears, and rerun the plain command. With the CSV logger, ``csv/metrics.csv`` then holds the
uninterrupted run's rows, each (step, metric) once.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import diffsweep.train as train_module
from diffsweep.checkpoints import AtomicCheckpointIO
from diffsweep.data.sampling import GlobalBatchSampler, ResumableDataLoader
from diffsweep.resume import EpochCountersOnRestart, read_done, read_status
from tests.conftest import REPO, compose_config

STEPS = 12
#: A run of three 4-step epochs that takes about a second.
TINY = [
    f"trainer.max_steps={STEPS}", "trainer.val_check_interval=4", "++trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1", "trainer.enable_model_summary=false", "data.batch_size=8",
    "data.resolution=8", "model.base_channels=8", "model.channel_mults=[1,2]",
    "model.attention_resolutions=[]", "model.num_groups=4", "sampler.num_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=2", "~callbacks.sample_grid",
    "~callbacks.progress_bar", "~callbacks.lr_monitor", "logger=none", "lr_schedule.warmup_steps=3",
    "num_threads=1",
]
#: The two ways an epoch is 4 steps: a 36-image training split, or Lightning's batch limit.
SMALL_SPLIT = ["data.source.val_fraction=0.98"]
LIMITED = ["++trainer.limit_train_batches=4"]
#: TINY with the CSV history and a 4-image sample grid at each validation (steps 4, 8 and 12).
LOGGED = [*(override for override in TINY
            if override not in ("~callbacks.sample_grid", "logger=none")),
          "logger=csv", "callbacks.sample_grid.num_samples=4"]


class _Killed(Exception):
    """Stands in for the process dying (raised through Lightning like any crash)."""


class _KillAtStep(L.Callback):
    """Raise at the start of training step ``step`` (the optimizer has done ``step`` steps)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise _Killed(f"killed before step {self.step}")


def _batches(loader) -> list[list[int]]:
    return [batch.tolist() for batch in loader]


def test_a_position_at_the_end_of_an_epoch_is_the_start_of_the_next():
    """The loader's state names the next batch to train: after the last batch the trainer takes
    from epoch 0 (all 4, or 2 under a batch limit) that is batch 0 of epoch 1."""
    def loader(done: int, taken: float = float("inf")) -> ResumableDataLoader:
        return ResumableDataLoader(torch.arange(32), sampler=GlobalBatchSampler(32, 8, seed=1),
                                   batches_done=lambda: done, epoch_length=lambda: taken,
                                   batch_size=8)

    assert loader(3).state_dict() == {"epoch": 0, "batches_done": 3}
    assert loader(4).state_dict() == {"epoch": 1, "batches_done": 0}
    assert loader(2, taken=2).state_dict() == {"epoch": 1, "batches_done": 0}
    uninterrupted = GlobalBatchSampler(32, 8, seed=1)
    uninterrupted.set_epoch(1)
    epoch_1 = _batches(ResumableDataLoader(torch.arange(32), sampler=uninterrupted,
                                           batches_done=lambda: 0, batch_size=8))
    for state in ({"epoch": 1, "batches_done": 0}, {"epoch": 0, "batches_done": 4}):  # new, old
        resumed = loader(0)
        resumed.load_state_dict(state)
        resumed.sampler.set_epoch(1)  # what Lightning's fit loop then calls
        assert _batches(resumed) == epoch_1
    # a position inside epoch 0 applies to epoch 0 only, once
    resumed = loader(0)
    resumed.load_state_dict({"epoch": 0, "batches_done": 3})
    resumed.sampler.set_epoch(0)
    assert len(_batches(resumed)) == 1 and len(_batches(resumed)) == 4
    resumed.load_state_dict({"epoch": 0, "batches_done": 3})
    resumed.sampler.set_epoch(1)
    assert _batches(resumed) == epoch_1


def _final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == STEPS
    return {"ema": checkpoint["state_dict"], "raw": checkpoint["current_model_state"]}


def assert_same_weights(reference: Path, resumed: Path) -> None:
    expected, got = _final_weights(reference), _final_weights(resumed)
    for kind in ("ema", "raw"):
        assert expected[kind].keys() == got[kind].keys()
        for name, value in expected[kind].items():
            assert torch.equal(value, got[kind][name]), (kind, name)


def history_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of ``<run dir>/csv/metrics.csv``."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_history(reference: Path, resumed: Path) -> None:
    """``metrics.csv`` holds the uninterrupted run's rows (values included), each (step, metric)
    once: no gap, no repeat."""
    rows = history_rows(resumed)
    pairs = [(row["step"], key) for row in rows for key, value in row.items()
             if value and key not in ("step", "epoch")]
    assert len(pairs) == len(set(pairs)), sorted(pairs)

    def table(found: list[dict[str, str]]) -> list[tuple[tuple[str, str], ...]]:
        return sorted(tuple(sorted((key, value) for key, value in row.items() if value))
                      for row in found)

    assert table(rows) == table(history_rows(reference))


def _train(run_dir: Path, overrides: list[str], monkeypatch=None, kill: L.Callback | None = None,
           base: list[str] = TINY):
    cfg = compose_config("train", [*base, *overrides], run_dir)
    if kill is None:
        return train_module.run(cfg)
    build_callbacks = train_module.build_callbacks
    monkeypatch.setattr(train_module, "build_callbacks",
                        lambda c, **kwargs: [*build_callbacks(c, **kwargs), kill])
    try:
        with pytest.raises(_Killed):
            train_module.run(cfg)
    finally:
        monkeypatch.setattr(train_module, "build_callbacks", build_callbacks)
    assert read_status(run_dir)["status"] == "failed"


def test_killed_after_the_epoch_boundary_checkpoint_resumes_to_the_same_weights(
        tmp_path, monkeypatch, single_thread):
    """Checkpoint of step 4 = the last batch of epoch 0; killed at step 5; rerun: epoch 1 must
    start at its first batch (with limit_train_batches it used to skip its first 4)."""
    reference = tmp_path / "reference"
    _train(reference, LIMITED)
    killed = tmp_path / "killed"
    _train(killed, LIMITED, monkeypatch, kill=_KillAtStep(5))
    _train(killed, LIMITED)
    assert read_status(killed)["status"] == "finished"
    assert_same_weights(reference, killed)


def test_killed_right_after_a_checkpoint_write_resumes_from_it(tmp_path, monkeypatch,
                                                               single_thread):
    """Killed between writing step_0000006.ckpt and last.ckpt (still at step 4): the rerun
    resumes from step 6 (the newest by global step), mid-epoch, on the small split."""
    reference = tmp_path / "reference"
    _train(reference, SMALL_SPLIT)
    save = AtomicCheckpointIO.save_checkpoint

    def save_then_die(self, checkpoint, path, storage_options=None):
        save(self, checkpoint, path, storage_options)
        if Path(path).name == "step_0000006.ckpt":
            raise _Killed("killed after writing step 6")

    killed = tmp_path / "killed"
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        _train(killed, SMALL_SPLIT)
    monkeypatch.undo()
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)[
        "global_step"] == 4
    _train(killed, SMALL_SPLIT)
    assert_same_weights(reference, killed)
    assert read_done(killed)["global_step"] == STEPS


def test_killed_right_after_a_checkpoint_write_keeps_every_logged_step_once(tmp_path, monkeypatch,
                                                                            single_thread):
    """Killed right after step_0000004.ckpt (the last batch of epoch 0, validated after the
    checkpoint): the loss of that batch was logged and fsynced before the checkpoint, and the
    rerun runs the validation of step 4 (grid and val/loss) that the kill cut off."""
    reference = tmp_path / "reference"
    _train(reference, LIMITED, base=LOGGED)
    save = AtomicCheckpointIO.save_checkpoint
    logged_at_save = []

    def save_then_die(self, checkpoint, path, storage_options=None):
        logged_at_save.append(sorted({row["step"] for row in history_rows(killed)}))
        save(self, checkpoint, path, storage_options)
        if Path(path).name == "step_0000004.ckpt":
            raise _Killed("killed after writing step 4")

    killed = tmp_path / "killed"
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        _train(killed, LIMITED, base=LOGGED)
    monkeypatch.undo()
    assert logged_at_save == [["0", "1"], ["0", "1"], ["0", "1", "2", "3"]]  # through the step
    assert not (killed / "samples" / "step_0000004.png").exists()
    _train(killed, LIMITED, base=LOGGED)
    assert_same_weights(reference, killed)
    assert_same_history(reference, killed)
    assert (killed / "samples" / "step_0000004.png").read_bytes() == (
        reference / "samples" / "step_0000004.png").read_bytes()


def _train_killed_after_writing(run_dir: Path, step: int, overrides: list[str], monkeypatch,
                                base: list[str] = TINY) -> None:
    """Train until ``step_<step>.ckpt`` is written, then die (as ``after-save`` in a process)."""
    save = AtomicCheckpointIO.save_checkpoint

    def save_then_die(self, checkpoint, path, storage_options=None):
        save(self, checkpoint, path, storage_options)
        if Path(path).name == f"step_{step:07d}.ckpt":
            raise _Killed(f"killed after writing step {step}")

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_then_die)
    try:
        with pytest.raises(_Killed):
            _train(run_dir, overrides, base=base)
    finally:
        monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)


def _epoch_progress(checkpoint_path: Path) -> dict:
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    return checkpoint["loops"]["fit_loop"]["epoch_progress"]


def test_killed_after_two_epoch_end_checkpoints_in_a_row_resumes_to_the_same_weights(
        tmp_path, monkeypatch, single_thread):
    """Killed right after the checkpoint of step 4 (the last batch of epoch 0), rerun and killed
    right after that of step 8 (the last batch of epoch 1), rerun: epoch 2 trains on its own data.
    The first restart must count epoch 1 as started, as the uninterrupted run does; Lightning
    alone leaves it uncounted, and the second restart then trained epoch 1 again."""
    reference = tmp_path / "reference"
    _train(reference, LIMITED, base=LOGGED)
    killed = tmp_path / "killed"
    _train_killed_after_writing(killed, 4, LIMITED, monkeypatch, base=LOGGED)
    _train_killed_after_writing(killed, 8, LIMITED, monkeypatch, base=LOGGED)
    step_8 = Path("checkpoints") / "step_0000008.ckpt"
    assert _epoch_progress(killed / step_8) == _epoch_progress(reference / step_8)
    _train(killed, LIMITED, base=LOGGED)
    assert read_status(killed)["status"] == "finished"
    assert_same_weights(reference, killed)
    assert_same_history(reference, killed)


def _loop_state(epochs: tuple[int, int, int, int], batches: tuple[int, int, int, int]) -> dict:
    """A checkpoint's ``loops`` with the fit loop's epoch counters and the epoch loop's batch
    counters of the current epoch, each (ready, started, processed, completed)."""
    def progress(counts):
        return dict(zip(("ready", "started", "processed", "completed"), counts))

    return {"fit_loop": {
        "epoch_progress": {"total": progress(epochs), "current": progress(epochs)},
        "epoch_loop.batch_progress": {"total": progress(batches), "current": progress(batches),
                                      "is_last_batch": True}}}


def test_a_checkpoint_with_its_epoch_uncounted_gets_it_counted_on_load():
    """A checkpoint a run resumed without the fix wrote in its next epoch (counters all 1, in a
    training batch) counts that epoch as ready and started; correct checkpoints, in an epoch or
    between two, are left as they are."""
    def loaded(epochs, batches):
        checkpoint = {"loops": _loop_state(epochs, batches)}
        EpochCountersOnRestart().on_load_checkpoint(None, None, checkpoint)
        return checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]

    assert loaded((1, 1, 1, 1), (4, 4, 4, 3)) == {"ready": 2, "started": 2, "processed": 1,
                                                  "completed": 1}
    assert loaded((1, 1, 1, 1), (2, 2, 2, 1))["started"] == 2  # mid-epoch too
    assert loaded((2, 2, 1, 1), (4, 4, 4, 3))["started"] == 2  # counted: unchanged
    assert loaded((1, 1, 1, 1), (4, 4, 4, 4))["started"] == 1  # between epochs: unchanged
    assert loaded((1, 1, 0, 0), (4, 4, 4, 3))["started"] == 1
    EpochCountersOnRestart().on_load_checkpoint(None, None, {})  # no loop state: nothing to do


@pytest.mark.slow
def test_a_checkpoint_written_after_an_uncorrected_restart_resumes_to_the_same_weights(
        tmp_path, monkeypatch, single_thread):
    """A run resumed from the step 4 checkpoint without :class:`EpochCountersOnRestart`'s
    restart correction wrote a step 8 checkpoint with epoch 1 uncounted; resuming from it now
    continues with epoch 2 and ends with the uninterrupted run's weights."""
    reference = tmp_path / "reference"
    _train(reference, LIMITED)
    killed = tmp_path / "killed"
    _train_killed_after_writing(killed, 4, LIMITED, monkeypatch)
    monkeypatch.setattr(EpochCountersOnRestart, "on_train_start", lambda *args: None)
    _train_killed_after_writing(killed, 8, LIMITED, monkeypatch)
    monkeypatch.undo()
    step_8 = Path("checkpoints") / "step_0000008.ckpt"
    assert _epoch_progress(killed / step_8)["total"]["started"] == 1  # epoch 1 uncounted
    _train(killed, LIMITED)
    assert_same_weights(reference, killed)


@pytest.mark.slow
@pytest.mark.parametrize("epochs", ["small_split", "limited"])
def test_every_kill_point_in_process_resumes_to_the_same_weights(tmp_path, monkeypatch,
                                                                 single_thread, epochs):
    """Killed before every step 1..11 (so resumed from every checkpoint 2..10, three of them at
    epoch boundaries), and from checkpoints a preemption handler writes at the end of any step."""
    overrides = SMALL_SPLIT if epochs == "small_split" else LIMITED
    reference = tmp_path / "reference"
    _train(reference, overrides)
    for step in range(1, STEPS):
        killed = tmp_path / f"killed_{step}"
        _train(killed, overrides, monkeypatch, kill=_KillAtStep(step))
        _train(killed, overrides)
        assert_same_weights(reference, killed)

    class SaveAndDie(L.Callback):  # what callbacks.preemption does at a signal
        def __init__(self, step):
            self.step = step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == self.step:
                trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints"
                                        / f"step_{self.step:07d}.ckpt")
                raise _Killed("saved and stopped")

    for step in (3, 4, 5, 8):
        stopped = tmp_path / f"stopped_{step}"
        _train(stopped, overrides, monkeypatch, kill=SaveAndDie(step))
        _train(stopped, overrides)
        assert_same_weights(reference, stopped)


# ------------------------------------------------------------------------ SIGKILL, subprocesses

#: ``python -c`` program: ``train.py`` with a kill planted at ``point`` (``step N``: SIGKILL in
#: training step N; ``after-save N``: right after step_N.ckpt is written; ``mid-save N``: while
#: step_N.ckpt is half written; ``sigterm N``: SIGTERM in step N, which saves and stops;
#: ``after-grid N``: right after samples/step_N.png is written, before the validation's metrics).
KILL_HARNESS = r"""
import os, runpy, signal, sys
point, value = sys.argv[1], int(sys.argv[2])
sys.argv = [sys.argv[3], *sys.argv[4:]]
from diffsweep import files
from diffsweep.callbacks import samples
from diffsweep.checkpoints import AtomicCheckpointIO
from diffsweep.module import DiffusionModule
if point == "after-grid":
    save_grid = samples.save_grid
    def dying_grid(images, path, nrow=None):
        written = save_grid(images, path, nrow)
        if os.path.basename(str(path)) == f"step_{value:07d}.png":
            os.kill(os.getpid(), signal.SIGKILL)
        return written
    samples.save_grid = dying_grid
elif point in ("step", "sigterm"):
    training_step = DiffusionModule.training_step
    def dying_step(self, batch, batch_idx):
        if self.global_step == value:
            os.kill(os.getpid(), signal.SIGKILL if point == "step" else signal.SIGTERM)
        return training_step(self, batch, batch_idx)
    DiffusionModule.training_step = dying_step
else:
    save = AtomicCheckpointIO.save_checkpoint
    name = f"step_{value:07d}.ckpt"
    def dying_save(self, checkpoint, path, storage_options=None):
        if point == "mid-save" and os.path.basename(str(path)) == name:
            def half_then_die(obj, handle):
                handle.write(b"half a checkpoint")
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            files.torch.save = half_then_die
        save(self, checkpoint, path, storage_options)
        if point == "after-save" and os.path.basename(str(path)) == name:
            os.kill(os.getpid(), signal.SIGKILL)
    AtomicCheckpointIO.save_checkpoint = dying_save
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("DIFFSWEEP_ROOT", None)
    return env


def _command(overrides: list[str], run_dir: Path | None, base: list[str] = TINY) -> list[str]:
    return [*base, *overrides, *([f"hydra.run.dir={run_dir}"] if run_dir else [])]


def _killed_process(cwd: Path, point: str, value: int, overrides: list[str],
                    run_dir: Path | None, base: list[str] = TINY) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILL_HARNESS, point, str(value),
                           str(REPO / "train.py"), *_command(overrides, run_dir, base)],
                          cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def _plain_process(cwd: Path, overrides: list[str], run_dir: Path | None,
                   base: list[str] = TINY) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"),
                           *_command(overrides, run_dir, base)],
                          cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def _only_run_dir(cwd: Path) -> Path:
    runs = sorted((cwd / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_sigkill_at_random_steps_then_the_same_command_ends_with_the_same_weights(tmp_path):
    """SIGKILL (and SIGTERM) at the epoch boundary, right after and in the middle of checkpoint
    writes, at random steps and twice in one run; each time the plain command is rerun: the
    weights are the uninterrupted run's bit for bit, csv/metrics.csv holds its rows once."""
    overrides = LIMITED
    reference = tmp_path / "reference"
    result = _plain_process(tmp_path, overrides, reference, base=LOGGED)
    assert result.returncode == 0, result.stderr[-3000:]
    draw = random.Random(13)
    cases = [[("step", 4)], [("after-save", 4)], [("mid-save", 6)], [("sigterm", 5)],
             [("step", draw.randrange(1, STEPS))], [("step", 3), ("after-save", 8)]]
    for number, kills in enumerate(cases):
        cwd = tmp_path / f"case_{number}"
        cwd.mkdir()
        # the first case finds its run directory as users do (resume=auto, same command)
        run_dir = None if number == 0 else cwd / "run"
        for point, value in kills:
            killed = _killed_process(cwd, point, value, overrides, run_dir, LOGGED)
            expected = -signal.SIGKILL if point != "sigterm" else 128 + signal.SIGTERM
            assert killed.returncode == expected, (kills, killed.stderr[-3000:])
        found = run_dir or _only_run_dir(cwd)
        assert read_status(found)["status"] in ("running", "failed"), kills
        if ("mid-save", 6) in kills:
            assert list((found / "checkpoints").glob(".step_0000006.ckpt.*.partial"))
        result = _plain_process(cwd, overrides, run_dir, base=LOGGED)
        assert result.returncode == 0, (kills, result.stderr[-3000:])
        assert (run_dir or _only_run_dir(cwd)) == found  # no second run directory
        assert read_status(found)["status"] == "finished" and read_done(found) is not None
        assert not list(found.rglob("*.partial")), kills
        assert_same_weights(reference, found)
        assert_same_history(reference, found)


def _killed_when_file_appears(cwd: Path, relative: str, overrides: list[str], run_dir: Path,
                              base: list[str] = TINY) -> int:
    """Start the plain ``train.py`` command, SIGKILL it as soon as ``<run dir>/<relative>``
    exists (polled every millisecond); returns the exit status."""
    target = run_dir / relative
    with open(cwd / "killed.log", "w") as output:
        process = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                                    *_command(overrides, run_dir, base)],
                                   cwd=cwd, env=_env(), stdout=output, stderr=output)
        deadline = time.monotonic() + 300
        while not target.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise AssertionError(f"{target} never appeared: "
                                     f"{(cwd / 'killed.log').read_text()[-3000:]}")
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
        return process.wait(timeout=60)


@pytest.mark.slow
def test_sigkill_right_after_a_checkpoint_or_a_grid_appears_keeps_every_logged_step_once(
        tmp_path):
    """SIGKILL as soon as a checkpoint or a sample grid appears (polled from outside), and right
    after the last step's checkpoint and right after a grid (planted), then the same command:
    the weights are the uninterrupted run's bit for bit and csv/metrics.csv holds its rows, each
    (step, metric) once."""
    overrides = LIMITED
    reference = tmp_path / "reference"
    result = _plain_process(tmp_path, overrides, reference, base=LOGGED)
    assert result.returncode == 0, result.stderr[-3000:]
    cases = [("appears", "checkpoints/step_0000004.ckpt"), ("appears", "samples/step_0000008.png"),
             ("after-save", 12), ("after-grid", 4)]
    for number, (point, value) in enumerate(cases):
        cwd = tmp_path / f"case_{number}"
        cwd.mkdir()
        run_dir = cwd / "run"
        if point == "appears":
            status = _killed_when_file_appears(cwd, str(value), overrides, run_dir, LOGGED)
        else:
            status = _killed_process(cwd, point, int(value), overrides, run_dir,
                                     LOGGED).returncode
        assert status == -signal.SIGKILL, (point, value, status)
        assert read_status(run_dir)["status"] == "running", (point, value)
        result = _plain_process(cwd, overrides, run_dir, base=LOGGED)
        assert result.returncode == 0, (point, value, result.stderr[-3000:])
        assert read_status(run_dir)["status"] == "finished" and read_done(run_dir) is not None
        assert_same_weights(reference, run_dir)
        assert_same_history(reference, run_dir)
        assert (run_dir / "samples" / "final.png").read_bytes() == (
            reference / "samples" / "final.png").read_bytes(), (point, value)


@pytest.mark.slow
def test_sigkill_twice_in_a_row_then_the_same_command_ends_with_the_same_weights(tmp_path):
    """Two kills in a row, each rerun with the next kill planted, then the plain command: after the
    epoch-end checkpoints of steps 4 and 8 (the restart from step 4 used to leave epoch 1
    uncounted, so the one from step 8 trained epoch 1 again), and other pairs around the epoch
    boundary. The weights and csv/metrics.csv are the uninterrupted run's."""
    overrides = LIMITED
    reference = tmp_path / "reference"
    result = _plain_process(tmp_path, overrides, reference, base=LOGGED)
    assert result.returncode == 0, result.stderr[-3000:]
    cases = [[("after-save", 4), ("after-save", 8)], [("after-save", 2), ("after-save", 8)],
             [("step", 5), ("after-save", 8)], [("after-save", 4), ("after-save", 12)]]
    for number, kills in enumerate(cases):
        cwd = tmp_path / f"case_{number}"
        cwd.mkdir()
        run_dir = cwd / "run"
        for point, value in kills:
            killed = _killed_process(cwd, point, value, overrides, run_dir, LOGGED)
            assert killed.returncode == -signal.SIGKILL, (kills, killed.stderr[-3000:])
        result = _plain_process(cwd, overrides, run_dir, base=LOGGED)
        assert result.returncode == 0, (kills, result.stderr[-3000:])
        assert read_status(run_dir)["status"] == "finished", kills
        assert_same_weights(reference, run_dir)
        assert_same_history(reference, run_dir)
