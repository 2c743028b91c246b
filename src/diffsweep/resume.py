"""Resuming runs and rerunning sweeps: the same command after any interruption continues the run,
and a finished job is never redone.

Run directories
    Every training run keeps ``run_status.json`` (its override signature and ``running``/
    ``stopped``/``finished``/``failed``) and holds an exclusive lock on ``run.lock`` while it runs.
    When Hydra picks the run directory, :func:`resumable_run_dir` returns the newest unfinished,
    unlocked run with the same signature (training resumes there from its newest checkpoint) or
    claims a new directory: ``<time>``, or ``<time>_2``, ``<time>_3``, ... when a run that started
    in the same second took it (:func:`claim_new_dir`, also the sweep-directory resolver). A
    finished run is never reopened by the resolver: the same command after success starts a new
    run.

Done markers
    A job that ran to its end writes ``done.json`` into its directory, last and atomically:
    the training metrics, the global step and the run config (``train.py``), or the results row
    and a digest of the job config (``evaluate.py``). Rerunning a sweep in the same
    ``hydra.sweep.dir`` (or a run with the same ``hydra.run.dir``) skips those jobs without
    touching their outputs and continues the others from their newest checkpoint
    (:func:`find_resume_point`, :func:`finished_evaluation`), or from the one before when the
    newest holds the last step (the run was stopped in its final validation, grid or metrics,
    which Lightning would not run again from there).

Logged history
    Every training run gets :class:`~diffsweep.loggers.CheckpointedHistory`
    (:meth:`ResumePoint.callbacks`): what was logged up to a checkpoint is on disk before it, and
    a resumed run logs what came after it once (``metrics.csv`` drops those rows first).

Epoch counters
    A resumed run also gets :class:`EpochCountersOnRestart`: after a restart from an epoch's
    last batch the next epoch is counted as started, as in an uninterrupted run, so that a later
    resume continues at the right epoch and data position.

Config changes on resume
    The checkpoint stores its resolved run config (``diffsweep_config``). Resuming compares it key
    by key with the new run's (:func:`check_resume_config`): keys in :data:`SAFE_ON_RESUME`
    (run length, logging/validation/checkpoint cadence, grids, metrics, loggers, paths, threads,
    devices) apply; any other change is refused before anything is built or written, with one
    line (a :class:`~diffsweep.checkpoints.CheckpointMismatchError`) listing ``key: old -> new``
    and the two ways out: ``resume=never`` in a new run directory, or
    ``resume_allow_changes=[key,...]`` to resume and apply them (optimizer hyperparameters such
    as ``module.optimizer.lr`` are then written into the restored optimizer and LR schedule:
    :class:`ApplyOptimizerChanges`).

Leftovers of killed writers
    A writer killed mid-write leaves ``.<name>.<pid>.partial`` beside its target
    (:func:`diffsweep.files.partial_path`). :func:`remove_stale_partials` deletes those whose
    process is gone when a run resumes in (or a results table is written to) that directory.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffsweep.files import (
    atomic_write_json,
    file_lock,
    is_locked,
    remove_stale_partials,
    stable_hash,
)

log = logging.getLogger(__name__)

STATUS_FILE = "run_status.json"
LOCK_FILE = "run.lock"
DONE_FILE = "done.json"

#: Dotted config keys (``fnmatch`` patterns; a pattern also covers every key below it) whose
#: change on resume applies: they do not change what is trained, only for how long, where, on how
#: many devices, and what is logged, checked, drawn or measured on the way.
SAFE_ON_RESUME: tuple[str, ...] = (
    # run length
    "trainer.max_steps", "trainer.max_epochs", "trainer.max_time", "trainer.min_steps",
    "trainer.min_epochs",
    # validation, logging and checkpoint cadence; the console
    "trainer.val_check_interval", "trainer.check_val_every_n_epoch", "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps", "trainer.log_every_n_steps", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.enable_checkpointing", "trainer.profiler",
    "trainer.default_root_dir", "trainer.plugins", "callbacks.model_checkpoint",
    "callbacks.sample_grid", "callbacks.lr_monitor", "callbacks.progress_bar",
    "callbacks.preemption", "metrics", "logger", "console", "tags", "task_name",
    "optimized_metric", "job_type",
    # where and on how many devices (a global batch is the same on 1 or N devices)
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.use_distributed_sampler", "trainer.benchmark", "trainer.deterministic",
    "num_threads", "matmul_precision", "paths", "data*.root", "*.cache_dir", "*.output_dir",
    "data.val_batch_size",
    # how validation grids and FID sample (the validation sampler, its precision, compilation)
    "sampler", "module.sampler", "module.sample_precision", "module.sample_compile",
    "module.compile", "module.compile_options",
    # how this run was started
    "ckpt_path", "resume", "resume_allow_changes", "choices",
    # switches that only turn a validation check off
    "allow_unusual_lr",
)
#: Keys that set how long a run trains: a finished run with a longer schedule continues.
RUN_LENGTH_KEYS = ("trainer.max_steps", "trainer.max_epochs", "trainer.max_time",
                   "trainer.min_steps", "trainer.min_epochs")
#: Optimizer hyperparameters that :class:`ApplyOptimizerChanges` writes into a restored optimizer
#: (``module.optimizer.<name>``; other optimizer keys select the implementation).
OPTIMIZER_HYPERPARAMETERS = ("lr", "betas", "weight_decay", "eps", "momentum", "dampening",
                             "nesterov", "alpha", "amsgrad", "maximize")
_ABSENT = "<absent>"
#: Parts of the composed module config that are interpolations of a config group.
_MODULE_ALIASES = {"module.denoiser.net": "model", "module.denoiser.schedule": "scheduler",
                   "module.loss": "loss", "module.lr_schedule": "lr_schedule",
                   "module.sampler": "sampler"}


# ------------------------------------------------------------------------------ run directories

_CLAIMED: dict[tuple[str, str], str] = {}


def claim_new_dir(parent: str | os.PathLike, name: str) -> str:
    """Create and return a new, empty directory ``parent/name``, or ``name_2``, ``name_3``, ...
    when that exists: two runs started in the same second get two directories.

    ``mkdir`` is atomic, so concurrent processes never get the same one. Within one process the
    same ``(parent, name)`` returns the directory claimed first (Hydra may resolve its run and
    sweep directories more than once).
    """
    key = (os.path.abspath(parent), str(name))
    if key in _CLAIMED:
        return _CLAIMED[key]
    root = Path(parent)
    root.mkdir(parents=True, exist_ok=True)
    for number in itertools.count(1):
        candidate = root / (name if number == 1 else f"{name}_{number}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        _CLAIMED[key] = str(candidate)
        return str(candidate)
    raise AssertionError("unreachable")


def read_status(run_dir: str | Path) -> dict[str, str] | None:
    """The run's status record, or None if absent/unreadable."""
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def resumable_run_dir(runs_dir: str, new_name: str, resume: str, signature: str) -> str:
    """Hydra resolver for ``hydra.run.dir``: an unfinished run of the same command, or a new one.

    Args:
        runs_dir: folder holding one sub-folder per run.
        new_name: name of a new run's folder (a timestamp; :func:`claim_new_dir` makes it unique).
        resume: ``auto`` (look for an unfinished run) or ``never``.
        signature: the command's overrides (Hydra's ``override_dirname``).
    """
    if resume not in ("auto", "never"):
        raise ValueError(f"resume must be 'auto' or 'never', got {resume!r}.")
    root = Path(runs_dir)
    if resume == "auto" and root.is_dir():
        candidates = sorted(root.glob(f"*/{STATUS_FILE}"), key=lambda p: p.stat().st_mtime,
                            reverse=True)
        for status_path in candidates:
            status = read_status(status_path.parent)
            if (status and status.get("signature") == signature
                    and status.get("status") != "finished"
                    and not is_locked(status_path.parent / LOCK_FILE)):
                log.info("Resuming the unfinished run in %s", status_path.parent)
                return str(status_path.parent)
    return claim_new_dir(root, new_name)


