"""Federated PPO's reference: a weighted mixture of the peers' policy snapshots (``research/algorithms.md`` §5).

Each client's KL reference is not the base model but a mixture of every client's latest snapshot, so the usual
trust-region KL pulls a client toward where its peers are (TunePPO's "trajectory attractor"). Here: the mixing
weights and the mixture of the peers' logits (pure), and ``MixtureReference``, the reference a module calls; which
snapshots, with which weights, is ``peers``' business (the ``PeerMixture`` aggregator and the module's
``PeerReference``). With self-preference 1 the reference is the client's own snapshot (isolated PPO whose reference
is refreshed at every sync).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

MixtureSpace = Literal["logits", "probs"]


def uniform_weights(num_peers: int, self_index: int, self_preference: float | None = None) -> Tensor:
    """(N,) w_ii = α and w_ij = (1 - α) / (N - 1) for j ≠ i; ``self_preference=None`` gives 1/N to everyone.

    TunePPO's ``uniform`` weightage (its self-attraction α).
    """
    if num_peers < 1 or not 0 <= self_index < num_peers:
        raise ValueError(f"need 0 <= self_index < num_peers, got {self_index} and {num_peers}")
    if self_preference is None or num_peers == 1:
        return torch.full((num_peers,), 1.0 / num_peers, dtype=torch.float64)
    if not 0 <= self_preference <= 1:
        raise ValueError(f"self_preference must be in [0, 1], got {self_preference}")
    w = torch.full((num_peers,), (1 - self_preference) / (num_peers - 1), dtype=torch.float64)
    w[self_index] = self_preference
    return w


def score_weights(scores: Tensor, temperature: float = 1.0) -> Tensor:
    """(N,) softmax(S / T) of the peers' summed recent mean scores: the same vector for every client."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(scores.double() / temperature, dim=0)


def product_weights(uniform: Tensor, scores: Tensor) -> Tensor:
    """(N,) the renormalised elementwise product of the uniform and the score weights (TunePPO's refinement)."""
    w = uniform.double() * scores.double()
    total = w.sum()
    if not total > 0:
        raise ValueError("the product of the weightings is zero everywhere")
    return w / total


class MixtureAccumulator:
    """Streams peers' logits into the mixture, one peer at a time: memory stays one (B, T, V) buffer for any N.

    ``logits`` space (TunePPO's implementation): log softmax(Σ_j w_j z_j / T), a product of experts. ``probs``
    space: the arithmetic mixture log Σ_j w_j softmax(z_j / T). A peer of weight 0 need not be added at all.
    """

    def __init__(self, space: MixtureSpace = "logits", temperature: float = 1.0) -> None:
        if space not in ("logits", "probs"):
            raise ValueError(f"space must be 'logits' or 'probs', got {space!r}")
        self.space, self.temperature = space, temperature
        self._acc: Tensor | None = None
        self._total_weight = 0.0

    def add(self, logits: Tensor, weight: float) -> None:
        """Mix in one peer's (B, T, V) logits with its weight."""
        scaled = logits.float() / self.temperature
        if self.space == "logits":
            term = weight * scaled
            self._acc = term if self._acc is None else self._acc + term
        else:
            term = torch.log_softmax(scaled, dim=-1) + math.log(max(weight, 1e-38))
            self._acc = term if self._acc is None else torch.logaddexp(self._acc, term)
        self._total_weight += weight

    def log_probs(self, tokens: Tensor) -> Tensor:
        """(B, T) log-probs of ``tokens`` under the mixture of what was added (weights must sum to 1)."""
        if self._acc is None:
            raise ValueError("no peer was added to the mixture")
        if abs(self._total_weight - 1.0) > 1e-6:
            raise ValueError(f"the mixture's weights sum to {self._total_weight}, not 1")
        log_p = torch.log_softmax(self._acc, dim=-1) if self.space == "logits" else self._acc
        return log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def mixture_log_probs(
    peer_logits: Tensor, weights: Tensor, tokens: Tensor, space: MixtureSpace = "logits", temperature: float = 1.0
) -> Tensor:
    """Log-probs of ``tokens`` under the mixture of the peers' next-token distributions (see ``MixtureAccumulator``).

    Args:
        peer_logits: (N, B, T, V) each peer snapshot's logits on the same sequences.
        weights: (N,) mixing weights (summing to 1).
        tokens: (B, T) the tokens to score.
        space: ``logits`` or ``probs``.
        temperature: the sampling temperature the logits are divided by.

    Returns:
        (B, T) log-probs.
    """
    if peer_logits.shape[0] != weights.shape[0]:
        raise ValueError(f"{peer_logits.shape[0]} peers' logits but {weights.shape[0]} weights")
    acc = MixtureAccumulator(space, temperature)
    for z, w in zip(peer_logits, weights.tolist()):
        if w > 0:
            acc.add(z, w)
    return acc.log_probs(tokens)


class MixtureReference:
    """A client's KL reference for one round: the mixture of peer snapshots (``PPOModule``'s ``peer_reference``).

    Called as ``reference(module, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=T)``. Each
    snapshot of non-zero weight is swapped into the module's trainable state for one no-grad forward pass over the
    completions, then the client's live state is restored.

    Args:
        snapshots: per peer, its trainable state (adapter) at the last sync.
        weights: (N,) mixing weights, one per snapshot.
        space: ``logits`` or ``probs``.
    """

    def __init__(self, snapshots: list[dict[str, Tensor]], weights: Tensor, space: MixtureSpace = "logits") -> None:
        if len(snapshots) != len(weights):
            raise ValueError(f"{len(snapshots)} snapshots but {len(weights)} weights")
        self.snapshots, self.weights, self.space = snapshots, weights, space

    @torch.no_grad()
    def __call__(
        self,
        module: Any,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion_ids: Tensor,
        completion_mask: Tensor,
        temperature: float = 1.0,
    ) -> Tensor:
        """(B, C) log-probs of the completion tokens under the mixture."""
        acc = MixtureAccumulator(self.space, temperature if temperature > 0 else 1.0)
        live = module.trainable_state()
        try:
            for snapshot, w in zip(self.snapshots, self.weights.tolist()):
                if w <= 0:
                    continue
                module.load_trainable_state(snapshot)
                acc.add(module.completion_logits(prompt_ids, prompt_mask, completion_ids, completion_mask), w)
        finally:
            module.load_trainable_state(live)
        return acc.log_probs(completion_ids)


__all__ = [
    "MixtureAccumulator",
    "MixtureReference",
    "mixture_log_probs",
    "product_weights",
    "score_weights",
    "uniform_weights",
]
