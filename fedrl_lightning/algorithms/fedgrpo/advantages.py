"""FedGRPO's federated group-relative advantages: pure tensor functions over rewards returned by expert clients.

Shapes: Q questions, M experts per question, g candidates per expert, G = g * M candidates per question,
N = Q * G candidates in a step. Rows of a question are contiguous; within a question, ``partition`` scoring gives
expert b the contiguous block ``[b * g, (b + 1) * g)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fedrl_lightning.losses import ScaleRewards, group_advantages

Baseline = Literal["pooled", "per_expert"]
Scoring = Literal["partition", "replicate"]
BASELINES: tuple[str, ...] = ("pooled", "per_expert")
SCORINGS: tuple[str, ...] = ("partition", "replicate")


def federated_advantages(
    rewards: Tensor,
    group_size: int,
    block_size: int,
    baseline: Baseline = "pooled",
    scale_rewards: ScaleRewards = "none",
    eps: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """Group-relative advantages of expert-scored candidates.

    ``pooled`` (FedGRPO at HEAD): every candidate of a question is compared with the mean of all G of them,
    ``A_j = r_j - mean_{j' in q}(r_j')``. ``per_expert`` (the earlier FedGRPO commit): each expert's block of g
    candidates has its own baseline, ``A_j = r_j - mean_{j' in block(j)}(r_j')``, so experts that grade on different
    scales do not shift each other's candidates. ``scale_rewards`` divides by the std of the same group (``group``),
    of the whole batch (``batch``) or not at all (``none``, the FedGRPO default). NaN rewards (an expert that could
    not score a candidate) get advantage 0 and do not enter the means.

    Args:
        rewards: (N,) one scalar per candidate, questions contiguous.
        group_size: G, candidates per question.
        block_size: g, candidates per expert block (G for ``replicate`` scoring, where every expert saw all G).
        baseline: ``pooled`` or ``per_expert``.
        scale_rewards: ``none``, ``group`` or ``batch``.
        eps: added to the std before dividing.

    Returns:
        advantages: (N,).
        group_std: (N / G,) for ``pooled`` or (N / g,) for ``per_expert``: the std of each baseline group.

    Raises:
        ValueError: an unknown baseline, or g not dividing G.

    Example:
        >>> r = torch.tensor([1.0, 0.0, 3.0, 4.0])
        >>> federated_advantages(r, 4, 2, "pooled")[0].tolist()
        [-1.0, -2.0, 1.0, 2.0]
        >>> federated_advantages(r, 4, 2, "per_expert")[0].tolist()
        [0.5, -0.5, -0.5, 0.5]
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if block_size < 1 or group_size % block_size:
        raise ValueError(f"block_size {block_size} must divide group_size {group_size}")
    size = group_size if baseline == "pooled" else block_size
    return group_advantages(rewards, size, scale_rewards, eps)


def combine_expert_rewards(rewards: Tensor, weights: Tensor) -> Tensor:
    """``replicate`` scoring: each candidate's reward is the confidence-weighted mean of its experts' rewards.

    ``r_j = sum_b w_b r_{b,j} / sum_b w_b`` over the experts b that returned a finite reward for candidate j (an
    expert returning NaN abstains); NaN where every expert abstained.

    Args:
        rewards: (Q, M, G) reward of expert b for candidate j of question q.
        weights: (Q, M) non-negative confidence weights; they need not sum to 1.

    Returns:
        (Q, G) combined rewards.

    Example:
        >>> r = torch.tensor([[[1.0, 0.0], [0.0, float("nan")]]])
        >>> combine_expert_rewards(r, torch.tensor([[3.0, 1.0]])).tolist()
        [[0.25, 0.0]]
    """
    if rewards.dim() != 3 or weights.shape != rewards.shape[:2]:
        raise ValueError(
            f"rewards must be (Q, M, G) and weights (Q, M), got {tuple(rewards.shape)}, {tuple(weights.shape)}"
        )
    if (weights < 0).any():
        raise ValueError("confidence weights must be >= 0")
    valid = ~torch.isnan(rewards)
    w = torch.where(valid, weights.unsqueeze(-1).to(rewards.dtype), 0.0)
    total = (w * torch.where(valid, rewards, 0.0)).sum(1)
    norm = w.sum(1)
    out = total / norm.clamp(min=torch.finfo(rewards.dtype).tiny)
    # An all-zero weight vector over finite rewards falls back to the plain mean of the experts that answered.
    plain = torch.where(valid, rewards, 0.0).sum(1) / valid.sum(1).clamp(min=1)
    out = torch.where(norm > 0, out, plain)
    return torch.where(valid.any(1), out, torch.nan)


def expert_blocks(num_questions: int, num_experts: int, block_size: int) -> Tensor:
    """(N,) index b of the expert block each candidate belongs to under ``partition`` scoring.

    Example:
        >>> expert_blocks(2, 2, 2).tolist()
        [0, 0, 1, 1, 0, 0, 1, 1]
    """
    return torch.arange(num_experts).repeat_interleave(block_size).repeat(num_questions)