# ------------------------------------------------------------------------------ status and done

def read_done(job_dir: str | Path) -> dict[str, Any] | None:
    """The job's done record (``done.json``), or None if it has not finished."""
    try:
        return json.loads((Path(job_dir) / DONE_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_done(job_dir: str | Path, record: Mapping[str, Any]) -> None:
    """Mark the job finished with ``record`` (atomically; call it after every other output)."""
    atomic_write_json(Path(job_dir) / DONE_FILE, dict(record))


def training_complete(trainer: L.Trainer) -> bool:
    """Whether ``trainer.fit`` returned because training reached its end: ``max_steps`` /
    ``max_epochs``, or an early-stopping callback, not because it was interrupted."""
    if trainer.interrupted or getattr(trainer, "received_sigterm", False):
        return False
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs:
        return True
    return any(getattr(callback, "stopped_epoch", 0)
               for callback in trainer.early_stopping_callbacks)


class RunRecord:
    """What :func:`run_status` writes when its block ends (see :meth:`conclude`)."""

    def __init__(self) -> None:
        self.done: dict[str, Any] | None = None
        self.complete = True

    def conclude(self, trainer: L.Trainer, metrics: Mapping[str, float],
                 config: Mapping[str, Any] | None) -> None:
        """Record how ``trainer.fit`` ended: complete -> ``finished`` and a done marker with
        ``metrics``, the global step and ``config``; cut short -> ``stopped`` (resumable)."""
        self.complete = training_complete(trainer)
        self.done = ({"metrics": dict(metrics), "global_step": int(trainer.global_step),
                      "epoch": int(trainer.current_epoch), "config": config}
                     if self.complete else None)


def _write_status(run_dir: Path, signature: str, status: str) -> None:
    atomic_write_json(run_dir / STATUS_FILE,
                      {"signature": signature, "status": status, "pid": os.getpid()})


@contextmanager
def run_status(run_dir: str | Path, signature: str, enabled: bool = True) -> Iterator[RunRecord]:
    """Mark ``run_dir`` running (and locked) inside the block.

    On entry stale partial files of killed writers are removed (:func:`remove_stale_partials`).
    Leaving the block normally marks the run ``finished`` (then writes ``done.json`` when
    :meth:`RunRecord.conclude` recorded one), or ``stopped`` when ``conclude`` found training cut
    short; an exception marks it ``failed`` (where the disk lets it; the exception is raised
    either way). ``enabled=False`` (DDP ranks > 0) does nothing.
    """
    record = RunRecord()
    if not enabled:
        yield record
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(run_dir / LOCK_FILE, blocking=False) as held:
        if not held:
            raise RuntimeError(f"Another process is training in {run_dir}; wait for it or choose "
                               f"another run directory (hydra.run.dir=...).")
        removed = remove_stale_partials(run_dir)
        if removed:
            log.info("Removed %d partial file(s) of killed writers in %s: %s", len(removed),
                     run_dir, ", ".join(str(path.relative_to(run_dir)) for path in removed))
        _write_status(run_dir, signature, "running")
        try:
            yield record
        except BaseException:
            try:
                _write_status(run_dir, signature, "failed")
            except OSError as status_error:  # a full disk: the run's own error is the one to see
                log.warning("Could not mark %s failed: %s", run_dir, status_error)
            raise
        _write_status(run_dir, signature, "finished" if record.complete else "stopped")
        if record.done is not None:
            write_done(run_dir, record.done)


# ------------------------------------------------------------------------------ partial files

# ------------------------------------------------------------------------------ config changes

@dataclass(frozen=True)
class ConfigChange:
    """One key whose value differs between a checkpoint's run config and the new one."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    if value is _ABSENT:
        return _ABSENT
    return json.dumps(value, default=str) if not isinstance(value, str) else value


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}`` (lists are values; an
    empty mapping is a value)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, dotted))
        else:
            flat[dotted] = value
    return flat


def key_matches(key: str, patterns: Sequence[str]) -> bool:
    """Whether dotted ``key`` matches an ``fnmatch`` pattern or lies below one."""
    return any(fnmatch.fnmatchcase(key, pattern) or key.startswith(pattern + ".")
               or fnmatch.fnmatchcase(key, pattern + ".*") for pattern in patterns)


def _override_keys(overrides: Sequence[str]) -> list[str]:
    """The config keys a list of Hydra overrides names (``+a.b=1`` -> ``a.b``, ``vae@x.y=z`` ->
    ``x.y``, ``model=unet_small`` -> ``model``)."""
    keys = []
    for override in overrides:
        key = override.lstrip("~+").split("=", 1)[0]
        keys.append(key.split("@", 1)[1] if "@" in key else key)
    return keys


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _as_json(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as it reads back from JSON (tuples are lists, other objects strings), so a
    config from a checkpoint, a done marker or a fresh composition compares alike."""
    return json.loads(json.dumps(config, default=str))


def config_changes(stored: Mapping[str, Any], requested: Mapping[str, Any],
                   overrides: Sequence[str] = ()) -> list[ConfigChange]:
    """Every key whose value differs between a stored run config and a requested one.

    ``stored`` is upgraded first (:func:`diffsweep.assembly.upgrade_run_config`). A key that only
    one side has counts when a command-line override in ``overrides`` names it or a node above it
    (``+model.extra=1``, ``~callbacks.ema``, ``model=unet_small``); otherwise it is an option
    diffsweep added (its default is the earlier behaviour) or dropped since the checkpoint was
    written, and is skipped.
    """
    from diffsweep.assembly import upgrade_run_config

    old = flatten_config(_as_json(upgrade_run_config(dict(stored))))
    new = flatten_config(_as_json(requested))
    named = _override_keys(overrides)
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if (before is _ABSENT or after is _ABSENT) and not any(
                key == name or key.startswith(name + ".") for name in named):
            continue
        if before != after:
            changes.append(ConfigChange(key, before, after))
    # the module config interpolates the groups (module.denoiser.net: ${model}, ...): name each
    # change once, by its group key
    by_key = {change.key: change for change in changes}
    return [change for change in changes if not any(
        change.key.startswith(alias + ".")
        and (twin := by_key.get(group + change.key[len(alias):])) is not None
        and (twin.old, twin.new) == (change.old, change.new)
        for alias, group in _MODULE_ALIASES.items())]


def allowed_changes(cfg: DictConfig | Mapping[str, Any]) -> list[str]:
    """``resume_allow_changes`` of a run config as a list of key patterns."""
    allowed = _plain(cfg.get("resume_allow_changes")) if cfg is not None else None
    if allowed is None:
        return []
    if isinstance(allowed, str):
        allowed = [allowed]
    if not isinstance(allowed, list) or not all(isinstance(item, str) for item in allowed):
        raise ValueError(f"resume_allow_changes={allowed!r} is not allowed: give a list of config "
                         f"keys, e.g. resume_allow_changes=[module.optimizer.lr,data.batch_size].")
    return allowed


def _earlier_defaults_hint(changes: list[ConfigChange]) -> str:
    """A pointer to ``experiment=ddpm`` when a refused change is the default formulation's change
    (eps-prediction/fp32 until the time-to-quality race; ``auto`` since)."""
    earlier = {("module.denoiser.prediction_type", "epsilon"), ("trainer.precision", "32-true")}
    if any((change.key, str(change.old)) in earlier and str(change.new) == "auto"
           for change in changes):
        return (" (The defaults changed to v-prediction in bf16 where the CPU/GPU has it: "
                "add experiment=ddpm to resume a run trained with the earlier eps-MSE fp32 "
                "defaults.)")
    return ""


def check_resume_config(stored: Mapping[str, Any], cfg: DictConfig, source: str = "the checkpoint",
                        requested: Mapping[str, Any] | None = None) -> list[ConfigChange]:
    """The changes from ``stored`` (a checkpoint's ``diffsweep_config``) to ``cfg`` that apply on
    resume; raise :class:`~diffsweep.checkpoints.CheckpointMismatchError` (one line) when any
    change is neither in
    :data:`SAFE_ON_RESUME` nor allowed by ``cfg.resume_allow_changes``.

    ``requested`` is the new run config as checkpoints store it (default:
    :func:`diffsweep.assembly.stored_run_config` of ``cfg``).
    """
    from diffsweep.assembly import stored_run_config
    from diffsweep.checkpoints import CheckpointMismatchError
    from diffsweep.hydra_utils import hydra_overrides

    allowed = allowed_changes(cfg)
    changes = config_changes(stored, stored_run_config(cfg) if requested is None else requested,
                             hydra_overrides())
    refused = [change for change in changes
               if not key_matches(change.key, SAFE_ON_RESUME) and not key_matches(change.key,
                                                                                  allowed)]
    if refused:
        keys = ",".join(change.key for change in refused)
        raise CheckpointMismatchError(
            f"Resuming {source} with a config that changes what is trained: "
            f"{'; '.join(str(change) for change in refused)}. Keep those values to resume; start "
            f"afresh with resume=never (in a new run directory: drop hydra.run.dir / "
            f"hydra.sweep.dir); or resume and apply the change with "
            f"resume_allow_changes=[{keys}].{_earlier_defaults_hint(refused)}")
    if changes:
        log.info("Resuming %s; config changes that apply: %s", source,
                 "; ".join(str(change) for change in changes if change.key != "ckpt_path"))
    return changes


class ApplyOptimizerChanges(L.Callback):
    """Write new optimizer hyperparameters into the optimizer and LR schedule a resume restored
    (Lightning restores the checkpoint's, so ``module.optimizer.lr`` would otherwise be ignored).

    Args:
        hyperparameters: ``{"lr": 2e-4, "weight_decay": 0.01, ...}`` for every param group. A new
            ``lr`` also becomes the LR schedule's base: the schedule's current factor (warmup,
            decay) applies to it from the restored step on.
    """

    def __init__(self, hyperparameters: Mapping[str, Any]) -> None:
        self.hyperparameters = dict(hyperparameters)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for optimizer in trainer.optimizers:
            owned = [s for s in schedulers if getattr(s, "optimizer", None) is optimizer]
            for index, group in enumerate(optimizer.param_groups):
                for name, value in self.hyperparameters.items():
                    if name != "lr":
                        group[name] = tuple(value) if isinstance(value, list) else value
                        continue
                    for scheduler in owned:
                        base = scheduler.base_lrs[index]
                        factor = group["lr"] / base if base else 1.0
                        scheduler.base_lrs[index] = float(value)
                        group["lr"] = float(value) * factor
                        if getattr(scheduler, "_last_lr", None):
                            scheduler._last_lr[index] = group["lr"]
                    if not owned:
                        group["lr"] = float(value)
                    if "initial_lr" in group:
                        group["initial_lr"] = float(value)
        log.info("Applied the new optimizer settings on resume: %s", self.hyperparameters)


def _uncounted_epoch(loops: Any) -> bool:
    """Whether a checkpoint's loop state was saved in a training batch of an epoch that the fit
    loop never counted as started: its epoch counters (ready, started, processed, completed) are
    all equal, as between two epochs, while the epoch loop is inside a batch (processed but not
    completed, i.e. ``on_train_batch_end``, where every checkpoint of a training run is saved)."""
    fit = loops.get("fit_loop") if isinstance(loops, Mapping) else None
    if not isinstance(fit, Mapping):
        return False
    epochs, batches = fit.get("epoch_progress"), fit.get("epoch_loop.batch_progress")
    if not isinstance(epochs, Mapping) or not isinstance(batches, Mapping):
        return False
    try:
        counts = [epochs[kind][name] for kind in ("total", "current")
                  for name in ("ready", "started", "processed", "completed")]
        in_batch = batches["current"]["processed"] == batches["current"]["completed"] + 1
    except (KeyError, TypeError):
        return False
    return in_batch and len(set(counts[:4])) == 1 and len(set(counts[4:])) == 1


class EpochCountersOnRestart(L.Callback):
    """Keep Lightning's epoch counters right across restarts, so that every resume continues at
    the uninterrupted run's epoch and data position.

    A restart from a checkpoint of an epoch's last batch (its step checkpoint, written in
    ``on_train_batch_end``) closes that epoch in Lightning's fit loop, but leaves the loop's
    "restarted mid-epoch" stage set when the next epoch starts: that epoch is not counted as
    ready and started, and ``on_train_epoch_start`` is not called. Every checkpoint written in it
    then holds an epoch count one short, and a run resumed from one of those trains that epoch
    again, on its data, instead of continuing (a second kill and rerun ends with other weights).

    - ``on_load_checkpoint``: a checkpoint written so (by a run resumed without this callback)
      gets the uncounted epoch counted before Lightning restores its loops.
    - ``on_train_start`` (after Lightning's restore closed the checkpoint's epoch): the stage is
      cleared, so the next epoch starts as in an uninterrupted run (counted, with its
      ``on_train_epoch_start`` hooks).
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        loops = checkpoint.get("loops")
        if not _uncounted_epoch(loops):
            return
        epochs = loops["fit_loop"]["epoch_progress"]
        for kind in ("total", "current"):
            epochs[kind]["ready"] += 1
            epochs[kind]["started"] += 1
        log.info("Counted the epoch the checkpoint was saved in as started (a run resumed "
                 "earlier left it uncounted): epoch %d.", epochs["current"]["processed"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        epochs = fit_loop.epoch_progress.total
        if fit_loop.restarted_mid_epoch and epochs.processed == epochs.ready:
            fit_loop.reset_restart_stage()  # the restored epoch is closed: start the next one


@dataclass
class ResumePoint:
    """Where a training run starts.

    Attributes:
        ckpt_path: the checkpoint to continue from (None: from scratch).
        changes: the config changes from that checkpoint's config that apply.
        finished: the done record when this job already finished with this config (nothing
            to do: ``finished["metrics"]`` are its final metrics).
    """

    ckpt_path: str | None = None
    changes: list[ConfigChange] = field(default_factory=list)
    finished: dict[str, Any] | None = None

    def callbacks(self) -> list[L.Callback]:
        """Callbacks of a training run that resumes here: the logged history kept in step with
        the checkpoints (:class:`~diffsweep.loggers.CheckpointedHistory`, every run), the
        epoch counters Lightning's restart leaves short (:class:`EpochCountersOnRestart`), and
        the changes Lightning's restore would undo (optimizer hyperparameters)."""
        from diffsweep.loggers import CheckpointedHistory

        prefix = "module.optimizer."
        hyperparameters = {change.key[len(prefix):]: change.new for change in self.changes
                           if change.key.startswith(prefix)
                           and change.key[len(prefix):] in OPTIMIZER_HYPERPARAMETERS
                           and change.new is not _ABSENT}
        optimizer = ([ApplyOptimizerChanges(hyperparameters)]
                     if hyperparameters and self.ckpt_path else [])
        restart = [EpochCountersOnRestart()] if self.ckpt_path else []
        return [CheckpointedHistory(), *restart, *optimizer]


def _trains_further(changes: Sequence[ConfigChange], done: Mapping[str, Any]) -> bool:
    for change in changes:
        if change.key == "trainer.max_steps":
            if change.new is None or change.new < 0 or change.new > done.get("global_step", 0):
                return True
        elif change.key in RUN_LENGTH_KEYS:
            return True
    return False


def checkpoint_folder(cfg: DictConfig, output_dir: str | Path) -> Path:
    """Where the run's checkpoints go (``callbacks.model_checkpoint.dirpath``)."""
    return Path(OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath",
                                 default=str(Path(output_dir) / "checkpoints")))


def newest_checkpoint_before(directory: str | Path, step: int) -> Path | None:
    """The readable training checkpoint in ``directory`` with the highest global step below
    ``step`` (ties: ``last.ckpt``, then the newer file), or None."""
    from diffsweep.checkpoints import load_weights_only

    best: tuple[tuple[int, bool, float], Path] | None = None
    for candidate in Path(directory).glob("*.ckpt"):
        try:
            checkpoint = load_weights_only(candidate)
        except ValueError:  # unreadable: not a resume point (find_resume_checkpoint warned)
            continue
        global_step = int(checkpoint.get("global_step", 0))
        if "loops" not in checkpoint or global_step >= step:
            continue
        rank = (global_step, candidate.name == "last.ckpt", candidate.stat().st_mtime)
        if best is None or rank > best[0]:
            best = (rank, candidate)
    return best[1] if best else None


def _resume_before_the_end(cfg: DictConfig, folder: Path, found: Path) -> Path:
    """``found``, or the newest checkpoint before it when ``found`` holds the run's last step
    (``trainer.max_steps``) of a run that did not finish.

    Such a run was stopped after its last checkpoint, in the final validation, sample grid, FID
    or before its done marker; Lightning, resumed there, ends ``fit`` at once and none of those
    would run or be logged. From the checkpoint before, the last steps train again (to the same
    weights) and the end of the run happens once.
    """
    from diffsweep.checkpoints import load_weights_only

    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=None)
    if not isinstance(max_steps, int) or max_steps <= 0:
        return found
    if int(load_weights_only(found).get("global_step", -1)) != max_steps:
        return found
    earlier = newest_checkpoint_before(folder, max_steps)
    if earlier is None:
        return found
    log.info("%s holds the last step (%d) of a run that did not finish; resuming from %s so that "
             "the end of the run (final validation, grids, metrics) runs.", found, max_steps,
             earlier)
    return earlier


