"""Byzantine-robust aggregators: coordinate-wise median, trimmed mean, and (Multi-)Krum.

They act on the clients' adapters (not deltas; median and trimmed mean are translation-equivariant and Krum's
distances are the same either way) and treat LoRA A and B as plain tensors. Median and trimmed mean are unweighted
and ignore ``ClientUpdate.weight``; MultiKrum averages the selected clients with ``weighting`` (callback weights take
precedence). None of them is sum-decomposable, so none composes with secure aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedrl_lightning.aggregation.base import (
    F64,
    WEIGHTINGS,
    Aggregator,
    ClientUpdate,
    Weighting,
    check_choice,
    check_same_keys,
    client_weights,
    weighted_average,
)


class _CoordinateWise(Aggregator):
    """Base of the coordinate-wise rules: per tensor, reduce the clients' values sorted along a new dim 0."""

    def reduce(self, ordered: Tensor) -> Tensor:
        """The aggregate of one tensor from the clients' values ``ordered`` (float64, shape (n, ...), sorted on 0)."""
        raise NotImplementedError

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        if not updates:
            return global_state
        states = [u.state for u in updates]
        check_same_keys(states)
        out = {}
        for name, ref in states[0].items():
            ordered = torch.stack([s[name].detach().to("cpu", F64) for s in states]).sort(dim=0).values
            out[name] = self.reduce(ordered).to(ref.dtype)
        return out


class FedMedian(_CoordinateWise):
    """Coordinate-wise median of the clients' adapters (Yin et al. 2018); unweighted.

    With an even number of clients the median is the mean of the two middle values (as ``numpy.median``, not the
    lower one as ``torch.median``). Takes no arguments.
    """

    def reduce(self, ordered: Tensor) -> Tensor:
        n = ordered.shape[0]
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class TrimmedMean(_CoordinateWise):
    """Coordinate-wise trimmed mean (Yin et al. 2018; Flower's FedTrimmedAvg); unweighted.

    Per coordinate, drop the ⌊βn⌋ lowest and ⌊βn⌋ highest of the n client values and average the rest.

    Args:
        beta: fraction trimmed from each end, in [0, 0.5) (Flower's FedTrimmedAvg defaults to 0.2). With fewer
            than 1/beta clients nothing is trimmed.
    """

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5) so that trimming leaves a client, got {beta}")
        self.beta = beta

    def reduce(self, ordered: Tensor) -> Tensor:
        n = ordered.shape[0]
        k = int(self.beta * n)
        return ordered[k : n - k].mean(dim=0)


class Krum(Aggregator):
    """Krum / MultiKrum (Blanchard et al. 2017) over the flattened adapters.

    A client's score is the sum of squared L2 distances to its n - f - 2 nearest other clients (all tensors
    flattened together). Krum (``num_selected=1``) returns the adapter with the lowest score; MultiKrum returns the
    weighted mean of the ``num_selected`` lowest-scoring adapters (ties broken by arrival order). The ids of the
    clients kept in the last round are in ``last_selected``.

    Args:
        num_malicious: f, the number of Byzantine clients tolerated; a round needs n > 2f + 2 clients.
        num_selected: how many clients to keep (1 = Krum).
        weighting: weights of the MultiKrum mean (``prompts``, ``tokens``, ``uniform``); callback weights take
            precedence.
    """

    def __init__(self, num_malicious: int = 0, num_selected: int = 1, weighting: Weighting = "prompts") -> None:
        if num_malicious < 0:
            raise ValueError(f"num_malicious must be >= 0, got {num_malicious}")
        if num_selected < 1:
            raise ValueError(f"num_selected must be >= 1, got {num_selected}")
        check_choice("weighting", weighting, WEIGHTINGS)
        self.num_malicious, self.num_selected, self.weighting = num_malicious, num_selected, weighting
        self.last_selected: list[int] = []

    def scores(self, states: Sequence[dict[str, Tensor]]) -> Tensor:
        """Krum score of every client (float64, shape (n,))."""
        n, f = len(states), self.num_malicious
        if n <= 2 * f + 2:
            raise ValueError(
                f"Krum needs n > 2f + 2 clients: got n={n} with num_malicious f={f} (need n >= {2 * f + 3})"
            )
        check_same_keys(states)
        dist = torch.zeros(n, n, dtype=F64)
        for name in states[0]:
            flat = torch.stack([s[name].detach().to("cpu", F64).reshape(-1) for s in states])
            for i in range(n):
                dist[i] += (flat - flat[i]).pow(2).sum(dim=1)
        dist.fill_diagonal_(float("inf"))
        return dist.sort(dim=1).values[:, : n - f - 2].sum(dim=1)

    def aggregate(self, global_state: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        if not updates:
            return global_state
        if self.num_selected > len(updates):
            raise ValueError(f"num_selected={self.num_selected} but only {len(updates)} clients reported")
        scores = self.scores([u.state for u in updates])
        keep = torch.argsort(scores, stable=True)[: self.num_selected].tolist()
        chosen = [updates[i] for i in keep]
        self.last_selected = [u.client_id for u in chosen]
        return weighted_average([u.state for u in chosen], client_weights(chosen, self.weighting))
