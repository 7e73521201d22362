"""Server optimizers: x_{t+1} = step(x_t, Δ̄) with Δ̄ the weighted mean of the client deltas.

FedAvgM (server momentum) and FedOpt's FedAdagrad/FedAdam/FedYogi (Reddi et al. 2021); SCAFFOLD, a server optimizer
with a client side, is in ``scaffold.py``. Server state (momentum, moments, control variates) is kept in float64 and
never updated in place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedrl_lightning.aggregation.base import (
    F64,
    ClientUpdate,
    LoraMode,
    WeightedAggregator,
    Weighting,
    check_same_keys,
)
from fedrl_lightning.aggregation.lora import average64


def load_tensors(tensors: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """Detached float64 CPU copies of saved server-state tensors (None = no tensors)."""
    return {k: v.detach().to("cpu", F64).clone() for k, v in (tensors or {}).items()}


def check_state_keys(what: str, state: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> None:
    """Raise a ValueError naming the keys if a non-empty server ``state`` (``what``) and ``delta`` differ in keys."""
    if state and set(state) != set(delta):
        raise ValueError(f"the {what} has keys {sorted(set(state) ^ set(delta))[:5]} that the global adapter lacks")


class ServerOptimizer(WeightedAggregator):
    """Base of the server optimizers: x_{t+1} = step(x_t, Δ̄), Δ̄ = the weighted mean of the client deltas.

    Subclasses implement ``step(params, delta)`` (float64 tensors, returns the new params) and keep their state in
    ``state_dict``. In ``product`` LoRA mode, Δ̄ = (product average re-factorised, signs aligned to x_t) - x_t: a
    factor-space delta, so momentum and moments act on A and B. [CHOICE]

    Args:
        weighting: as in ``FedAvg``; callback weights take precedence.
        lora_mode: as in ``FedAvg``.
    """

    def pseudo_gradient(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        """Δ̄ = Σ p_i (y_i - x) in float64."""
        states = [u.state for u in updates]
        check_same_keys([global_state, *states], "global adapter and client states (index 0 = global)")
        mean = average64(states, self.weights(updates), self.lora_mode, global_state)
        return {k: mean[k] - global_state[k].detach().to("cpu", F64) for k in global_state}

    def step(self, params: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        if not updates:
            return global_state
        delta = self.pseudo_gradient(global_state, updates)
        new = self.step({k: v.detach().to("cpu", F64) for k, v in global_state.items()}, delta)
        return {k: new[k].to(v.dtype) for k, v in global_state.items()}


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019): v ← β v + Δ̄ (v_0 = 0); x ← x + η_s v.

    Same as Flower's FedAvgM (heavy ball, no Nesterov), not OpenFedLLM's EMA. Flower's default momentum is 0.0;
    0.9 here follows Hsu et al.

    Args:
        server_lr: server learning rate η_s.
        momentum: momentum β in [0, 1).
        weighting: as in ``FedAvg``.
        lora_mode: as in ``FedAvg``.
    """

    def __init__(
        self,
        server_lr: float = 1.0,
        momentum: float = 0.9,
        weighting: Weighting = "prompts",
        lora_mode: LoraMode = "separate",
    ) -> None:
        super().__init__(weighting, lora_mode)
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.server_lr, self.momentum = server_lr, momentum
        self.buffer: dict[str, Tensor] = {}

    def step(self, params: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Tensor]:
        check_state_keys("momentum buffer", self.buffer, delta)
        buf = {k: self.momentum * self.buffer[k] + d if self.buffer else d for k, d in delta.items()}
        self.buffer = buf
        return {k: params[k] + self.server_lr * buf[k] for k in params}

    def state_dict(self) -> dict:
        return {"momentum_buffer": dict(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = load_tensors(state.get("momentum_buffer"))


class FedOpt(ServerOptimizer):
    """Adaptive federated optimization (Reddi et al. 2021), shared by FedAdagrad, FedAdam and FedYogi.

    m ← β₁ m + (1-β₁) Δ̄; v ← second_moment(v, Δ̄²) (the square of the pseudo-gradient, not of m as in
    OpenFedLLM); x ← x + η m / (√v + τ). m starts at 0; v starts at ``initial_v`` (None = τ², Reddi et al.'s
    v_{-1} ≥ τ²; Flower starts at 0.0, which ``initial_v: 0.0`` reproduces).

    Scale for LoRA: when |Δ̄| ≫ τ every coordinate moves by about ±η per round, whatever the adapter's scale; when
    |Δ̄| ≪ τ the step is about (η/τ)·m. LoRA deltas per round are tiny (local lr × steps, ~1e-5), so Flower's η=0.1
    is far too large for adapters: choose η on the adapter's scale, e.g. 1e-3..1e-2 with τ=1e-3 (η/τ ≈ 1 makes the
    first rounds FedAvg-like).

    Args:
        eta: server learning rate η.
        beta_1: first-moment decay β₁ in [0, 1).
        beta_2: second-moment decay β₂ in [0, 1) (used by ``second_moment``).
        tau: adaptivity τ > 0.
        initial_v: initial second moment; None = τ².
        bias_correction: scale η by √(1-β₂^t) / (1-β₁^t), t = aggregation steps taken.
        weighting: as in ``FedAvg``.
        lora_mode: as in ``FedAvg``.
    """

    def __init__(
        self,
        eta: float,
        beta_1: float,
        beta_2: float,
        tau: float,
        initial_v: float | None = None,
        bias_correction: bool = False,
        weighting: Weighting = "prompts",
        lora_mode: LoraMode = "separate",
    ) -> None:
        super().__init__(weighting, lora_mode)
        if not eta > 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        for name, beta in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0 <= beta < 1:
                raise ValueError(f"{name} must be in [0, 1), got {beta}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if initial_v is not None and not initial_v >= 0:
            raise ValueError(f"initial_v must be >= 0, got {initial_v}")
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.initial_v = tau**2 if initial_v is None else initial_v
        self.bias_correction = bias_correction
        self.t = 0
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}

    def second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, params: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Tensor]:
        check_state_keys("first moment", self.m, delta)
        b1, t = self.beta_1, self.t + 1
        m, v = {}, {}
        for k, d in delta.items():
            m[k] = b1 * self.m[k] + (1 - b1) * d if self.m else (1 - b1) * d
            v[k] = self.second_moment(self.v[k] if self.v else torch.full_like(d, self.initial_v), d * d)
        lr = self.eta
        if self.bias_correction:
            lr *= math.sqrt(1 - self.beta_2**t) / (1 - b1**t)
        self.m, self.v, self.t = m, v, t
        return {k: params[k] + lr * m[k] / (v[k].sqrt() + self.tau) for k in params}

    def state_dict(self) -> dict:
        return {"step": self.t, "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state.get("step", 0))
        self.m, self.v = load_tensors(state.get("m")), load_tensors(state.get("v"))


class FedAdagrad(FedOpt):
    """FedAdagrad (Reddi et al. 2021): v ← v + Δ̄²; x ← x + η m / (√v + τ).

    Defaults are Flower 1.4x's (η=0.1, τ=1e-3, β₁=0 so m = Δ̄). See ``FedOpt`` for the scale of η on LoRA
    adapters (use ~1e-3..1e-2).

    Args:
        eta: server learning rate η (Flower: 0.1, far too large for LoRA; use ~1e-3..1e-2 with τ=1e-3, see ``FedOpt``).
        beta_1: first-moment decay β₁ (Flower's FedAdagrad uses 0.0; Reddi et al. allow β₁ > 0).
        tau: adaptivity τ (Flower 1.4x: 1e-3; older Flower: 1e-9).
        initial_v: initial second moment; None = τ² (Reddi et al.), 0.0 = Flower.
        weighting: as in ``FedAvg``.
        lora_mode: as in ``FedAvg``.
    """

    def __init__(
        self,
        eta: float = 1e-1,
        beta_1: float = 0.0,
        tau: float = 1e-3,
        initial_v: float | None = None,
        weighting: Weighting = "prompts",
        lora_mode: LoraMode = "separate",
    ) -> None:
        super().__init__(eta, beta_1, 0.0, tau, initial_v, False, weighting, lora_mode)

    def second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return v + d2


class FedAdam(FedOpt):
    """FedAdam (Reddi et al. 2021): v ← β₂ v + (1-β₂) Δ̄²; x ← x + η_t m / (√v + τ).

    Defaults are Flower 1.4x's. See ``FedOpt`` for the scale of η on LoRA adapters (use ~1e-3..1e-2).

    Args:
        eta: server learning rate η (Flower: 0.1, far too large for LoRA; use ~1e-3..1e-2 with τ=1e-3, see ``FedOpt``).
        beta_1: first-moment decay β₁.
        beta_2: second-moment decay β₂.
        tau: adaptivity τ (Flower 1.4x: 1e-3; older Flower: 1e-9).
        initial_v: initial second moment; None = τ² (Reddi et al.), 0.0 = Flower.
        bias_correction: η_t = η √(1-β₂^t) / (1-β₁^t), t = aggregation steps taken (1 on the first). Reddi et al.
            have none (False); Flower applies it with t = server_round + 1, i.e. one round ahead of this.
        weighting: as in ``FedAvg``.
        lora_mode: as in ``FedAvg``.
    """

    def __init__(
        self,
        eta: float = 1e-1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        initial_v: float | None = None,
        bias_correction: bool = False,
        weighting: Weighting = "prompts",
        lora_mode: LoraMode = "separate",
    ) -> None:
        super().__init__(eta, beta_1, beta_2, tau, initial_v, bias_correction, weighting, lora_mode)

    def second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return self.beta_2 * v + (1 - self.beta_2) * d2


class FedYogi(FedOpt):
    """FedYogi (Reddi et al. 2021): v ← v - (1-β₂) Δ̄² sign(v - Δ̄²); x ← x + η m / (√v + τ).

    Defaults are Flower 1.4x's. See ``FedOpt`` for the scale of η on LoRA adapters (use ~1e-3..1e-2).

    Args:
        eta: server learning rate η (Flower 0.01).
        beta_1: first-moment decay β₁.
        beta_2: second-moment decay β₂.
        tau: adaptivity τ (Flower 1.4x: 1e-3; older Flower: 1e-9).
        initial_v: initial second moment; None = τ² (Reddi et al.), 0.0 = Flower.
        weighting: as in ``FedAvg``.
        lora_mode: as in ``FedAvg``.
    """

    def __init__(
        self,
        eta: float = 1e-2,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        initial_v: float | None = None,
        weighting: Weighting = "prompts",
        lora_mode: LoraMode = "separate",
    ) -> None:
        super().__init__(eta, beta_1, beta_2, tau, initial_v, False, weighting, lora_mode)

    def second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return v - (1 - self.beta_2) * d2 * torch.sign(v - d2)
