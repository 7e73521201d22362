"""FGRPO: aggregation weights from each client's relative performance gain against its own history.

FGRPO (arXiv 2606.03094) weights clients by how much they improve relative to a personalised historical baseline,
so clients with different reward scales or task difficulty are compared fairly. The paper's method section was not
readable; the rule below is the reconstruction of ``research/algorithms.md`` section 3, and every reconstructed
choice is a named option ([RECONSTRUCTION] / [CHOICE] in the docstrings):

    g_i = (P_i - b_i) / (|b_i| + eps)          gain="ratio"   (or P_i - b_i with gain="diff")
    alpha_i = (1 - floor) * softmax(z(g) / temperature)_i + floor / |S|
    b_i <- beta * b_i + (1 - beta) * P_i       baseline="ema" (or the mean of a window, or the best so far)

``P_i`` is the client's mean training reward of the round (``signal``). With ``baseline_on_client`` (default) the
baseline is kept in the client's private state and only the scalar gain is uploaded (counted by the channel).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from fedrl_lightning.callbacks import Callback

_KEY = "fgrpo_history"


class RelativeGainWeighting(Callback):
    """Sets ``ClientUpdate.weight`` from relative performance gains before each aggregation (FGRPO).

    Args:
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
        baseline_on_client: keep the baseline in the client's private state and upload only the gain.
    """

    def __init__(
        self,
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
        self.signal, self.gain, self.baseline = signal, gain, baseline
        self.beta, self.window, self.temperature, self.zscore = beta, window, temperature, zscore
        self.floor, self.eps, self.weight_by_samples = floor, eps, weight_by_samples
        self.baseline_on_client = baseline_on_client
        self._server_history: dict[int, dict[str, Any]] = {}

    # -- the client-side part: baseline and gain ---------------------------------------------------------------

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

    # -- the server-side part: weights -------------------------------------------------------------------------

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

    def on_before_aggregate(self, trainer: Any, round_idx: int, updates: list[Any]) -> None:
        gains = []
        for update in updates:
            performance = float(update.metrics.get(self.signal, float("nan")))
            if math.isnan(performance):
                raise ValueError(f"client {update.client_id} reported no {self.signal!r} metric for FGRPO weighting")
            if self.baseline_on_client:
                g = self.client_gain_in(trainer.client_states[update.client_id].extra, performance)
                trainer.comm.record(round_idx, update.client_id, "up", 8)  # one float64 gain
            else:
                g, self._server_history[update.client_id] = self.client_gain(
                    self._server_history.get(update.client_id, {}), performance
                )
            gains.append(g)
        self.apply_weights(updates, gains)

    def client_gain_in(self, client_extra: dict[str, Any], performance: float) -> float:
        """``client_gain`` against the baseline kept in a client's private state, which it updates in place."""
        gain, client_extra[_KEY] = self.client_gain(client_extra.get(_KEY, {}), performance)
        return gain

    def apply_weights(self, updates: list[Any], gains: list[float]) -> None:
        """Set each update's aggregation weight from the round's gains and log both in its metrics."""
        alphas = self.weights(gains, [float(u.num_samples) for u in updates])
        for update, g, a in zip(updates, gains, alphas):
            update.weight = a
            update.metrics.update({"fgrpo/gain": g, "fgrpo/weight": a})

    def state_dict(self) -> dict[str, Any]:
        return {"server_history": self._server_history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._server_history = dict(state["server_history"])
