"""From a per-token loss to a scalar: TRL's ``loss_type`` aggregation, truncated-completion masking, masked means.

Kept apart from the per-token losses (``surrogate.py``, ``ppo.py``) so that the loss and the way it is averaged are
chosen independently. Shapes: B completions per micro-batch, T completion tokens; masks are (B, T) {0, 1} tensors.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")


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
