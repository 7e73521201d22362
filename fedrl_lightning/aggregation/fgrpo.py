"""FGRPO: aggregation weights from each client's relative performance gain against its own history.

FGRPO (arXiv 2606.03094) weights clients by how much they improve relative to a personalised historical baseline,
so clients with different reward scales or task difficulty are compared fairly. The paper's method section was not
readable; the rule below is the reconstruction of ``research/algorithms.md`` section 3, and every reconstructed
choice is a named option ([RECONSTRUCTION] / [CHOICE] in the docstrings):

    g_i = (P_i - b_i) / (|b_i| + eps)          gain="ratio"   (or P_i - b_i with gain="diff")
    alpha_i = (1 - floor) * softmax(z(g) / temperature)_i + floor / |S|
    b_i <- beta * b_i + (1 - beta) * P_i       baseline="ema" (or the mean of a window, or the best so far)

``P_i`` is the client's mean training reward of the round (``signal``). It is an aggregator around another one
(FedAvg, SCAFFOLD, FedAdam, ...): its client side (a ``LocalObjective``, the seam SCAFFOLD uses) measures the gain
against the baseline kept in the client's private state and uploads only that scalar; its server side turns the
round's gains into ``ClientUpdate.weight`` and lets the inner aggregator average with them. With
``baseline_on_client: false`` the server keeps every baseline instead (and checkpoints it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor

from fedrl_lightning.aggregation.base import Aggregator, ClientUpdate, LocalObjective
from fedrl_lightning.aggregation.fedavg import FedAvg

HISTORY_KEY = "fgrpo_history"
"""Where a client's baseline lives in its private state."""
GAIN_KEY = "fgrpo_gain"
"""The scalar a client uploads in ``ClientUpdate.extra``."""


class _GainObjective(LocalObjective):
    """The client's half: the inner aggregator's objective, plus the gain against the client's own baseline."""

    def __init__(self, owner: RelativeGainWeighting, inner: LocalObjective | None, client_extra: dict) -> None:
        self.owner, self.inner, self.client_extra = owner, inner, client_extra

    def on_gradients(self, params: Mapping[str, Tensor], lr: float) -> None:
        if self.inner is not None:
            self.inner.on_gradients(params, lr)

    def finish(self, params: Mapping[str, Tensor], metrics: Mapping[str, float] | None = None) -> dict[str, Any]:
        sent = self.inner.finish(params, metrics) if self.inner is not None else {}
        performance = self.owner.performance(metrics or {})
        history = self.client_extra.get(HISTORY_KEY, {})
        gain, self.client_extra[HISTORY_KEY] = self.owner.client_gain(history, performance)
        return {**sent, GAIN_KEY: gain}


