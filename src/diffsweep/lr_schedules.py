"""Learning-rate schedules, each ``schedule(optimizer, ...) -> LambdaLR`` stepped once per
optimizer step (configs/lr_schedule/, built with ``_partial_: true``; the module passes the
optimizer).

All start with a linear warmup ``factor(step) = (step + 1) / warmup_steps`` for
``step < warmup_steps`` (none when 0), then:

- :func:`constant`: ``1``.
- :func:`cosine`: ``min_factor + (1 - min_factor) (1 + cos(pi p)) / 2`` with ``p`` the fraction of
  the post-warmup steps done (diffusers' ``get_cosine_schedule_with_warmup`` for ``min_factor=0``).
- :func:`inverse_sqrt`: ``1 / sqrt(max(step / ref_steps, 1))`` (EDM2's inverse square-root decay,
  Karras et al. 2024, Eq. 7, with ``t_ref = ref_steps``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def _check_steps(name: str, value: int, minimum: int) -> int:
    if int(value) != value or value < minimum:
        raise ValueError(f"lr_schedule.{name}={value!r} is not allowed; use an integer >= "
                         f"{minimum}.")
    return int(value)


def _with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int,
                 after: Callable[[int], float]) -> LambdaLR:
    warmup_steps = _check_steps("warmup_steps", warmup_steps, 0)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return after(step)

    return LambdaLR(optimizer, factor)


def constant(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """Warmup, then the optimizer's learning rate unchanged."""
    return _with_warmup(optimizer, warmup_steps, lambda step: 1.0)


def cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
           min_factor: float = 0.0) -> LambdaLR:
    """Warmup, then a half cosine from the full rate to ``min_factor`` of it at ``total_steps``
    (held there afterwards)."""
    total_steps = _check_steps("total_steps", total_steps, 1)
    if not 0.0 <= min_factor <= 1.0:
        raise ValueError(f"lr_schedule.min_factor={min_factor!r} is not allowed; use a value in "
                         f"[0, 1].")
    span = max(1, total_steps - warmup_steps)

    def after(step: int) -> float:
        progress = min(1.0, (step - warmup_steps) / span)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return _with_warmup(optimizer, warmup_steps, after)


def inverse_sqrt(optimizer: torch.optim.Optimizer, ref_steps: int, warmup_steps: int = 0
                 ) -> LambdaLR:
    """Warmup, then ``1 / sqrt(max(step / ref_steps, 1))``."""
    ref_steps = _check_steps("ref_steps", ref_steps, 1)
    return _with_warmup(optimizer, warmup_steps,
                        lambda step: 1.0 / math.sqrt(max(step / ref_steps, 1.0)))


__all__ = ["constant", "cosine", "inverse_sqrt"]
