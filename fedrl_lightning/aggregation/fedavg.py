"""The FedAvg family: FedAvg (McMahan et al.), FedProx (Li et al. 2020) and FedMOA's task-aware FedAvg."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from fedrl_lightning.aggregation.base import (
    ClientUpdate,
    LocalObjective,
    LoraMode,
    WeightedAggregator,
    WeightedMean,
    Weighting,
    check_choice,
    normalised,
    sample_weights,
)
from fedrl_lightning.aggregation.lora import average_states


class FedAvg(WeightedAggregator):
    """Federated averaging (McMahan et al.): the weighted mean of the clients' adapters.

    Args:
        weighting: weight each client by its ``prompts`` trained this round, ``tokens``, or ``uniform``. A weight set
            on the update by a callback (``ClientUpdate.weight``, on every update of the round) takes precedence.
        lora_mode: ``separate`` averages LoRA A and B independently (FlowerTune/OpenFedLLM behaviour);
            ``product`` averages the products B_i A_i per module and re-factorises the mean to rank r by SVD
            (see ``product_average``).

    Streams (``begin``) with ``separate`` averaging: each update is folded into one weighted sum as it arrives.
    """

    _streams = True

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        if not updates:
            return global_state
        return average_states([u.state for u in updates], self.weights(updates), self.lora_mode, global_state)

    def finish_mean(self, global_state: dict[str, Tensor], mean: dict[str, Tensor], acc: WeightedMean) -> dict:
        return {k: v.to(acc.own.dtypes[k]) for k, v in mean.items()}


def proximal_term(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], mu: float) -> Tensor:
    """FedProx's proximal term (μ/2) Σ ||w - w_anchor||² over the tensors of ``params`` (differentiable in params).

    Computed in float32 on the parameters' device; move ``anchor`` there once per round to avoid a copy per step.
    """
    if mu < 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    missing = [k for k in params if k not in anchor]
    if missing:
        raise ValueError(f"the anchor has no tensor for {missing[:5]}")
    total = None
    for name, w in params.items():
        sq = (w.float() - anchor[name].detach().to(w.device, torch.float32)).pow(2).sum()
        total = sq if total is None else total + sq
    return torch.zeros(()) if total is None else 0.5 * mu * total


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg on the server; the client adds (μ/2)||w - x_t||² to its loss.

    The server side is FedAvg; ``local_objective`` gives each client a ``ProximalObjective`` that adds the
    proximal term's gradient to every local step (``proximal_term`` computes the term itself).

    Args:
        mu: proximal coefficient μ (OpenFedLLM's default 0.01; Li et al. try 0.001, 0.01, 0.1, 1; Flower has no
            default). 0 makes FedProx FedAvg.
        weighting: as in ``FedAvg``.
        lora_mode: as in ``FedAvg``.
    """

    def __init__(self, mu: float = 0.01, weighting: Weighting = "prompts", lora_mode: LoraMode = "separate") -> None:
        if not mu >= 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        super().__init__(weighting, lora_mode)
        self.mu = mu

    def proximal_term(self, params: Mapping[str, Tensor], global_state: Mapping[str, Tensor]) -> Tensor:
        """(μ/2) Σ ||w - w_global||² (see the module-level ``proximal_term``)."""
        return proximal_term(params, global_state, self.mu)

    def local_objective(
        self,
        global_state: dict[str, Tensor],
        client_extra: dict[str, Any],
        down: Mapping[str, Tensor] | None = None,
    ) -> LocalObjective | None:
        return ProximalObjective(global_state, self.mu) if self.mu > 0 else None


class ProximalObjective(LocalObjective):
    """FedProx on the client: adds μ (w - x_global), the gradient of (μ/2)||w - x_global||², to every gradient.

    Adding it to the gradients once per optimizer step equals adding the proximal term to the step's loss (whatever
    the micro-batching) without a second graph.
    """

    def __init__(self, anchor: Mapping[str, Tensor], mu: float) -> None:
        self.anchor, self.mu = anchor, mu
        self._on_device: dict[str, Tensor] = {}

    @torch.no_grad()
    def on_gradients(self, params: Mapping[str, Tensor], lr: float) -> None:
        for name, p in params.items():
            if name not in self._on_device:
                self._on_device[name] = self.anchor[name].to(p.device, p.dtype)
            pull = self.mu * (p - self._on_device[name])
            p.grad = pull if p.grad is None else p.grad.add_(pull)


