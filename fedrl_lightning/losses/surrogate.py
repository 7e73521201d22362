"""The GRPO family's per-token policy loss: clipped surrogate, k3 KL, clip statistics, sampler-mismatch IS weights.

Every function here returns unreduced (B, T) tensors (or the weights that multiply into them); how a per-token loss
becomes the scalar that is back-propagated (``loss_type``) lives in ``reduction.py``.
Shapes: B completions per micro-batch (N, C for a whole generation batch), T completion tokens; masks are (B, T)
{0, 1} tensors.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

IS_MODES: tuple[str, ...] = ("sequence_mask", "sequence_truncate", "token_mask", "token_truncate")


def k3_kl(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1, always >= 0.

    Args:
        log_probs: (B, T) policy log-probs.
        ref_log_probs: (B, T) reference log-probs.

    Returns:
        (B, T) per-token KL estimates.
    """
    diff = ref_log_probs - log_probs
    return torch.exp(diff) - diff - 1


def _per_token(advantages: Tensor) -> Tensor:
    """(B,) sequence advantages -> (B, 1) to broadcast over tokens; (B, 1) or (B, T) pass through."""
    return advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages


def clipped_surrogate(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Clipped surrogate -min(ratio' * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A).

    Args:
        log_probs: (B, T) current-policy log-probs (with grad).
        old_log_probs: (B, T) behaviour-policy log-probs.
        advantages: (B,) sequence advantages (or (B, T)).
        epsilon_low: lower clip width.
        epsilon_high: upper clip width, defaults to ``epsilon_low``.
        delta: if set, ratio' = min(ratio, delta) also caps the unclipped branch (two-sided GRPO, INTELLECT-2);
            meant to exceed 1 + epsilon_high. Otherwise ratio' = ratio.

    Returns:
        per_token_loss: (B, T), unmasked.
        ratio: (B, T) exp(logp - old), not capped by delta.
    """
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = _per_token(advantages)
    ratio = torch.exp(log_probs - old_log_probs)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    return -torch.min(unclipped * adv, clipped * adv), ratio


def clip_ratio_stats(
    ratio: Tensor, advantages: Tensor, mask: Tensor, epsilon_low: float = 0.2, epsilon_high: float | None = None
) -> dict[str, Tensor]:
    """Fractions of active tokens whose clip binds (TRL ``clip_ratio/{low,high,region}_mean``).

    Low: ratio < 1 - eps_low and A < 0; high: ratio > 1 + eps_high and A > 0. Beyond a bound with the other
    advantage sign, min() picks the unclipped branch and the gradient still flows, so it does not count.

    Args:
        ratio: (B, T) probability ratios.
        advantages: (B,) (or (B, T)) advantages.
        mask: (B, T) active-token mask.
        epsilon_low: lower clip width.
        epsilon_high: upper clip width, defaults to ``epsilon_low``.

    Returns:
        Scalars ``low_mean``, ``high_mean``, ``region_mean`` (0 for an empty mask).
    """
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = _per_token(advantages)
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    m = mask.to(ratio.dtype)
    denom = m.sum().clamp(min=1)
    flags = {"low_mean": low, "high_mean": high, "region_mean": low | high}
    return {name: (f.to(ratio.dtype) * m).sum() / denom for name, f in flags.items()}


def grpo_per_token_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    ref_log_probs: Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_weights: Tensor | None = None,
    use_bias_correction_kl: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """GRPO per-token loss L = clipped_surrogate * importance_weights + beta * KL, as TRL 1.16's ``_compute_loss``.

    KL = k3_kl * ratio with ``use_bias_correction_kl`` (TRL's default), else k3_kl. The ratio exp(logp - old) keeps
    its gradient: the corrected term's gradient is the unbiased reverse-KL gradient (DeepSeek-V3.2), so the gradient
    differs from the plain k3 term's even on-policy, where the ratio's value is exactly 1.

    Args:
        log_probs, old_log_probs, advantages, epsilon_low, epsilon_high, delta: as in ``clipped_surrogate``.
        ref_log_probs: (B, T) reference log-probs, required when ``beta != 0``.
        beta: KL coefficient.
        importance_weights: (B, T) or (B, 1) sampler-mismatch IS weights; as in TRL they weight the surrogate only,
            not the KL term.
        use_bias_correction_kl: multiply the k3 KL by the (uncapped) probability ratio.

    Returns:
        per_token_loss: (B, T), unmasked.
        ratio: (B, T) probability ratios.
        kl: (B, T) the KL term beta multiplies (ratio-weighted with the correction, TRL's logged ``kl``) whenever
            ``ref_log_probs`` is given (also at beta = 0, for logging), else None.

    Raises:
        ValueError: ``beta != 0`` without ``ref_log_probs``.
    """
    if beta != 0 and ref_log_probs is None:
        raise ValueError(f"beta={beta} requires ref_log_probs")
    loss, ratio = clipped_surrogate(log_probs, old_log_probs, advantages, epsilon_low, epsilon_high, delta)
    if importance_weights is not None:
        loss = loss * importance_weights
    kl = None if ref_log_probs is None else k3_kl(log_probs, ref_log_probs)
    if kl is not None and use_bias_correction_kl:
        kl = kl * ratio
    if kl is not None and beta != 0:
        loss = loss + beta * kl
    return loss, ratio, kl


@torch.no_grad()
def importance_sampling_weights(
    old_log_probs: Tensor,
    sampling_log_probs: Tensor,
    mask: Tensor,
    mode: Literal["sequence_mask", "sequence_truncate", "token_mask", "token_truncate"] = "sequence_mask",
    cap: float = 3.0,
    cap_min: float | None = None,
) -> Tensor:
    """Weights that correct for sampling with vLLM's numerics instead of the trainer's (no gradient).

    With ``d = mask * (old_log_probs - sampling_log_probs)`` per token (NaN, a log-prob the sampler did not report,
    counts as 0, so its ratio is 1):

    * ``token_truncate``: ``clip(exp(d), cap_min, cap)``;
    * ``token_mask``: ``exp(d)`` where ``cap_min <= exp(d) <= cap``, else 0;
    * ``sequence_truncate``: ``clip(exp(sum_t d), cap_min, cap)`` (the product of the token ratios);
    * ``sequence_mask`` (default): ``exp(sum_t d)`` where within ``[cap_min, cap]``, else 0.

    The same operations in the same order as TRL 1.16's vLLM importance-sampling correction (bounds on the ratio,
    not on its log), so for float32 log-probs the weights are bitwise TRL's.

    Args:
        old_log_probs: (N, C) trainer log-probs of the sampled tokens before the update.
        sampling_log_probs: (N, C) the sampler's log-probs of the same tokens.
        mask: (N, C) 1 for completion tokens (padding contributes nothing).
        mode: one of ``IS_MODES``.
        cap: upper bound C_max.
        cap_min: lower bound C_min; None = no lower bound.

    Returns:
        (N, C) for token modes (1 at masked positions), (N, 1) for sequence modes; multiply into the surrogate.
    """
    if mode not in IS_MODES:
        raise ValueError(f"mode must be one of {IS_MODES}, got {mode!r}")
    if cap <= 0 or (cap_min is not None and not 0 <= cap_min <= cap):
        raise ValueError(f"need 0 <= cap_min <= cap and cap > 0, got cap_min={cap_min}, cap={cap}")
    d = torch.nan_to_num((old_log_probs.float() - sampling_log_probs.float()) * mask.float(), nan=0.0)
    if mode.startswith("sequence"):
        d = d.sum(dim=1, keepdim=True)
    ratio = d.exp()
    if mode.endswith("truncate"):
        return ratio.clamp(min=cap_min, max=cap)
    low = -math.inf if cap_min is None else cap_min
    return ratio.masked_fill((ratio < low) | (ratio > cap), 0.0)
