"""Pure tensor functions for GRPO-family and PPO losses, following TRL 1.10.dev (research/rl_anchors.md §3).

Modules: ``advantages`` (reward-function weighting, group-relative advantages), ``logprobs`` (per-token log-probs
and entropies from logits), ``chunked`` (the same from the last hidden states and the LM head, a chunk of tokens at
a time, with an exact gradient), ``surrogate`` (the per-token policy loss: clipped surrogate, k3 KL, clip
statistics, importance-sampling weights), ``reduction`` (``loss_type`` aggregation to a scalar, masking, masked
means) and ``ppo`` (GAE, whitening, the clipped value loss). They import torch only. Every public name is importable
from here, e.g. ``from fedrl_lightning.losses import group_advantages``.

Shapes: N completions per generation batch, G generations per prompt, K reward functions, B completions per
micro-batch, T completion tokens, V vocabulary. Masks are (B, T) {0, 1} tensors.
"""

from fedrl_lightning.losses.advantages import SCALE_REWARDS, ScaleRewards, group_advantages, weighted_reward_sum
from fedrl_lightning.losses.chunked import chunked_log_probs, default_chunk_size
from fedrl_lightning.losses.logprobs import entropy_from_logits, selective_log_softmax
from fedrl_lightning.losses.ppo import clipped_value_loss, gae, masked_whiten
from fedrl_lightning.losses.reduction import LOSS_TYPES, LossType, aggregate_loss, mask_truncated, masked_mean
from fedrl_lightning.losses.surrogate import (
    IS_MODES,
    clip_ratio_stats,
    clipped_surrogate,
    grpo_per_token_loss,
    importance_sampling_weights,
    k3_kl,
)

__all__ = [
    "IS_MODES",
    "LOSS_TYPES",
    "SCALE_REWARDS",
    "LossType",
    "ScaleRewards",
    "aggregate_loss",
    "chunked_log_probs",
    "clip_ratio_stats",
    "clipped_surrogate",
    "clipped_value_loss",
    "default_chunk_size",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "grpo_per_token_loss",
    "importance_sampling_weights",
    "k3_kl",
    "mask_truncated",
    "masked_mean",
    "masked_whiten",
    "selective_log_softmax",
    "weighted_reward_sum",
]
