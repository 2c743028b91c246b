"""A quiet console: known-harmless warnings filtered in one place, one progress bar per run,
user errors as one line.

- :data:`HARMLESS` lists every warning and log line diffsweep silences, each with why it is
  harmless here. :func:`quiet` installs the filters (call it again freely); ``show=True`` (config
  ``console.show_warnings=true``) or ``DIFFSWEEP_SHOW_WARNINGS=1`` leaves everything visible.
- :class:`StepProgressBar`: one bar per run counting optimizer steps up to ``max_steps``
  (Lightning's bar restarts at every epoch, and a 1617-image data set has 12-25 batches per
  epoch).
- :func:`progress_bar_kwargs`: no bar at all when the callbacks have none (Lightning would add its
  Rich bar, which shows ``Epoch 0/-2`` for step-based runs).
- Errors: :func:`user_error_lines` tells a user error (a bad config value, a missing or unreadable
  file: :class:`~diffsweep.validate.ConfigError`, the ``ValueError``/``OSError`` family raised with
  a clear message, also behind Hydra's ``InstantiationException``) from a bug. The entry points
  (``train.py``, ``evaluate.py``, ``python -m diffsweep.export``) run inside :func:`command_line`,
  and their Hydra task in :func:`one_line_errors`: a user error prints ``error: <message>`` (one
  line per problem) on stderr without a traceback and the command exits with status 1; under
  ``-m`` each failing job prints its line(s) (``error: job #3: ...``), the other jobs still run,
  and the sweep exits with status 1. Bugs keep their traceback; ``HYDRA_FULL_ERROR=1`` or
  ``DIFFSWEEP_DEBUG=1`` shows the traceback of every error.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from hydra.errors import CompactHydraException, InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n, convert_inf
from omegaconf.errors import OmegaConfBaseException

from diffsweep.validate import ConfigError

#: Set to 1 to see every warning (the same as ``console.show_warnings=true``).
SHOW_WARNINGS_ENV = "DIFFSWEEP_SHOW_WARNINGS"
#: Set to 1 to get the traceback of every error (user errors included), like ``HYDRA_FULL_ERROR=1``.
DEBUG_ENV = "DIFFSWEEP_DEBUG"
#: Exit status of an entry point stopped by a user error (a bug exits with Python's/Hydra's 1 too).
USER_ERROR_EXIT = 1

#: Loggers that emit Lightning's ``rank_zero_info`` lines.
_LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero",
                           "lightning.fabric.utilities.rank_zero",
                           "lightning_utilities.core.rank_zero")


@dataclass(frozen=True)
class Harmless:
    """A message silenced by :func:`quiet`: ``kind`` is ``warning`` (``warnings.warn``) or ``log``
    (a ``logging`` record of one of ``loggers``); ``pattern`` is a regular expression matched at
    the message start."""

    kind: str
    pattern: str
    why: str
    loggers: tuple[str, ...] = _LIGHTNING_INFO_LOGGERS


HARMLESS: tuple[Harmless, ...] = (
    Harmless("warning", r"The `srun` command is available on your system but is not used",
             "diffsweep submits SLURM jobs itself (hydra/launcher=submitit_slurm runs under srun)"),
    Harmless("warning", r".*isinstance\(treespec, LeafSpec\)` is deprecated",
             "Lightning 2.6 calls a pytree API that torch 2.14 deprecates; nothing to change here"),
    Harmless("warning", r"The number of training batches \(\d+\) is smaller than the logging "
                        r"interval",
             "runs count steps across epochs: log_every_n_steps applies to the whole run"),
    Harmless("warning", r"Checkpoint directory .* exists and is not empty",
             "a resumed run writes into its own checkpoint folder on purpose"),
    Harmless("warning", r"Precision bf16-mixed is not supported by the model summary",
             "only the summary's size estimate assumes 32 bits; training runs in bf16 as asked "
             "(and configs/trainer/default.yaml turns the summary off)"),
    Harmless("warning", r"In the sequence `.*multiruns,.*` some elements are missing",
             "configs/hydra/default.yaml passes an empty run signature to diffsweep.run_dir for "
             "sweeps on purpose; OmegaConf reads the empty element as '' today"),
    Harmless("log", r"💡 Tip: For seamless cloud",
             "Lightning's advertisements for litlogger / litmodels"),
    Harmless("log", r"setup plugin ",
             "alembic (imported by Optuna for SQL storages) announces its plugins when "
             "hparams_search=... loads the Optuna sweeper", loggers=("alembic.runtime.plugins",)),
    Harmless("log", r"Failed experiment: error: ",
             "the Optuna sweeper restates a failed trial's error, which the job printed already "
             "(its 'Failed [...] times out of N' line, which stops the search, stays)",
             loggers=("hydra_plugins.hydra_optuna_sweeper._impl",)),
    Harmless("log", r"No CUDA runtime is found, using CUDA_HOME=",
             "torch.compile on a CPU imports torch's C++ extension helper, which looks for CUDA "
             "it does not need here", loggers=("torch.utils.cpp_extension",)),
)


class _HarmlessLogFilter(logging.Filter):
    """Drops log records whose message starts with one of the :data:`HARMLESS` log patterns."""

    def __init__(self, patterns: Iterable[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(pattern) for pattern in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in self.patterns)


def warnings_shown(show: bool = False) -> bool:
    """Whether every warning stays visible: ``show`` or ``$DIFFSWEEP_SHOW_WARNINGS`` set to 1."""
    return bool(show) or os.environ.get(SHOW_WARNINGS_ENV, "") not in ("", "0", "false")


def _harmless_loggers() -> dict[str, list[str]]:
    """Logger name -> the :data:`HARMLESS` log patterns it is filtered with."""
    patterns: dict[str, list[str]] = {}
    for item in HARMLESS:
        if item.kind == "log":
            for name in item.loggers:
                patterns.setdefault(name, []).append(item.pattern)
    return patterns


def quiet(show: bool = False) -> bool:
    """Silence the :data:`HARMLESS` warnings and log lines (repeated calls add nothing); returns
    False when :func:`warnings_shown`, after removing the filters an earlier call installed (the
    entry points call it before the config is read; ``console.show_warnings=true`` then undoes
    it)."""
    patterns = {item.pattern for item in HARMLESS if item.kind == "warning"}
    if warnings_shown(show):
        warnings.filters[:] = [entry for entry in warnings.filters
                               if not (entry[0] == "ignore" and entry[1] is not None
                                       and entry[1].pattern in patterns)]
        for name in _harmless_loggers():
            logger = logging.getLogger(name)
            for existing in [f for f in logger.filters if isinstance(f, _HarmlessLogFilter)]:
                logger.removeFilter(existing)
        return False
    for item in HARMLESS:
        if item.kind == "warning":
            warnings.filterwarnings("ignore", message=item.pattern)
    for name, logger_patterns in _harmless_loggers().items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _HarmlessLogFilter) for existing in logger.filters):
            logger.addFilter(_HarmlessLogFilter(logger_patterns))
    return True


def console_options(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``console`` node of a run config with its defaults: ``config_tree`` (short | full |
    none) and ``show_warnings`` (bool)."""
    node = dict((cfg or {}).get("console") or {})
    options = {"config_tree": str(node.get("config_tree", "short")),
               "show_warnings": bool(node.get("show_warnings", False))}
    if options["config_tree"] not in ("short", "full", "none"):
        raise ValueError(f"console.config_tree must be short, full or none; got "
                         f"{options['config_tree']!r}.")
    return options


