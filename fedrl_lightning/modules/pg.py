"""What every policy-gradient algorithm here shares, with TRL's config names and defaults.

One local step: sample completions, score them with the reward functions, build a batch (``make_batch``: the
algorithm's advantages, cached old and reference log-probs), then optimizer steps over that batch in micro-batches
(``optimizer_steps``), each micro-batch's loss from ``training_step``. This base holds the sampling parameters,
scoring, the micro-batch and optimizer-step iteration, the clipped surrogate loss with its aggregation, the k3 KL
term and the vLLM importance correction, and TRL's rollout metrics. A subclass adds its advantage estimation
(``make_batch``) and its loss (``training_step``): ``GRPOModule`` group-relative advantages, ``PPOModule`` a value
model and GAE.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Self

import lightning as L
import torch
from torch import Tensor

from fedrl_lightning.errors import StopFederation
from fedrl_lightning.losses import (
    LossType,
    aggregate_loss,
    clip_ratio_stats,
    grpo_per_token_loss,
    importance_sampling_weights,
    mask_truncated,
    masked_mean,
)
from fedrl_lightning.modules.policy import PolicyModule
from fedrl_lightning.rewards import TrainerState, accuracy_reward, compute_rewards, reward_func_name, reward_inputs
from fedrl_lightning.rollout import Rollout, SamplingParams

RewardFunc = Callable[..., list]
ImportanceSamplingMode = Literal["sequence_mask", "sequence_truncate", "token_mask", "token_truncate"]


@dataclass
class PolicyGradientBatch:
    """A scored rollout ready for the loss; every tensor field holds one row per completion.

    Attributes:
        rollout: the completions (N rows).
        advantages: (N,) per completion or (N, C) per token.
        mask: (N, C) loss mask (completion mask, truncated rows zeroed if asked).
        old_log_probs: (N, C) log-probs before the update, or None when the ratio is 1 (one pass over the batch).
        ref_log_probs: (N, C) reference log-probs for the k3 KL term when ``beta > 0``, else None.
        num_items_in_batch: active tokens of the optimizer step's batch (the DAPO normaliser).
        num_micro_batches: how many micro-batches make one optimizer step.
    """

    rollout: Rollout
    advantages: Tensor
    mask: Tensor
    old_log_probs: Tensor | None
    ref_log_probs: Tensor | None
    num_items_in_batch: float
    num_micro_batches: int = 1

    def rows(self, index: slice | Tensor) -> Self:
        """Rows ``index`` of the rollout and of every tensor field; the normalisers are kept."""
        cut = {f.name: v[index] for f in fields(self) if isinstance(v := getattr(self, f.name), Tensor)}
        return replace(self, rollout=self.rollout.select(index), **cut)

    def micro_batches(self, size: int) -> list[Self]:
        """Consecutive micro-batches of ``size`` rows (the last may be shorter) that make one optimizer step."""
        n = len(self.rollout)
        parts = [self.rows(slice(s, min(s + size, n))) for s in range(0, n, size)]
        return [replace(part, num_micro_batches=len(parts)) for part in parts]


class PolicyGradientModule(PolicyModule):
    """A clipped policy-gradient algorithm on a LoRA policy; subclasses define ``make_batch`` and ``training_step``.

    Args:
        reward_funcs: TRL reward functions ``f(prompts, completions, completion_ids, trainer_state, **columns) ->
            list[float | None]`` (dotted paths in YAML; called as ``rewards`` says); None = ``[accuracy_reward]``.
        reward_weights: one weight per reward function; None = all 1.
        accuracy_func: the verifier that defines held-out accuracy (a completion is correct when it scores >= 1);
            None = ``accuracy_reward``.
        num_generations: completions per prompt.
        prompts_per_step: prompts per local step; a step generates ``prompts_per_step * num_generations``.
        micro_batch_size: completions per forward/backward pass (gradients accumulate over micro-batches); None = 16,
            or what ``gradient_accumulation_steps`` implies.
        gradient_accumulation_steps: TRL's name for the micro-batches of one optimizer step: sets ``micro_batch_size``
            to ``prompts_per_step * num_generations / gradient_accumulation_steps`` (which must divide). None =
            ``micro_batch_size`` decides.
        max_completion_length: new tokens per completion at most.
        temperature: sampling temperature (log-probs are computed on logits / temperature, as TRL).
        top_p: nucleus sampling.
        top_k: top-k sampling; None disables it.
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo`` (TRL's normalisations).
        epsilon: lower clip range of the ratio.
        epsilon_high: upper clip range; None = ``epsilon``.
        delta: optional upper cap on the unclipped ratio (two-sided clipping); None disables it.
        beta: k3 KL coefficient toward the reference (the base model: adapter disabled); 0 skips the reference pass.
        num_iterations: optimizer passes over each generated batch (old log-probs are cached when > 1).
        mask_truncated_completions: exclude completions that hit ``max_completion_length`` from the loss.
        log_entropy: compute the mean token entropy metric (costs one pass over the completion logits).
        vllm_importance_sampling_correction: when the rollout carries the sampler's log-probs (vLLM), weight each
            token's loss by the capped ratio trainer / sampler probability (TRL's truncated importance sampling).
        vllm_importance_sampling_mode: ``sequence_mask``, ``sequence_truncate``, ``token_mask`` or ``token_truncate``
            (see ``losses.importance_sampling_weights``).
        vllm_importance_sampling_cap: upper bound of that ratio.
        max_reward_failure_rate: a step where a reward function fails (raises, or returns NaN/inf) on more than
            this share of its samples stops the run (``StopFederation``, exit code 3) instead of training on what is
            left; 1.0 (default) stops only when it fails on every sample. Failures below it are counted as
            ``rewards/<fn>/errors`` and warned about.
        reward_timeout: seconds one reward function's call on a step's batch may take, enforced while it runs (the
            call runs in a forked process and is killed at the limit; its samples count as failed). None = no
            limit, called in process (cheaper).
        **kwargs: the policy's arguments (``model``, ``lora_r``, ``learning_rate``, ...), see ``PolicyModule``.
    """

    # Weight the k3 KL term by the probability ratio (``losses.grpo_per_token_loss``). Off here so that algorithms
    # other than GRPO keep the plain k3 term; ``GRPOModule`` takes it as TRL's ``use_bias_correction_kl`` (default on).
    use_bias_correction_kl: bool = False

    def __init__(
        self,
        reward_funcs: list[RewardFunc] | None = None,
        reward_weights: list[float] | None = None,
        accuracy_func: RewardFunc | None = None,
        num_generations: int = 1,
        prompts_per_step: int = 4,
        micro_batch_size: int | None = None,
        gradient_accumulation_steps: int | None = None,
        max_completion_length: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        loss_type: LossType = "dapo",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        delta: float | None = None,
        beta: float = 0.0,
        num_iterations: int = 1,
        mask_truncated_completions: bool = False,
        log_entropy: bool = True,
        vllm_importance_sampling_correction: bool = True,
        vllm_importance_sampling_mode: ImportanceSamplingMode = "sequence_mask",
        vllm_importance_sampling_cap: float = 3.0,
        max_reward_failure_rate: float = 1.0,
        reward_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        micro_batch_size = resolve_micro_batch_size(
            micro_batch_size, gradient_accumulation_steps, prompts_per_step * num_generations
        )
        for name, value in (
            ("num_generations", num_generations),
            ("prompts_per_step", prompts_per_step),
            ("micro_batch_size", micro_batch_size),
            ("max_completion_length", max_completion_length),
            ("num_iterations", num_iterations),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= max_reward_failure_rate <= 1:
            raise ValueError(f"max_reward_failure_rate must be in [0, 1], got {max_reward_failure_rate}")
        if reward_timeout is not None and not reward_timeout > 0:
            raise ValueError(f"reward_timeout must be > 0 seconds (or null), got {reward_timeout}")
        self.max_reward_failure_rate, self.reward_timeout = max_reward_failure_rate, reward_timeout
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        self.reward_funcs = list(reward_funcs) if reward_funcs else [accuracy_reward]
        if reward_weights is not None and len(reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(reward_weights)} entries but there are {len(self.reward_funcs)} reward_funcs"
            )
        super().__init__(**kwargs)
        self.reward_weights = torch.tensor(reward_weights or [1.0] * len(self.reward_funcs), dtype=torch.float32)
        self.accuracy_func = accuracy_func or accuracy_reward
        self.num_generations, self.prompts_per_step = num_generations, prompts_per_step
        self.micro_batch_size = micro_batch_size
        self.sampling = SamplingParams(num_generations, max_completion_length, temperature, top_p, top_k)
        self.loss_type = loss_type
        self.epsilon, self.epsilon_high, self.delta, self.beta = epsilon, epsilon_high, delta, beta
        self.num_iterations, self.mask_truncated_completions = num_iterations, mask_truncated_completions
        self.log_entropy = log_entropy
        self.is_correction = vllm_importance_sampling_correction
        self.is_mode, self.is_cap = vllm_importance_sampling_mode, vllm_importance_sampling_cap
        self.trainer_state = TrainerState()  # the reward functions' trainer_state; ``score`` advances its step

    def eval_sampling(self) -> SamplingParams:
        """Greedy, one completion per prompt."""
        return replace(self.sampling, num_generations=1, temperature=0.0)

    # -- scoring and the batch -----------------------------------------------------------------------------------

    def score(self, rollout: Rollout, examples: list[dict[str, Any]], group_size: int) -> Tensor:
        """Rewards (N, K) of a rollout; ``examples`` are the prompts' rows, each repeated ``group_size`` times."""
        prompts, columns = expand_columns(examples, group_size)
        completions, ids = reward_inputs(prompts, rollout)
        state = self.trainer_state
        self.trainer_state = replace(state, global_step=state.global_step + 1)  # TRL's step: one per local step
        kwargs = dict(timeout=self.reward_timeout, completion_ids=ids, trainer_state=state)
        rewards, errors = compute_rewards(self.reward_funcs, prompts, completions, columns, **kwargs)
        for k, fn in enumerate(self.reward_funcs):
            name = reward_func_name(fn)
            self.tracker.update(f"rewards/{name}/mean", torch.nanmean(rewards[:, k]))
            self.tracker.update(f"rewards/{name}/std", nanstd(rewards[:, k]))
            if errors.get(name):
                self.tracker.update(f"rewards/{name}/errors", errors[name])
                rate = errors[name] / max(1, len(completions))
                if rate >= 1.0 or rate > self.max_reward_failure_rate:
                    raise StopFederation(
                        f"reward function {name!r} failed on {errors[name]} of {len(completions)} samples of a step "
                        f"(max_reward_failure_rate {self.max_reward_failure_rate}); see the warnings above"
                    )
        # The round's rollout accuracy (a task-aware server weighs clients by it).
        k = next((k for k, fn in enumerate(self.reward_funcs) if fn is self.accuracy_func), None)
        if k is None:
            correct = compute_rewards([self.accuracy_func], prompts, completions, columns, **kwargs)[0][:, 0]
        else:
            correct = rewards[:, k]
        self.tracker.update("accuracy", (correct.nan_to_num(0.0) >= 1.0).float().mean())
        return rewards

    def make_batch(self, rollout: Rollout, rewards_per_func: Tensor) -> PolicyGradientBatch:
        """The algorithm's advantages and cached log-probs of a scored rollout (rewards (N, K) from ``score``)."""
        raise NotImplementedError(f"{type(self).__name__} must define make_batch")

    def loss_mask(self, rollout: Rollout) -> Tensor:
        """(N, C) completion mask, with truncated completions zeroed when ``mask_truncated_completions``."""
        if self.mask_truncated_completions:
            return mask_truncated(rollout.completion_mask, rollout.is_truncated)
        return rollout.completion_mask

    # -- iteration over a batch ----------------------------------------------------------------------------------

    def optimizer_steps(self, batch: PolicyGradientBatch) -> Iterator[list[PolicyGradientBatch]]:
        """Micro-batches of each optimizer step: ``num_iterations`` passes, each over ``mini_batches(batch)``."""
        for _ in range(self.num_iterations):
            for mini_batch in self.mini_batches(batch):
                yield mini_batch.micro_batches(self.micro_batch_size)

    def mini_batches(self, batch: PolicyGradientBatch) -> list[PolicyGradientBatch]:
        """The optimizer steps of one pass over ``batch``: here one, over the whole batch."""
        return [batch]

    def chunks(self, args: tuple[Tensor, ...]) -> Iterator[tuple[Tensor, ...]]:
        """``args`` cut along the batch into ``micro_batch_size`` rows at a time."""
        n, size = args[0].shape[0], self.micro_batch_size
        for s in range(0, n, size):
            yield tuple(a[s : s + size] for a in args)

    def chunked(self, fn: Callable[..., Tensor], args: tuple[Tensor, ...]) -> Tensor:
        """``fn(*args)`` computed ``micro_batch_size`` rows at a time and concatenated."""
        return torch.cat([fn(*chunk) for chunk in self.chunks(args)])

    def rollout_reference_log_probs(self, rollout: Rollout) -> Tensor:
        """(N, C) log-probs of a rollout's completions under the KL reference (``reference_log_probs``) at the
        sampling temperature, ``micro_batch_size`` rows at a time."""
        temperature = self.sampling.temperature
        return self.chunked(lambda *a: self.reference_log_probs(*a, temperature=temperature), model_inputs(rollout))

    # -- the loss of one micro-batch -----------------------------------------------------------------------------

    def backward_step(self, fabric: L.Fabric, batch: PolicyGradientBatch) -> None:
        """Loss and backward of one micro-batch (an algorithm with several objectives may backpropagate each); the
        forward under the trainer's precision (``fabric.autocast``), the backward outside it."""
        with fabric.autocast():
            loss = self.training_step(batch)
        fabric.backward(loss)

    def policy_log_probs(self, batch: PolicyGradientBatch) -> tuple[Tensor, Tensor]:
        """(log-probs with grad, old log-probs) of a micro-batch's completions, both (B, C); logs the entropy."""
        log_probs, entropy = self.completion_log_probs(
            *model_inputs(batch.rollout), temperature=self.sampling.temperature, with_entropy=self.log_entropy
        )
        if entropy is not None:
            self.tracker.update("entropy", masked_mean(entropy.detach(), batch.mask), float(batch.mask.sum()))
        old = batch.old_log_probs if batch.old_log_probs is not None else log_probs.detach()
        return log_probs, old

    def policy_loss(
        self, batch: PolicyGradientBatch, log_probs: Tensor, old: Tensor, advantages: Tensor, log: bool = True
    ) -> Tensor:
        """The clipped, KL-penalised, importance-corrected loss of a micro-batch for ``advantages`` (B,) or (B, C)."""
        sampled = batch.rollout.sampling_log_probs
        weights = None
        if self.is_correction and sampled is not None:
            weights = self.importance_weights(old, sampled, batch.mask, log)
        per_token, ratio, kl = grpo_per_token_loss(
            log_probs,
            old,
            advantages,
            ref_log_probs=batch.ref_log_probs,
            beta=self.beta,
            epsilon_low=self.epsilon,
            epsilon_high=self.epsilon_high,
            delta=self.delta,
            importance_weights=weights,  # the surrogate's only, not the KL term's (TRL)
            use_bias_correction_kl=self.use_bias_correction_kl,
        )
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
    def importance_weights(self, old: Tensor, sampled: Tensor, mask: Tensor, log: bool = True) -> Tensor:
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

    # -- metrics -------------------------------------------------------------------------------------------------

    def log_rollout(self, rollout: Rollout, rewards: Tensor, group_std: Tensor | None = None) -> None:
        """TRL's rollout metrics: the scalar rewards (N,), the spread within groups (N / G,) when given, lengths."""
        lengths = rollout.completion_mask.sum(dim=1).float()
        terminated = lengths[~rollout.is_truncated]
        t = self.tracker
        t.update("reward", torch.nanmean(rewards))
        t.update("reward_std", nanstd(rewards))
        if group_std is not None:
            t.update("frac_reward_zero_std", (group_std.nan_to_num(0.0) == 0).float().mean())
        t.update("completions/mean_length", lengths.mean())
        t.update("completions/min_length", lengths.min())
        t.update("completions/max_length", lengths.max())
        t.update("completions/clipped_ratio", rollout.is_truncated.float().mean())
        if len(terminated):
            t.update("completions/mean_terminated_length", terminated.mean())
        t.update("num_tokens", float(rollout.completion_mask.sum() + rollout.prompt_mask.sum()))


