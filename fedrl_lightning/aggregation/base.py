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
    return [sample_weight(u, weighting) for u in updates]


def sample_weight(update: ClientUpdate, weighting: Weighting) -> float:
    """One update's ``sample_weights``: its prompts, its tokens, or 1."""
    if weighting == "prompts":
        return float(update.num_samples)
    if weighting == "tokens":
        return float(update.num_tokens)
    return 1.0


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


def check_weight(weight: float) -> float:
    """``weight`` as a float; raises a ValueError unless it is finite and >= 0."""
    weight = float(weight)
    if weight < 0 or not math.isfinite(weight):
        raise ValueError(f"aggregation weights must be finite and >= 0, got {weight}")
    return weight


class WeightedSum:
    """Sum_i w_i * state_i tensor by tensor in float64 on CPU, and Sum_i w_i, folded one state at a time.

    ``mean`` divides once at the end, so the weights need not be known before the states arrive: the buffered mean
    (``mean64``) and the streaming aggregators fold the same way, in arrival order, and agree bit for bit.

    Args:
        what: how ``add``'s key check names the states (``<what> 0 and <i> have different keys``).
        like: the keys every state must have (index 0 of the check); None = those of the first state added.
    """

    def __init__(self, what: str = "client states", like: Mapping[str, Tensor] | None = None) -> None:
        self.what, self.like = what, like
        self.sums: dict[str, Tensor] | None = None
        self.dtypes: dict[str, torch.dtype] = {}  # those of the first state added
        self.total = 0.0
        self.weights: list[float] = []

    def add(self, state: Mapping[str, Tensor], weight: float) -> None:
        """Fold ``weight * state`` in (``state`` is not kept)."""
        weight = check_weight(weight)
        ref = self.like if self.like is not None else state if self.sums is None else self.sums
        if set(state) != set(ref):
            index = len(self.weights) + (self.like is not None)
            diff = sorted(set(ref).symmetric_difference(state))
            more = " ..." if len(diff) > 5 else ""
            raise ValueError(f"{self.what} 0 and {index} have different keys: {diff[:5]}{more}")
        if self.sums is None:
            self.sums = {name: torch.zeros(t.shape, dtype=F64) for name, t in state.items()}
            self.dtypes = {name: t.dtype for name, t in state.items()}
        for name, acc in self.sums.items():
            acc += state[name].detach().to("cpu", F64) * weight
        self.total += weight
        self.weights.append(weight)

    def mean(self) -> dict[str, Tensor]:
        """Sum_i w_i state_i / Sum_i w_i in float64 (divided in place: call it once)."""
        if self.sums is None:
            raise ValueError("nothing to average")
        if self.total <= 0:
            raise ValueError(f"aggregation weights must sum to > 0, got {self.weights}")
        return {name: acc.div_(self.total) for name, acc in self.sums.items()}


def mean64(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """``weighted_average`` on CPU, left in float64 (the dtype of the inputs is not restored)."""
    if not states:
        raise ValueError("nothing to average")
    weights = [float(w) for w in weights]
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"aggregation weights must be finite and >= 0, got {weights}")
    check_same_keys(states)
    acc = WeightedSum()
    for state, w in zip(states, weights):
        acc.add(state, w)
    return acc.mean()


