"""Rewards to GRPO advantages: the weighted sum over reward functions, then group-relative normalisation.

Shapes: N completions per generation batch, in groups of G consecutive rows (G generations per prompt); K reward
functions. NaN marks a reward that does not apply (per function) or an unscorable completion (summed).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

ScaleRewards = Literal["group", "batch", "none"]
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")


def weighted_reward_sum(rewards_per_func: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of reward functions, skipping "not applicable" (NaN) entries.

    Args:
        rewards_per_func: (N, K) rewards; NaN = the function does not apply to that completion.
        weights: (K,) per-function weights.

    Returns:
        (N,) rewards; NaN where the whole row is NaN (unscorable).
    """
    total = torch.nansum(rewards_per_func * weights.to(rewards_per_func.dtype), dim=1)
    # nansum of an all-NaN row is 0, which would silently score it; keep it distinguishable instead.
    return torch.where(torch.isnan(rewards_per_func).all(dim=1), torch.nan, total)


def _nan_std(x: Tensor) -> tuple[Tensor, Tensor]:
    """NaN-aware Bessel-corrected std over the last dim: (..., n) -> (std, count), std = 0 where count < 2."""
    valid = ~torch.isnan(x)
    count = valid.sum(-1)
    mean = torch.where(valid, x, 0.0).sum(-1) / count.clamp(min=1)
    sq_dev = torch.where(valid, x - mean.unsqueeze(-1), 0.0).pow(2).sum(-1)
    return torch.where(count > 1, (sq_dev / (count - 1).clamp(min=1)).sqrt(), 0.0), count


def group_advantages(
    rewards: Tensor, num_generations: int, scale_rewards: ScaleRewards = "group", eps: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Group-relative advantages (TRL ``sum_then_normalize``), NaN-aware, Bessel-corrected stds.

    ``group``: (R - mean_g) / (std_g + eps); ``batch``: (R - mean_g) / (std_batch + eps); ``none``: R - mean_g.

    Args:
        rewards: (N,) rewards, groups of G consecutive rows; NaN = unscorable.
        num_generations: group size G.
        scale_rewards: scaling mode, see above.
        eps: added to the std before dividing.

    Returns:
        advantages: (N,); 0 for unscorable rows and for all rows of a zero-std group (all scorable rewards equal
            or fewer than two scorable rows).
        group_std: (N // G,) group stds whatever the mode, 0 for zero-std groups (TRL's ``frac_reward_zero_std``).

    Raises:
        ValueError: unknown ``scale_rewards``, or ``rewards`` not 1-D with a length divisible by G.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if num_generations < 1 or rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be 1-D with a length divisible by num_generations={num_generations}")
    grouped = rewards.view(-1, num_generations)
    valid = ~torch.isnan(grouped)
    group_std, count = _nan_std(grouped)
    group_mean = torch.where(valid, grouped, 0.0).sum(-1) / count.clamp(min=1)
    # Exact constancy test (max == min) rather than std == 0: rounding can leave a tiny std/residual for identical
    # rewards, which divided by eps = 1e-4 would leak noise into groups that carry no signal.
    hi = torch.where(valid, grouped, -torch.inf).amax(-1)
    lo = torch.where(valid, grouped, torch.inf).amin(-1)
    constant = (count < 2) | (hi == lo)
    group_std = torch.where(constant, 0.0, group_std)

    centred = grouped - group_mean.unsqueeze(-1)
    if scale_rewards == "group":
        centred = centred / (group_std.unsqueeze(-1) + eps)
    elif scale_rewards == "batch":
        centred = centred / (_nan_std(rewards)[0] + eps)
    advantages = torch.where(valid & ~constant.unsqueeze(-1), centred, 0.0)
    return advantages.reshape(-1), group_std