def resolve_micro_batch_size(micro_batch_size: int | None, accumulation_steps: int | None, rows: int) -> int:
    """The micro-batch size from either key: TRL's ``gradient_accumulation_steps`` splits a step's ``rows``
    completions into that many micro-batches; without it ``micro_batch_size`` (default 16) holds."""
    if accumulation_steps is None:
        return 16 if micro_batch_size is None else micro_batch_size
    if accumulation_steps < 1 or rows % accumulation_steps:
        raise ValueError(
            f"gradient_accumulation_steps must be >= 1 and divide prompts_per_step * num_generations = {rows}, "
            f"got {accumulation_steps}"
        )
    size = rows // accumulation_steps
    if micro_batch_size is not None and micro_batch_size != size:
        raise ValueError(
            f"micro_batch_size {micro_batch_size} and gradient_accumulation_steps {accumulation_steps} disagree "
            f"({rows} completions per step / {accumulation_steps} = {size}); set one of them"
        )
    return size


def expand_columns(examples: list[dict[str, Any]], group_size: int) -> tuple[list[Any], dict[str, list[Any]]]:
    """Repeat each example ``group_size`` times: (prompts, {column: values}) aligned with the completions."""
    rows = [ex for ex in examples for _ in range(group_size)]
    keys = [k for k in examples[0] if k != "prompt"] if examples else []
    return [ex["prompt"] for ex in rows], {k: [ex.get(k) for ex in rows] for k in keys}


def model_inputs(rollout: Rollout) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(prompt_ids, prompt_mask, completion_ids, completion_mask)``: what scores a rollout's completions."""
    return rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask


def nanstd(x: Tensor) -> Tensor:
    """Sample standard deviation of the non-NaN entries of ``x``; 0 with fewer than two."""
    x = x[~torch.isnan(x)]
    return x.std() if x.numel() > 1 else torch.tensor(0.0)


__all__ = [
    "ImportanceSamplingMode",
    "PolicyGradientBatch",
    "PolicyGradientModule",
    "RewardFunc",
    "expand_columns",
    "model_inputs",
    "nanstd",
]
