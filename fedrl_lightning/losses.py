"""Pure tensor functions for GRPO-family and PPO losses, following TRL 1.10.dev (research/rl_anchors.md §3).

Shapes: N completions per generation batch, G generations per prompt, K reward functions, B completions per
micro-batch, T completion tokens, V vocabulary. Masks are (B, T) {0, 1} tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")
IS_MODES: tuple[str, ...] = ("sequence_mask", "sequence_truncate", "token_mask", "token_truncate")


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


def _rowwise_log_softmax(logits: Tensor, temperature: float) -> Iterator[Tensor]:
    """Yield the (T, V) log-softmax of logits / temperature one batch row at a time (bounded peak memory)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # Upcast one row at a time: a bf16 log-softmax over a large vocabulary is too coarse for importance ratios.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    for row in logits:
        yield torch.log_softmax(row.to(dtype) / temperature, dim=-1)


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probs of the chosen tokens without materialising the (B, T, V) log-softmax at once.

    Args:
        logits: (B, T, V) raw logits.
        index: (B, T) token ids.
        temperature: sampling temperature dividing the logits.

    Returns:
        (B, T) log-probs in float32 (float64 for float64 logits).
    """
    rows = _rowwise_log_softmax(logits, temperature)
    return torch.stack([lp.gather(-1, idx.unsqueeze(-1)).squeeze(-1) for lp, idx in zip(rows, index)])


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Token entropy of softmax(logits / temperature), computed row by row.

    Args:
        logits: (B, T, V) raw logits.
        temperature: sampling temperature.

    Returns:
        (B, T) entropies in nats, float32 (float64 for float64 logits).
    """
    out = []
    for logp in _rowwise_log_softmax(logits, temperature):
        p = logp.exp()
        # -inf logits (banned tokens) give p = 0, logp = -inf: their 0 * -inf term is 0, not NaN.
        out.append(-torch.where(p > 0, p * logp, 0.0).sum(-1))
    return torch.stack(out)


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


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    loss_type: LossType,
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    num_micro_batches: int = 1,
) -> Tensor:
    """Reduce one micro-batch's per-token loss to the scalar TRL back-propagates for ``loss_type``.

    grpo: mean over sequences of per-sequence token means; bnpo: micro-batch token mean; dr_grpo: token sum /
    (B * max_completion_length); these three are divided by ``num_micro_batches``. dapo: token sum /
    ``num_items_in_batch``, which summed over the micro-batches is the global token mean (no further division).

    Args:
        per_token_loss: (B, T) per-token loss.
        mask: (B, T) {0, 1} active-token mask.
        loss_type: one of ``LOSS_TYPES``.
        max_completion_length: L_max, required by dr_grpo.
        num_items_in_batch: dapo only: active tokens of the whole generation batch over all micro-batches
            (divided by the world size under DDP gradient averaging); defaults to ``mask.sum()``.
        num_micro_batches: gradient-accumulation steps of the optimizer step.

    Returns:
        Scalar loss.

    Raises:
        ValueError: unknown ``loss_type``, dr_grpo without ``max_completion_length``, invalid counts.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
    m = mask.to(per_token_loss.dtype)
    masked = per_token_loss * m
    if loss_type == "grpo":
        # Clamp: a fully masked (e.g. truncated) sequence contributes 0 rather than 0/0 = NaN.
        return (masked.sum(-1) / m.sum(-1).clamp(min=1)).mean() / num_micro_batches
    if loss_type == "bnpo":
        return masked.sum() / m.sum().clamp(min=1) / num_micro_batches
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' requires max_completion_length")
        return masked.sum() / (per_token_loss.size(0) * max_completion_length) / num_micro_batches
    n = m.sum() if num_items_in_batch is None else num_items_in_batch
    if n < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {float(n)}")
    # No clamp to 1: n may legitimately be fractional (tokens / world size). n == 0 implies a zero numerator.
    return masked.sum() / (n if n > 0 else 1)


def mask_truncated(mask: Tensor, is_truncated: Tensor) -> Tensor:
    """Zero the mask rows of truncated completions (TRL ``mask_truncated_completions``).

    Args:
        mask: (B, T) mask.
        is_truncated: (B,) bool, True where the completion ended without EOS.

    Returns:
        (B, T) mask, same dtype, truncated rows zeroed.
    """
    return mask * (~is_truncated.bool()).unsqueeze(-1).to(mask.dtype)


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
) -> tuple[Tensor, Tensor, Tensor | None]:
    """GRPO per-token loss L = clipped_surrogate * importance_weights + beta * k3_kl.

    Args:
        log_probs, old_log_probs, advantages, epsilon_low, epsilon_high, delta: as in ``clipped_surrogate``.
        ref_log_probs: (B, T) reference log-probs, required when ``beta != 0``.
        beta: KL coefficient.
        importance_weights: (B, T) or (B, 1) sampler-mismatch IS weights; as in TRL they weight the surrogate only,
            not the KL term.

    Returns:
        per_token_loss: (B, T), unmasked.
        ratio: (B, T) probability ratios.
        kl: (B, T) k3 KL whenever ``ref_log_probs`` is given (also at beta = 0, for logging), else None.

    Raises:
        ValueError: ``beta != 0`` without ``ref_log_probs``.
    """
    if beta != 0 and ref_log_probs is None:
        raise ValueError(f"beta={beta} requires ref_log_probs")
    loss, ratio = clipped_surrogate(log_probs, old_log_probs, advantages, epsilon_low, epsilon_high, delta)
    if importance_weights is not None:
        loss = loss * importance_weights
    kl = None if ref_log_probs is None else k3_kl(log_probs, ref_log_probs)
    if kl is not None and beta != 0:
        loss = loss + beta * kl
    return loss, ratio, kl


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is nonzero.

    Args:
        values: (B, T) values.
        mask: (B, T) {0, 1} (or nonnegative weight) mask.
        dim: dim to reduce; None reduces to a scalar.

    Returns:
        Scalar, or ``values``' shape without ``dim``; 0 (not NaN) where the mask is empty.
    """
    m = mask.to(values.dtype)
    num, denom = ((values * m).sum(), m.sum()) if dim is None else ((values * m).sum(dim), m.sum(dim))
    return num / denom.clamp(min=torch.finfo(values.dtype).eps)


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

    With ``d = mask * (old_log_probs - sampling_log_probs)`` per token:

    * ``token_truncate``: ``clip(exp(d), cap_min, cap)``;
    * ``token_mask``: ``exp(d)`` where ``cap_min <= exp(d) <= cap``, else 0;
    * ``sequence_truncate``: ``clip(exp(sum_t d), cap_min, cap)`` (the product of the token ratios);
    * ``sequence_mask`` (default): ``exp(sum_t d)`` where within ``[cap_min, cap]``, else 0.

    Args:
        old_log_probs: (N, C) trainer log-probs of the sampled tokens before the update.
        sampling_log_probs: (N, C) the sampler's log-probs of the same tokens.
        mask: (N, C) 1 for completion tokens (padding contributes nothing).
        mode: one of ``IS_MODES``.
        cap: upper bound C_max.
        cap_min: lower bound C_min; None = no lower bound.

    Returns:
        (N, C) for token modes (1 at masked positions), (N, 1) for sequence modes; multiply into the per-token loss.
    """
    if mode not in IS_MODES:
        raise ValueError(f"mode must be one of {IS_MODES}, got {mode!r}")
    if cap <= 0 or (cap_min is not None and not 0 <= cap_min <= cap):
        raise ValueError(f"need 0 <= cap_min <= cap and cap > 0, got cap_min={cap_min}, cap={cap}")
    d = (old_log_probs.float() - sampling_log_probs.float()) * mask.float()
    if mode.startswith("sequence"):
        d = d.sum(dim=1, keepdim=True)
    hi = math.log(cap)
    lo = math.log(cap_min) if cap_min else -math.inf
    if mode.endswith("truncate"):
        return d.clamp(min=lo, max=hi).exp()
    keep = (d <= hi) & (d >= lo)
    return torch.where(keep, d.exp(), torch.zeros_like(d))