def find_resume_point(cfg: DictConfig, output_dir: str | Path) -> ResumePoint:
    """Decide how a training run starts, before anything is built or written.

    - ``ckpt_path`` given: continue from it (its config checked by :func:`check_resume_config`).
    - ``resume=auto``: a job whose ``done.json`` says it finished with this config is finished
      (a longer ``trainer.max_steps`` continues it); else continue from the newest checkpoint in
      the checkpoint folder (:func:`~diffsweep.checkpoints.find_resume_checkpoint`), if any;
      when that one holds the last step, the one before it (:func:`_resume_before_the_end`).
    - ``resume=never``: from scratch; refused when the run directory already holds another run's
      checkpoints or done marker (a later ``resume=auto`` would mix the two).

    Raises:
        CheckpointMismatchError: the config changes what the checkpoint (or finished job)
            trained, or ``resume=never`` would mix two runs in one directory.
    """
    from diffsweep.checkpoints import (
        CheckpointMismatchError,
        find_resume_checkpoint,
        read_checkpoint,
    )

    output_dir = Path(output_dir)
    ckpt_path = cfg.get("ckpt_path")
    resume = cfg.get("resume", "auto")
    folder = checkpoint_folder(cfg, output_dir)
    if not ckpt_path and resume == "never":
        existing = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
        if existing or read_done(output_dir) is not None:
            what = f"checkpoints ({existing[-1].name}, ...)" if existing else "a finished run"
            raise CheckpointMismatchError(
                f"resume=never but {output_dir} already holds {what} of an earlier run; start "
                f"afresh in a new run directory (drop hydra.run.dir / hydra.sweep.dir), or use "
                f"resume=auto to continue it.")
        return ResumePoint()
    if not ckpt_path:
        done = read_done(output_dir)
        if done is not None and done.get("config") is not None:
            changes = check_resume_config(done["config"], cfg, source=f"the finished run in "
                                                                       f"{output_dir}")
            if not _trains_further(changes, done):
                log.info("%s already finished (step %s); nothing to do. Outputs are kept; "
                         "use a new run directory to train again.", output_dir,
                         done.get("global_step"))
                return ResumePoint(finished=done)
        found = find_resume_checkpoint(folder)
        if found is None:
            return ResumePoint()
        found = _resume_before_the_end(cfg, folder, found)
        log.info("Resuming from %s", found)
        ckpt_path = str(found)
    stored = read_checkpoint(ckpt_path).get("diffsweep_config")
    if stored is None:  # not written by train.py: Lightning's own checks apply
        return ResumePoint(ckpt_path=str(ckpt_path))
    changes = check_resume_config(stored, cfg, source=str(ckpt_path))
    return ResumePoint(ckpt_path=str(ckpt_path), changes=changes)


