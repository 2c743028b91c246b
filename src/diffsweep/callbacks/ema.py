"""EMA of the weights with a decay warmup, on Lightning's ``WeightAveraging``.

Lightning's ``EMAWeightAveraging`` has a fixed decay; diffusion training wants the decay to ramp up
(early weights are poor). We pass our own ``multi_avg_fn`` that does one fused
``torch._foreach_lerp_`` per update with the decay of the current step:

    decay(step) = min(max_decay, 1 - (1 + step / inv_gamma) ** -power)

(power warmup, diffusers' ``EMAModel`` with ``use_ema_warmup``).

``power = 2/3`` suits short runs, ``3/4`` long ones (Karras et al.). The average lives in an
``AveragedModel`` of the whole LightningModule, so frozen helpers (VAE, Inception) must stay outside
the module tree. Checkpoints hold the EMA weights as ``state_dict`` and the raw ones as
``current_model_state`` (Lightning's format).
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor


def ema_decay(step: int, max_decay: float = 0.9999, inv_gamma: float = 1.0,
              power: float = 2 / 3, min_decay: float = 0.0) -> float:
    """Decay for the update after ``step`` optimizer steps (step >= 0),
    in [min_decay, max_decay]."""
    value = 1 - (1 + step / inv_gamma) ** -power
    return max(min_decay, min(max_decay, value))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_ema_arguments(max_decay: float = 0.9999, inv_gamma: float = 1.0, power: float = 2 / 3,
                        min_decay: float = 0.0, update_every_n_steps: int = 1,
                        start_step: int = 0, key: str = "callbacks.ema") -> None:
    """Raise a one-line ValueError naming ``<key>.<argument>``, its value and the allowed range:
    ``0 <= min_decay <= max_decay < 1``, ``inv_gamma > 0``, ``power > 0``,
    ``update_every_n_steps >= 1`` and ``start_step >= 0`` (integers)."""
    if not _is_real(max_decay) or not 0 <= max_decay < 1:
        raise ValueError(f"{key}.max_decay={max_decay!r} is not allowed: the EMA decay is a number "
                         f"in [0, 1) (e.g. 0.999; 1 would freeze the average).")
    if not _is_real(min_decay) or not 0 <= min_decay <= max_decay:
        raise ValueError(f"{key}.min_decay={min_decay!r} is not allowed: a number in [0, "
                         f"max_decay={max_decay}].")
    for name, value in (("inv_gamma", inv_gamma), ("power", power)):
        if not _is_real(value) or not value > 0:
            raise ValueError(f"{key}.{name}={value!r} is not allowed: the warmup's {name} is a "
                             f"number > 0.")
    if not isinstance(update_every_n_steps, int) or isinstance(update_every_n_steps, bool) \
            or update_every_n_steps < 1:
        raise ValueError(f"{key}.update_every_n_steps={update_every_n_steps!r} is not allowed: "
                         f"an integer >= 1.")
    if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
        raise ValueError(f"{key}.start_step={start_step!r} is not allowed: an integer >= 0.")


class _WarmupEMA:
    """``multi_avg_fn`` for ``AveragedModel``: lerp every averaged tensor towards the current one.

    The decay is set by the callback (from the Python-side step count) before each update, so the
    update needs no device-to-host sync.
    """

    def __init__(self) -> None:
        self.decay = 0.0

    def __call__(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        floating = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floating:
            avg, cur = zip(*floating)
            torch._foreach_lerp_(list(avg), list(cur), 1.0 - self.decay)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)


class EMA(WeightAveraging):
    """EMA weights for validation, sampling, FID and checkpoints.

    Args:
        max_decay: the decay the warmup approaches (e.g. 0.9999).
        inv_gamma, power: warmup shape (see module docstring).
        min_decay: lower bound of the decay.
        update_every_n_steps: update the average every N optimizer steps.
        start_step: no averaging before this optimizer step (the average tracks the raw weights).
        device: where the averaged copy lives (None: the module's device).
    """

    def __init__(self, max_decay: float = 0.9999, inv_gamma: float = 1.0, power: float = 2 / 3,
                 min_decay: float = 0.0, update_every_n_steps: int = 1, start_step: int = 0,
                 device: str | None = None) -> None:
        check_ema_arguments(max_decay, inv_gamma, power, min_decay, update_every_n_steps,
                            start_step)
        self._avg_fn = _WarmupEMA()
        super().__init__(device=device, use_buffers=True, multi_avg_fn=self._avg_fn)
        self.max_decay, self.inv_gamma, self.power = max_decay, inv_gamma, power
        self.min_decay = min_decay
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self._fast_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None:
            return False
        if step_idx < self.start_step:
            self._avg_fn.decay = 0.0  # copy: the average follows the raw weights
            return True
        self._avg_fn.decay = ema_decay(step_idx - self.start_step, self.max_decay,
                                       self.inv_gamma, self.power, self.min_decay)
        return (step_idx + 1) % self.update_every_n_steps == 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: STEP_OUTPUT, batch: Any, batch_idx: int) -> None:
        # Same logic as WeightAveraging.on_train_batch_end, with a faster update (see _update).
        step_idx = trainer.global_step - 1
        if (trainer.global_step > self._latest_update_step
                and self.should_update(step_idx=step_idx)):
            self._update(pl_module)
            self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def _update(self, pl_module: L.LightningModule) -> None:
        """``AveragedModel.update_parameters`` without its per-step overhead.

        ``update_parameters`` detaches and ``.to(device)``-copies every tensor, regroups them by
        device and dtype and reads ``n_averaged`` on the host (a device sync) each step: about 3x
        the cost of the lerp itself for a small net. Here: one ``torch._foreach_lerp_`` over the
        floating tensors, ``copy_`` for the others, ``n_averaged += 1`` on its device (no sync).
        The first update of a fit (a copy unless resumed) and averages kept on another device or
        in another dtype go through ``update_parameters``.
        """
        average = self._average_model
        assert average is not None
        if self._fast_pairs is None:
            # First update of a fit: a copy (n_averaged == 0) or, resumed, a regular average.
            average.update_parameters(pl_module)
            averaged = list(itertools.chain(average.module.parameters(),
                                            average.module.buffers()))
            current = list(itertools.chain(pl_module.parameters(), pl_module.buffers()))
            if len(averaged) == len(current) and all(
                    a.device == c.device and a.dtype == c.dtype
                    for a, c in zip(averaged, current)):
                # The same tensor objects for the rest of the fit (weight swaps and loads copy
                # in place), so they are listed once: walking the module tree each step costs
                # more than the lerp for a small net.
                self._fast_pairs = (averaged, current)
            return
        averaged, current = self._fast_pairs
        self._avg_fn(averaged, current, average.n_averaged)
        average.n_averaged += 1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._fast_pairs = None  # the first update of each fit lists the tensors again

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "decay": self._avg_fn.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._avg_fn.decay = state_dict.get("decay", 0.0)

    def current_decay(self) -> float:
        """The decay used by the most recent update."""
        return self._avg_fn.decay

