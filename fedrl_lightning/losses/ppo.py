"""PPO's additions to the GRPO losses: GAE over per-token rewards, masked whitening, the clipped value loss.

The policy side of PPO is the clipped surrogate of ``surrogate.py``. Shapes: B completions per micro-batch, T
completion tokens; masks are (B, T) {0, 1} tensors, right-padded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedrl_lightning.losses.reduction import masked_mean


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(values - mean) / sqrt(var + eps) with the masked mean and Bessel-corrected masked variance.

    Args:
        values: (B, T) values, e.g. GAE advantages.
        mask: (B, T) {0, 1} mask.
        shift_mean: if False the mean is added back (rescale only), as in TRL.
        eps: added to the variance.

    Returns:
        (B, T) whitened values, 0 at masked-out positions.
    """
    mean = masked_mean(values, mask)
    n = mask.to(values.dtype).sum()
    # Bessel n / (n - 1); with fewer than 2 tokens the variance is 0 and the result 0 instead of NaN.
    var = masked_mean((values - mean) ** 2, mask) * torch.where(n > 1, n / (n - 1).clamp(min=1), 1.0)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation: A_t = sum_l (gamma * lam)^l delta_{t+l}, returns = A + V.

    delta_t = r_t + gamma * V_{t+1} - V_t. The mask must be a right-padded prefix: rewards and values past the last
    active token count as 0, so the last token bootstraps from V = 0 (terminal) and padding contributes nothing.

    Args:
        rewards: (B, T) per-token rewards (e.g. -kl_coef * KL, plus the score on the last token).
        values: (B, T) value estimates V(s_t).
        mask: (B, T) {0, 1} active-token mask.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        advantages: (B, T), 0 at masked positions.
        returns: (B, T) value targets, 0 at masked positions.
    """
    m = mask.to(values.dtype)
    r, v = rewards * m, values * m
    adv_next = torch.zeros_like(v[:, 0])
    value_next = torch.zeros_like(v[:, 0])
    out = []
    for t in reversed(range(v.size(1))):
        adv_next = r[:, t] + gamma * value_next - v[:, t] + gamma * lam * adv_next
        value_next = v[:, t]
        out.append(adv_next)
    advantages = torch.stack(out[::-1], dim=1) * m
    return advantages, (advantages + v) * m


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float = 0.2
) -> Tensor:
    """PPO value loss 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)).

    Args:
        values: (B, T) current value predictions (with grad).
        old_values: (B, T) value predictions at rollout time.
        returns: (B, T) value targets.
        mask: (B, T) {0, 1} mask.
        clip_range: c, the allowed move of V away from ``old_values``.

    Returns:
        Scalar loss.
    """
    clipped = torch.clamp(values, old_values - clip_range, old_values + clip_range)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)