class TaskAwareFedAvg(FedAvg):
    """FedMOA's server side (``research/algorithms.md`` §4): task- and accuracy-aware averaging. [RECONSTRUCTION]

    Only the abstract of FedMOA is readable ("task- and accuracy-aware aggregation that favours high-quality
    updates"); the rule below is reconstructed and each choice is a named option. Clients are grouped by
    ``ClientUpdate.extra["task"]`` (a string; missing = one group ``"default"``). Within a task, clients are weighted
    by their accuracy ``extra["accuracy"]`` (the round's primary-objective accuracy) and normalised to 1; then each
    task gets weight 1/|tasks|, so a task with many clients does not dominate. If a callback set
    ``ClientUpdate.weight`` on every update, those weights are used instead. The weights depend on every client of
    the round, so it buffers the updates (``streaming`` is false).

    Args:
        accuracy_weighting: weight clients within a task by accuracy; False = by ``weighting`` (samples) only.
        temperature: softmax temperature of the ``softmax`` rule (lower = favour the most accurate client more).
        accuracy_rule: [RECONSTRUCTION] ``softmax``: w_i ∝ exp(a_i / temperature) within the task;
            ``power``: w_i ∝ n_i a_i^gamma (algorithms.md §4(b)), falling back to n_i for a task whose accuracies
            are all 0.
        gamma: exponent of the ``power`` rule.
        task_balance: [RECONSTRUCTION] ``equal``: every task present this round gets the same total weight;
            ``samples``: a task's total weight is proportional to its clients' ``weighting`` sum.
        weighting: the sample weights n_i (``prompts``, ``tokens`` or ``uniform``).
        lora_mode: as in ``FedAvg``.
    """

    def __init__(
        self,
        accuracy_weighting: bool = True,
        temperature: float = 1.0,
        accuracy_rule: Literal["softmax", "power"] = "softmax",
        gamma: float = 1.0,
        task_balance: Literal["equal", "samples"] = "equal",
        weighting: Weighting = "prompts",
        lora_mode: LoraMode = "separate",
    ) -> None:
        super().__init__(weighting, lora_mode)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        check_choice("accuracy_rule", accuracy_rule, ("softmax", "power"))
        check_choice("task_balance", task_balance, ("equal", "samples"))
        self.accuracy_weighting, self.temperature, self.gamma = accuracy_weighting, temperature, gamma
        self.accuracy_rule, self.task_balance = accuracy_rule, task_balance

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        if all(u.weight is not None for u in updates):
            return [float(u.weight) for u in updates]
        base = sample_weights(updates, self.weighting)
        groups: dict[str, list[int]] = {}
        for i, u in enumerate(updates):
            groups.setdefault(str(u.extra.get("task", "default")), []).append(i)
        total_base = sum(base)
        out = [0.0] * len(updates)
        for task, idx in groups.items():
            within = self._within_task([updates[i] for i in idx], [base[i] for i in idx], task)
            if self.task_balance == "equal":
                share = 1.0 / len(groups)
            else:
                share = sum(base[i] for i in idx) / total_base if total_base > 0 else 0.0
            for i, w in zip(idx, within):
                out[i] = share * w
        return out

    def _within_task(self, updates: list[ClientUpdate], base: list[float], task: str) -> list[float]:
        if not self.accuracy_weighting:
            return normalised(base)
        acc = []
        for u in updates:
            if "accuracy" not in u.extra:
                raise ValueError(f"client {u.client_id} (task {task!r}) sent no extra['accuracy']")
            a = float(u.extra["accuracy"])
            if not math.isfinite(a) or (self.accuracy_rule == "power" and a < 0):
                raise ValueError(f"client {u.client_id} sent accuracy {a}; need a finite value (>= 0 for power)")
            acc.append(a)
        if self.accuracy_rule == "softmax":
            top = max(acc)
            return normalised([math.exp((a - top) / self.temperature) for a in acc])
        raw = [n * a**self.gamma for n, a in zip(base, acc)]
        return normalised(raw if sum(raw) > 0 else base)
