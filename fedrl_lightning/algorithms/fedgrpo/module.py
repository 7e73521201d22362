"""FedGRPO's server: GRPO on the server's policy, with every training reward bought from expert clients as a float.

The training step is ``GRPOModule``'s (rollout backend, cached old/reference log-probs, the clipped bnpo loss,
``num_iterations`` optimizer passes, TRL's metric names); only the reward and the baseline differ. The reward is an
``ExpertReward`` (a reward function with TRL's signature, ``algorithms/fedgrpo/reward.py``): for each question it
routes the G = g x M candidates to M experts and returns their floats. Advantages are ``pooled`` (each candidate
minus the mean of its question's G rewards, no std: FedGRPO at HEAD) or ``per_expert`` (minus the mean of its
expert's block: the earlier commit). The server never sees a label: ``reward_funcs`` and ``accuracy_func`` serve
only the held-out evaluation, which the experimenter runs.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from fedrl_lightning.algorithms.fedgrpo.advantages import federated_advantages
from fedrl_lightning.algorithms.fedgrpo.reward import ExpertReward
from fedrl_lightning.modules.grpo import GRPOModule
from fedrl_lightning.modules.pg import RewardFunc, expand_columns, nanstd
from fedrl_lightning.rewards import as_completions, format_reward, reasoning_gym_reward, tag_count_reward
from fedrl_lightning.rollout import Rollout


class FedGRPOModule(GRPOModule):
    """The server policy of FedGRPO; its data module is ``FedGRPOData``.

    Args:
        experts: the training reward (experts, selector, M, g, scoring); None = ``ExpertReward()`` defaults.
        baseline: ``pooled`` (mean over all G) or ``per_expert`` (mean over each expert's block; in ``replicate``
            scoring every expert saw the whole group, so both coincide).
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
            and the policy's (``model``, ``lora_r``, ``learning_rate``, ...). ``num_generations`` is the reward's G.
    """

    def __init__(
        self,
        experts: ExpertReward | None = None,
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
        if "num_generations" in kwargs:
            raise ValueError(
                "FedGRPOModule sets num_generations = generations_per_expert x experts_per_question of its experts"
            )
        experts = experts or ExpertReward()
        funcs = reward_funcs or [reasoning_gym_reward, format_reward, tag_count_reward]
        weights = reward_weights or ([8.0, 1.0, 1.0] if reward_funcs is None else None)
        super().__init__(
            reward_funcs=funcs,
            reward_weights=weights,
            accuracy_func=accuracy_func or reasoning_gym_reward,
            num_generations=experts.group_size,
            loss_type=loss_type,
            scale_rewards=scale_rewards,
            epsilon=epsilon,
            epsilon_high=epsilon_high,
            beta=beta,
            num_iterations=num_iterations,
            **kwargs,
        )
        self.experts, self.baseline = experts, baseline

    def setup_data(self, data: L.LightningDataModule) -> None:
        self.experts.connect(data)  # type: ignore[arg-type]  # ExpertReward.connect checks it is FedGRPOData

    # -- scoring: questions and candidates down, floats up --------------------------------------------------------

    def score(self, rollout: Rollout, examples: list[dict[str, Any]], group_size: int) -> Tensor:
        """(N, 1) rewards from the selected experts; each question's rows are ``group_size`` = G contiguous rows."""
        prompts, columns = expand_columns(examples, group_size)
        values = self.experts(prompts, as_completions(prompts, rollout.completions), **columns)
        out = torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float32)
        self.tracker.update("rewards/experts/mean", torch.nanmean(out))
        self.tracker.update("rewards/experts/std", nanstd(out))
        self.tracker.update("rewards/experts/abstained", torch.isnan(out).float().mean())
        step = self.experts.step
        for direction, n in self.experts.bytes_at(step).items():
            self.tracker.update(f"experts/bytes_{direction}", n)
        for key, n in self.experts.routing.get(step, {}).items():
            self.tracker.update(f"experts/routed/{key}", n)
        return out[:, None]

    def rewards_and_advantages(self, rewards_per_func: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        rewards = rewards_per_func[:, 0]
        partition = self.experts.scoring == "partition"
        block = self.experts.generations_per_expert if partition else self.num_generations
        advantages, group_std = federated_advantages(
            rewards, self.num_generations, block, self.baseline, self.scale_rewards
        )
        return rewards, advantages, group_std

    # -- the experts' state is the server's: checkpointed with it, restored before each round -----------------------

    def client_state(self) -> dict[str, Any]:
        return {**super().client_state(), "experts": self.experts.state_dict()}

    def load_client_state(self, state: dict[str, Any]) -> None:
        super().load_client_state(state)
        self.experts.load_state_dict(state.get("experts", {}))
