"""DDP under Hydra: rank processes that rebuild the job's own config instead of re-running argv.

Lightning's default DDP launcher (``_SubprocessScriptLauncher``) starts ranks 1..N-1 by re-running
``sys.argv`` with a few Hydra overrides. Under ``-m`` (multirun) that command is the whole sweep,
so every child runs every job (Lightning #11300). Here the entry point registers the job it is
running (:func:`run_job`); when Lightning asks for the other ranks, :class:`HydraDDPStrategy`'s
launcher writes that job's config (resolved, plus Hydra's runtime node) to
``<job dir>/.hydra/ddp_job.yaml`` and starts ``python -m diffsweep.launch <that file>`` per local
rank. A child sets the same ``HydraConfig``, calls the same task function on the same config, in
the same working directory, and creates no Hydra run dir or log file of its own. Lightning's
``rank_zero_only`` keeps loggers, checkpoints, sample grids and results on global rank 0.

At the end of each job the entry point waits for its ranks, destroys the process group and
restores the ``MASTER_*``/``*RANK``/``WORLD_SIZE`` variables the launcher set, so the next job of a
sweep starts its own ranks on a fresh port.

Where the cluster starts the processes itself (SLURM via ``hydra/launcher=submitit_slurm``,
``torchrun``: ``cluster_environment.creates_processes_externally``), nothing is launched; every
task runs the Hydra job and Lightning wires the ranks together.

Select it with ``trainer=ddp`` (``configs/trainer/ddp.yaml``)::

    strategy:
      _target_: diffsweep.launch.HydraDDPStrategy
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf

from diffsweep.files import atomic_write_text

log = logging.getLogger(__name__)

#: File (under the job's Hydra output subdir) the rank processes rebuild the job from.
JOB_FILE = "ddp_job.yaml"
#: Environment variables the launcher sets in the launching process (restored after each job).
DDP_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
#: Seconds a finished rank 0 waits for the other ranks to exit.
CHILD_EXIT_TIMEOUT_S = 120.0


@dataclass
class _Job:
    """The Hydra job this process runs: what a rank process needs to run it too."""

    task: str                      # "package.module:function", called with the config
    config: dict[str, Any]         # the job's config (resolved when written for the ranks)
    hydra: dict[str, Any] | None   # Hydra's runtime node (HydraConfig), when Hydra runs the job
    cwd: str                       # working directory of the job
    launchers: list[_HydraJobLauncher]
    env: dict[str, str | None]     # DDP variables as they were before the job


_current_job: _Job | None = None


def _task_path(task: Callable[..., Any] | str) -> str:
    if isinstance(task, str):
        return task
    module = getattr(task, "__module__", None)
    if not module or module == "__main__":
        raise ValueError(f"The task {task!r} must be importable by the rank processes: pass a "
                         f"function defined in a package module (or 'package.module:function').")
    return f"{module}:{task.__qualname__}"


def _load_task(path: str) -> Callable[[DictConfig], Any]:
    module_name, _, name = path.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in name.split("."):
        target = getattr(target, part)
    return target


@contextlib.contextmanager
def hydra_job(cfg: DictConfig, task: Callable[..., Any] | str) -> Iterator[None]:
    """Register ``task(cfg)`` as the job DDP rank processes must run; clean up after it.

    On exit: waits for (or, after an error, stops) the rank processes this job started, destroys
    the torch.distributed process group and restores the DDP environment variables. A job stopped
    by a signal (:class:`~diffsweep.callbacks.preemption.Preempted`: every rank saved and stops at
    the same step) waits for its ranks without stopping them and lets the ``Preempted`` through.
    """
    from diffsweep.callbacks.preemption import Preempted

    global _current_job
    hydra_node = None
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra_node = OmegaConf.to_container(HydraConfig.get(), resolve=False)
    job = _Job(task=_task_path(task),
               config={key: value for key, value in  # Hydra's node travels separately
                       OmegaConf.to_container(cfg, resolve=False).items()  # type: ignore[union-attr]
                       if key != "hydra"},
               hydra=hydra_node, cwd=os.getcwd(), launchers=[],
               env={key: os.environ.get(key) for key in DDP_ENV_KEYS})
    previous, _current_job = _current_job, job
    outcome = "failed"
    try:
        yield
        outcome = "done"
    except Preempted:
        outcome = "preempted"
        raise
    finally:
        _current_job = previous
        try:
            for launcher in job.launchers:
                launcher.finish(stop=outcome == "failed", check=outcome == "done")
        finally:
            _destroy_process_group()
            for key, value in job.env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def run_job(cfg: DictConfig, task: Callable[[DictConfig], Any] | str) -> Any:
    """``task(cfg)`` inside :func:`hydra_job`: what an entry point's ``@hydra.main`` calls."""
    function = _load_task(task) if isinstance(task, str) else task
    with hydra_job(cfg, task):
        return function(cfg)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def write_job_file(job: _Job, path: Path) -> Path:
    """Write ``job`` (task, config, Hydra node, cwd) as YAML to ``path`` atomically."""
    # Resolved here, in the job's process (``${now:}``, ``${hydra:...}`` as this rank sees them).
    config = OmegaConf.to_container(OmegaConf.create(job.config), resolve=True)
    document = {"task": job.task, "cwd": job.cwd, "config": config, "hydra": job.hydra}
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(document)))
    return path


