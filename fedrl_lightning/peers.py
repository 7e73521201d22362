"""Federated PPO's reference: a weighted mixture of the peers' policy snapshots (``research/algorithms.md`` §5).

Each client's KL reference is not the base model but a mixture of every client's latest snapshot, so the usual
trust-region KL pulls a client toward where its peers are (TunePPO's "trajectory attractor"). These are the pure
parts: the mixing weights and the mixture of the peers' logits. With self-preference 1 the reference is the
client's own snapshot (isolated PPO whose reference is refreshed at every sync).
"""

from __future__ import annotations

from typing import Literal

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


def mixture_log_probs(
    peer_logits: Tensor, weights: Tensor, tokens: Tensor, space: MixtureSpace = "logits", temperature: float = 1.0
) -> Tensor:
    """Log-probs of ``tokens`` under the mixture of the peers' next-token distributions.

    ``logits`` (TunePPO's implementation): log softmax(Σ_j w_j z_j / T), a product of experts. ``probs``: the
    arithmetic mixture log Σ_j w_j softmax(z_j / T).

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
    w = weights.to(peer_logits.device, torch.float32).view(-1, 1, 1, 1)
    scaled = peer_logits.float() / temperature
    if space == "logits":
        log_p = torch.log_softmax((w * scaled).sum(dim=0), dim=-1)
    elif space == "probs":
        log_p = torch.logsumexp(torch.log_softmax(scaled, dim=-1) + w.clamp(min=1e-38).log(), dim=0)
    else:
        raise ValueError(f"space must be 'logits' or 'probs', got {space!r}")
    return log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


__all__ = ["mixture_log_probs", "product_weights", "score_weights", "uniform_weights"]
