"""PPO with a value head: per-token KL-shaped rewards, GAE, clipped policy and value losses, epochs of minibatches.

``research/rl_anchors.md`` §3.7 and ``research/algorithms.md`` §5 (TunePPO). Sampling, rewards, the clipped policy
loss and its aggregation, the k3 KL term and the vLLM importance correction come from ``PolicyGradientModule``; what
PPO adds:

* a scalar value head on the policy's last hidden states (trained with the adapter, federated with it);
* per-token rewards r_t = -kl_coef (log π_old - log π_ref)_t (k1) plus the sequence score on the last token;
* GAE(γ, λ) advantages and returns, whitened advantages, a clipped value loss weighted by ``vf_coef``;
* ``num_iterations`` PPO epochs, each over ``num_mini_batches`` shuffled minibatches (one optimizer step each);
* TunePPO's penalties: a completion with no EOS or shorter than ``min_response_length`` scores ``penalty_score``;
* Federated PPO's reference (optional): a mixture of the peers' snapshots, rebuilt each round from what the server
  sent (``peer_reference``, ``fedrl_lightning.algorithms.fedppo``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from peft import PeftModel
from torch import Tensor, nn

from fedrl_lightning.algorithms.fedppo.mixture import MixtureReference
from fedrl_lightning.algorithms.fedppo.peers import PeerReference
from fedrl_lightning.losses import (
    LossType,
    ScaleRewards,
    clipped_value_loss,
    gae,
    masked_mean,
    masked_whiten,
    weighted_reward_sum,
)
from fedrl_lightning.modules.pg import PolicyGradientBatch, PolicyGradientModule, model_inputs
from fedrl_lightning.rollout import Rollout

log = logging.getLogger(__name__)

VALUE_PREFIX = "value_head."
VALUE_ADAPTER = "value"


@contextmanager
def only_adapter(model: PeftModel, name: str) -> Iterator[None]:
    """Run ``model`` with adapter ``name`` the only active one, then reactivate the previous adapter.

    PEFT's public ``set_adapter`` switches; it also unfreezes the adapter it activates and freezes the others, so
    every parameter's ``requires_grad`` is put back on exit: all adapters keep training.
    """
    previous = model.active_adapter
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for p, flag in requires_grad:
            p.requires_grad_(flag)


@dataclass
class PPOBatch(PolicyGradientBatch):
    """A ``PolicyGradientBatch`` whose advantages are per token, plus the value targets.

    Attributes:
        old_values: (N, C) value predictions at rollout time.
        returns: (N, C) GAE value targets.
    """

    old_values: Tensor | None = None
    returns: Tensor | None = None

    def select(self, index: Tensor) -> PPOBatch:
        """Rows ``index`` as a minibatch of its own (its token count becomes the loss normaliser)."""
        rows = self.rows(index)
        return replace(rows, num_items_in_batch=float(rows.mask.sum()))


class PPOModule(PolicyGradientModule):
    """PPO on a LoRA policy with a scalar value head; rewards from the reward functions (or a reward model).

    A reward model is one more reward function: ``rewards.model.RewardModel(path=...)`` scores prompt + completion
    with any local sequence-classification checkpoint.

    Args:
        num_generations: completions per prompt (1 is plain PPO; more give a larger batch per prompt).
        kl_coef: β_r of the k1 KL penalty in the per-token reward (0 skips the reference pass unless ``beta`` > 0).
        gamma: GAE discount γ.
        lam: GAE λ.
        vf_coef: weight of the value loss.
        cliprange_value: how far the value may move from its rollout-time prediction before clipping.
        num_mini_batches: optimizer steps per PPO epoch (the batch is shuffled and split).
        whiten_advantages: normalise advantages over the batch's tokens.
        penalty_score: the score of a penalised completion (TunePPO: -3).
        penalize_no_eos: penalise completions that hit ``max_completion_length`` without EOS.
        min_response_length: penalise completions with fewer tokens (0 disables).
        value_model: ``head``: the value head reads the policy's own hidden states (one forward pass for both);
            ``lora``: a separate LoRA adapter (the policy's rank and targets) on the same base feeds the head, so
            the value loss never moves the policy's adapter (TunePPO's value model), at one more forward pass.
        peer_reference: Federated PPO: the KL reference of each round is the mixture of the adapter the round
            started from and the peers' snapshots the server sent (``PeerMixture``); with an ordinary aggregator,
            the synced global model. None: the base model.
        num_iterations: PPO epochs over each generated batch.
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo``: TRL's normalisations of the policy loss.
        scale_rewards: unused: PPO normalises its advantages with ``whiten_advantages``. Accepted so that configs
            written while ``PPOModule`` extended ``GRPOModule`` still parse; a value other than ``group`` is logged.
        **kwargs: ``PolicyGradientModule``'s arguments (``epsilon`` is the policy clip range, ``beta`` an optional
            k3 KL term in the loss) and the policy's. Defaults follow TRL's PPO trainer.
    """

    def __init__(
        self,
        num_generations: int = 1,
        kl_coef: float = 0.05,
        gamma: float = 1.0,
        lam: float = 0.95,
        vf_coef: float = 0.1,
        cliprange_value: float = 0.2,
        num_mini_batches: int = 1,
        whiten_advantages: bool = True,
        penalty_score: float = -3.0,
        penalize_no_eos: bool = False,
        min_response_length: int = 0,
        value_model: Literal["head", "lora"] = "head",
        peer_reference: PeerReference | None = None,
        num_iterations: int = 4,
        loss_type: LossType = "bnpo",
        scale_rewards: ScaleRewards = "group",
        **kwargs: Any,
    ) -> None:
        super().__init__(num_generations=num_generations, num_iterations=num_iterations, loss_type=loss_type, **kwargs)
        if scale_rewards != "group":
            log.warning("PPOModule ignores scale_rewards=%r: its advantages are whitened instead", scale_rewards)
        if num_mini_batches < 1 or num_mini_batches > self.prompts_per_step * num_generations:
            raise ValueError(f"num_mini_batches must be in [1, completions per step], got {num_mini_batches}")
        if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
            raise ValueError(f"gamma and lam must be in [0, 1], got {gamma} and {lam}")
        self.kl_coef, self.gamma, self.lam, self.vf_coef = kl_coef, gamma, lam, vf_coef
        self.cliprange_value, self.num_mini_batches = cliprange_value, num_mini_batches
        self.whiten_advantages, self.penalty_score = whiten_advantages, penalty_score
        self.penalize_no_eos, self.min_response_length = penalize_no_eos, min_response_length
        if value_model not in ("head", "lora"):
            raise ValueError(f"value_model must be 'head' or 'lora', got {value_model!r}")
        self.value_model = value_model
        self.peer_reference = peer_reference
        self.round_reference: MixtureReference | None = None  # this round's, from begin_round
        if value_model == "lora":
            with torch.random.fork_rng():  # a deterministic init that leaves the caller's RNG stream alone
                torch.manual_seed(kwargs.get("seed", 0) + 1)
                self.model.add_adapter(VALUE_ADAPTER, copy.deepcopy(self.model.peft_config["default"]))
            for name, p in self.model.named_parameters():  # add_adapter leaves a non-active adapter frozen
                if f".{VALUE_ADAPTER}." in name:
                    p.requires_grad_(True)
        hidden = self.model.get_base_model().config.hidden_size
        self.value_head = nn.Linear(hidden, 1, dtype=next(self.model.parameters()).dtype)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: no value noise in the first advantages
        nn.init.zeros_(self.value_head.bias)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        params = super().trainable_parameters()
        params.update({VALUE_PREFIX + n: p for n, p in self.value_head.named_parameters()})
        return params

    def log_probs_and_values(self, *args: Tensor, with_entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
        """(log-probs (B, C), entropy or None, values (B, C)) of completions (one pass; two with a value LoRA)."""
        shared = self.value_model == "head"
        log_probs, entropy, hidden = self.completion_forward(
            *args, temperature=self.sampling.temperature, with_entropy=with_entropy, with_hidden=shared
        )
        if not shared:
            with only_adapter(self.model, VALUE_ADAPTER):
                hidden = self.completion_forward(*args, with_hidden=True)[2]
        return log_probs, entropy, self.value_head(hidden).squeeze(-1)

    # -- the round's reference ---------------------------------------------------------------------------------

    def begin_round(self, received: Mapping[str, Tensor]) -> None:
        """With a ``peer_reference``: this round's reference from the start adapter and ``received``; logs the
        mixing weights as ``peers/weight_self`` and ``peers/weight_client<j>``."""
        if self.peer_reference is None:
            return
        self.round_reference = self.peer_reference.reference(self.trainable_state(), received)
        for name, w in self.peer_reference.weights(received).items():
            self.tracker.update(f"peers/weight_{name}", w)

    def end_round(self) -> None:
        self.round_reference = None

    @torch.no_grad()
    def reference_log_probs(self, *args: Tensor, temperature: float = 1.0) -> Tensor:
        """Completion log-probs of the KL reference: this round's peer mixture if there is one, else the base
        model's."""
        if self.round_reference is not None:
            return self.round_reference(self, *args, temperature=temperature)
        return super().reference_log_probs(*args, temperature=temperature)

    # -- the batch ---------------------------------------------------------------------------------------------

    def sequence_scores(self, rollout: Rollout, rewards_per_func: Tensor) -> Tensor:
        """(N,) weighted reward per completion, with TunePPO's penalties applied."""
        scores = weighted_reward_sum(rewards_per_func, self.reward_weights).nan_to_num(0.0)
        penalised = torch.zeros_like(scores, dtype=torch.bool)
        if self.penalize_no_eos:
            penalised |= rollout.is_truncated
        if self.min_response_length > 0:
            penalised |= rollout.completion_mask.sum(dim=1) < self.min_response_length
        return torch.where(penalised, torch.full_like(scores, self.penalty_score), scores)

    @torch.no_grad()
    def make_batch(self, rollout: Rollout, rewards_per_func: Tensor) -> PPOBatch:
        """Old log-probs and values, reference log-probs, KL-shaped per-token rewards, GAE; logs PPO's metrics."""
        scores = self.sequence_scores(rollout, rewards_per_func)
        mask = rollout.completion_mask
        parts = [self.log_probs_and_values(*a) for a in self.chunks(model_inputs(rollout))]
        old = torch.cat([p[0] for p in parts])
        values = torch.cat([p[2] for p in parts]).float()
        ref = self.rollout_reference_log_probs(rollout) if self.kl_coef > 0 or self.beta > 0 else None
        kl = (old - ref) * mask if ref is not None else torch.zeros_like(old)
        token_rewards = -self.kl_coef * kl
        last = (mask.sum(dim=1) - 1).clamp(min=0)
        token_rewards[torch.arange(len(scores)), last] += scores.to(token_rewards.dtype)
        advantages, returns = gae(token_rewards, values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        t = self.tracker
        t.update("objective/scores", scores.mean())
        t.update("objective/kl", kl.sum(dim=1).mean())
        t.update("objective/non_score_reward", token_rewards.sum(dim=1).mean() - scores.mean())
        t.update("objective/rlhf_reward", token_rewards.sum(dim=1).mean())
        t.update("val/mean", masked_mean(values, mask))
        self.log_rollout(rollout, scores)
        return PPOBatch(
            rollout,
            advantages,
            self.loss_mask(rollout),
            old,
            ref if self.beta > 0 else None,
            float(mask.sum()),
            old_values=values,
            returns=returns,
        )

    def mini_batches(self, batch: PPOBatch) -> list[PPOBatch]:
        """One PPO epoch (``optimizer_steps`` runs ``num_iterations``): the batch shuffled into ``num_mini_batches``
        optimizer steps."""
        return [batch.select(chunk) for chunk in torch.randperm(len(batch.rollout)).chunk(self.num_mini_batches)]

    # -- the loss of one micro-batch ---------------------------------------------------------------------------

    def training_step(self, batch: PPOBatch, batch_idx: int = 0) -> Tensor:
        inputs = model_inputs(batch.rollout)
        log_probs, entropy, values = self.log_probs_and_values(*inputs, with_entropy=self.log_entropy)
        weight = float(batch.mask.sum())
        if entropy is not None:
            self.tracker.update("entropy", masked_mean(entropy, batch.mask), weight)
        policy_loss = self.policy_loss(batch, log_probs, batch.old_log_probs, batch.advantages)
        value_loss = clipped_value_loss(values, batch.old_values, batch.returns, batch.mask, self.cliprange_value)
        # The value loss is a per-micro-batch mean: divide so accumulation over micro-batches averages it.
        loss = policy_loss + self.vf_coef * value_loss / batch.num_micro_batches
        with torch.no_grad():
            clipped = (values - batch.old_values).abs() > self.cliprange_value
            self.tracker.update("val/clipfrac_avg", masked_mean(clipped.float(), batch.mask), weight)
            self.tracker.update("loss/value_avg", value_loss, weight)
            self.tracker.update("loss/policy_avg", policy_loss * batch.num_micro_batches)
            log_ratio = (log_probs - batch.old_log_probs) * batch.mask
            self.tracker.update("policy/approxkl_avg", masked_mean(0.5 * log_ratio**2, batch.mask), weight)
            self.tracker.update("loss", loss * batch.num_micro_batches)
        return loss


__all__ = ["PPOBatch", "PPOModule", "only_adapter"]
