"""What every aggregator shares: the client update, the base classes, client weights and the float64 weighted mean.

Arithmetic is done in float64 on CPU; results keep the dtype of the input tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

Weighting = Literal["prompts", "tokens", "uniform"]
LoraMode = Literal["separate", "product"]
WEIGHTINGS = ("prompts", "tokens", "uniform")
"""The values of ``Weighting``."""
LORA_MODES = ("separate", "product")
"""The values of ``LoraMode``."""
F64 = torch.float64
"""The dtype of the aggregators' arithmetic and of the server state."""


@dataclass
class ClientUpdate:
    """What one client returns after its local round.

    Attributes:
        client_id: who sent it.
        state: the client's adapter after local training (as received through the channel); not a delta.
        num_samples: prompts trained on this round.
        num_tokens: completion tokens trained on this round.
        metrics: scalar training metrics of the round.
        weight: aggregation weight set by a callback (e.g. adaptive aggregation); None = the aggregator decides.
        extra: non-scalar side information for the server: ``scaffold_delta_c`` (dict of tensors, see ``Scaffold``),
            ``task`` (str) and ``accuracy`` (float, see ``TaskAwareFedAvg``).
    """

    client_id: int
    state: dict[str, Tensor]
    num_samples: int
    num_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    weight: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------- helpers


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise a ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def sample_weights(updates: Sequence[ClientUpdate], weighting: Weighting) -> list[float]:
    """The aggregator's own weights: prompts trained, tokens trained, or 1 per client (callback weights ignored)."""
    check_choice("weighting", weighting, WEIGHTINGS)
    if weighting == "prompts":
        return [float(u.num_samples) for u in updates]
    if weighting == "tokens":
        return [float(u.num_tokens) for u in updates]
    return [1.0] * len(updates)


def client_weights(updates: Sequence[ClientUpdate], weighting: Weighting) -> list[float]:
    """Callback weights (``ClientUpdate.weight``) when every update has one, else ``sample_weights``."""
    if updates and all(u.weight is not None for u in updates):
        return [float(u.weight) for u in updates]
    return sample_weights(updates, weighting)


def normalised(weights: Sequence[float]) -> list[float]:
    """The weights divided by their sum; raises a ValueError unless they are finite, >= 0 and sum to > 0."""
    weights = [float(w) for w in weights]
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"aggregation weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to > 0, got {weights}")
    return [w / total for w in weights]


def check_same_keys(states: Sequence[Mapping[str, Tensor]], what: str = "client states") -> None:
    """Raise a ValueError naming the differing keys unless every state has the keys of the first."""
    ref = set(states[0])
    for i, state in enumerate(states[1:], 1):
        if set(state) != ref:
            diff = sorted(ref.symmetric_difference(state))
            raise ValueError(f"{what} 0 and {i} have different keys: {diff[:5]}{' ...' if len(diff) > 5 else ''}")


def mean64(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """``weighted_average`` on CPU, left in float64 (the dtype of the inputs is not restored)."""
    if not states:
        raise ValueError("nothing to average")
    p = normalised(weights)
    check_same_keys(states)
    out = {}
    for name, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=F64)
        for state, w in zip(states, p):
            acc += state[name].detach().to("cpu", F64) * w
        out[name] = acc
    return out


def weighted_average(states: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Sum_i w_i * state_i / sum_i w_i, tensor by tensor, accumulated in float64."""
    return {k: v.to(states[0][k].dtype) for k, v in mean64(states, weights).items()}


# -------------------------------------------------------------------------------------------------- base classes


class LocalObjective:
    """What an aggregator asks of each client during its round (FedProx's pull, SCAFFOLD's correction).

    The client builds one per round (``Aggregator.local_objective``, from what the server sent:
    ``Aggregator.downlink``), calls ``on_gradients`` once per optimizer step (after the backward passes, before
    clipping), and after the round puts ``finish``'s result into ``ClientUpdate.extra`` (tensor dicts and scalars
    travel up with the adapter).
    """

    def on_gradients(self, params: Mapping[str, Tensor], lr: float) -> None:
        """Adjust ``param.grad`` in place; ``params`` are the trainable parameters by ``trainable_state`` name and
        ``lr`` the learning rate of the step about to be taken."""

    def finish(self, params: Mapping[str, Tensor], metrics: Mapping[str, float] | None = None) -> dict[str, Any]:
        """After the last step: what the client sends up besides its adapter (and its private state updates).

        ``metrics`` are the round's training metrics (e.g. the mean ``reward`` FGRPO's gain is measured on)."""
        return {}


class Aggregator:
    """Base of the server aggregators: turn the clients' updates into the next global adapter.

    Attributes:
        personalized: the clients train and deploy their own adapters (no global adapter is sent: each starts from
            its own, as in local-only training), but each sends its adapter up at the end of its round, and every
            client receives tensors of its own (``client_downlink``); ``aggregate`` returns the global state as it
            was. Federated PPO's ``PeerMixture`` is one.
    """

    personalized: bool = False

    def downlink(self, global_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Server side: tensors every client receives with the global adapter (e.g. SCAFFOLD's c); none here."""
        return {}

    def client_downlink(self, client_id: int, round_idx: int, num_rounds: int) -> dict[str, Tensor]:
        """Server side, for a personalized aggregator: the tensors ``client_id`` receives for round ``round_idx``
        (1-based) of ``num_rounds``; none here."""
        return {}

    def local_objective(
        self,
        global_state: dict[str, Tensor],
        client_extra: dict[str, Any],
        down: Mapping[str, Tensor] | None = None,
    ) -> LocalObjective | None:
        """Client side: the algorithm's part of one client's round; None = plain local training.

        ``client_extra`` is the client's private, persistent algorithm state (``ClientState.extra``), which the
        objective may update in ``finish``; ``down`` is what the server's ``downlink`` sent (None: compute it here,
        as one process holding both sides may).
        """
        return None

    def metrics(self) -> dict[str, float]:
        """Scalars of the last aggregation to log (e.g. DP's epsilon); none here."""
        return {}

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What must survive a restart (server optimizer moments, control variates, ...)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class WeightedAggregator(Aggregator):
    """Base of the aggregators that take a weighted mean of the clients' adapters (FedAvg and the server optimizers).

    Args:
        weighting: weight each client by its ``prompts`` trained this round, ``tokens``, or ``uniform``. A weight set
            on the update by a callback (``ClientUpdate.weight``, on every update of the round) takes precedence.
        lora_mode: ``separate`` averages LoRA A and B independently; ``product`` averages the products B_i A_i per
            module and re-factorises the mean to rank r (see ``product_average``).
    """

    def __init__(self, weighting: Weighting = "prompts", lora_mode: LoraMode = "separate") -> None:
        check_choice("weighting", weighting, WEIGHTINGS)
        check_choice("lora_mode", lora_mode, LORA_MODES)
        self.weighting = weighting
        self.lora_mode = lora_mode

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        """The clients' aggregation weights (not normalised): callback weights, else ``weighting``."""
        return client_weights(updates, self.weighting)
