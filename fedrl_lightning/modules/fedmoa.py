"""FedMOA's client side: per-objective GRPO losses mixed by weights that hypergradient descent adapts.

``research/algorithms.md`` §4. Only the paper's abstract is readable ("online adaptive weighting of the reward
objectives via hypergradient descent, which prioritizes primary reasoning as auxiliary objectives saturate"); the
mechanics are a [RECONSTRUCTION] after Baydin et al. (2018), and every choice is a named option:

* each reward function k is an objective with its own group-relative advantages A^(k) and GRPO loss L_k;
* the client minimises L(θ; λ) = Σ_k λ_k L_k(θ), λ = floor + (1 - K floor) softmax(φ) on the simplex;
* after the gradients of step s are known, φ moves against the hypergradient of the primary loss after the
  previous step, ∂L_0(θ_s)/∂λ_k = -η <∇L_0(θ_s), ∇L_k(θ_{s-1})>, through the softmax Jacobian.

A saturated auxiliary (every completion of a group gets the same reward) has zero advantages, hence a zero gradient
and a zero hypergradient, while the primary's own term keeps raising λ_0: the abstract's behaviour. φ is the
client's private state (swapped per client by the trainer, never aggregated); the per-step objective gradients
restart every round.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor

from fedrl_lightning.losses import group_advantages
from fedrl_lightning.modules.grpo import GRPOBatch, GRPOModule
from fedrl_lightning.rewards import reward_func_name
from fedrl_lightning.rollout import Rollout

Grads = list[Tensor]


def _dot(a: Grads, b: Grads) -> Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))


def objective_hypergradient(primary_now: Grads, previous: list[Grads], lr: float, normalize: bool) -> Tensor:
    """∂L_0(θ_s)/∂λ_k for every objective k, (K,) float64.

    Args:
        primary_now: ∇L_0(θ_s), one tensor per trainable parameter.
        previous: K lists, ∇L_k(θ_{s-1}).
        lr: η, the local learning rate of the step from θ_{s-1} to θ_s.
        normalize: [CHOICE] use the cosine of the two gradients instead of η times their dot product. With LoRA
            learning rates around 1e-5 the exact value is ~1e-6 and the weights would not move within a few dozen
            steps; the cosine keeps the sign (agreement with the primary) on a scale the step size controls.
            A zero gradient (a saturated objective) gives 0 either way.
    """
    out = []
    norm_now = _dot(primary_now, primary_now).sqrt()
    for grads in previous:
        dot = _dot(primary_now, grads)
        if normalize:
            denom = norm_now * _dot(grads, grads).sqrt()
            out.append(-dot / denom if denom > 0 else torch.zeros((), dtype=torch.float64))
        else:
            out.append(-lr * dot)
    return torch.stack(out)


def simplex_weights(logits: Tensor, floor: float) -> Tensor:
    """λ = floor + (1 - K floor) softmax(φ): every objective keeps at least ``floor``."""
    return floor + (1 - logits.numel() * floor) * torch.softmax(logits, dim=0)


def logits_step(logits: Tensor, hypergrad: Tensor, step_size: float, floor: float) -> Tensor:
    """φ - step_size * (∂λ/∂φ)ᵀ h, with ∂λ/∂φ = (1 - K floor)(diag(p) - p pᵀ) and p = softmax(φ)."""
    p = torch.softmax(logits.double(), dim=0)
    jacobian = (1 - logits.numel() * floor) * (torch.diag(p) - torch.outer(p, p))
    return (logits.double() - step_size * jacobian.T @ hypergrad.double()).to(logits.dtype)


def initial_logits(num_objectives: int, primary: int, primary_weight: float, floor: float) -> Tensor:
    """φ whose weights give ``primary_weight`` to the primary and split the rest evenly."""
    k = num_objectives
    rest = (1 - primary_weight) / (k - 1)
    target = torch.full((k,), rest, dtype=torch.float64)
    target[primary] = primary_weight
    p = (target - floor) / (1 - k * floor)
    if (p <= 0).any():
        raise ValueError(f"primary_weight={primary_weight} leaves an objective at or below weight_floor={floor}")
    return p.log().float()


class FedMOAModule(GRPOModule):
    """GRPO with one objective per reward function, weighted on the simplex by hypergradient descent. [RECONSTRUCTION]

    ``reward_funcs[primary]`` is the primary objective (correctness); the others are auxiliaries (format, length,
    ...). ``reward_weights`` no longer weight the loss (λ does); they still define the logged ``reward``. Pair it with
    ``aggregation.TaskAwareFedAvg`` for FedMOA's server side.

    Args:
        primary: index of the primary objective in ``reward_funcs``.
        primary_weight: [CHOICE] its initial weight (the others share the rest evenly).
        weight_floor: [CHOICE] lowest weight of any objective, so an auxiliary never vanishes.
        hypergrad_lr: [CHOICE] step size β_h on the logits φ.
        hypergrad_normalize: [CHOICE] cosine instead of η x dot product (see ``objective_hypergradient``).
        **kwargs: ``GRPOModule``'s arguments.
    """

    def __init__(
        self,
        primary: int = 0,
        primary_weight: float = 0.5,
        weight_floor: float = 0.05,
        hypergrad_lr: float = 0.1,
        hypergrad_normalize: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        k = len(self.reward_funcs)
        if k < 2:
            raise ValueError(f"FedMOA needs at least 2 reward_funcs (a primary and an auxiliary), got {k}")
        if not 0 <= primary < k:
            raise ValueError(f"primary={primary} is not an index into the {k} reward_funcs")
        if not 0 <= weight_floor < 1 / k:
            raise ValueError(f"weight_floor must be in [0, 1/{k}), got {weight_floor}")
        if not 0 < primary_weight < 1:
            raise ValueError(f"primary_weight must be in (0, 1), got {primary_weight}")
        self.primary, self.primary_weight, self.weight_floor = primary, primary_weight, weight_floor
        self.hypergrad_lr, self.hypergrad_normalize = hypergrad_lr, hypergrad_normalize
        self.objective_names = [reward_func_name(fn) for fn in self.reward_funcs]
        self.load_client_state({})

    # -- client-private state ----------------------------------------------------------------------------------

    def objective_weights(self) -> Tensor:
        return simplex_weights(self.logits, self.weight_floor)

    def client_state(self) -> dict[str, Any]:
        return {"fedmoa_logits": self.logits.clone()}

    def load_client_state(self, state: dict[str, Any]) -> None:
        logits = state.get("fedmoa_logits")
        if logits is None:
            logits = initial_logits(len(self.reward_funcs), self.primary, self.primary_weight, self.weight_floor)
        self.logits = logits.clone()
        self._step_grads: list[Grads] | None = None  # ∇L_k of the optimizer step being accumulated
        self._previous: list[Grads] | None = None  # ∇L_k(θ_{s-1})

    # -- loss ----------------------------------------------------------------------------------------------------

    def make_batch(self, rollout: Rollout, rewards_per_func: Tensor) -> GRPOBatch:
        batch = super().make_batch(rollout, rewards_per_func)
        per_objective = [
            group_advantages(rewards_per_func[:, k], self.num_generations, self.scale_rewards)[0]
            for k in range(rewards_per_func.shape[1])
        ]
        batch.objective_advantages = torch.stack(per_objective, dim=1)
        batch.advantages = batch.objective_advantages @ self.objective_weights().to(batch.advantages.dtype)
        return batch

    def backward_step(self, fabric: L.Fabric, batch: GRPOBatch) -> None:
        """One forward, one backward per objective: keeps each ∇L_k and accumulates Σ λ_k ∇L_k into ``.grad``."""
        params = list(self.trainable_parameters().values())
        weights = self.objective_weights().tolist()
        with fabric.autocast():  # the forward under the trainer's precision; the losses are float32 either way
            log_probs, old = self.policy_log_probs(batch)
        num = len(weights)
        if self._step_grads is None:
            self._step_grads = [[torch.zeros_like(p) for p in params] for _ in range(num)]
        total = 0.0
        for k in range(num):
            loss = self.policy_loss(batch, log_probs, old, batch.objective_advantages[:, k], log=k == self.primary)
            grads = torch.autograd.grad(loss, params, retain_graph=k < num - 1, allow_unused=True)
            for p, acc, g in zip(params, self._step_grads[k], grads, strict=True):
                if g is None:
                    continue
                acc.add_(g)
                p.grad = weights[k] * g if p.grad is None else p.grad.add_(g, alpha=weights[k])
            value = float(loss.detach())
            total += weights[k] * value
            self.tracker.update(f"fedmoa/loss/{self.objective_names[k]}", value * batch.num_micro_batches)
        self.tracker.update("loss", total * batch.num_micro_batches)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Move the objective weights by the hypergradient, now that ∇L_0(θ_s) is known."""
        current, self._step_grads = self._step_grads, None
        if current is None:
            return
        if self._previous is not None:
            lr = optimizer.param_groups[0]["lr"]
            h = objective_hypergradient(current[self.primary], self._previous, lr, self.hypergrad_normalize)
            self.logits = logits_step(self.logits, h, self.hypergrad_lr, self.weight_floor)
            for name, value in zip(self.objective_names, h.tolist(), strict=True):
                self.tracker.update(f"fedmoa/hypergrad/{name}", value)
        self._previous = current
        for name, value in zip(self.objective_names, self.objective_weights().tolist(), strict=True):
            self.tracker.update(f"fedmoa/weight/{name}", value)
        if not math.isfinite(float(self.logits.sum())):
            raise FloatingPointError(f"FedMOA objective logits became non-finite: {self.logits.tolist()}")


__all__ = ["FedMOAModule", "initial_logits", "logits_step", "objective_hypergradient", "simplex_weights"]
