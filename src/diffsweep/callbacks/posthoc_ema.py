"""Lightning side of post-hoc EMA (:mod:`diffsweep.posthoc_ema`): power-function EMAs of the
parameters and their snapshots.

``ema=posthoc`` adds this callback *beside* the default warmup EMA (``callbacks.ema``): that one
still produces validation grids, training-time FID and the checkpoints' ``state_dict``, so
sampling and ``evaluate.py`` without ``ema.sigma_rel`` work as before and the study compares
post-hoc profiles with the fixed EMA of the same run. This callback keeps one power-function EMA
per ``sigma_rels`` entry (updated after every optimizer step, ``beta = (1 - 1/t)^(gamma + 1)``),
writes all of them every ``every_n_steps`` steps and at the end of training to
``<output_dir>/posthoc_ema/step_<step>.safetensors`` (atomic writes, rank 0 only) and stores them
in every checkpoint (``callbacks["PostHocEMA"]``).

Kill and resume: a resumed run continues the averages from the checkpoint and first deletes every
snapshot after the resumed step (those a killed run wrote after its last checkpoint), then writes
them again as it passes those steps; a run that restarts from step 0 in a reused folder deletes
them all. The series on disk is always that of one uninterrupted run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor

from diffsweep.checkpoints import strip_compile_prefix
from diffsweep.posthoc_ema import (
    SNAPSHOT_DIR,
    SNAPSHOT_DTYPES,
    check_sigma_rel,
    drop_snapshots_after,
    list_snapshots,
    power_function_beta,
    sigma_rel_to_gamma,
    snapshot_bytes,
    snapshot_count,
    update_power_ema,
    write_snapshot,
)

log = logging.getLogger(__name__)

_STATE_FORMAT = 1


class PostHocEMA(L.Callback):
    """Power-function EMAs of the module's floating-point parameters, snapshotted for post-hoc EMA.

    Args:
        sigma_rels: relative widths of the tracked EMAs (at least two, distinct, each in
            ``(0, 0.3003]``); EDM2 tracks 0.05 and 0.10.
        every_n_steps: write a snapshot every N optimizer steps (and at the end of training).
        output_dir: the run directory; snapshots go to ``<output_dir>/posthoc_ema/`` (None: the
            trainer's ``default_root_dir``).
        dtype: snapshot precision, ``float32`` | ``float16`` | ``bfloat16`` (the averages
            themselves stay in float32 or better).
        device: where the averages live (None: beside the parameters; ``cpu`` saves accelerator
            memory at the cost of a copy per step).
    """

    def __init__(self, sigma_rels: Sequence[float] = (0.05, 0.10), every_n_steps: int = 100,
                 output_dir: str | None = None, dtype: str = "float32",
                 device: str | None = None) -> None:
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence):
            raise ValueError(f"callbacks.posthoc_ema.sigma_rels={sigma_rels!r} must be a list of "
                             f"relative EMA widths, e.g. [0.05, 0.10].")
        values = [check_sigma_rel(value, "callbacks.posthoc_ema.sigma_rels")
                  for value in sigma_rels]
        if len(values) < 2 or len(set(values)) != len(values):
            raise ValueError(f"callbacks.posthoc_ema.sigma_rels={list(sigma_rels)!r}: post-hoc "
                             f"EMA needs at least two distinct relative widths, e.g. [0.05, 0.10].")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) \
                or every_n_steps < 1:
            raise ValueError(f"callbacks.posthoc_ema.every_n_steps={every_n_steps!r} must be a "
                             f"positive integer (optimizer steps between snapshots).")
        if dtype not in SNAPSHOT_DTYPES:
            raise ValueError(f"callbacks.posthoc_ema.dtype={dtype!r} is not allowed; choose one "
                             f"of {', '.join(SNAPSHOT_DTYPES)}.")
        self.sigma_rels = tuple(values)
        self.gammas = tuple(sigma_rel_to_gamma(value) for value in values)
        self.every_n_steps = every_n_steps
        self.output_dir = output_dir
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.step = 0                                  # optimizer steps the averages cover
        self._names: list[str] = []
        self._averages: list[list[Tensor]] = []        # per profile, per parameter
        self._current: list[Tensor] = []               # the module's parameters, same order
        self._converted = False                        # current needs .to(device, dtype)
        self._loaded: dict[str, Any] | None = None
        self._snapshot_dir: Path | None = None
        self._trainer: L.Trainer | None = None
        self._written_step = 0                         # step of the last snapshot written

    # ------------------------------------------------------------------ lifecycle

    @property
    def snapshot_dir(self) -> Path:
        """``<output_dir>/posthoc_ema`` (known from ``setup`` on)."""
        if self._snapshot_dir is None:
            raise RuntimeError("PostHocEMA.snapshot_dir is set in setup().")
        return self._snapshot_dir

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        root = self.output_dir if self.output_dir is not None else trainer.default_root_dir
        self._snapshot_dir = Path(root) / SNAPSHOT_DIR
        self._trainer = trainer

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._track(pl_module)
        global_step = trainer.global_step
        if self._loaded is not None:
            self._restore(self._loaded, global_step)
            self._loaded = None
        elif global_step > 0:
            raise ValueError(
                f"Resuming at step {global_step} from a checkpoint without post-hoc EMA state: "
                f"the power-function EMAs must run from step 0. Train with ema=posthoc from the "
                f"start, or start a new run (resume=never).")
        else:
            self.step = 0
        self._written_step = self.step
        if trainer.is_global_zero:
            dropped = drop_snapshots_after(self.snapshot_dir, self.step)
            if dropped:
                log.warning("Post-hoc EMA: deleted %d snapshot(s) after step %d in %s (written "
                            "after the checkpoint this run resumes from).", len(dropped),
                            self.step, self.snapshot_dir)
            existing = {s.step for s in list_snapshots(self.snapshot_dir)}
            if self.step > 0 and self.step % self.every_n_steps == 0 \
                    and self.step not in existing:
                # the checkpoint was saved before this step's snapshot (a stop signal handled by
                # a callback that runs before this one): write it now, from the restored state
                self.write_snapshot()
            if self.step > self.every_n_steps and not any(step < self.step for step in existing):
                log.warning("Post-hoc EMA: no snapshots before step %d in %s (the checkpoint "
                            "comes from another run directory); profiles of this run are "
                            "reconstructed from later snapshots only.", self.step,
                            self.snapshot_dir)
            self._log_budget(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: STEP_OUTPUT, batch: Any, batch_idx: int) -> None:
        global_step = trainer.global_step
        if global_step > self.step:  # else: gradient accumulation, or caught up in state_dict
            self.update(global_step)
        if global_step % self.every_n_steps == 0 and global_step > self._written_step \
                and trainer.is_global_zero:
            self.write_snapshot()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.step > 0 and self.step % self.every_n_steps != 0 and trainer.is_global_zero:
            self.write_snapshot()  # the last step, so the final checkpoint has its snapshot

    # ------------------------------------------------------------------ averaging

    def _track(self, pl_module: L.LightningModule) -> None:
        """List the floating-point parameters once per fit (the same tensors all fit long) and
        create the averages as copies of them."""
        named = [(name, parameter) for name, parameter in pl_module.named_parameters()
                 if parameter.is_floating_point()]
        self._names = list(strip_compile_prefix({name: None for name, _ in named}))
        self._current = [parameter for _, parameter in named]
        averages = []
        for _ in self.sigma_rels:
            averages.append([parameter.detach().to(
                device=self.device or parameter.device,
                dtype=torch.promote_types(parameter.dtype, torch.float32)).clone()
                for parameter in self._current])
        self._averages = averages
        self._converted = any(a.device != c.device or a.dtype != c.dtype
                              for a, c in zip(averages[0], self._current))

    @torch.no_grad()
    def update(self, global_step: int) -> None:
        """Bring every average from ``self.step`` to ``global_step`` optimizer steps with the
        current parameters (one update; ``beta = (1 - delta/t)^(gamma + 1)``)."""
        current = self._current
        if self._converted:
            reference = self._averages[0]
            current = [c.detach().to(device=a.device, dtype=a.dtype, non_blocking=True)
                       for a, c in zip(reference, current)]
        delta = global_step - self.step
        for gamma, averages in zip(self.gammas, self._averages):
            update_power_ema(averages, current, power_function_beta(gamma, global_step, delta))
        self.step = global_step

    def averages(self) -> dict[float, dict[str, Tensor]]:
        """``{sigma_rel: {parameter name: average}}`` (the live tensors, not copies)."""
        return {sigma_rel: dict(zip(self._names, averages))
                for sigma_rel, averages in zip(self.sigma_rels, self._averages)}

    def write_snapshot(self) -> Path:
        """Write the averages after ``self.step`` steps to the snapshot folder."""
        path = write_snapshot(self.snapshot_dir, self.step, self.averages(), self.dtype)
        self._written_step = self.step
        return path

    def _log_budget(self, trainer: L.Trainer) -> None:
        num_parameters = sum(average.numel() for average in self._averages[0])
        per_snapshot = snapshot_bytes(num_parameters, len(self.sigma_rels), self.dtype)
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        count = snapshot_count(max_steps, self.every_n_steps) if max_steps else None
        total = f"{count} snapshots = {count * per_snapshot / 1e6:.1f} MB" if count else \
            "one per snapshot"
        log.info("Post-hoc EMA: sigma_rels %s (gamma %s), a snapshot every %d steps into %s: "
                 "%.2f MB each (%d parameters x %d profiles x %d bytes), %s.",
                 list(self.sigma_rels), [round(g, 3) for g in self.gammas], self.every_n_steps,
                 self.snapshot_dir, per_snapshot / 1e6, num_parameters, len(self.sigma_rels),
                 SNAPSHOT_DTYPES[self.dtype].itemsize, total)

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if (trainer is not None and self._averages and trainer.training
                and trainer.global_step > self.step):
            # A callback ordered before this one saves a checkpoint in on_train_batch_end (a stop
            # signal): take this step's update now, from the same post-step weights, so the
            # checkpoint's averages are those of its global step.
            self.update(trainer.global_step)
        return {"format": _STATE_FORMAT, "step": self.step, "sigma_rels": list(self.sigma_rels),
                "averages": {repr(sigma_rel): named
                             for sigma_rel, named in self.averages().items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_train_start, once the parameters are known (Lightning restores
        # callbacks after setup but before the loops' step).
        self._loaded = state_dict

    def _restore(self, state: dict[str, Any], global_step: int) -> None:
        stored = [float(value) for value in state.get("sigma_rels", [])]
        if len(stored) != len(self.sigma_rels) or not all(
                math.isclose(a, b, rel_tol=1e-12) for a, b in zip(stored, self.sigma_rels)):
            raise ValueError(f"The checkpoint's post-hoc EMA tracks sigma_rels={stored}, this run "
                             f"asks for callbacks.posthoc_ema.sigma_rels={list(self.sigma_rels)}; "
                             f"resume with the same values.")
        step = int(state["step"])
        if step != global_step:
            raise ValueError(f"The checkpoint's post-hoc EMA is at step {step} but its training "
                             f"state at step {global_step}; the checkpoint is inconsistent.")
        for sigma_rel, averages in zip(self.sigma_rels, self._averages):
            named = state["averages"][repr(sigma_rel)]
            missing = [name for name in self._names if name not in named]
            if missing or len(named) != len(self._names):
                raise ValueError(f"The checkpoint's post-hoc EMA (sigma_rel={sigma_rel}) holds "
                                 f"other parameters than the module (missing e.g. "
                                 f"{missing[:3]}); it belongs to another model.")
            with torch.no_grad():
                for name, average in zip(self._names, averages):
                    average.copy_(named[name])
        self.step = step


__all__ = ["PostHocEMA"]
