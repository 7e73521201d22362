"""Shared fixtures: a tiny random policy (2 layers, hidden 64) with the embedded tokenizer, and tiny data."""

from __future__ import annotations

import pytest
import torch

from fedrl_lightning.data import FederatedData
from fedrl_lightning.modules import GRPOModule


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """A reward that varies within a group even for a random model: completion length in characters mod 7."""
    return [float(len(c[0]["content"]) % 7) for c in completions]


def make_module(module_class: type[GRPOModule] = GRPOModule, **overrides) -> GRPOModule:
    kwargs = dict(
        model="tiny-random",
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-2,
        num_generations=4,
        prompts_per_step=2,
        micro_batch_size=4,
        max_completion_length=6,
        reward_funcs=[length_reward],
        dtype="float32",  # also on a CUDA machine, where "auto" would be bf16
        seed=0,
    )
    kwargs.update(overrides)
    return module_class(**kwargs)


def make_data(**overrides) -> FederatedData:
    kwargs = dict(
        tasks=["basic_arithmetic", "leg_counting"],
        num_clients=2,
        partition="by_task",
        train_size=8,
        eval_size=2,
        seed=0,
    )
    kwargs.update(overrides)
    return FederatedData(**kwargs)


@pytest.fixture
def tiny_module() -> GRPOModule:
    torch.manual_seed(0)
    return make_module()


@pytest.fixture
def tiny_data() -> FederatedData:
    return make_data()
