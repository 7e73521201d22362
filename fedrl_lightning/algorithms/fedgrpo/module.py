"""FedGRPO's server: GRPO on the server's policy, with every reward bought from expert clients as a float.

The training step is ``GRPOModule``'s (rollout backend, cached old/reference log-probs, the clipped bnpo loss,
``num_iterations`` optimizer passes, TRL's metric names); only scoring and the baseline differ. For each question
the ``ExpertSelection`` callback (``module.experts``) picks M experts; the server samples G = g x M candidates and

- ``partition`` (released code): expert b scores its own contiguous block of g candidates;
- ``replicate`` [CHOICE]: every selected expert scores all G, combined by the selector's confidence weights.

Advantages are ``pooled`` (each candidate minus the mean of its question's G rewards, no std: FedGRPO at HEAD) or
``per_expert`` (minus the mean of its expert's block: the earlier commit). The server never sees a label:
``reward_funcs`` and ``accuracy_func`` serve only the held-out evaluation, which the experimenter runs.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from fedrl_lightning.algorithms.fedgrpo.advantages import SCORINGS, combine_expert_rewards, federated_advantages
from fedrl_lightning.modules.grpo import GRPOModule
from fedrl_lightning.modules.pg import RewardFunc, nanstd
from fedrl_lightning.rewards import format_reward, reasoning_gym_reward, tag_count_reward
from fedrl_lightning.rollout import Rollout


class FedGRPOModule(GRPOModule):
    """The server policy of FedGRPO; needs the ``ExpertSelection`` callback and ``FedGRPOData``.

    Args:
        experts_per_question: M, experts selected for each question.
        generations_per_expert: g, candidates per expert block; the group is G = g x M.
        scoring: ``partition`` or ``replicate``.
        baseline: ``pooled`` (mean over all G) or ``per_expert`` (mean over each expert's block; in ``replicate``
            mode every expert saw the whole group, so both coincide).
        reward_funcs: the evaluation's reward functions (held-out ``reward`` metric); None = the task verifier,
            ``format_reward`` and ``tag_count_reward``. Never used in training.
        reward_weights: their weights; None = 8/1/1.
        accuracy_func: the held-out accuracy verifier; None = ``reasoning_gym_reward``.
        loss_type: as ``GRPOModule``; FedGRPO's script uses ``bnpo``.
        scale_rewards: ``none`` (FedGRPO: ``scale_rewards False``), ``group`` or ``batch``.
        epsilon: lower clip range (FedGRPO: 0.2).
        epsilon_high: upper clip range (FedGRPO: 0.3).
        beta: k3 KL coefficient to the base model (FedGRPO: 1e-4).
        num_iterations: optimizer passes over each generated batch (FedGRPO: 3).
        **kwargs: the rest of ``GRPOModule``'s arguments (``prompts_per_step``, ``max_completion_length``, ...)
            and the policy's (``model``, ``lora_r``, ``learning_rate``, ...). ``num_generations`` is g x M.
    """

    def __init__(
        self,
        experts_per_question: int = 2,
        generations_per_expert: int = 4,
        scoring: Literal["partition", "replicate"] = "partition",
        baseline: Literal["pooled", "per_expert"] = "pooled",
        reward_funcs: list[RewardFunc] | None = None,
        reward_weights: list[float] | None = None,
        accuracy_func: RewardFunc | None = None,
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "bnpo",
        scale_rewards: Literal["group", "batch", "none"] = "none",
        epsilon: float = 0.2,
        epsilon_high: float | None = 0.3,
        beta: float = 1e-4,
        num_iterations: int = 3,
        **kwargs: Any,
    ) -> None:
        if experts_per_question < 1 or generations_per_expert < 1:
            raise ValueError(
                f"experts_per_question and generations_per_expert must be >= 1, got "
                f"{experts_per_question} and {generations_per_expert}"
            )
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        if "num_generations" in kwargs:
            raise ValueError("FedGRPOModule sets num_generations = generations_per_expert x experts_per_question")
        funcs = reward_funcs or [reasoning_gym_reward, format_reward, tag_count_reward]
        weights = reward_weights or ([8.0, 1.0, 1.0] if reward_funcs is None else None)
        super().__init__(
            reward_funcs=funcs,
            reward_weights=weights,
            accuracy_func=accuracy_func or reasoning_gym_reward,
            num_generations=generations_per_expert * experts_per_question,
            loss_type=loss_type,
            scale_rewards=scale_rewards,
            epsilon=epsilon,
            epsilon_high=epsilon_high,
            beta=beta,
            num_iterations=num_iterations,
            **kwargs,
        )
        self.experts_per_question, self.generations_per_expert = experts_per_question, generations_per_expert
        self.scoring, self.baseline = scoring, baseline
        self.experts: Any = None  # the ExpertSelection callback, attached at fit start

    # -- scoring: questions and candidates down, floats up --------------------------------------------------------

    def score(self, rollout: Rollout, examples: list[dict[str, Any]], group_size: int) -> Tensor:
        """(N, 1) rewards from the selected experts; each question's rows are ``group_size`` = G contiguous rows."""
        if self.experts is None:
            raise RuntimeError(
                "FedGRPOModule gets its rewards from expert clients: add "
                "fedrl_lightning.algorithms.fedgrpo.selection.ExpertSelection to trainer.callbacks"
            )
        m, g = self.experts_per_question, self.generations_per_expert
        rewards = []
        for i, example in enumerate(examples):
            candidates = rollout.completions[i * group_size : (i + 1) * group_size]
            chosen, weights = self.experts.route(example, m)
            if self.scoring == "partition":
                for b, k in enumerate(chosen):
                    rewards.append(
                        torch.tensor(self.experts.query(k, example["prompt"], candidates[b * g : (b + 1) * g]))
                    )
            else:
                per_expert = torch.tensor([self.experts.query(k, example["prompt"], candidates) for k in chosen])
                rewards.append(combine_expert_rewards(per_expert[None], torch.tensor([weights]))[0])
        out = torch.cat(rewards).float()
        self.tracker.update("rewards/experts/mean", torch.nanmean(out))
        self.tracker.update("rewards/experts/std", nanstd(out))
        self.tracker.update("rewards/experts/abstained", torch.isnan(out).float().mean())
        return out[:, None]

    def rewards_and_advantages(self, rewards_per_func: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        rewards = rewards_per_func[:, 0]
        block = self.generations_per_expert if self.scoring == "partition" else self.num_generations
        advantages, group_std = federated_advantages(
            rewards, self.num_generations, block, self.baseline, self.scale_rewards
        )
        return rewards, advantages, group_std
