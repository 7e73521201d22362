"""Server-side aggregators: ``aggregate(global_state, updates) -> new global state``.

Each aggregator keeps what it needs between rounds and exposes ``state_dict()``/``load_state_dict()`` so a resumed
run continues exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor


@dataclass
class ClientUpdate:
    """What one client returns after its local round.

    Attributes:
        client_id: who sent it.
        state: the client's adapter after local training (as received through the channel).
        num_samples: prompts trained on this round.
        num_tokens: completion tokens trained on this round.
        metrics: scalar training metrics of the round.
        weight: aggregation weight set by a callback (e.g. adaptive aggregation); None = the aggregator decides.
    """

    client_id: int
    state: dict[str, Tensor]
    num_samples: int
    num_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    weight: float | None = None


def weighted_average(states: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Sum_i w_i * state_i / sum_i w_i, tensor by tensor, accumulated in float64."""
    if not states:
        raise ValueError("nothing to average")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to > 0, got {list(weights)}")
    out = {}
    for name, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for state, w in zip(states, weights):
            acc += state[name].to(torch.float64) * (w / total)
        out[name] = acc.to(ref.dtype)
    return out


class Aggregator:
    """Base of the server aggregators: turn the clients' updates into the next global adapter."""

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What must survive a restart (server optimizer moments, control variates, ...)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FedAvg(Aggregator):
    """Federated averaging (McMahan et al.): the weighted mean of the clients' adapters.

    Args:
        weighting: weight each client by its ``prompts`` trained this round, ``tokens``, or ``uniform``. A weight set
            on the update by a callback (``ClientUpdate.weight``) takes precedence.
    """

    def __init__(self, weighting: Literal["prompts", "tokens", "uniform"] = "prompts") -> None:
        self.weighting = weighting

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        if all(u.weight is not None for u in updates):
            return [float(u.weight) for u in updates]
        if self.weighting == "prompts":
            return [float(u.num_samples) for u in updates]
        if self.weighting == "tokens":
            return [float(u.num_tokens) for u in updates]
        return [1.0] * len(updates)

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        if not updates:
            return global_state
        return weighted_average([u.state for u in updates], self.weights(updates))
