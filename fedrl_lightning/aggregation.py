"""Server-side aggregators: ``aggregate(global_state, updates) -> new global state``.

Each aggregator keeps what it needs between rounds and exposes ``state_dict()``/``load_state_dict()`` so a resumed
run continues exactly. Arithmetic is done in float64 on CPU; results keep the dtype of the input tensors, and server
state (momentum, moments, control variates) is kept in float64 and never updated in place.

Notation (``research/fed_anchors.md`` §6): global adapter x, client i returns y_i, delta Δ_i = y_i - x, normalised
weights p_i, pseudo-gradient Δ̄ = Σ p_i Δ_i. Robust rules (median, trimmed mean, Krum) live in
``fedrl_lightning.aggregation_robust``.
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
_F64 = torch.float64
_LORA_FACTORS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


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
    check_choice("weighting", weighting, ("prompts", "tokens", "uniform"))
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


def _normalised(weights: Sequence[float]) -> list[float]:
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


def _mean64(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    if not states:
        raise ValueError("nothing to average")
    p = _normalised(weights)
    check_same_keys(states)
    out = {}
    for name, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=_F64)
        for state, w in zip(states, p):
            acc += state[name].detach().to("cpu", _F64) * w
        out[name] = acc
    return out


def weighted_average(states: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Sum_i w_i * state_i / sum_i w_i, tensor by tensor, accumulated in float64."""
    return {k: v.to(states[0][k].dtype) for k, v in _mean64(states, weights).items()}


# ---------------------------------------------------------------------------------------------------------- LoRA


def lora_pairs(state: Mapping[str, Tensor]) -> dict[str, tuple[str, str]]:
    """Pair the LoRA factors of each module: ``{module_prefix: (a_key, b_key)}``.

    ``...q_proj.lora_A.default.weight`` pairs with ``...q_proj.lora_B.default.weight`` under the prefix
    ``...q_proj`` (``lora_embedding_A``/``lora_embedding_B`` likewise). Keys that are not LoRA factors are left out.

    Raises:
        ValueError: an A without its B (or the reverse), or two adapters on one module.
    """
    pairs: dict[str, tuple[str, str]] = {}
    b_keys = set()
    for key in state:
        parts = key.split(".")
        for a_tok, b_tok in _LORA_FACTORS:
            if b_tok in parts:
                b_keys.add(key)
            if a_tok not in parts:
                continue
            i = parts.index(a_tok)
            prefix, b_key = ".".join(parts[:i]), ".".join([*parts[:i], b_tok, *parts[i + 1 :]])
            if b_key not in state:
                raise ValueError(f"LoRA factor {key!r} has no matching {b_key!r}")
            if prefix in pairs:
                raise ValueError(f"module {prefix!r} has two LoRA pairs ({pairs[prefix][0]!r}, {key!r})")
            pairs[prefix] = (key, b_key)
    unpaired = b_keys - {b for _, b in pairs.values()}
    if unpaired:
        raise ValueError(f"LoRA factors without their A: {sorted(unpaired)}")
    return pairs