class StepProgressBar(TQDMProgressBar):
    """One training bar per run, in optimizer steps (``global_step`` of ``max_steps``).

    It starts at the resumed step, is never reset at epoch boundaries, and shows the logged
    metrics (without Lightning's ``v_num``). Validation (a few batches; the grids and FID it
    samples are not batches) gets no bar unless ``validation_bar``.

    Args:
        refresh_rate: redraw every N optimizer steps (0 disables the bar).
        process_position: bar offset, as in Lightning's ``TQDMProgressBar``.
        validation_bar: also show Lightning's transient validation bar.
    """

    def __init__(self, refresh_rate: int = 10, process_position: int = 0,
                 validation_bar: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)
        self.validation_bar = bool(validation_bar)

    @staticmethod
    def total_steps(trainer: Any) -> int | float:
        """``max_steps``, or the estimated optimizer steps when the run is bounded by epochs."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        return convert_inf(trainer.estimated_stepping_batches)

    def init_train_tqdm(self, total: int | float | None = None, initial: int = 0) -> Tqdm:
        return Tqdm(desc="Training", total=total, initial=initial, unit="step",
                    position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def init_validation_tqdm(self) -> Tqdm:
        if self.validation_bar:
            return super().init_validation_tqdm()
        return Tqdm(disable=True)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm(self.total_steps(trainer),
                                                       trainer.global_step)

    def on_train_epoch_start(self, trainer: Any, *_: Any) -> None:
        """No per-epoch bar."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            _update_n(bar, step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.train_progress_bar is not None and not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.train_progress_bar is not None:
            _update_n(self.train_progress_bar, trainer.global_step)
            self.train_progress_bar.close()

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def progress_bar_kwargs(trainer_cfg: Mapping[str, Any], callbacks: Iterable[Any]) -> dict[str, Any]:
    """Trainer keyword arguments for the progress bar: ``enable_progress_bar=False`` when no
    callback is a progress bar (``~callbacks.progress_bar``) and the trainer config does not set
    it, so Lightning adds no bar of its own; else nothing."""
    if "enable_progress_bar" in trainer_cfg:
        return {}
    if any(isinstance(callback, ProgressBar) for callback in callbacks):
        return {}
    return {"enable_progress_bar": False}