def job_file_path(job: _Job) -> Path:
    """``<job output dir>/<hydra output subdir or .hydra>/ddp_job.yaml``."""
    runtime = (job.hydra or {}).get("runtime", {})
    output_dir = runtime.get("output_dir") or job.config.get("paths", {}).get("output_dir")
    if not output_dir:
        raise ValueError("Cannot place the DDP job file: neither hydra.runtime.output_dir nor "
                         "paths.output_dir is set.")
    subdir = (job.hydra or {}).get("output_subdir") or ".hydra"
    return Path(output_dir) / subdir / JOB_FILE


class _Observer(_ChildProcessObserver):
    """Lightning's child observer (a rank that dies kills the others and this process, which
    would otherwise hang in a collective), with a ``stop`` for a job that ended."""

    def stop(self) -> None:
        self._child_processes = []  # the next poll finds nothing running and ends the thread
        self._finished = True


class _HydraJobLauncher(_SubprocessScriptLauncher):
    """Starts local ranks 1..N-1 as ``python -m diffsweep.launch <job file>``.

    Without a registered job (no :func:`hydra_job` around ``trainer.fit``) it behaves like
    Lightning's launcher (re-runs ``sys.argv``), except under a Hydra multirun, where that would
    re-run the sweep: that is an error.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._observer: _Observer | None = None

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes,
                                                   num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally and not self.procs:
            self._call_children_scripts()
            self._observer = _Observer(main_pid=os.getpid(), child_processes=self.procs)
            self._observer.start()
        from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _call_children_scripts(self) -> None:
        job = _current_job
        if job is None:
            _refuse_argv_relaunch_in_multirun()
            super()._call_children_scripts()
            return
        self._check_can_spawn_children()
        path = write_job_file(job, job_file_path(job))
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        # The task travels on the command line this process builds, never read back from the job
        # file: a file in the run folder that someone edited cannot choose what a rank calls.
        command = [sys.executable, "-m", "diffsweep.launch", str(path), job.task]
        log.info("Starting %d more DDP rank(s): LOCAL_RANK=1..%d %s", self.num_processes - 1,
                 self.num_processes - 1, " ".join(command))
        for local_rank in range(1, self.num_processes):
            env = os.environ.copy()
            env["LOCAL_RANK"] = str(local_rank)
            if os.environ.get("PL_GLOBAL_SEED") is None:
                env.pop("PL_GLOBAL_SEED", None)
            self.procs.append(subprocess.Popen(command, env=env, cwd=job.cwd))
        job.launchers.append(self)

    def finish(self, stop: bool = False, timeout: float = CHILD_EXIT_TIMEOUT_S,
               check: bool | None = None) -> None:
        """Wait for the ranks this launcher started (``stop``: terminate them first); ``check``
        (default: not ``stop``) raises if one exited with a non-zero status."""
        if self._observer is not None:
            self._observer.stop()
        if stop:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        failures = []
        for rank, proc in enumerate(self.procs, start=1):
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if code != 0:
                failures.append(f"local rank {rank} (pid {proc.pid}) exited with {code}")
        self.procs = []
        if failures and (not stop if check is None else check):
            raise RuntimeError("DDP rank processes failed: " + "; ".join(failures))
        if failures:
            log.warning("DDP rank processes: %s", "; ".join(failures))


def _refuse_argv_relaunch_in_multirun() -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise RuntimeError(
            "DDP under a Hydra multirun needs the job registered for its rank processes: call the "
            "task through diffsweep.launch.run_job(cfg, task) in the @hydra.main function "
            "(Lightning's default would re-run the whole sweep in every rank, Lightning #11300).")


class HydraDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` whose ranks rebuild the running Hydra job (see module doc).

    Accepts every ``DDPStrategy`` argument (``process_group_backend``: None picks NCCL on GPUs,
    gloo on CPUs; ``find_unused_parameters``, ``timeout``, ...). ``start_method`` other than
    ``popen`` uses Lightning's own launchers (spawn/fork), which need no relaunch.
    """

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method != "popen":
            super()._configure_launcher()
            return
        self._launcher = _HydraJobLauncher(self.cluster_environment, self.num_processes,
                                           self.num_nodes)


