"""A real SLURM cluster (``.ci/slurm.sh start``: one node, partition ``debug``): the README's SLURM
sweep submits two jobs of two gloo DDP tasks each through hydra-submitit-launcher, and a job
signalled with USR2 saves its current step, requeues itself, resumes from that checkpoint and ends
with the weights of the uninterrupted job, bit for bit.

Skipped, with the reason, where no cluster answers (``.ci/slurm.sh`` could not install or start
one, or it was not started). ``.ci/run`` runs this file as its own step, between
``.ci/slurm.sh start`` and ``.ci/slurm.sh stop``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow

SLURM_DIR = Path(os.environ.get("DIFFSWEEP_SLURM_DIR", "/tmp/diffsweep-slurm"))

#: The README's SLURM sweep, CPU version: partition debug, no GPUs, 2 tasks (gloo ranks) per job.
README_SWEEP = ["-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug",
                "trainer.accelerator=cpu", "hydra.launcher.gpus_per_node=null",
                "trainer.devices=2", "scheduler=linear,cosine"]
#: The node has 2 CPUs: a 2-task job takes all of it (the jobs run one after the other).
ONE_CPU_PER_TASK = ["hydra.launcher.cpus_per_task=1"]
#: Tiny jobs: 24 steps of a 40k-parameter net, validation (one batch, a 4-image grid) at 12 and
#: 24, checkpoints every 3 steps.
TINY = ["model.base_channels=8", "model.channel_mults=[1,2]", "model.num_res_blocks=1",
        "model.attention_resolutions=[]", "data.resolution=8", "trainer.max_steps=24",
        "trainer.val_check_interval=12", "++trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1", "trainer.enable_model_summary=false", "data.batch_size=16",
        "sampler.num_steps=2", "callbacks.sample_grid.num_samples=4",
        "callbacks.model_checkpoint.every_n_train_steps=3", "~callbacks.progress_bar",
        "lr_schedule.warmup_steps=2"]
JOB_TIMEOUT_S = 900


def _cluster_problem() -> str | None:
    """Why the tests cannot run here, or None."""
    if importlib.util.find_spec("submitit") is None or \
            importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        return "hydra-submitit-launcher is not installed (pip install -e '.[slurm]')"
    reason = SLURM_DIR / "unavailable"
    if reason.is_file():
        return f"no SLURM cluster: {reason.read_text().strip()}"
    if shutil.which("sinfo") is None:
        return "no SLURM client (sinfo); start a cluster with .ci/slurm.sh start"
    try:
        answer = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%T"], capture_output=True,
                                text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s; start a cluster with .ci/slurm.sh start"
    states = answer.stdout.split()
    if answer.returncode != 0 or not states:
        said = ((answer.stderr or answer.stdout).strip() or "no partition debug").splitlines()[-1]
        return f"no SLURM cluster answers ({said}); start one with .ci/slurm.sh start"
    if not {"idle", "mixed", "allocated", "completing"} & {s.rstrip("*~#") for s in states}:
        return f"partition debug has no usable node (states: {states})"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def _env() -> dict[str, str]:
    # The cluster's sacct stand-in (answers from the job completion log; .ci/slurm.sh) first.
    path = f"{SLURM_DIR / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
            "HYDRA_FULL_ERROR": "1"}


def _train(*overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *overrides]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _squeue(*args: str) -> list[list[str]]:
    out = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, timeout=30)
    return [line.split() for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def readme_sweep(cluster, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's sweep, run once: (sweep dir, the launcher process)."""
    cwd = tmp_path_factory.mktemp("readme_sweep")
    sweep_dir = cwd / "multirun"
    launcher = subprocess.run(
        _train(*README_SWEEP, *ONE_CPU_PER_TASK, *TINY, f"hydra.sweep.dir={sweep_dir}"),
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=2 * JOB_TIMEOUT_S)
    return sweep_dir, launcher


