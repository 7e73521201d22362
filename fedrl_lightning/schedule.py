"""Learning-rate schedules as TRL's ``lr_scheduler_type`` and ``warmup_ratio`` define them, over a federated run.

A federated run's clock is the round, not a client's own step count: a client sampled in round 40 of 100 trains at
round 40's learning rate however rarely it was picked before. The schedule's position is therefore the run's local
step ``(round - 1) * local_steps + step`` out of ``num_rounds * local_steps``; every optimizer step of one local
step (``num_iterations``, PPO's mini-batches) uses that step's rate. The rate follows from (round, step) alone, so
there is no scheduler state to save, swap or resume.
"""

from __future__ import annotations

import math
from typing import Literal

LRSchedulerType = Literal["constant", "constant_with_warmup", "linear", "cosine"]
SCHEDULES: tuple[str, ...] = ("constant", "constant_with_warmup", "linear", "cosine")


def position(round_idx: int, local_steps: int, step: int) -> int:
    """The run's local step (0-based) of step ``step`` (0-based) of round ``round_idx`` (1-based): the schedule's
    position, the rewards' ``trainer_state.global_step`` and, plus one, the step index of the logs."""
    return (round_idx - 1) * local_steps + step


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup steps of a run of ``total_steps``: ``ceil(warmup_ratio * total_steps)``, as transformers counts them."""
    return math.ceil(total_steps * warmup_ratio)


def lr_factor(kind: LRSchedulerType, step: int, total_steps: int, warmup_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate at ``step`` (0-based: the first step is 0), as transformers'
    ``get_scheduler(kind, num_warmup_steps=ceil(warmup_ratio * total_steps), num_training_steps=total_steps)`` sets it
    before that step. ``constant`` ignores the warmup, as there.

    Raises:
        ValueError: an unknown ``kind`` or a ``warmup_ratio`` outside [0, 1].
    """
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    if kind == "constant":
        return 1.0
    warmup = warmup_steps(total_steps, warmup_ratio)
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
