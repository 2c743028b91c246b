"""Rerunnable sweeps: finished jobs are skipped with their outputs untouched, unfinished ones
continue; an evaluation rerun replaces its results rows; run directories are never shared; the
partial files of killed writers are cleaned up."""

from __future__ import annotations

import csv
import importlib.util
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import diffsweep.train as train_module
from diffsweep import evaluate, results
from diffsweep.files import partial_path, remove_stale_partials
from diffsweep.resume import claim_new_dir, read_done, read_status, resumable_run_dir, run_status
from tests.conftest import REPO, compose_config
from tests.test_resume_kill import KILL_HARNESS, LIMITED, TINY

RUN = [*TINY, "trainer.max_steps=4", "data.source.val_fraction=0.98"]
#: Every output of a training job a rerun must leave alone.
WITH_OUTPUTS = ["+callbacks.sample_grid._target_=diffsweep.callbacks.samples.SampleGrid",
                "+callbacks.sample_grid.output_dir=${paths.output_dir}",
                "+callbacks.sample_grid.num_samples=4", "logger=csv"]


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder`` with its mtime and bytes, except Hydra's own (``.hydra/``,
    ``multirun.yaml`` and the job logs, which Hydra writes before a job starts)."""
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(folder.rglob("*")) if path.is_file()
            and ".hydra" not in path.parts and path.name != "multirun.yaml"
            and not path.name.endswith(".log")}


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------------------ training jobs

def test_a_finished_training_job_is_skipped_and_its_outputs_never_rewritten(tmp_path):
    job = tmp_path / "sweep" / "0"
    metrics = train_module.run(compose_config("train", [*RUN, *WITH_OUTPUTS], job))
    for output in ("samples/final.png", "csv/metrics.csv", "checkpoints/last.ckpt", "done.json"):
        assert (job / output).is_file(), output
    done = read_done(job)
    assert done["global_step"] == 4 and done["metrics"] == pytest.approx(metrics)
    before = _snapshot(job)
    again = train_module.run(compose_config("train", [*RUN, *WITH_OUTPUTS], job))
    assert again == pytest.approx(metrics)  # what a sweeper (optimized_metric) reads
    assert _snapshot(job) == before


def test_a_run_stopped_before_its_end_is_not_done_and_the_rerun_finishes_it(tmp_path,
                                                                           monkeypatch):
    class StopAtStep2(L.Callback):  # a graceful stop (trainer.should_stop), not a crash
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                trainer.should_stop = True

    job = tmp_path / "job"
    build_callbacks = train_module.build_callbacks
    monkeypatch.setattr(train_module, "build_callbacks",
                        lambda cfg, **kwargs: [*build_callbacks(cfg, **kwargs), StopAtStep2()])
    train_module.run(compose_config("train", RUN, job))
    monkeypatch.undo()
    assert read_status(job)["status"] == "stopped" and read_done(job) is None
    train_module.run(compose_config("train", RUN, job))
    assert read_done(job)["global_step"] == 4 and read_status(job)["status"] == "finished"


# ------------------------------------------------------------------------------ evaluation jobs

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train_module.run(compose_config("train", RUN, run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


def _evaluate(job: Path, checkpoint: Path, results_file: Path, num_steps: int) -> dict:
    cfg = compose_config("evaluate", [f"ckpt_path={checkpoint}", "logger=none", "grid_samples=4",
                                      "metrics=fid_tiny", "metrics.fid.evaluator.num_samples=8",
                                      f"sampler.num_steps={num_steps}",
                                      f"results_file={results_file}"], job)
    return evaluate.run(cfg)


def _load_analyze():
    spec = importlib.util.spec_from_file_location(
        "analyze_vp_vs_ve_rerun", REPO / "experiments" / "vp_vs_ve" / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_an_evaluation_rerun_replaces_its_rows_and_skips_finished_jobs(tmp_path, checkpoint):
    sweep, table = tmp_path / "sweep", tmp_path / "sweep" / "results.csv"
    first = [_evaluate(sweep / str(job), checkpoint, table, steps)
             for job, steps in ((0, 2), (1, 3))]
    rows = results.read_rows(table)
    assert [row["num_steps"] for row in rows] == ["2", "3"] and rows[0]["weights"] == "ema"
    before = _snapshot(sweep)
    # the same sweep again: both jobs finished, nothing is recomputed or rewritten
    again = [_evaluate(sweep / str(job), checkpoint, table, steps)
             for job, steps in ((0, 2), (1, 3))]
    assert again == first and _snapshot(sweep) == before
    # job 1 was killed after its row, before its done marker: it runs again, its row is replaced
    (sweep / "1" / "done.json").unlink()
    _evaluate(sweep / "1", checkpoint, table, 3)
    rows = results.read_rows(table)
    assert [row["num_steps"] for row in rows] == ["2", "3"]
    # another sweep writing the same measurement into the same table (experiments/*/run.sh)
    _evaluate(tmp_path / "other_sweep" / "0", checkpoint, table, 2)
    assert [row["num_steps"] for row in results.read_rows(table)] == ["2", "3"]
    analyze = _load_analyze()
    groups = analyze.group(analyze.load_rows([table]))
    assert [len(fids) for by_nfe in groups.values() for fids in by_nfe.values()] == [1, 1]


# ------------------------------------------------------------------------------ run directories

def _claim(args: tuple[str, str, multiprocessing.Queue]) -> None:
    parent, name, queue = args
    queue.put(claim_new_dir(parent, name))


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_claim, args=((str(tmp_path), "2030-01-01_00-00-00",
                                                     queue),)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    claimed = sorted(queue.get(timeout=10) for _ in workers)
    assert [Path(path).name for path in claimed] == [
        "2030-01-01_00-00-00", "2030-01-01_00-00-00_2", "2030-01-01_00-00-00_3",
        "2030-01-01_00-00-00_4"]
    # the resolver: a taken timestamp folder (another command's run) is not reused
    runs = tmp_path / "runs"
    (runs / "t0").mkdir(parents=True)
    with run_status(runs / "t0", "a=1"):
        pass
    assert resumable_run_dir(str(runs), "t0", "auto", "b=2") == str(runs / "t0_2")
    # ...and within one process the same name resolves to the same directory
    assert resumable_run_dir(str(runs), "t0", "auto", "b=2") == str(runs / "t0_2")


def test_stale_partial_files_are_removed_and_nothing_else(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    stale = checkpoints / f".last.ckpt.{dead}.partial"
    live = checkpoints / f".step_0000002.ckpt.{alive}.partial"
    real = [checkpoints / "last.ckpt", checkpoints / "notes.partial",
            checkpoints / f"last.ckpt.{dead}.partial", checkpoints / f".odd.{dead}.partial.txt"]
    for path in (stale, live, *real):
        path.write_bytes(b"x")
    assert partial_path(checkpoints / "last.ckpt").name == f".last.ckpt.{alive}.partial"
    sample = tmp_path / "run" / "samples" / f".final.png.{dead}.partial"
    sample.parent.mkdir()
    sample.write_bytes(b"x")
    assert remove_stale_partials(tmp_path / "run", recursive=False) == []
    with run_status(tmp_path / "run", "a=1"):  # a run resuming in this directory
        pass
    assert not stale.exists() and not sample.exists()
    assert live.exists() and all(path.exists() for path in real)
    table = tmp_path / "results.csv"
    leftover = tmp_path / f".results.csv.{dead}.partial"
    leftover.write_bytes(b"half")
    results.append_row(table, {"a": 1})
    assert not leftover.exists()


# ------------------------------------------------------------------------------ real sweeps (slow)

def _env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("DIFFSWEEP_ROOT", None)
    return env


@pytest.mark.slow
def test_an_interrupted_train_sweep_reruns_to_completion_skipping_finished_jobs(tmp_path):
    """Job 0 finishes, job 1 is SIGKILLed at step 5; the same sweep command then leaves job 0
    alone and continues job 1 from its step-4 checkpoint."""
    sweep = tmp_path / "sweep"
    command = ["-m", "scheduler=linear,cosine", f"hydra.sweep.dir={sweep}", *TINY, *LIMITED,
               "trainer.max_steps=6", *WITH_OUTPUTS]
    job_one_kill = KILL_HARNESS.replace(
        "if self.global_step == value:",
        "from hydra.core.hydra_config import HydraConfig\n"
        "        if self.global_step == value and HydraConfig.get().job.num == 1:")
    killed = subprocess.run([sys.executable, "-c", job_one_kill, "step", "5",
                             str(REPO / "train.py"), *command], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert read_done(sweep / "0") is not None and read_done(sweep / "1") is None
    finished_job = _snapshot(sweep / "0")
    rerun = subprocess.run([sys.executable, str(REPO / "train.py"), *command], cwd=tmp_path,
                           env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _snapshot(sweep / "0") == finished_job
    assert "Resuming from" in rerun.stdout + rerun.stderr
    assert read_done(sweep / "1")["global_step"] == 6
    resumed = torch.load(sweep / "1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 6
    assert (sweep / "1" / "samples" / "final.png").is_file()


@pytest.mark.slow
def test_an_evaluation_sweep_rerun_keeps_one_row_per_job(tmp_path, checkpoint):
    command = [str(REPO / "evaluate.py"), f"ckpt_path={checkpoint}", "-m", "sampler=ddim,heun",
               "sampler.num_steps=2", "metrics=fid_tiny", "metrics.fid.evaluator.num_samples=8",
               "grid_samples=4", "logger=none", "hydra.sweep.dir=sweep"]
    for attempt in range(2):
        result = subprocess.run([sys.executable, *command], cwd=tmp_path, env=_env(),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        if attempt == 0:
            before = _snapshot(tmp_path / "sweep")
    assert _snapshot(tmp_path / "sweep") == before
    with open(tmp_path / "sweep" / "results.csv") as handle:
        assert sorted(row["sampler"] for row in csv.DictReader(handle)) == ["ddim", "heun"]


@pytest.mark.slow
def test_two_runs_started_together_never_share_a_run_directory(tmp_path):
    """Both fail validation right after Hydra wrote their .hydra/ files: each wrote its own."""
    processes = [subprocess.Popen([sys.executable, str(REPO / "train.py"), "seed=abc",
                                   f"tags=[{name}]"], cwd=tmp_path, env=_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for name in ("first", "second")]
    for process in processes:
        process.wait(timeout=300)
    runs = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 2, runs
    tags = sorted(str(yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()))
                  for run in runs)
    assert tags == ["['seed=abc', 'tags=[first]']", "['seed=abc', 'tags=[second]']"]