# ---------------------------------------------------------------------------------- rank process


def _hydra_config(node: dict[str, Any]) -> DictConfig:
    from hydra.conf import HydraConf

    typed = OmegaConf.structured(HydraConf)
    OmegaConf.set_struct(typed, False)  # Hydra's own defaults add keys (e.g. ``env``)
    typed = OmegaConf.merge(typed, node)
    return OmegaConf.create({"hydra": typed})


def rank_main(job_file: str | Path, task: str) -> Any:
    """A rank process: rebuild the job's config from ``job_file`` and run ``task`` on it.

    ``task`` (``package.module:function``) comes from the launching process's command line, not
    from the file; the config goes through the same target registry as any run
    (:mod:`diffsweep.targets`).

    Sets ``HydraConfig`` from the saved node (without Hydra's run dir, config files or log file),
    logs to stderr at WARNING (rank 0 reports), runs in the job's working directory. A rank
    stopped by a signal (:class:`~diffsweep.callbacks.preemption.Preempted`, after the checkpoint
    all ranks saved) exits with status 0: rank 0 reports the stop and exits with 128 + signal, and
    Lightning's watcher in rank 0 kills every rank when one exits with a non-zero status.
    """
    from diffsweep.callbacks.preemption import Preempted

    document = OmegaConf.load(job_file)
    rank = os.environ.get("LOCAL_RANK", "?")
    logging.basicConfig(level=logging.WARNING,
                        format=f"[rank {rank}][%(name)s][%(levelname)s] - %(message)s")
    if document.get("hydra") is not None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(_hydra_config(
            OmegaConf.to_container(document.hydra, resolve=False)))  # type: ignore[arg-type]
    os.chdir(str(document.cwd))
    cfg = document.config
    try:
        return _load_task(task)(cfg)
    except Preempted:
        raise SystemExit(0) from None


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m diffsweep.launch <job dir>/.hydra/ddp_job.yaml "
                 "<package.module:function> (started by diffsweep.launch.HydraDDPStrategy for "
                 "ranks > 0)")
    rank_main(sys.argv[1], sys.argv[2])