class RelativeGainWeighting(Aggregator):
    """FGRPO: weights each client's update by its relative performance gain, then aggregates with ``aggregator``.

    Args:
        aggregator: the aggregator that averages with these weights (default ``FedAvg``); its client side (e.g.
            SCAFFOLD's correction) runs as usual.
        signal: the client metric that measures performance ([CHOICE] the round's mean training ``reward``).
        gain: ``ratio`` (scale-free, (P - b) / (|b| + eps)) or ``diff`` (P - b). [RECONSTRUCTION]
        baseline: ``ema`` (exponential moving average with ``beta``), ``window`` (mean of the last ``window``
            rounds) or ``best`` (best value so far). [RECONSTRUCTION]
        beta: EMA coefficient of the baseline.
        window: rounds in the ``window`` baseline.
        temperature: softmax temperature over the gains.
        zscore: standardise the gains across the round's clients before the softmax ([CHOICE], so the temperature
            does not depend on the reward scale).
        floor: share of the weight spread uniformly so no client is starved (lambda).
        eps: added to ``|b|`` in the ratio gain.
        weight_by_samples: multiply by each client's prompts and renormalise. [CHOICE]
        baseline_on_client: keep the baseline in the client's private state and upload only the gain; false keeps
            every client's baseline on the server.
    """

    def __init__(
        self,
        aggregator: Aggregator | None = None,
        signal: str = "reward",
        gain: Literal["ratio", "diff"] = "ratio",
        baseline: Literal["ema", "window", "best"] = "ema",
        beta: float = 0.9,
        window: int = 3,
        temperature: float = 1.0,
        zscore: bool = True,
        floor: float = 0.1,
        eps: float = 1e-6,
        weight_by_samples: bool = False,
        baseline_on_client: bool = True,
    ) -> None:
        if not 0 <= floor <= 1 or temperature <= 0 or not 0 <= beta < 1 or window < 1:
            raise ValueError("need 0 <= floor <= 1, temperature > 0, 0 <= beta < 1, window >= 1")
        if gain not in ("ratio", "diff") or baseline not in ("ema", "window", "best"):
            raise ValueError(f"gain must be ratio or diff and baseline ema, window or best; got {gain!r}, {baseline!r}")
        self.aggregator = aggregator if aggregator is not None else FedAvg()
        self.signal, self.gain, self.baseline = signal, gain, baseline
        self.beta, self.window, self.temperature, self.zscore = beta, window, temperature, zscore
        self.floor, self.eps, self.weight_by_samples = floor, eps, weight_by_samples
        self.baseline_on_client = baseline_on_client
        self.server_history: dict[int, dict[str, Any]] = {}

    # -- the client side: baseline and gain --------------------------------------------------------------------

    def performance(self, metrics: Mapping[str, float], client_id: int | None = None) -> float:
        """The round's ``signal`` metric.

        Raises:
            ValueError: the metrics lack it.
        """
        value = float(metrics.get(self.signal, math.nan))
        if math.isnan(value):
            who = f"client {client_id}" if client_id is not None else "the client"
            raise ValueError(f"{who} reported no {self.signal!r} metric for FGRPO weighting")
        return value

    def client_gain(self, history: dict[str, Any], performance: float) -> tuple[float, dict[str, Any]]:
        """Gain of ``performance`` against the baseline in ``history``; returns (gain, updated history).

        The first round has no baseline yet: the gain is 0 and the baseline starts at the first value.
        """
        if not history:
            return 0.0, {"ema": performance, "values": [performance], "best": performance}
        if self.baseline == "ema":
            base = history["ema"]
        elif self.baseline == "window":
            recent = history["values"][-self.window :]
            base = sum(recent) / len(recent)
        else:
            base = history["best"]
        g = performance - base
        if self.gain == "ratio":
            g /= abs(base) + self.eps
        updated = {
            "ema": self.beta * history["ema"] + (1 - self.beta) * performance,
            "values": (history["values"] + [performance])[-self.window :],
            "best": max(history["best"], performance),
        }
        return g, updated

    def downlink(self, global_state: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.aggregator.downlink(global_state)

    def local_objective(
        self,
        global_state: dict[str, Tensor],
        client_extra: dict[str, Any],
        down: Mapping[str, Tensor] | None = None,
    ) -> LocalObjective | None:
        inner = self.aggregator.local_objective(global_state, client_extra, down)
        return _GainObjective(self, inner, client_extra) if self.baseline_on_client else inner

    # -- the server side: weights ------------------------------------------------------------------------------

    def weights(self, gains: list[float], samples: list[float]) -> list[float]:
        """alpha_i = (1 - floor) softmax(z(g) / T)_i + floor / n, optionally times samples (renormalised)."""
        n = len(gains)
        g = list(gains)
        if self.zscore and n > 1:
            mean = sum(g) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in g) / n)
            g = [(x - mean) / std if std > 0 else 0.0 for x in g]
        top = max(x / self.temperature for x in g)
        exp = [math.exp(x / self.temperature - top) for x in g]
        alpha = [(1 - self.floor) * e / sum(exp) + self.floor / n for e in exp]
        if self.weight_by_samples:
            alpha = [a * s for a, s in zip(alpha, samples)]
            total = sum(alpha)
            alpha = [a / total for a in alpha]
        return alpha

    def gains(self, updates: Sequence[ClientUpdate]) -> list[float]:
        """Each update's gain: uploaded by the client, or measured against the server-kept baseline.

        Raises:
            ValueError: a client sent no gain, or no ``signal`` metric (server-kept baselines).
        """
        gains = []
        for u in updates:
            if self.baseline_on_client:
                if GAIN_KEY not in u.extra:
                    raise ValueError(f"client {u.client_id} sent no {GAIN_KEY!r} for FGRPO weighting")
                gains.append(float(u.extra[GAIN_KEY]))
            else:
                performance = self.performance(u.metrics, u.client_id)
                g, self.server_history[u.client_id] = self.client_gain(
                    self.server_history.get(u.client_id, {}), performance
                )
                gains.append(g)
        return gains

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        gains = self.gains(updates)
        alphas = self.weights(gains, [float(u.num_samples) for u in updates])
        for update, g, a in zip(updates, gains, alphas):
            update.weight = a
            update.metrics.update({"fgrpo/gain": g, "fgrpo/weight": a})
        return self.aggregator.aggregate(global_state, updates)

    def metrics(self) -> dict[str, float]:
        return self.aggregator.metrics()

    def state_dict(self) -> dict[str, Any]:
        return {"aggregator": self.aggregator.state_dict(), "server_history": self.server_history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.aggregator.load_state_dict(state["aggregator"])
        self.server_history = dict(state["server_history"])