def _product_mean64(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float], reference: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    check_same_keys(states)
    pairs = lora_pairs(states[0])
    paired = {k for ab in pairs.values() for k in ab}
    out = _mean64([{k: v for k, v in s.items() if k not in paired} for s in states], weights)
    p = _normalised(weights)
    for prefix, (a_key, b_key) in pairs.items():
        a0, b0 = states[0][a_key], states[0][b_key]
        if a0.ndim != 2 or b0.ndim != 2 or a0.shape[0] != b0.shape[1]:
            raise ValueError(f"product mode needs 2-D factors B (out, r) @ A (r, in) at {prefix!r}")
        rank = a0.shape[0]
        prod = sum(w * (s[b_key].to(_F64) @ s[a_key].to(_F64)) for s, w in zip(states, p))
        u, sv, vh = torch.linalg.svd(prod, full_matrices=False)
        k = min(rank, sv.numel())
        root = sv[:k].sqrt()
        b = torch.zeros(b0.shape, dtype=_F64)
        a = torch.zeros(a0.shape, dtype=_F64)
        b[:, :k], a[:k] = u[:, :k] * root, root[:, None] * vh[:k]
        # [CHOICE] A component with a (numerically) zero singular value would be zero in both factors and then get
        # no gradient ever again (e.g. a round where no client moved B). Keep B's column at zero and give A's row
        # the singular vector at the clients' RMS row norm of A, so the product is unchanged and B can still learn.
        tol = max(prod.shape) * torch.finfo(_F64).eps * (float(sv[0]) if sv.numel() else 0.0)
        dead = [j for j in range(k) if float(sv[j]) <= tol]
        if dead:
            row_norm = math.sqrt(sum(w * float(s[a_key].to(_F64).pow(2).sum()) / rank for s, w in zip(states, p)))
            a[dead] = vh[dead] * row_norm
        # [CHOICE] SVD signs are arbitrary; flip each component to agree with the current global adapter so that the
        # factor-space delta (used by server optimizers) does not jump between rounds. The product is unchanged.
        if reference is not None and a_key in reference and b_key in reference:
            ref_a, ref_b = reference[a_key].to(_F64), reference[b_key].to(_F64)
            if ref_a.shape == a.shape and ref_b.shape == b.shape:
                sign = torch.where((a * ref_a).sum(1) + (b * ref_b).sum(0) < 0, -1.0, 1.0).to(_F64)
                a, b = a * sign[:, None], b * sign
        out[a_key], out[b_key] = a, b
    return {k: out[k] for k in states[0]}