# ------------------------------------------------------------------------------ evaluation jobs

def _source_stamp(path: str | None) -> Any:
    """Size and modification time of a checkpoint file (or a pretrained folder's files): a
    retrained ``last.ckpt`` is another model."""
    if not path:
        return None
    target = Path(path)
    if target.is_file():
        status = target.stat()
        return [status.st_size, status.st_mtime_ns]
    if target.is_dir():
        return sorted([str(file.relative_to(target)), file.stat().st_size,
                       file.stat().st_mtime_ns]
                      for file in itertools.chain(target.glob("*"), target.glob("*/*"))
                      if file.is_file())
    return None


def evaluation_digest(cfg: DictConfig) -> str:
    """A digest of an evaluation job: its resolved config and the model files it reads."""
    from diffsweep.hydra_utils import run_config_dict

    config = run_config_dict(cfg)
    config.pop("paths", None)  # the job directory is where the marker lives, not what it did
    config.pop("trusted_targets", None)  # what may be built, not what was measured
    return stable_hash({"config": config,
                        "model": _source_stamp(cfg.get("ckpt_path") or cfg.get("pretrained"))})


def finished_evaluation(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any] | None:
    """The results row of an evaluation job that already finished in ``output_dir`` with the
    same config and model files (None: evaluate). Stale partial files in the job directory are
    removed either way."""
    output_dir = Path(output_dir)
    remove_stale_partials(output_dir, recursive=False)
    done = read_done(output_dir)
    if done is None or done.get("digest") != evaluation_digest(cfg) or "row" not in done:
        return None
    log.info("%s already finished with this config; its results row is kept.", output_dir)
    return done["row"]


def mark_evaluation_done(cfg: DictConfig, output_dir: str | Path, row: Mapping[str, Any]) -> None:
    """Write the evaluation job's done marker (after its results row and grid)."""
    write_done(output_dir, {"row": dict(row), "digest": evaluation_digest(cfg)})


__all__ = ["ApplyOptimizerChanges", "ConfigChange", "DONE_FILE", "EpochCountersOnRestart",
           "LOCK_FILE", "ResumePoint",
           "RunRecord", "SAFE_ON_RESUME", "STATUS_FILE", "check_resume_config", "checkpoint_folder",
           "claim_new_dir", "config_changes", "evaluation_digest", "find_resume_point",
           "finished_evaluation", "flatten_config", "key_matches", "mark_evaluation_done",
           "newest_checkpoint_before",
           "read_done", "read_status", "resumable_run_dir", "run_status",
           "training_complete", "write_done"]
