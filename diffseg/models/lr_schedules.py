"""Learning-rate schedules: the factor that multiplies the optimiser's learning rate at each step.

Each schedule is a pure function ``schedule(step, *, total_steps, ...) -> factor``. A model config picks
one from the Hydra group ``model/lr_schedule`` (``warmup_cosine``, ``step_decay``, ``constant``) as a
partial; ``SegmentationModule.configure_optimizers`` supplies ``total_steps``, the number of optimiser steps
the trainer will actually run (``trainer.max_steps``, or ``max_epochs`` x steps per epoch), so the schedule
spans the real run whichever way its length was given.
"""
from __future__ import annotations

import math
from typing import Sequence

from diffseg.utils.errors import ConfigError


def _warmup(step: int, warmup_steps: int) -> float | None:
    """Linear warm-up factor (step + 1)/warmup_steps during the first ``warmup_steps`` steps, else None."""
    if warmup_steps < 0:
        raise ConfigError(f"model.lr_schedule.warmup_steps: expected >= 0, got {warmup_steps}")
    return (step + 1) / warmup_steps if step < warmup_steps else None


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int = 100, min_ratio: float = 0.0) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps`` (ImgX-DiffSeg's schedule):
    factor = min_ratio + (1 - min_ratio)·(1 + cos(π·p))/2 with p the fraction of the post-warm-up steps done."""
    warm = _warmup(step, warmup_steps)
    if warm is not None:
        return warm
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_decay(step: int, *, total_steps: int, milestones: Sequence[float] = (2 / 3, 5 / 6), gamma: float = 0.5,
               warmup_steps: int = 0) -> float:
    """Multiply by ``gamma`` at each milestone (SegRefiner's schedule: halved at 80k and 100k of 120k steps).

    Milestones are fractions of ``total_steps`` in (0, 1), so the same config spans a 120k-step paper run
    and a 400-step tiny run; milestone m falls on step round(m·total_steps)."""
    if any(not 0.0 < float(m) < 1.0 for m in milestones) or list(milestones) != sorted(milestones):
        raise ConfigError(f"model.lr_schedule.milestones: expected increasing fractions of the run in (0, 1), "
                          f"got {list(milestones)}")
    warm = _warmup(step, warmup_steps)
    if warm is not None:
        return warm
    passed = sum(step >= round(float(m) * total_steps) for m in milestones)
    return float(gamma) ** passed


def constant(step: int, *, total_steps: int, warmup_steps: int = 0) -> float:
    """1 after an optional linear warm-up (SegDiff's reference keeps the learning rate constant)."""
    warm = _warmup(step, warmup_steps)
    return 1.0 if warm is None else warm
