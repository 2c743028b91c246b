"""Stop signals end training with a resumable checkpoint of the current step.

SIGTERM (what SLURM, Kubernetes and ``kill`` send at preemption), SIGINT (Ctrl-C) and SIGUSR1/
SIGUSR2 (SLURM's ``--signal``; submitit asks for USR2 ``signal_delay_s`` before the time limit)
are handled alike while ``trainer.fit`` trains:

1. the handler only records the signal (a checkpoint being written, a validation, a sample grid
   run to their end: nothing is interrupted half way);
2. at the end of the optimizer step in progress (``on_train_batch_end``, after the EMA update,
   the same point as :class:`~lightning.pytorch.callbacks.ModelCheckpoint`'s periodic saves) every
   rank learns whether any rank was signalled (under DDP one ``all_reduce(MAX)`` of one integer
   every ``check_every_n_steps`` steps), all call ``trainer.save_checkpoint`` (global rank 0
   writes through the trainer's checkpoint IO: atomic) into ModelCheckpoint's folder under its
   file name for that step (``step_0000123.ckpt``), where ``train.py``'s ``resume=auto`` and
   :func:`diffsweep.checkpoints.find_resume_checkpoint` (highest global step) look;
3. on SLURM, a requeue signal (USR1/USR2 by default) also makes global rank 0 run
   ``scontrol requeue <job>`` (as Lightning's ``SLURMEnvironment(auto_requeue=True)`` does for
   its requeue signal): the job runs again in the same job directory and resumes from that
   checkpoint. SIGTERM and SIGINT never requeue (``scancel`` sends SIGTERM: a cancelled job stays
   cancelled, its checkpoint kept);
4. every rank raises :class:`Preempted` (a ``SystemExit`` with status 128 + signal number, 143 for
   SIGTERM). The run is not ``finished`` (``run_status.json`` says ``failed``), so the same
   command resumes it; DDP rank processes started by :mod:`diffsweep.launch` exit with 0.

A signal that arrives during validation takes effect at the end of the next optimizer step;
one that arrives after the last step (final validation, final sample grid) lets the run finish
normally. Further signals while stopping change nothing (the first names the stop; a requeue
signal among them asks for the requeue). The handlers are installed in ``on_train_start``, over
Lightning's (whose SIGTERM handler only sets ``trainer.received_sigterm``, which Lightning's loops
turn into a stop without a checkpoint, and under DDP broadcasts from inside the signal handler,
which can desynchronise the ranks; a SIGTERM it caught before training is taken over here), and
Lightning's teardown puts the previous ones back: before training and after ``fit`` returns,
signals act as they did before.

DataLoader worker processes get the signals too where the whole process group or job step is
signalled (Ctrl-C in a terminal, SLURM's ``--signal`` and ``scancel``) and, left to the default
action, die of it, which fails the main process before it can save; :func:`worker_init` as their
``worker_init_fn`` keeps them alive until the main process stops them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

#: Signals that save a checkpoint and stop training (by default).
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
#: Signals that, on SLURM, also requeue the job (by default).
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")
#: Exit status of a stopped run: 128 + the signal number (the shell's convention).
EXIT_STATUS_BASE = 128
_SIGNAL_RANGE = 64  # signal numbers are < 64 on Linux; the agreed code packs (requeue, signum)


class Preempted(SystemExit):
    """Training stopped on ``signum`` after saving ``checkpoint`` at ``step``.

    A ``SystemExit`` (exit status 128 + ``signum``) so that Hydra's job runner and submitit's
    job wrapper let it through like a signal, without writing a failed job result.
    """

    def __init__(self, signum: int, step: int, checkpoint: str, requeued: bool) -> None:
        super().__init__(EXIT_STATUS_BASE + signum)
        self.signum, self.step, self.checkpoint, self.requeued = signum, step, checkpoint, requeued

    def __str__(self) -> str:
        then = ("the job was requeued and resumes from it" if self.requeued
                else "run the same command again to resume from it")
        return (f"Stopped on {signal_name(self.signum)} at step {self.step}: saved "
                f"{self.checkpoint}; {then}.")


def signal_name(signum: int) -> str:
    """``15`` -> ``'SIGTERM'``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def signal_number(spec: str | int) -> int:
    """``'SIGTERM'``, ``'TERM'``, ``'term'`` or ``15`` -> 15; anything else is a ValueError."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec in {int(s) for s in signal.Signals}:
            return spec
    elif isinstance(spec, str):
        name = spec.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        member = getattr(signal.Signals, name, None)
        if member is not None:
            return int(member)
    raise ValueError(f"callbacks.preemption: signal {spec!r} is not a signal of this system; use "
                     f"names such as SIGTERM, SIGINT, SIGUSR1, SIGUSR2.")


def ignore_stop_signals(worker_id: int | None = None,
                        signals: Iterable[str | int] = STOP_SIGNALS) -> None:
    """Ignore ``signals`` in this process: a DataLoader ``worker_init_fn`` for worker processes,
    which the main process stops itself once it has saved its checkpoint."""
    for spec in signals:
        signal.signal(signal_number(spec), signal.SIG_IGN)


def worker_init(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: :func:`ignore_stop_signals`, then Lightning's worker seeding
    where ``seed_everything(workers=True)`` asked for it (what Lightning adds to a loader that has
    no ``worker_init_fn``). Use ``functools.partial(worker_init, rank=global_rank)``."""
    ignore_stop_signals(worker_id)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id, rank=rank)


