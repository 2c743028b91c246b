"""A quiet console: known-harmless warnings filtered in one place, one progress bar per run.

- :data:`HARMLESS` lists every warning and log line diffsweep silences, each with why it is
  harmless here. :func:`quiet` installs the filters (call it again freely); ``show=True`` (config
  ``console.show_warnings=true``) or ``DIFFSWEEP_SHOW_WARNINGS=1`` leaves everything visible.
- :class:`StepProgressBar`: one bar per run counting optimizer steps up to ``max_steps``
  (Lightning's bar restarts at every epoch, and a 1617-image data set has 12-25 batches per
  epoch).
- :func:`progress_bar_kwargs`: no bar at all when the callbacks have none (Lightning would add its
  Rich bar, which shows ``Epoch 0/-2`` for step-based runs).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n, convert_inf

#: Set to 1 to see every warning (the same as ``console.show_warnings=true``).
SHOW_WARNINGS_ENV = "DIFFSWEEP_SHOW_WARNINGS"


@dataclass(frozen=True)
class Harmless:
    """A message silenced by :func:`quiet`: ``kind`` is ``warning`` (``warnings.warn``) or ``log``
    (a ``logging`` record); ``pattern`` is a regular expression matched at the message start."""

    kind: str
    pattern: str
    why: str


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
    Harmless("log", r"💡 Tip: For seamless cloud",
             "Lightning's advertisements for litlogger / litmodels"),
)

#: Loggers that emit Lightning's ``rank_zero_info`` lines.
_LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero",
                           "lightning.fabric.utilities.rank_zero",
                           "lightning_utilities.core.rank_zero")


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


def quiet(show: bool = False) -> bool:
    """Silence the :data:`HARMLESS` warnings and log lines (repeated calls add nothing); returns
    False (and changes nothing) when :func:`warnings_shown`."""
    if warnings_shown(show):
        return False
    for item in HARMLESS:
        if item.kind == "warning":
            warnings.filterwarnings("ignore", message=item.pattern)
    patterns = [item.pattern for item in HARMLESS if item.kind == "log"]
    for name in _LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _HarmlessLogFilter) for existing in logger.filters):
            logger.addFilter(_HarmlessLogFilter(patterns))
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


__all__ = ["HARMLESS", "Harmless", "SHOW_WARNINGS_ENV", "StepProgressBar", "console_options",
           "progress_bar_kwargs", "quiet", "warnings_shown"]
