"""GRPO as a LightningModule: TRL's config names and defaults, the pure losses in ``losses.py``.

One local step: generate G completions per prompt, score them, turn rewards into group-relative advantages,
then ``num_iterations`` optimizer steps over that batch in micro-batches. The ``training_step`` of one
micro-batch is the whole of the algorithm; the loop around it lives in ``client.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from fedrl_lightning.losses import (
    aggregate_loss,
    clip_ratio_stats,
    group_advantages,
    grpo_per_token_loss,
    importance_sampling_weights,
    mask_truncated,
    masked_mean,
    weighted_reward_sum,
)
from fedrl_lightning.modules.policy import PolicyModule
from fedrl_lightning.rewards import accuracy_reward, compute_rewards, reward_func_name
from fedrl_lightning.rollout import Rollout, SamplingParams

RewardFunc = Callable[..., list]


@dataclass
class GRPOBatch:
    """A scored rollout ready for the loss; ``select`` cuts micro-batches.

    Attributes:
        rollout: the completions (N rows).
        advantages: (N,) group-relative advantages.
        mask: (N, C) loss mask (completion mask, truncated rows zeroed if asked).
        old_log_probs: (N, C) log-probs before the update when ``num_iterations > 1``, else None.
        ref_log_probs: (N, C) reference (adapter disabled) log-probs when ``beta > 0``, else None.
        num_items_in_batch: active tokens of the whole batch (the DAPO normaliser).
        num_micro_batches: how many micro-batches make one optimizer step.
        objective_advantages: (N, K) per-objective advantages for multi-objective algorithms (FedMOA), else None.
    """

    rollout: Rollout
    advantages: Tensor
    mask: Tensor
    old_log_probs: Tensor | None
    ref_log_probs: Tensor | None
    num_items_in_batch: float
    num_micro_batches: int = 1
    objective_advantages: Tensor | None = None

    def micro_batches(self, size: int) -> list[GRPOBatch]:
        n = len(self.rollout)
        starts = range(0, n, size)
        out = []
        for s in starts:
            idx = slice(s, min(s + size, n))
            out.append(
                replace(
                    self,
                    rollout=self.rollout.select(idx),
                    advantages=self.advantages[idx],
                    mask=self.mask[idx],
                    old_log_probs=None if self.old_log_probs is None else self.old_log_probs[idx],
                    ref_log_probs=None if self.ref_log_probs is None else self.ref_log_probs[idx],
                    objective_advantages=None if self.objective_advantages is None else self.objective_advantages[idx],
                    num_micro_batches=len(starts),
                )
            )
        return out


class GRPOModule(PolicyModule):
    """Group Relative Policy Optimisation on a LoRA policy, with TRL's ``GRPOConfig`` names and semantics.

    Args:
        reward_funcs: reward functions ``f(prompts, completions, **columns) -> list[float | None]`` (dotted paths
            in YAML); None = ``[accuracy_reward]``.
        reward_weights: one weight per reward function; None = all 1.
        accuracy_func: the verifier that defines held-out accuracy (a completion is correct when it scores >= 1);
            None = ``accuracy_reward``.
        num_generations: completions per prompt (G), >= 2.
        prompts_per_step: prompts per local step; a step generates ``prompts_per_step * num_generations``.
        micro_batch_size: completions per forward/backward pass (gradients accumulate over micro-batches).
        max_completion_length: new tokens per completion at most.
        temperature: sampling temperature (log-probs are computed on logits / temperature, as TRL).
        top_p: nucleus sampling.
        top_k: top-k sampling; None disables it.
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo`` (TRL's normalisations).
        scale_rewards: ``group``, ``batch`` or ``none`` (Dr. GRPO): what the centred reward is divided by.
        epsilon: lower clip range of the ratio.
        epsilon_high: upper clip range; None = ``epsilon``.
        delta: optional upper cap on the unclipped ratio (two-sided clipping); None disables it.
        beta: k3 KL coefficient toward the base model (adapter disabled); 0 skips the reference pass.
        num_iterations: optimizer passes over each generated batch (old log-probs are cached when > 1).
        mask_truncated_completions: exclude completions that hit ``max_completion_length`` from the loss.
        log_entropy: compute the mean token entropy metric (costs one pass over the completion logits).
        vllm_importance_sampling_correction: when the rollout carries the sampler's log-probs (vLLM), weight each
            token's loss by the capped ratio trainer / sampler probability (TRL's truncated importance sampling).
        vllm_importance_sampling_mode: ``sequence_mask``, ``sequence_truncate``, ``token_mask`` or ``token_truncate``
            (see ``losses.importance_sampling_weights``).
        vllm_importance_sampling_cap: upper bound of that ratio.
        **kwargs: the policy's arguments (``model``, ``lora_r``, ``learning_rate``, ...), see ``PolicyModule``.
    """

    group_relative = True
    """Advantages compare completions of one prompt (so each prompt needs at least 2)."""

    def __init__(
        self,
        reward_funcs: list[RewardFunc] | None = None,
        reward_weights: list[float] | None = None,
        accuracy_func: RewardFunc | None = None,
        num_generations: int = 8,
        prompts_per_step: int = 4,
        micro_batch_size: int = 16,
        max_completion_length: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        delta: float | None = None,
        beta: float = 0.0,
        num_iterations: int = 1,
        mask_truncated_completions: bool = False,
        log_entropy: bool = True,
        vllm_importance_sampling_correction: bool = True,
        vllm_importance_sampling_mode: Literal[
            "sequence_mask", "sequence_truncate", "token_mask", "token_truncate"
        ] = "sequence_mask",
        vllm_importance_sampling_cap: float = 3.0,
        **kwargs: Any,
    ) -> None:
        if num_generations < (2 if self.group_relative else 1):
            raise ValueError(f"num_generations must be >= 2 (group-relative advantages), got {num_generations}")
        for name, value in (
            ("prompts_per_step", prompts_per_step),
            ("micro_batch_size", micro_batch_size),
            ("max_completion_length", max_completion_length),
            ("num_iterations", num_iterations),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.reward_funcs = list(reward_funcs) if reward_funcs else [accuracy_reward]
        if reward_weights is not None and len(reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(reward_weights)} entries but there are {len(self.reward_funcs)} reward_funcs"
            )
        super().__init__(**kwargs)
        self.reward_weights = torch.tensor(reward_weights or [1.0] * len(self.reward_funcs), dtype=torch.float32)
        self.accuracy_func = accuracy_func or accuracy_reward
        self.num_generations, self.prompts_per_step, self.micro_batch_size = (
            num_generations,
            prompts_per_step,
            micro_batch_size,
        )
        self.sampling = SamplingParams(num_generations, max_completion_length, temperature, top_p, top_k)
        self.loss_type, self.scale_rewards = loss_type, scale_rewards
        self.epsilon, self.epsilon_high, self.delta, self.beta = epsilon, epsilon_high, delta, beta
        self.num_iterations, self.mask_truncated_completions = num_iterations, mask_truncated_completions
        self.log_entropy = log_entropy
        self.is_correction, self.is_mode, self.is_cap = (
            vllm_importance_sampling_correction,
            vllm_importance_sampling_mode,
            vllm_importance_sampling_cap,
        )

    def eval_sampling(self) -> SamplingParams:
        """Greedy, one completion per prompt."""
        return replace(self.sampling, num_generations=1, temperature=0.0)

    # -- scoring -----------------------------------------------------------------------------------------------

    def score(self, rollout: Rollout, examples: list[dict[str, Any]], group_size: int) -> Tensor:
        """Rewards (N, K) of a rollout; ``examples`` are the prompts' rows, each repeated ``group_size`` times."""
        prompts, columns = expand_columns(examples, group_size)
        completions = [[{"role": "assistant", "content": text}] for text in rollout.completions]
        rewards, errors = compute_rewards(self.reward_funcs, prompts, completions, columns)
        for k, fn in enumerate(self.reward_funcs):
            name = reward_func_name(fn)
            self.tracker.update(f"rewards/{name}/mean", torch.nanmean(rewards[:, k]))
            self.tracker.update(f"rewards/{name}/std", _nanstd(rewards[:, k]))
            if errors.get(name):
                self.tracker.update(f"rewards/{name}/errors", errors[name])
        # The round's rollout accuracy (a task-aware server weighs clients by it).
        k = next((k for k, fn in enumerate(self.reward_funcs) if fn is self.accuracy_func), None)
        correct = (
            rewards[:, k]
            if k is not None
            else compute_rewards([self.accuracy_func], prompts, completions, columns)[0][:, 0]
        )
        self.tracker.update("accuracy", (correct.nan_to_num(0.0) >= 1.0).float().mean())
        return rewards

    def make_batch(self, rollout: Rollout, rewards_per_func: Tensor) -> GRPOBatch:
        """Advantages, loss mask, cached old and reference log-probs; logs TRL's rollout metrics."""
        rewards, advantages, group_std = self.rewards_and_advantages(rewards_per_func)
        mask = rollout.completion_mask
        if self.mask_truncated_completions:
            mask = mask_truncated(mask, rollout.is_truncated)
        old = ref = None
        args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
        if self.num_iterations > 1:  # with one pass the ratio is exactly 1: no need to recompute
            with torch.no_grad():
                old = self._chunked(
                    lambda *a: self.completion_log_probs(*a, temperature=self.sampling.temperature)[0], args
                )
        if self.beta > 0:
            ref = self._chunked(lambda *a: self.reference_log_probs(*a, temperature=self.sampling.temperature), args)
        self._log_rollout(rollout, rewards, group_std)
        return GRPOBatch(rollout, advantages, mask, old, ref, float(mask.sum()))

    def rewards_and_advantages(self, rewards_per_func: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Scalar rewards (N,), advantages (N,) and group stds (N / G,) or None; subclasses change the baseline."""
        rewards = weighted_reward_sum(rewards_per_func, self.reward_weights)
        advantages, group_std = group_advantages(rewards, self.num_generations, self.scale_rewards)
        return rewards, advantages, group_std

    def optimizer_steps(self, batch: GRPOBatch) -> Iterator[list[GRPOBatch]]:
        """Micro-batches of each optimizer step over a generated batch: the whole batch, ``num_iterations`` times."""
        for _ in range(self.num_iterations):
            yield batch.micro_batches(self.micro_batch_size)

    def _chunks(self, args: tuple[Tensor, ...]) -> Iterator[tuple[Tensor, ...]]:
        """``args`` cut along the batch into ``micro_batch_size`` rows at a time."""
        n, size = args[0].shape[0], self.micro_batch_size
        for s in range(0, n, size):
            yield tuple(a[s : s + size] for a in args)

    def _chunked(self, fn: Callable[..., Tensor], args: tuple[Tensor, ...]) -> Tensor:
        return torch.cat([fn(*chunk) for chunk in self._chunks(args)])

    def _log_rollout(self, rollout: Rollout, rewards: Tensor, group_std: Tensor | None = None) -> None:
        lengths = rollout.completion_mask.sum(dim=1).float()
        terminated = lengths[~rollout.is_truncated]
        t = self.tracker
        t.update("reward", torch.nanmean(rewards))
        t.update("reward_std", _nanstd(rewards))
        if group_std is not None:
            t.update("frac_reward_zero_std", (group_std.nan_to_num(0.0) == 0).float().mean())
        t.update("completions/mean_length", lengths.mean())
        t.update("completions/min_length", lengths.min())
        t.update("completions/max_length", lengths.max())
        t.update("completions/clipped_ratio", rollout.is_truncated.float().mean())
        if len(terminated):
            t.update("completions/mean_terminated_length", terminated.mean())
        t.update("num_tokens", float(rollout.completion_mask.sum() + rollout.prompt_mask.sum()))

    # -- the loss of one micro-batch ---------------------------------------------------------------------------

    def training_step(self, batch: GRPOBatch, batch_idx: int = 0) -> Tensor:
        log_probs, old = self.policy_log_probs(batch)
        loss = self.policy_loss(batch, log_probs, old, batch.advantages)
        # Scaled back so the logged value is the loss of the whole batch whatever the micro-batching.
        self.tracker.update("loss", loss.detach() * batch.num_micro_batches)
        return loss

    def policy_log_probs(self, batch: GRPOBatch) -> tuple[Tensor, Tensor]:
        """(log-probs with grad, old log-probs) of a micro-batch's completions, both (B, C); logs the entropy."""
        r = batch.rollout
        log_probs, entropy = self.completion_log_probs(
            r.prompt_ids,
            r.prompt_mask,
            r.completion_ids,
            r.completion_mask,
            temperature=self.sampling.temperature,
            with_entropy=self.log_entropy,
        )
        if entropy is not None:
            self.tracker.update("entropy", masked_mean(entropy.detach(), batch.mask), float(batch.mask.sum()))
        old = batch.old_log_probs if batch.old_log_probs is not None else log_probs.detach()
        return log_probs, old

    def policy_loss(
        self, batch: GRPOBatch, log_probs: Tensor, old: Tensor, advantages: Tensor, log: bool = True
    ) -> Tensor:
        """The clipped, KL-penalised, importance-corrected loss of a micro-batch for ``advantages`` (B,)."""
        per_token, ratio, kl = grpo_per_token_loss(
            log_probs,
            old,
            advantages,
            ref_log_probs=batch.ref_log_probs,
            beta=self.beta,
            epsilon_low=self.epsilon,
            epsilon_high=self.epsilon_high,
            delta=self.delta,
        )
        sampled = batch.rollout.sampling_log_probs
        if self.is_correction and sampled is not None:
            per_token = per_token * self._importance_weights(old, sampled, batch.mask, log)
        loss = aggregate_loss(
            per_token,
            batch.mask,
            self.loss_type,
            max_completion_length=self.sampling.max_completion_length,
            num_items_in_batch=batch.num_items_in_batch,
            num_micro_batches=batch.num_micro_batches,
        )
        if log:
            with torch.no_grad():
                weight = float(batch.mask.sum())
                if kl is not None:
                    self.tracker.update("kl", masked_mean(kl, batch.mask), weight)
                stats = clip_ratio_stats(ratio, advantages, batch.mask, self.epsilon, self.epsilon_high)
                for name, value in stats.items():
                    self.tracker.update(f"clip_ratio/{name}", value, weight)
        return loss

    @torch.no_grad()
    def _importance_weights(self, old: Tensor, sampled: Tensor, mask: Tensor, log: bool = True) -> Tensor:
        """The capped trainer/sampler ratio of the sampled tokens, with TRL's ``sampling/*`` metrics."""
        sampled = sampled.to(old.device)
        weights = importance_sampling_weights(old, sampled, mask, self.is_mode, self.is_cap)
        if not log:
            return weights
        weight = float(mask.sum())
        t = self.tracker
        t.update("sampling/sampling_logp_difference/mean", masked_mean((old - sampled).abs(), mask), weight)
        t.update("sampling/importance_sampling_ratio/mean", weights.mean())
        t.update("sampling/importance_sampling_ratio/min", weights.min())
        t.update("sampling/importance_sampling_ratio/max", weights.max())
        return weights


def expand_columns(examples: list[dict[str, Any]], group_size: int) -> tuple[list[Any], dict[str, list[Any]]]:
    """Repeat each example ``group_size`` times: (prompts, {column: values}) aligned with the completions."""
    rows = [ex for ex in examples for _ in range(group_size)]
    keys = [k for k in examples[0] if k != "prompt"] if examples else []
    return [ex["prompt"] for ex in rows], {k: [ex.get(k) for ex in rows] for k in keys}


def _nanstd(x: Tensor) -> Tensor:
    x = x[~torch.isnan(x)]
    return x.std() if x.numel() > 1 else torch.tensor(0.0)
