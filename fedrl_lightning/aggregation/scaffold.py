"""SCAFFOLD (Karimireddy et al. 2020): control variates correct client drift; server and client sides."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fedrl_lightning.aggregation.base import F64, ClientUpdate, LocalObjective, WeightedMean, Weighting
from fedrl_lightning.aggregation.server_opt import ServerOptimizer, check_state_keys, load_tensors


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
        new = (x.to(F64) - y_local[name].to(x.device, F64)) / (num_steps * lr)
        if name in c_client:
            new = new + c_client[name].to(x.device, F64)
        if name in c_global:
            new = new - c_global[name].to(x.device, F64)
        out[name] = new.to(torch.promote_types(x.dtype, torch.float32))
    return out


class Scaffold(ServerOptimizer):
    """SCAFFOLD (Karimireddy et al. 2020), server side: x ← x + η_g Δ̄; c ← c + (|S|/N) mean_i(Δc_i).

    Each client sends Δc_i = c_i⁺ - c_i in ``ClientUpdate.extra["scaffold_delta_c"]`` (a dict with every key of the
    global adapter); the client helpers are ``scaffold_correction`` and ``scaffold_new_client_c``. Clients read the
    server control variate with ``control_variate(global_state)`` (zeros before the first round). LoRA factors are
    averaged separately (no product mode: c lives in factor space).

    Streams (``begin``): the adapters' mean and the sum of the Δc_i are folded as the updates arrive.

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

    def downlink(self, global_state: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.control_variate(global_state)

    def local_objective(
        self,
        global_state: dict[str, Tensor],
        client_extra: dict[str, Any],
        down: Mapping[str, Tensor] | None = None,
    ) -> LocalObjective:
        c_global = dict(down) if down is not None else self.control_variate(global_state)
        return ScaffoldObjective(c_global, client_extra, global_state)

    def control_variate(self, global_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The server control variate c, in the global adapter's dtypes (zeros before the first aggregation)."""
        return {k: self.c[k].to(v.dtype) if k in self.c else torch.zeros_like(v) for k, v in global_state.items()}

    def step(self, params: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: params[k] + self.server_lr * delta[k] for k in params}

    _streams = True

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        if not updates:
            return global_state
        n_total = self.total_clients(len(updates))
        deltas = [self.delta_c(u, global_state) for u in updates]
        check_state_keys("control variate", self.c, global_state)
        new = super().aggregate(global_state, updates)
        self.c = {
            k: self.c.get(k, torch.zeros(v.shape, dtype=F64)) + sum(dc[k].to("cpu", F64) for dc in deltas) / n_total
            for k, v in global_state.items()
        }
        return new

    def total_clients(self, reported: int) -> int:
        """N of the control variate's update: ``num_clients``, else the clients that reported."""
        n_total = self.num_clients if self.num_clients is not None else reported
        if reported > n_total:
            raise ValueError(f"{reported} clients reported but num_clients is {n_total}")
        return n_total

    @staticmethod
    def delta_c(update: ClientUpdate, global_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The Δc_i ``update`` sent; raises a ValueError unless it has the adapter's keys."""
        dc = update.extra.get("scaffold_delta_c")
        if dc is None or set(dc) != set(global_state):
            raise ValueError(f"client {update.client_id} sent no extra['scaffold_delta_c'] with the adapter's keys")
        return dc

    def accumulator(self, global_state: dict[str, Tensor]) -> WeightedMean:
        return _ScaffoldMean(self, global_state)

    def finish_mean(self, global_state: dict[str, Tensor], mean: dict[str, Tensor], acc: WeightedMean) -> dict:
        n_total = self.total_clients(acc.count)
        check_state_keys("control variate", self.c, global_state)
        new = super().finish_mean(global_state, mean, acc)
        zero = {k: torch.zeros(v.shape, dtype=F64) for k, v in global_state.items() if k not in self.c}
        self.c = {k: self.c.get(k, zero.get(k)) + acc.dc_sum[k] / n_total for k in global_state}
        return new

    def state_dict(self) -> dict:
        return {"c": dict(self.c)}

    def load_state_dict(self, state: dict) -> None:
        self.c = load_tensors(state.get("c"))


class _ScaffoldMean(WeightedMean):
    """SCAFFOLD's streaming accumulator: the adapters' weighted mean and the plain sum of the Δc_i, folded as they
    arrive (the sum starts at zero and adds in client order, as ``aggregate``'s ``sum`` does)."""

    def __init__(self, aggregator: Scaffold, global_state: dict[str, Tensor]) -> None:
        super().__init__(aggregator, global_state, "global adapter and client states (index 0 = global)", global_state)
        self.dc_sum = {k: torch.zeros(v.shape, dtype=F64) for k, v in global_state.items()}

    def fold(self, update: ClientUpdate) -> None:
        dc = Scaffold.delta_c(update, self.global_state)
        super().fold(update)
        for k, total in self.dc_sum.items():
            total += dc[k].to("cpu", F64)


class ScaffoldObjective(LocalObjective):
    """SCAFFOLD on the client: corrects every gradient by c - c_i, then sends Δc_i = c_i⁺ - c_i up.

    c comes down with the adapter (``down``); c_i is the client's private state (``client_extra["scaffold_c"]``,
    0 before its first round), replaced by c_i⁺ (option II, ``scaffold_new_client_c``) at the end of a round,
    with K = the optimizer steps taken and η_l their mean learning rate.
    """

    def __init__(self, c_global: dict[str, Tensor], client_extra: dict[str, Any], x_global: Mapping[str, Tensor]):
        self.down = c_global
        self.client_extra, self.x_global = client_extra, x_global
        self.c_client: dict[str, Tensor] = dict(client_extra.get("scaffold_c", {}))
        self.steps, self.lr_sum = 0, 0.0
        self._correction: dict[str, Tensor] | None = None

    @torch.no_grad()
    def on_gradients(self, params: Mapping[str, Tensor], lr: float) -> None:
        if self._correction is None:  # c - c_i, once per round, on the parameters' device
            zeros = {k: torch.zeros_like(p) for k, p in params.items()}
            self._correction = scaffold_correction(zeros, self.down, self.c_client)
        for name, p in params.items():
            fix = self._correction[name].to(p.dtype)
            p.grad = fix.clone() if p.grad is None else p.grad.add_(fix)
        self.steps += 1
        self.lr_sum += lr

    def finish(self, params: Mapping[str, Tensor], metrics: Mapping[str, float] | None = None) -> dict[str, Any]:
        if self.steps == 0:
            raise RuntimeError("SCAFFOLD: the client took no optimizer step this round")
        y = {k: p.detach().cpu() for k, p in params.items()}
        new_c = scaffold_new_client_c(self.c_client, self.down, self.x_global, y, self.steps, self.lr_sum / self.steps)
        zero = torch.zeros((), dtype=F64)
        delta = {k: v - self.c_client.get(k, zero).to(v.dtype) for k, v in new_c.items()}
        self.client_extra["scaffold_c"] = new_c
        return {"scaffold_delta_c": delta}
