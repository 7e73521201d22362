"""GRPO as a LightningModule: TRL's config names and defaults, the pure losses in ``losses.py``.

One local step: generate G completions per prompt, score them, turn rewards into group-relative advantages,
then ``num_iterations`` optimizer steps over that batch in micro-batches. Sampling, scoring, the clipped loss and
the iteration come from ``PolicyGradientModule``; GRPO adds the group-relative advantages. The loop around the
``training_step`` of one micro-batch lives in ``client.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedrl_lightning.losses import ScaleRewards, group_advantages, weighted_reward_sum
from fedrl_lightning.modules.pg import (
    PolicyGradientBatch,
    PolicyGradientModule,
    RewardFunc,
    expand_columns,
    model_inputs,
)
from fedrl_lightning.rollout import Rollout


@dataclass
class GRPOBatch(PolicyGradientBatch):
    """A ``PolicyGradientBatch`` with one advantage per completion.

    Attributes:
        advantages: (N,) group-relative advantages.
        old_log_probs: (N, C) log-probs before the update when ``num_iterations > 1``, else None.
        num_items_in_batch: active tokens of the whole batch (the DAPO normaliser).
        objective_advantages: (N, K) per-objective advantages for multi-objective algorithms (FedMOA), else None.
    """

    objective_advantages: Tensor | None = None


class GRPOModule(PolicyGradientModule):
    """Group Relative Policy Optimisation on a LoRA policy, with TRL's ``GRPOConfig`` names and semantics.

    Args:
        num_generations: completions per prompt (G), >= 2: each completion's advantage compares it with the others
            of its prompt.
        scale_rewards: ``group``, ``batch`` or ``none`` (Dr. GRPO): what the centred reward is divided by.
        use_bias_correction_kl: multiply the k3 KL term (``beta > 0``) by the ratio exp(logp - old_logp), as TRL's
            option of that name (on by default, as in TRL 1.16): its gradient is then the unbiased reverse-KL gradient.
            It changes the gradient even with one iteration, where the ratio's value is 1; False = the plain k3 term.
        **kwargs: the rest of the sampling and loss arguments (``reward_funcs``, ``prompts_per_step``,
            ``loss_type``, ``epsilon``, ``beta``, ``num_iterations``, ...), see ``PolicyGradientModule``, and the
            policy's (``model``, ``lora_r``, ``learning_rate``, ...), see ``PolicyModule``.
    """

    def __init__(
        self,
        num_generations: int = 8,
        scale_rewards: ScaleRewards = "group",
        use_bias_correction_kl: bool = True,
        **kwargs: Any,
    ) -> None:
        if num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (group-relative advantages), got {num_generations}")
        super().__init__(num_generations=num_generations, **kwargs)
        self.scale_rewards = scale_rewards
        self.use_bias_correction_kl = use_bias_correction_kl

    def make_batch(self, rollout: Rollout, rewards_per_func: Tensor) -> GRPOBatch:
        """Advantages, loss mask, cached old and reference log-probs; logs TRL's rollout metrics."""
        rewards, advantages, group_std = self.rewards_and_advantages(rewards_per_func)
        mask = self.loss_mask(rollout)
        old = ref = None
        if self.num_iterations > 1:  # with one pass the ratio is exactly 1: no need to recompute
            temperature = self.sampling.temperature
            with torch.no_grad():
                old = self.chunked(
                    lambda *a: self.completion_log_probs(*a, temperature=temperature)[0], model_inputs(rollout)
                )
        if self.beta > 0:
            ref = self.rollout_reference_log_probs(rollout)
        self.log_rollout(rollout, rewards, group_std)
        return GRPOBatch(rollout, advantages, mask, old, ref, float(mask.sum()))

    def rewards_and_advantages(self, rewards_per_func: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Scalar rewards (N,), advantages (N,) and group stds (N / G,) or None; subclasses change the baseline."""
        rewards = weighted_reward_sum(rewards_per_func, self.reward_weights)
        advantages, group_std = group_advantages(rewards, self.num_generations, self.scale_rewards)
        return rewards, advantages, group_std

    def training_step(self, batch: GRPOBatch, batch_idx: int = 0) -> Tensor:
        log_probs, old = self.policy_log_probs(batch)
        loss = self.policy_loss(batch, log_probs, old, batch.advantages)
        # Scaled back so the logged value is the loss of the whole batch whatever the micro-batching.
        self.tracker.update("loss", loss.detach() * batch.num_micro_batches)
        return loss


# ``expand_columns`` and ``RewardFunc`` are imported from here by callers that predate ``modules.pg``.
__all__ = ["GRPOBatch", "GRPOModule", "RewardFunc", "expand_columns"]
