"""Server optimizers: x_{t+1} = step(x_t, Δ̄) with Δ̄ the weighted mean of the client deltas.

FedAvgM (server momentum) and FedOpt's FedAdagrad/FedAdam/FedYogi (Reddi et al. 2021); SCAFFOLD, a server optimizer
with a client side, is in ``scaffold.py``. Server state (momentum, moments, control variates) is kept in float64 and
never updated in place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from fedrl_lightning.aggregation.base import (
    F64,
    ClientUpdate,
    LoraMode,
    WeightedAggregator,
    WeightedMean,
    Weighting,
    check_same_keys,
)
from fedrl_lightning.aggregation.lora import average64

Convention = Literal["flower", "reddi"]
CONVENTIONS: tuple[str, ...] = ("flower", "reddi")


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
    ``state_dict``. With ``separate`` averaging they stream (``begin``): Δ̄ is the mean of the updates folded as they
    arrive minus x, and the step is taken in ``finish``. In ``product`` LoRA mode, Δ̄ = (product average
    re-factorised, signs aligned to x_t) - x_t: a factor-space delta, so momentum and moments act on A and B. [CHOICE]

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

    _streams = True

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        if not updates:
            return global_state
        return self.apply(global_state, self.pseudo_gradient(global_state, updates))

    def apply(self, global_state: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Tensor]:
        """x_{t+1} = step(x_t, Δ̄) in float64, returned in the global adapter's dtypes."""
        new = self.step({k: v.detach().to("cpu", F64) for k, v in global_state.items()}, delta)
        return {k: new[k].to(v.dtype) for k, v in global_state.items()}

    def accumulator(self, global_state: dict[str, Tensor]) -> WeightedMean:
        return WeightedMean(self, global_state, "global adapter and client states (index 0 = global)", global_state)

    def finish_mean(self, global_state: dict[str, Tensor], mean: dict[str, Tensor], acc: WeightedMean) -> dict:
        """Streaming: Δ̄ = the folded mean - x, then the step (as ``aggregate``)."""
        return self.apply(global_state, {k: mean[k] - global_state[k].detach().to("cpu", F64) for k in global_state})


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
    OpenFedLLM); x ← x + η_t m / (√v + τ), m starting at 0. Where the paper leaves a choice, ``convention`` picks:

    * ``flower`` (default): Flower's strategies (1.32 to 1.42) exactly (``flwr.serverapp.strategy`` and the older
      ``flwr.server.strategy`` agree): v starts at 0; FedAdam's η_t = η √(1-β₂^(t+1)) / (1-β₁^(t+1)) in its t-th
      aggregation (Flower's exponent is server_round + 1, and its rounds count from 1); FedAdagrad and FedYogi η_t = η.
    * ``reddi``: Reddi et al.'s Algorithm 2: v starts at τ² (their v_{-1} ≥ τ²), η_t = η; FedAdam's
      ``bias_correction: true`` gives Kingma & Ba's η √(1-β₂^t) / (1-β₁^t).

    Scale for LoRA: when |Δ̄| ≫ τ every coordinate moves by about ±η per round, whatever the adapter's scale; when
    |Δ̄| ≪ τ the step is about (η/τ)·m. LoRA deltas per round are tiny (local lr × steps, ~1e-5), so Flower's η=0.1
    is far too large for adapters: choose η on the adapter's scale, e.g. 1e-3..1e-2 with τ=1e-3 (η/τ ≈ 1 makes the
    first rounds FedAvg-like). With ``flower``'s v_0 = 0 the first step is about ±η·(1-β₁)/√(1-β₂) per coordinate
    wherever |Δ̄| ≫ τ.

    Args:
        eta: server learning rate η.
        beta_1: first-moment decay β₁ in [0, 1).
        beta_2: second-moment decay β₂ in [0, 1) (used by ``second_moment``).
        tau: adaptivity τ > 0.
        convention: ``flower`` or ``reddi`` (see above): the defaults of ``initial_v`` and ``bias_correction`` and
            the bias correction's step.
        initial_v: initial second moment; None = the convention's (flower 0, reddi τ²).
        bias_correction: scale η as the convention does; None = the convention's (FedAdam under flower only).
        weighting: as in ``FedAvg``.
        lora_mode: as in ``FedAvg``.
    """

    # Whether ``convention="flower"`` corrects the bias by default: Flower does it in FedAdam only.
    flower_bias_correction: bool = False

    def __init__(
        self,
        eta: float,
        beta_1: float,
        beta_2: float,
        tau: float,
        convention: Convention = "flower",
        initial_v: float | None = None,
        bias_correction: bool | None = None,
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
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        if initial_v is not None and not initial_v >= 0:
            raise ValueError(f"initial_v must be >= 0, got {initial_v}")
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.convention = convention
        flower = convention == "flower"
        self.initial_v = (0.0 if flower else tau**2) if initial_v is None else initial_v
        self.bias_correction = (flower and self.flower_bias_correction) if bias_correction is None else bias_correction
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
            e = t + 1 if self.convention == "flower" else t  # Flower: server_round + 1, one round ahead of Adam's
            lr *= math.sqrt(1 - self.beta_2**e) / (1 - b1**e)
        self.m, self.v, self.t = m, v, t
        return {k: params[k] + lr * m[k] / (v[k].sqrt() + self.tau) for k in params}

    def state_dict(self) -> dict:
        return {"step": self.t, "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state.get("step", 0))
        self.m, self.v = load_tensors(state.get("m")), load_tensors(state.get("v"))


class FedAdagrad(FedOpt):
    """FedAdagrad (Reddi et al. 2021): v ← v + Δ̄²; x ← x + η m / (√v + τ).

    Defaults are Flower's (η=0.1, τ=1e-3, β₁=0 so m = Δ̄, v_0 = 0). See ``FedOpt`` for the conventions and the
    scale of η on LoRA adapters (use ~1e-3..1e-2).

    Args:
        eta: server learning rate η (Flower: 0.1, far too large for LoRA; use ~1e-3..1e-2 with τ=1e-3, see ``FedOpt``).
        beta_1: first-moment decay β₁ (Flower's FedAdagrad uses 0.0; Reddi et al. allow β₁ > 0).
        tau: adaptivity τ (Flower's ``serverapp`` strategies: 1e-3; its legacy FedAdam/FedAdagrad: 1e-9).
        convention: ``flower`` (v_0 = 0) or ``reddi`` (v_0 = τ²), see ``FedOpt``.
        initial_v: initial second moment; None = the convention's.
        weighting: as in ``FedAvg``.
        lora_mode: as in ``FedAvg``.
    """

    def __init__(
        self,
        eta: float = 1e-1,
        beta_1: float = 0.0,
        tau: float = 1e-3,
        convention: Convention = "flower",
        initial_v: float | None = None,
        weighting: Weighting = "prompts",
        lora_mode: LoraMode = "separate",
    ) -> None:
        super().__init__(eta, beta_1, 0.0, tau, convention, initial_v, False, weighting, lora_mode)

    def second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return v + d2


class FedAdam(FedOpt):
    """FedAdam (Reddi et al. 2021): v ← β₂ v + (1-β₂) Δ̄²; x ← x + η_t m / (√v + τ).

    Defaults are Flower's (η=0.1, β₁=0.9, β₂=0.99, τ=1e-3, v_0 = 0, η_t bias-corrected with Flower's step).
    See ``FedOpt`` for the conventions and the scale of η on LoRA adapters (use ~1e-3..1e-2).

    Args:
        eta: server learning rate η (Flower: 0.1, far too large for LoRA; use ~1e-3..1e-2 with τ=1e-3, see ``FedOpt``).
        beta_1: first-moment decay β₁.
        beta_2: second-moment decay β₂.
        tau: adaptivity τ (Flower's ``serverapp`` strategies: 1e-3; its legacy FedAdam/FedAdagrad: 1e-9).
        convention: ``flower`` or ``reddi``, see ``FedOpt``.
        initial_v: initial second moment; None = the convention's (flower 0, reddi τ²).
        bias_correction: η_t = η √(1-β₂^e) / (1-β₁^e) in the t-th aggregation, e = t + 1 under flower (Flower's
            server_round + 1), e = t under reddi (Kingma & Ba). None = the convention's: on for flower, off for reddi
            (Reddi et al. have none).
        weighting: as in ``FedAvg``.
        lora_mode: as in ``FedAvg``.
    """

    flower_bias_correction = True

    def __init__(
        self,
        eta: float = 1e-1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        convention: Convention = "flower",
        initial_v: float | None = None,
        bias_correction: bool | None = None,
        weighting: Weighting = "prompts",
        lora_mode: LoraMode = "separate",
    ) -> None:
        super().__init__(eta, beta_1, beta_2, tau, convention, initial_v, bias_correction, weighting, lora_mode)

    def second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return self.beta_2 * v + (1 - self.beta_2) * d2


class FedYogi(FedOpt):
    """FedYogi (Reddi et al. 2021): v ← v - (1-β₂) Δ̄² sign(v - Δ̄²); x ← x + η m / (√v + τ).

    Defaults are Flower's (η=0.01, β₁=0.9, β₂=0.99, τ=1e-3, v_0 = 0). See ``FedOpt`` for the conventions and
    the scale of η on LoRA adapters (use ~1e-3..1e-2).

    Args:
        eta: server learning rate η (Flower 0.01).
        beta_1: first-moment decay β₁.
        beta_2: second-moment decay β₂.
        tau: adaptivity τ (Flower's ``serverapp`` strategies: 1e-3; its legacy FedAdam/FedAdagrad: 1e-9).
        convention: ``flower`` (v_0 = 0) or ``reddi`` (v_0 = τ²), see ``FedOpt``.
        initial_v: initial second moment; None = the convention's.
        weighting: as in ``FedAvg``.
        lora_mode: as in ``FedAvg``.
    """

    def __init__(
        self,
        eta: float = 1e-2,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        convention: Convention = "flower",
        initial_v: float | None = None,
        weighting: Weighting = "prompts",
        lora_mode: LoraMode = "separate",
    ) -> None:
        super().__init__(eta, beta_1, beta_2, tau, convention, initial_v, False, weighting, lora_mode)

    def second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return v - (1 - self.beta_2) * d2 * torch.sign(v - d2)