# ------------------------------------------------------------------------------------ errors

#: Types that are user errors when raised by diffsweep's own code (a check with a clear message),
#: by an object a config builds (behind Hydra's InstantiationException) or at an origin below.
_CHECKED_ERROR_TYPES: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
    PermissionError)
#: OSErrors that say something about the machine, not the code: disk full, quota, read-only.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
#: Module prefix where an error was raised -> the config node whose value it rejects (prefixed to
#: a message that does not name it): optimizers are built from ``module.optimizer`` by a partial
#: called inside Lightning's ``configure_optimizers``, outside Hydra's instantiate.
ERROR_ORIGIN_KEYS: dict[str, str] = {"torch.optim": "module.optimizer"}

_Task = TypeVar("_Task", bound=Callable[..., Any])


def tracebacks_wanted() -> bool:
    """Whether errors keep their traceback: ``HYDRA_FULL_ERROR=1`` or ``$DIFFSWEEP_DEBUG`` set."""
    return (os.environ.get("HYDRA_FULL_ERROR") == "1"
            or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false"))


#: diffsweep's package folder: code in it raises its errors on purpose, with a clear message.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _in_package(filename: str | None) -> bool:
    """Whether ``filename`` is a file of diffsweep (also as ``python -m diffsweep.export``, whose
    module is then ``__main__``)."""
    return bool(filename) and os.path.abspath(str(filename)).startswith(_PACKAGE_DIR + os.sep)


def _raised_in(error: BaseException) -> tuple[str, str]:
    """(module name, file) of the innermost Python frame of ``error``'s traceback."""
    tb = error.__traceback__
    if tb is None:
        return "", ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")), tb.tb_frame.f_code.co_filename


def _defined_in_package(error: BaseException) -> bool:
    module = sys.modules.get(type(error).__module__)
    return _in_package(getattr(module, "__file__", None))


def _full_key(message: str) -> str | None:
    """The ``full_key: <key>`` line Hydra appends to an InstantiationException's message."""
    match = re.search(r"^full_key: (\S+)\s*$", message, flags=re.MULTILINE)
    return match.group(1) if match else None


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _with_key(line: str, key: str | None) -> str:
    return line if not key or key in line else f"{key}: {line}"


def user_error_lines(error: BaseException) -> list[str] | None:
    """The one-line message(s) of a user error, or None when ``error`` looks like a bug.

    User errors: :class:`~diffsweep.validate.ConfigError` (one line per problem), OmegaConf and
    Lightning configuration errors; ``ValueError``, ``FileNotFoundError``, ``FileExistsError``,
    ``NotADirectoryError``, ``IsADirectoryError``, ``PermissionError`` and disk-full/read-only
    ``OSError`` raised by diffsweep's code, by an object built from the config (Hydra's
    ``InstantiationException`` is unwrapped to its cause, and its ``full_key`` names the config
    node) or at an :data:`ERROR_ORIGIN_KEYS` origin; any exception class diffsweep defines
    (``CorruptLatentCacheError``, ``NonFiniteLossError``, ...). Other errors (a
    ``RuntimeError`` from torch, an ``AttributeError``, a ``ValueError`` from deep inside a
    library) are bugs: None, the caller keeps the traceback.
    """
    key: str | None = None
    instantiated = False
    while isinstance(error, InstantiationException):
        instantiated = True
        key = key or _full_key(str(error))
        cause = error.__cause__
        if cause is None or isinstance(cause, ImportError):  # a _target_ that cannot be found
            first = re.sub(r", set env var HYDRA_FULL_ERROR=1 to see chained exception", "",
                           str(error).splitlines()[0])
            return [_with_key(first, key)]
        error = cause
    if isinstance(error, ConfigError):
        return [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    if isinstance(error, OmegaConfBaseException):
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return [_with_key(first, getattr(error, "full_key", None) or key)]
    origin, origin_file = _raised_in(error)
    origin_key = next((node for prefix, node in ERROR_ORIGIN_KEYS.items()
                       if origin == prefix or origin.startswith(prefix + ".")), None)
    checked = (isinstance(error, _CHECKED_ERROR_TYPES)
               or (instantiated and isinstance(error, TypeError)))
    if not (_defined_in_package(error)  # diffsweep's own error classes
            or isinstance(error, MisconfigurationException)
            or (isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS)
            or (checked and (instantiated or origin_key is not None
                             or _in_package(origin_file)))):
        return None
    message = _one_line(str(error)) or type(error).__name__
    return [_with_key(message, key or origin_key)]


def error_text(lines: Iterable[str], job: str | None = None) -> str:
    """``lines`` as printed: ``error: <line>`` each (``error: job #3: <line>`` in a sweep)."""
    where = f"job {job}: " if job is not None else ""
    return "".join(f"error: {where}{line}\n" for line in lines)


class ReportedError(CompactHydraException):
    """A Hydra job's user error whose line(s) :func:`one_line_errors` already printed; Hydra marks
    the job failed (the sweep goes on, then exits with status 1)."""


class _HydraRestatementFilter:
    """``sys.stderr`` without Hydra's restatement of an error already printed in this process:
    ``Error executing job with overrides: [...]``, the error's text again and, right after it, the
    hint to set ``HYDRA_FULL_ERROR=1`` (Hydra writes each with one ``write``). Everything else
    passes through unchanged."""

    HINT = "\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n"

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.repeats: set[str] = set()
        self._after_repeat = False

    def write(self, text: str) -> int:
        after_repeat, self._after_repeat = self._after_repeat, text in self.repeats
        if self._after_repeat or (after_repeat and text == self.HINT):
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


_restatements: _HydraRestatementFilter | None = None


def _hydra_job() -> tuple[str | None, str | None]:
    """(job number under ``-m``, else None; Hydra's ``Error executing job`` line for this job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    overrides = OmegaConf.to_container(hydra_cfg.overrides.task)
    restated = f"Error executing job with overrides: {overrides}{os.linesep}"
    job = f"#{hydra_cfg.job.num}" if hydra_cfg.mode == RunMode.MULTIRUN else None
    return job, restated


def one_line_errors(task: _Task) -> _Task:
    """Wrap a Hydra task function: a user error (:func:`user_error_lines`) prints its line(s) on
    stderr (``error: ...``; ``error: job #N: ...`` under ``-m``) and fails the job with
    :class:`ReportedError`, whose restatement by Hydra :func:`command_line` drops. Bugs, and every
    error when :func:`tracebacks_wanted`, propagate unchanged (Hydra prints the traceback)."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Only module-level names here: launchers (joblib, submitit) pickle this closure by value
        # with the globals it names, and _restatements holds the open stderr.
        try:
            return task(*args, **kwargs)
        except Exception as error:
            _report_task_error(error)
            raise

    return wrapper  # type: ignore[return-value]


def _check_group_choices(arguments: list[str], config_dir: str | os.PathLike[str]) -> None:
    """Raise :class:`ConfigError` for command-line group options ``config_dir`` lacks; a command
    with Hydra flags other than ``-m`` (``--config-dir``, ``--cfg``, ...) is left to Hydra."""
    from diffsweep.hydra_utils import unknown_group_choices

    if any(argument.startswith("-") and argument not in ("-m", "--multirun")
           for argument in arguments):
        return
    problems = unknown_group_choices([argument for argument in arguments
                                      if argument not in ("-m", "--multirun")], config_dir)
    if problems:
        raise ConfigError("\n".join(problems))


def _report_task_error(error: Exception) -> None:
    """For :func:`one_line_errors`: a user error prints its line(s) and raises
    :class:`ReportedError`; otherwise returns (the caller re-raises ``error``)."""
    lines = None if tracebacks_wanted() else user_error_lines(error)
    if lines is None:
        return
    job, restated = _hydra_job()
    text = error_text(lines, job)
    sys.stderr.write(text)
    sys.stderr.flush()
    failure = ReportedError(text.rstrip("\n"))
    if _restatements is not None:
        _restatements.repeats.update([restated, f"{failure}{os.linesep}"] if restated else [])
    raise failure from None


@contextlib.contextmanager
def command_line(config_dir: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """The console of a command-line entry point (``with command_line(): main()``).

    With ``config_dir`` (the entry point's Hydra config folder), a config-group option the
    command line names that the folder lacks (``scheduler=cosinus``) is one line before Hydra
    starts (:func:`diffsweep.hydra_utils.unknown_group_choices`; Hydra would print a dozen).

    Installs :func:`quiet`'s filters before anything runs (Hydra composes and starts plugins
    before a job reads ``console.show_warnings``), drops Hydra's restatement of errors
    :func:`one_line_errors` already printed, and turns a user error escaping the block into its
    line(s) on stderr and exit status :data:`USER_ERROR_EXIT`. With :func:`tracebacks_wanted`,
    errors keep their traceback.
    """
    global _restatements
    quiet()
    previous_stderr, previous_filter = sys.stderr, _restatements
    _restatements = _HydraRestatementFilter(previous_stderr)
    sys.stderr = _restatements
    try:
        if config_dir is not None:
            _check_group_choices(sys.argv[1:], config_dir)
        yield
    except ReportedError:  # printed where it happened (a task run without Hydra's runner)
        raise SystemExit(USER_ERROR_EXIT) from None
    except Exception as error:
        lines = None if tracebacks_wanted() else user_error_lines(error)
        if lines is None:
            raise
        previous_stderr.write(error_text(lines))
        raise SystemExit(USER_ERROR_EXIT) from None
    finally:
        sys.stderr, _restatements = previous_stderr, previous_filter


__all__ = ["DEBUG_ENV", "ERROR_ORIGIN_KEYS", "HARMLESS", "Harmless", "ReportedError",
           "SHOW_WARNINGS_ENV", "StepProgressBar", "USER_ERROR_EXIT", "command_line",
           "console_options", "error_text", "one_line_errors", "progress_bar_kwargs", "quiet",
           "tracebacks_wanted", "user_error_lines", "warnings_shown"]
