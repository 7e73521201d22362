"""One client's round: rollouts -> rewards -> advantages -> local optimizer steps -> ClientUpdate.

The client owns private state that never leaves it: its data cursor, optimizer state and RNG (and, without
aggregation, its own adapter). The trainer swaps that state in and out around ``run_round``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from fedrl_lightning.aggregation.base import LocalObjective
from fedrl_lightning.data import ClientSampler
from fedrl_lightning.losses import weighted_reward_sum
from fedrl_lightning.modules.grpo import expand_columns
from fedrl_lightning.rewards import compute_rewards
from fedrl_lightning.rollout import RolloutBackend


@dataclass
class ClientState:
    """Everything a client keeps between rounds (on CPU).

    Attributes:
        sampler: the data cursor (``ClientSampler.state_dict()``).
        optimizer: optimizer state dict, or None before the first round.
        rng: torch RNG state, or None before the first round.
        adapter: the client's own adapter when it is not overwritten by a global one (local-only training).
        extra: algorithm state (e.g. a performance baseline), for callbacks and later algorithms.
    """

    sampler: dict[str, int]
    optimizer: dict[str, Any] | None = None
    rng: torch.Tensor | None = None
    adapter: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@contextmanager
def timed(tracker: Any, name: str):
    """Record the wall time of the block as ``timing/<name>`` (seconds)."""
    start = time.perf_counter()
    yield
    tracker.update(f"timing/{name}", time.perf_counter() - start)


def local_step(
    fabric: Any,
    module: Any,
    optimizer: Any,
    backend: RolloutBackend,
    examples: list[dict],
    objective: LocalObjective | None = None,
) -> int:
    """One local step: generate, score, then the module's optimizer steps over that batch; returns completion tokens.

    Per optimizer step, after the backward passes and before clipping: the module's ``on_before_optimizer_step``
    (algorithm state such as FedMOA's objective weights) and the aggregator's ``objective`` (FedProx, SCAFFOLD).
    """
    t = module.tracker
    with timed(t, "generate"):
        rollout = backend.generate(module, [ex["prompt"] for ex in examples], module.sampling)
    with timed(t, "reward"):
        rewards = module.score(rollout, examples, module.num_generations)
    with timed(t, "old_ref_log_probs"):
        batch = module.make_batch(rollout, rewards)
    module.train()
    for micro_batches in module.optimizer_steps(batch):
        with timed(t, "forward_backward"):
            for micro in micro_batches:
                module.backward_step(fabric, micro)
        with timed(t, "optimizer"):
            module.on_before_optimizer_step(optimizer)
            if objective is not None:
                objective.on_gradients(module.trainable_parameters(), optimizer.param_groups[0]["lr"])
            if module.max_grad_norm > 0:
                t.update("grad_norm", fabric.clip_gradients(module, optimizer, max_norm=module.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return int(batch.mask.sum())


def run_round(
    fabric: Any,
    module: Any,
    optimizer: Any,
    backend: RolloutBackend,
    examples: list[dict],
    sampler: ClientSampler,
    local_steps: int,
    on_step: Callable[[int], None] | None = None,
    objective: LocalObjective | None = None,
) -> tuple[int, int, dict[str, float]]:
    """Train ``local_steps`` steps on the client's data; returns (prompts, completion tokens, metrics)."""
    num_prompts = num_tokens = 0
    for step in range(local_steps):
        batch = [examples[i] for i in sampler.next_batch(module.prompts_per_step)]
        with timed(module.tracker, "step"):
            num_tokens += local_step(fabric, module, optimizer, backend, batch, objective)
        num_prompts += len(batch)
        if on_step is not None:
            on_step(step)
    return num_prompts, num_tokens, module.tracker.compute_and_reset()


@torch.no_grad()
def evaluate(module: Any, backend: RolloutBackend, examples: list[dict], batch_size: int = 32) -> dict[str, float]:
    """Greedy accuracy (``accuracy_func`` >= 1) and mean weighted reward on held-out examples."""
    params = module.eval_sampling()
    correct, rewards = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rollout = backend.generate(module, [ex["prompt"] for ex in chunk], params)
        prompts, columns = expand_columns(chunk, 1)
        completions = [[{"role": "assistant", "content": c}] for c in rollout.completions]
        acc, _ = compute_rewards([module.accuracy_func], prompts, completions, columns)
        correct.append((acc[:, 0] >= 1.0).float())
        per_func, _ = compute_rewards(module.reward_funcs, prompts, completions, columns)
        rewards.append(weighted_reward_sum(per_func, module.reward_weights))
    if not correct:
        return {}
    return {"accuracy": float(torch.cat(correct).mean()), "reward": float(torch.cat(rewards).nanmean())}
