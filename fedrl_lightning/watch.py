"""Per-local-step watching: each local step's own metrics and scored samples, from the client to the run's logs.

A client's round returns its local steps' metrics beside the round's means, as ``local_step/<i>/<name>`` keys of
the update's metrics (``pack_steps``), so they cross every transport unchanged (Fabric ranks gather the updates,
Flower sends metrics as a ``MetricRecord``). The server takes them out of each reply before anything else sees the
update (``StepLog.collect``) and writes them with the round's row once the round completes (``StepLog.flush``):
a round that is retried or never checkpointed leaves no step rows behind. The step index is the run's local step
``(round - 1) * local_steps + i + 1``, the position the learning-rate schedule uses.

The samples (prompt, completion, reward per function, advantage) never leave the client: ``local_step`` fills
``sample_rows`` for the ``on_local_step_end`` hook, where ``fedrl_lightning.callbacks.watch.CompletionsLog`` writes
them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning.fabric.loggers import Logger
from torch import Tensor

from fedrl_lightning.losses import weighted_reward_sum
from fedrl_lightning.rewards import reward_func_name
from fedrl_lightning.schedule import position

if TYPE_CHECKING:
    from fedrl_lightning.aggregation.base import ClientUpdate
    from fedrl_lightning.modules.pg import PolicyGradientBatch, PolicyGradientModule
    from fedrl_lightning.rollout import Rollout

STEP_KEY = re.compile(r"local_step/(\d+)/(.+)")
"""An update's metric key of one local step: ``local_step/<i>/<name>``, ``i`` 0-based within the round."""


def run_step(round_idx: int, local_steps: int, step: int) -> int:
    """The run's 1-based local step index of step ``step`` (0-based) of round ``round_idx`` (1-based)."""
    return position(round_idx, local_steps, step) + 1


def pack_steps(per_step: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each local step's metrics as flat ``local_step/<i>/<name>`` keys (see ``STEP_KEY``)."""
    return {f"local_step/{i}/{name}": value for i, metrics in enumerate(per_step) for name, value in metrics.items()}


def pop_steps(metrics: dict[str, float]) -> list[dict[str, float]]:
    """Remove the ``local_step/<i>/...`` keys from ``metrics``; each step's metrics, in step order."""
    steps: dict[int, dict[str, float]] = {}
    for key in [k for k in metrics if k.startswith("local_step/")]:
        match = STEP_KEY.fullmatch(key)
        value = metrics.pop(key)
        if match:
            steps.setdefault(int(match.group(1)), {})[match.group(2)] = value
    return [steps[i] for i in sorted(steps)]


class StepLog:
    """The server's per-step rows: collected from a round's replies, written to the loggers with the round's row.

    Args:
        every: keep the rows of the run's local steps that are multiples of this; 0 keeps none (the step metrics
            are still removed from the updates).
    """

    def __init__(self, every: int = 1) -> None:
        if every < 0:
            raise ValueError(f"log_every_n_steps must be >= 0, got {every}")
        self.every = every
        self.pending: list[dict[str, float]] = []  # the round in progress (dropped when it is retried)
        self.rewards: list[tuple[int, int, float]] = []  # (client, step, reward) written in this session: the plot

    def start_round(self) -> None:
        """Forget the rows of an earlier attempt of the round."""
        self.pending = []

    def collect(self, round_idx: int, update: ClientUpdate) -> None:
        """Take ``update``'s per-step metrics out of its metrics and keep the rows to log."""
        steps = pop_steps(update.metrics)
        for i, metrics in enumerate(steps):
            step = run_step(round_idx, len(steps), i)
            if self.every and step % self.every == 0:
                self.pending.append({"round": round_idx, "client": update.client_id, "step": step, **metrics})

    def flush(self, loggers: Iterable[Logger]) -> None:
        """The pending rows to every logger (``save`` is the caller's): a logger with ``log_rows`` (``metrics.csv``)
        takes them as rows; the others as ``client<i>/step/<name>`` over the run's local step."""
        for logger in loggers:
            log_rows = getattr(logger, "log_rows", None)
            if callable(log_rows):
                log_rows(self.pending)
                continue
            for row in self.pending:
                metrics = {k: v for k, v in row.items() if k not in ("round", "client", "step")}
                logger.log_metrics({f"client{row['client']}/step/{k}": v for k, v in metrics.items()}, step=row["step"])
        self.rewards += [(int(r["client"]), int(r["step"]), r["reward"]) for r in self.pending if "reward" in r]
        self.pending = []


def _finite(value: float) -> float | None:
    """JSON has no NaN: None instead."""
    return value if math.isfinite(value) else None


def sample_rows(
    module: PolicyGradientModule,
    rollout: Rollout,
    examples: list[dict[str, Any]],
    rewards: Tensor,
    batch: PolicyGradientBatch,
) -> list[dict[str, Any]]:
    """One row per completion of a scored step: its prompt, completion, weighted reward, reward per function and
    advantage (a per-token advantage is averaged over the completion's loss mask). ``rewards``: ``module.score``'s
    (N, K)."""
    if rewards.shape[1] == len(module.reward_funcs):
        names = [reward_func_name(fn) for fn in module.reward_funcs]
        total = weighted_reward_sum(rewards, module.reward_weights).tolist()
    else:  # a module that scores otherwise (FedGRPO's experts: one column): the columns, summed
        names = [f"reward_{k}" for k in range(rewards.shape[1])]
        total = weighted_reward_sum(rewards, rewards.new_ones(rewards.shape[1])).tolist()
    advantages = batch.advantages.detach().float().cpu()
    if advantages.dim() == 2:
        mask = batch.mask.detach().float().cpu()
        advantages = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    per_func, adv = rewards.tolist(), advantages.tolist()
    group = max(1, len(rollout.completions) // max(1, len(examples)))
    return [
        {
            "prompt": examples[i // group]["prompt"],
            "completion": text,
            "reward": _finite(total[i]),
            "rewards": {name: _finite(per_func[i][k]) for k, name in enumerate(names)},
            "advantage": _finite(adv[i]),
        }
        for i, text in enumerate(rollout.completions)
    ]


__all__ = ["STEP_KEY", "StepLog", "pack_steps", "pop_steps", "run_step", "sample_rows"]