def weighted_average(states: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Sum_i w_i * state_i / sum_i w_i, tensor by tensor, accumulated in float64 in the states' order and divided
    once at the end (``WeightedSum``)."""
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


class Accumulator:
    """One round's aggregation in progress (``Aggregator.begin``): ``fold`` each update as it arrives, then ``finish``.

    Nothing of the aggregator changes before ``finish``, so a round that fails (too few clients, a retry) just drops
    its accumulator. ``fold`` does not keep the update's tensors unless the accumulator buffers (``Buffer``).
    """

    def fold(self, update: ClientUpdate) -> None:
        """Take in one update (in the round's client order)."""
        raise NotImplementedError

    def finish(self) -> dict[str, Tensor]:
        """The new global state (the old one when nothing was folded); call it once."""
        raise NotImplementedError


class Buffer(Accumulator):
    """Keeps every update and calls ``aggregator.aggregate`` at the end: the accumulator of the rules that need all
    the updates at once (robust statistics, weights from every client's scalars, product LoRA averaging)."""

    def __init__(self, aggregator: Aggregator, global_state: dict[str, Tensor]) -> None:
        self.aggregator, self.global_state = aggregator, global_state
        self.updates: list[ClientUpdate] = []

    def fold(self, update: ClientUpdate) -> None:
        self.updates.append(update)

    def finish(self) -> dict[str, Tensor]:
        return self.aggregator.aggregate(self.global_state, self.updates)


class Aggregator:
    """Base of the server aggregators: turn the clients' updates into the next global adapter.

    ``aggregate(global_state, updates)`` takes the whole round at once; ``begin(global_state)`` returns an
    ``Accumulator`` that takes it one update at a time, as the server receives them. An aggregator that can fold an
    update into one accumulator and forget it (the weighted-mean family) is ``streaming``: its aggregation memory does
    not grow with the number of clients, and its ``begin`` gives bit for bit what ``aggregate`` gives. The others
    buffer every update until the round ends.

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

    _streams = False  # set True in the body of a class whose ``accumulator`` folds exactly as its ``aggregate``

    @property
    def streaming(self) -> bool:
        """Whether ``begin`` folds the updates as they arrive (else it buffers them): true when the class that
        defines the ``aggregate`` in use declares that its ``accumulator`` folds the same way (a subclass with an
        ``aggregate`` of its own buffers until it says otherwise)."""
        owner = next(c for c in type(self).__mro__ if "aggregate" in vars(c))
        return bool(vars(owner).get("_streams", False))

    def begin(self, global_state: dict[str, Tensor]) -> Accumulator:
        """This round's accumulator: ``accumulator`` when ``streaming``, else a ``Buffer`` around ``aggregate``."""
        return self.accumulator(global_state) if self.streaming else Buffer(self, global_state)

    def accumulator(self, global_state: dict[str, Tensor]) -> Accumulator:
        """A streaming aggregator's fold-as-you-go accumulator for a round starting at ``global_state``."""
        raise NotImplementedError(f"{type(self).__name__} does not stream")

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

    @property
    def streaming(self) -> bool:
        """As ``Aggregator.streaming``, and only with ``separate`` LoRA averaging (``product`` needs every client's
        factors at once) and the base class's ``weights`` (weights that depend on every client need them all)."""
        plain_weights = type(self).weights is WeightedAggregator.weights
        return self.lora_mode == "separate" and plain_weights and Aggregator.streaming.fget(self)

    def finish_mean(self, global_state: dict[str, Tensor], mean: dict[str, Tensor], acc: WeightedMean) -> dict:
        """The new global state from the round's weighted mean (float64) of the adapters; ``acc`` is the accumulator
        (its ``own.dtypes`` are the first update's dtypes)."""
        raise NotImplementedError

    def accumulator(self, global_state: dict[str, Tensor]) -> Accumulator:
        return WeightedMean(self, global_state)


class WeightedMean(Accumulator):
    """A ``WeightedAggregator``'s streaming accumulator: the weighted sum and the total weight of the adapters,
    folded as they arrive, divided once in ``finish`` and handed to ``aggregator.finish_mean``.

    The weights are ``client_weights``': callback weights (``ClientUpdate.weight``) when every update has one, else
    ``weighting``. Whether every update will have one is known only at the end, so while they all have one both
    sums are kept (two accumulators, still independent of the number of clients).

    Args:
        aggregator: whose ``weighting`` and ``finish_mean``.
        global_state: the adapter the round started from.
        what: how the key check names the states.
        like: the keys every state must have; None = the first update's.
    """

    def __init__(
        self,
        aggregator: WeightedAggregator,
        global_state: dict[str, Tensor],
        what: str = "client states",
        like: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.aggregator, self.global_state = aggregator, global_state
        self.what, self.like = what, like
        self.own = WeightedSum(what, like)
        self.callback: WeightedSum | None = None
        self.all_weighted = True  # every update so far has a callback weight
        self.bad_weight: float | None = None  # a callback weight that is not finite and >= 0
        self.count = 0

    def fold(self, update: ClientUpdate) -> None:
        self.all_weighted = self.all_weighted and update.weight is not None
        if not self.all_weighted:
            self.callback = None  # not every update has one: the aggregator's own weights
        elif self.count == 0:
            self.callback = WeightedSum(self.what, self.like)
        if self.callback is not None:
            w = float(update.weight)
            if w >= 0 and math.isfinite(w):
                self.callback.add(update.state, w)
            elif self.bad_weight is None:  # raised at the end, if every update turns out to have a weight
                self.bad_weight = w
        self.own.add(update.state, sample_weight(update, self.aggregator.weighting))
        self.count += 1

    def mean64(self) -> dict[str, Tensor]:
        """The weighted mean so far, float64 (divides in place: once)."""
        if self.all_weighted and self.bad_weight is not None:
            check_weight(self.bad_weight)
        return (self.callback if self.callback is not None else self.own).mean()

    def finish(self) -> dict[str, Tensor]:
        if not self.count:
            return self.global_state
        return self.aggregator.finish_mean(self.global_state, self.mean64(), self)