def product_average(
    states: Sequence[dict[str, Tensor]], weights: Sequence[float], reference: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Average LoRA adapters in weight space: ΔW = Σ p_i B_i A_i per module, re-factorised to the adapter rank r.

    With ΔW = U S Vᵀ (truncated SVD), B = U_r √S_r and A = √S_r V_rᵀ, so B A is the best rank-r approximation of the
    mean product (exact when that mean has rank <= r). Keys that are not LoRA factors are averaged plainly.

    Args:
        states: client adapters.
        weights: their aggregation weights (normalised here).
        reference: the current global adapter; each SVD component's sign is chosen to agree with it.
    """
    return {k: v.to(states[0][k].dtype) for k, v in _product_mean64(states, weights, reference).items()}


def average_states(
    states: Sequence[dict[str, Tensor]],
    weights: Sequence[float],
    lora_mode: LoraMode = "separate",
    reference: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``weighted_average`` (``separate``: A and B averaged independently) or ``product_average`` (``product``)."""
    return {k: v.to(states[0][k].dtype) for k, v in _average64(states, weights, lora_mode, reference).items()}


def _average64(states, weights, lora_mode: LoraMode, reference=None) -> dict[str, Tensor]:
    check_choice("lora_mode", lora_mode, ("separate", "product"))
    if lora_mode == "product":
        return _product_mean64(states, weights, reference)
    return _mean64(states, weights)


# ------------------------------------------------------------------------------------------------- FedAvg family


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
            on the update by a callback (``ClientUpdate.weight``, on every update of the round) takes precedence.
        lora_mode: ``separate`` averages LoRA A and B independently (FlowerTune/OpenFedLLM behaviour);
            ``product`` averages the products B_i A_i per module and re-factorises the mean to rank r by SVD
            (see ``product_average``).
    """

    def __init__(self, weighting: Weighting = "prompts", lora_mode: LoraMode = "separate") -> None:
        check_choice("weighting", weighting, ("prompts", "tokens", "uniform"))
        check_choice("lora_mode", lora_mode, ("separate", "product"))
        self.weighting = weighting
        self.lora_mode = lora_mode

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        return client_weights(updates, self.weighting)

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        if not updates:
            return global_state
        return average_states([u.state for u in updates], self.weights(updates), self.lora_mode, global_state)


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

    The server side is FedAvg. The client loop adds ``aggregator.proximal_term(trainable_params, global_state)`` to
    each local loss, where ``global_state`` is the adapter it received this round.

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


class TaskAwareFedAvg(FedAvg):
    """FedMOA's server side (``research/algorithms.md`` §4): task- and accuracy-aware averaging. [RECONSTRUCTION]

    Only the abstract of FedMOA is readable ("task- and accuracy-aware aggregation that favours high-quality
    updates"); the rule below is reconstructed and each choice is a named option. Clients are grouped by
    ``ClientUpdate.extra["task"]`` (a string; missing = one group ``"default"``). Within a task, clients are weighted
    by their accuracy ``extra["accuracy"]`` (the round's primary-objective accuracy) and normalised to 1; then each
    task gets weight 1/|tasks|, so a task with many clients does not dominate. If a callback set
    ``ClientUpdate.weight`` on every update, those weights are used instead.

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
            return _normalised(base)
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
            return _normalised([math.exp((a - top) / self.temperature) for a in acc])
        raw = [n * a**self.gamma for n, a in zip(base, acc)]
        return _normalised(raw if sum(raw) > 0 else base)


# ------------------------------------------------------------------------------------------ server optimizers


def _load_tensors(tensors: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", _F64).clone() for k, v in (tensors or {}).items()}


def _check_state_keys(what: str, state: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> None:
    if state and set(state) != set(delta):
        raise ValueError(f"the {what} has keys {sorted(set(state) ^ set(delta))[:5]} that the global adapter lacks")


class ServerOptimizer(Aggregator):
    """Base of the server optimizers: x_{t+1} = step(x_t, Δ̄), Δ̄ = the weighted mean of the client deltas.

    Subclasses implement ``step(params, delta)`` (float64 tensors, returns the new params) and keep their state in
    ``state_dict``. In ``product`` LoRA mode, Δ̄ = (product average re-factorised, signs aligned to x_t) - x_t: a
    factor-space delta, so momentum and moments act on A and B. [CHOICE]

    Args:
        weighting: as in ``FedAvg``; callback weights take precedence.
        lora_mode: as in ``FedAvg``.
    """

    def __init__(self, weighting: Weighting = "prompts", lora_mode: LoraMode = "separate") -> None:
        check_choice("weighting", weighting, ("prompts", "tokens", "uniform"))
        check_choice("lora_mode", lora_mode, ("separate", "product"))
        self.weighting = weighting
        self.lora_mode = lora_mode

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        return client_weights(updates, self.weighting)

    def pseudo_gradient(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        """Δ̄ = Σ p_i (y_i - x) in float64."""
        states = [u.state for u in updates]
        check_same_keys([global_state, *states], "global adapter and client states (index 0 = global)")
        mean = _average64(states, self.weights(updates), self.lora_mode, global_state)
        return {k: mean[k] - global_state[k].detach().to("cpu", _F64) for k in global_state}

    def step(self, params: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        if not updates:
            return global_state
        delta = self.pseudo_gradient(global_state, updates)
        new = self.step({k: v.detach().to("cpu", _F64) for k, v in global_state.items()}, delta)
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
        _check_state_keys("momentum buffer", self.buffer, delta)
        buf = {k: self.momentum * self.buffer[k] + d if self.buffer else d for k, d in delta.items()}
        self.buffer = buf
        return {k: params[k] + self.server_lr * buf[k] for k in params}

    def state_dict(self) -> dict:
        return {"momentum_buffer": dict(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = _load_tensors(state.get("momentum_buffer"))


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
        _check_state_keys("first moment", self.m, delta)
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
        self.m, self.v = _load_tensors(state.get("m")), _load_tensors(state.get("v"))


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


# ---------------------------------------------------------------------------------------------------- SCAFFOLD


def scaffold_correction(
    grad: Mapping[str, Tensor], c_global: Mapping[str, Tensor], c_client: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """SCAFFOLD's corrected gradient g + c - c_i, tensor by tensor (a key missing from c or c_i counts as 0).

    [CHOICE] With an Adam local optimizer the correction is added to the gradient *before* the Adam step (so Adam's
    moments see the corrected gradient), not subtracted from the weights after the step as OpenFedLLM does.
    """
    out = {}
    for name, g in grad.items():
        corrected = g
        if name in c_global:
            corrected = corrected + c_global[name].to(g.device, g.dtype)
        if name in c_client:
            corrected = corrected - c_client[name].to(g.device, g.dtype)
        out[name] = corrected
    return out


def scaffold_new_client_c(
    c_client: Mapping[str, Tensor],
    c_global: Mapping[str, Tensor],
    x_global: Mapping[str, Tensor],
    y_local: Mapping[str, Tensor],
    num_steps: int,
    lr: float,
) -> dict[str, Tensor]:
    """Option II of Karimireddy et al.: c_i⁺ = c_i - c + (x - y_i) / (K η_l), per tensor of ``x_global``.

    A key missing from c or c_i counts as 0 (an empty dict is the initial c_i = 0). The client sends
    c_i⁺ - c_i as ``ClientUpdate.extra["scaffold_delta_c"]``. With Adam (or a schedule) locally, (x - y_i)/(K η_l)
    is the mean *update* direction, not the mean gradient; pass the mean learning rate of the K steps as ``lr``.
    The result is at least float32.
    """
    if num_steps <= 0 or not lr > 0:
        raise ValueError(f"num_steps and lr must be > 0, got {num_steps} and {lr}")
    out = {}
    for name, x in x_global.items():
        new = (x.to(_F64) - y_local[name].to(x.device, _F64)) / (num_steps * lr)
        if name in c_client:
            new = new + c_client[name].to(x.device, _F64)
        if name in c_global:
            new = new - c_global[name].to(x.device, _F64)
        out[name] = new.to(torch.promote_types(x.dtype, torch.float32))
    return out


class Scaffold(ServerOptimizer):
    """SCAFFOLD (Karimireddy et al. 2020), server side: x ← x + η_g Δ̄; c ← c + (|S|/N) mean_i(Δc_i).

    Each client sends Δc_i = c_i⁺ - c_i in ``ClientUpdate.extra["scaffold_delta_c"]`` (a dict with every key of the
    global adapter); the client helpers are ``scaffold_correction`` and ``scaffold_new_client_c``. Clients read the
    server control variate with ``control_variate(global_state)`` (zeros before the first round). LoRA factors are
    averaged separately (no product mode: c lives in factor space).

    Args:
        server_lr: global step size η_g (Karimireddy et al.: 1).
        num_clients: total number of clients N; None = the number that reported this round (|S|), i.e.
            c ← c + mean(Δc_i), which is exact under full participation.
        weighting: weights of Δ̄ (Karimireddy et al. use the plain mean: ``uniform``). c always uses the plain mean.
    """

    def __init__(
        self, server_lr: float = 1.0, num_clients: int | None = None, weighting: Weighting = "uniform"
    ) -> None:
        super().__init__(weighting, "separate")
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        if num_clients is not None and num_clients < 1:
            raise ValueError(f"num_clients must be >= 1 or None, got {num_clients}")
        self.server_lr, self.num_clients = server_lr, num_clients
        self.c: dict[str, Tensor] = {}

    def control_variate(self, global_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The server control variate c, in the global adapter's dtypes (zeros before the first aggregation)."""
        return {k: self.c[k].to(v.dtype) if k in self.c else torch.zeros_like(v) for k, v in global_state.items()}

    def step(self, params: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: params[k] + self.server_lr * delta[k] for k in params}

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        if not updates:
            return global_state
        n_total = self.num_clients if self.num_clients is not None else len(updates)
        if len(updates) > n_total:
            raise ValueError(f"{len(updates)} clients reported but num_clients is {n_total}")
        deltas = []
        for u in updates:
            dc = u.extra.get("scaffold_delta_c")
            if dc is None or set(dc) != set(global_state):
                raise ValueError(f"client {u.client_id} sent no extra['scaffold_delta_c'] with the adapter's keys")
            deltas.append(dc)
        _check_state_keys("control variate", self.c, global_state)
        new = super().aggregate(global_state, updates)
        self.c = {
            k: self.c.get(k, torch.zeros(v.shape, dtype=_F64)) + sum(dc[k].to("cpu", _F64) for dc in deltas) / n_total
            for k, v in global_state.items()
        }
        return new

    def state_dict(self) -> dict:
        return {"c": dict(self.c)}

    def load_state_dict(self, state: dict) -> None:
        self.c = _load_tensors(state.get("c"))