def test_readme_slurm_sweep_runs_two_jobs_of_two_gloo_ranks_to_the_end(readme_sweep):
    sweep_dir, launcher = readme_sweep
    output = launcher.stdout + launcher.stderr
    assert launcher.returncode == 0, output[-4000:]
    assert "sacct" not in output  # job states read without errors on a cluster without accounting
    for job, scheduler in ((0, "linear"), (1, "cosine")):
        job_dir = sweep_dir / str(job)
        final = _load(job_dir / "checkpoints" / "last.ckpt")
        assert final["global_step"] == 24
        assert final["diffsweep_config"]["scheduler"]["beta_schedule"] == (
            "linear" if scheduler == "linear" else "squaredcos_cap_v2")
        assert (job_dir / "samples" / "final.png").is_file()
        assert (job_dir / "csv" / "metrics.csv").read_text().count("\n") > 24
        assert '"status": "finished"' in (job_dir / "run_status.json").read_text()
        # One SLURM job with two tasks: global ranks 0 and 1 of one gloo process group.
        (task_dir,) = [p for p in (sweep_dir / ".submitit").iterdir() if p.name.endswith(f"_{job}")]
        logs = {path.name: path.read_text() for path in task_dir.glob("*_log.*")}
        assert {name.rsplit("_log", 1)[0][-1] for name in logs} == {"0", "1"}  # task ids
        rank0 = "".join(text for name, text in logs.items() if name.endswith("_0_log.err"))
        assert "distributed_backend=gloo" in rank0 and "Starting with 2 processes" in rank0


def _wait(condition, timeout: float, what: str, process: subprocess.Popen | None = None,
          every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            break
        time.sleep(every)
    output = (process.communicate()[0][-4000:]
              if process is not None and process.poll() is not None else "")
    raise AssertionError(f"timed out waiting for {what}\n{output}")


def test_usr2_saves_requeues_and_the_job_resumes_to_the_uninterrupted_weights(readme_sweep,
                                                                             tmp_path):
    sweep_dir, _ = readme_sweep
    expected = _load(sweep_dir / "0" / "checkpoints" / "last.ckpt")  # the uninterrupted job
    preempted_dir = tmp_path / "multirun"
    command = [o if not o.startswith("scheduler=") else "scheduler=linear" for o in README_SWEEP]
    launcher = subprocess.Popen(
        _train(*command, *ONE_CPU_PER_TASK, *TINY, f"hydra.sweep.dir={preempted_dir}"),
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job_dir = preempted_dir / "0"
    _wait(lambda: (job_dir / "checkpoints" / "step_0000003.ckpt").exists(), JOB_TIMEOUT_S,
          "the job's step-3 checkpoint", launcher, every=0.05)
    (job_id,) = [row[0] for row in _squeue("-o", "%i %T") if row[1] == "RUNNING"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)

    # SLURM holds a requeued job for 120 s before it is eligible again; let it start now.
    _wait(lambda: any(row[:2] == ["PENDING", "BeginTime"] for row in
                      _squeue("-j", job_id, "-o", "%T %r")), 120, "the job to be requeued",
          launcher)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True,
                   timeout=30)
    output, _ = launcher.communicate(timeout=JOB_TIMEOUT_S)
    assert launcher.returncode == 0, output[-4000:]
    assert "sacct" not in output

    log = (job_dir / "train.log").read_text()  # both attempts append to the job's log
    stopped = [line for line in log.splitlines() if "Stopped on SIGUSR2 at step" in line]
    assert len(stopped) == 1 and "the job was requeued" in stopped[0], log[-4000:]
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert 3 <= step < 24
    assert f"Resuming from {job_dir / 'checkpoints' / f'step_{step:07d}.ckpt'}" in log
    assert '"status": "finished"' in (job_dir / "run_status.json").read_text()
    actual = _load(job_dir / "checkpoints" / "last.ckpt")
    assert actual["global_step"] == expected["global_step"] == 24
    # Two gloo ranks on CPU reduce in a fixed order: the resumed job is bitwise the same.
    for key in ("state_dict", "current_model_state"):
        for name, value in expected[key].items():
            assert torch.equal(value, actual[key][name]), f"{key}.{name}"