def slurm_job_id(environ: dict[str, str] | None = None) -> str | None:
    """This SLURM job's id for ``scontrol`` (``<array job>_<task>`` for array tasks), or None."""
    environ = os.environ if environ is None else environ
    array_job, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job(job_id: str, timeout_s: float = 60.0) -> bool:
    """``scontrol requeue <job_id>``; True when SLURM accepted it (failures are logged)."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                                timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("Could not requeue SLURM job %s: %s", job_id, error)
        return False
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job_id, result.returncode,
                    (result.stderr or result.stdout).strip())
        return False
    log.info("Requeued SLURM job %s", job_id)
    return True


class Preemption(L.Callback):
    """Save a resumable checkpoint at the current step and stop on ``signals`` (module doc).

    Args:
        signals: signals that stop training (names such as ``SIGTERM`` or numbers).
        requeue_signals: those of ``signals`` after which a SLURM job is requeued.
        requeue: requeue SLURM jobs at all (off: save and stop only).
        dirpath: folder of the checkpoint; None: ModelCheckpoint's ``dirpath``, else
            ``<trainer.default_root_dir>/checkpoints`` (where ``train.py`` resumes from).
        check_every_n_steps: under DDP, how often (in optimizer steps) the ranks agree on stopping
            (one all-reduce of one integer); a single process checks every step for free.
    """

    def __init__(self, signals: Iterable[str | int] = STOP_SIGNALS,
                 requeue_signals: Iterable[str | int] = REQUEUE_SIGNALS, requeue: bool = True,
                 dirpath: str | None = None, check_every_n_steps: int = 1) -> None:
        self.signals = tuple(dict.fromkeys(signal_number(spec) for spec in signals))
        self.requeue_signals = frozenset(signal_number(spec) for spec in requeue_signals)
        if not self.requeue_signals <= set(self.signals):
            extra = sorted(signal_name(s) for s in self.requeue_signals - set(self.signals))
            raise ValueError(f"callbacks.preemption.requeue_signals: {extra} are not in signals "
                             f"{[signal_name(s) for s in self.signals]}; a requeue signal must "
                             f"also stop training.")
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) \
                or check_every_n_steps < 1:
            raise ValueError(f"callbacks.preemption.check_every_n_steps={check_every_n_steps!r}: "
                             f"must be an integer >= 1.")
        self.requeue = bool(requeue)
        self.dirpath = dirpath
        self.check_every_n_steps = check_every_n_steps
        self._previous: dict[int, Any] = {}
        self._active = False
        self._received: int | None = None     # the first signal received
        self._requeue_requested = False
        self._step_at_batch_start = -1

    # -- signal handling ---------------------------------------------------------------------
    @property
    def received(self) -> int | None:
        """The first stop signal received during this fit, or None."""
        return self._received

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._active:  # left installed after fit (handlers restored around ours)
            self._forward(signum, frame)
            return
        if self._received is None:
            self._received = signum
        self._requeue_requested |= signum in self.requeue_signals

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("Preemption: not in the main thread; stop signals are not handled.")
            return
        self._previous = {signum: signal.getsignal(signum) for signum in self.signals}
        self._received, self._requeue_requested, self._active = None, False, True
        for signum in self.signals:
            signal.signal(signum, self._handle)

    def _uninstall(self) -> None:
        if not self._active:
            return
        self._active = False
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                if signal.getsignal(signum) == self._handle and previous is not None:
                    signal.signal(signum, previous)

    # -- Lightning hooks ---------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()
        connector = getattr(trainer, "_signal_connector", None)
        if self._active and signal.SIGTERM in self.signals and trainer.received_sigterm:
            # Caught by Lightning's handler between its registration and now: ours takes it over
            # (Lightning would stop without a checkpoint).
            self._received = signal.SIGTERM
            if connector is not None:
                connector.received_sigterm = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self._active or trainer.global_step == self._step_at_batch_start:
            return  # accumulating gradients: no optimizer step finished in this batch
        many = trainer.world_size > 1
        if many and trainer.global_step % self.check_every_n_steps:
            return
        code = self._agree(trainer, self._local_code())
        if code:
            self._stop(trainer, signum=code % _SIGNAL_RANGE,
                       requeue=code >= 2 * _SIGNAL_RANGE)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._uninstall()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._uninstall()

    # -- stopping ----------------------------------------------------------------------------
    def _local_code(self) -> int:
        """0: no signal; else ``(1 + requeue) * 64 + signum`` (the largest wins the all-reduce:
        a requeue request beats a plain stop)."""
        if self._received is None:
            return 0
        return (1 + self._requeue_requested) * _SIGNAL_RANGE + self._received

    @staticmethod
    def _agree(trainer: L.Trainer, code: int) -> int:
        """The largest ``code`` over all ranks (every rank calls this at the same step)."""
        if trainer.world_size <= 1:
            return code
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return code
        value = torch.tensor([code], dtype=torch.int64, device=trainer.strategy.root_device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        """Where the checkpoint of the current step goes: ModelCheckpoint's folder and file name
        for this step when it writes into ``dirpath``, else ``<dirpath>/step_<step>.ckpt``."""
        step = trainer.global_step
        callback = trainer.checkpoint_callback
        callback_dir = callback.dirpath if isinstance(callback, ModelCheckpoint) else None
        folder = Path(self.dirpath or callback_dir
                      or Path(trainer.default_root_dir) / "checkpoints")
        if callback_dir and Path(callback_dir) == folder:
            metrics = {"epoch": torch.tensor(trainer.current_epoch), "step": torch.tensor(step)}
            return folder / Path(callback.format_checkpoint_name(metrics)).name
        return folder / f"step_{step:07d}.ckpt"

    def _stop(self, trainer: L.Trainer, signum: int, requeue: bool) -> None:
        step = trainer.global_step
        path = self.checkpoint_path(trainer)
        if trainer.is_global_zero:
            log.warning("Received %s: saving a checkpoint at step %d to %s.", signal_name(signum),
                        step, path)
        trainer.save_checkpoint(path)  # every rank: rank 0 writes, then all meet at a barrier
        requeued = False
        job_id = slurm_job_id()
        if requeue and self.requeue and job_id is not None and trainer.is_global_zero:
            requeued = requeue_slurm_job(job_id)
        stop = Preempted(signum, step, str(path), requeued)
        if trainer.is_global_zero:
            log.warning("%s", stop)
        raise stop


__all__ = ["EXIT_STATUS_BASE", "Preempted", "Preemption", "REQUEUE_SIGNALS", "STOP_SIGNALS",
           "ignore_stop_signals", "requeue_slurm_job", "signal_name", "signal_number",
           "slurm_job_id", "worker_init"]
