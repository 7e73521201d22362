"""Tests for fedrl_lightning.losses against hand-computed values."""

import math

import pytest
import torch

from fedrl_lightning.losses import (
    aggregate_loss,
    clip_ratio_stats,
    clipped_surrogate,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    group_advantages,
    grpo_per_token_loss,
    importance_sampling_weights,
    k3_kl,
    mask_truncated,
    masked_mean,
    masked_whiten,
    selective_log_softmax,
    weighted_reward_sum,
)

EPS = 1e-4
NAN = float("nan")


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=1e-5, equal_nan=True
    )


# ------------------------------------------------------------------------------------------------- rewards


def test_weighted_reward_sum_skips_nan_and_keeps_unscorable_nan():
    rewards = torch.tensor([[1.0, NAN], [NAN, NAN], [2.0, 3.0]])
    out = weighted_reward_sum(rewards, torch.tensor([0.5, 2.0]))
    # row 0: 0.5*1 (NaN skipped); row 1: all NaN -> NaN; row 2: 0.5*2 + 2*3 = 7
    close(out, [0.5, NAN, 7.0])
    assert torch.isnan(out[1])


# 2 groups x 3 generations: [1, 2, 3] (mean 2, std 1) and [2, 4, 6] (mean 4, std 2)
REWARDS = torch.tensor([1.0, 2.0, 3.0, 2.0, 4.0, 6.0])


def test_group_advantages_group_scaling():
    adv, std = group_advantages(REWARDS, 3, "group")
    close(std, [1.0, 2.0])
    close(adv, [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), -2 / (2 + EPS), 0.0, 2 / (2 + EPS)])


def test_group_advantages_batch_scaling():
    adv, std = group_advantages(REWARDS, 3, "batch")
    # batch mean 3, squared deviations 4+1+0+1+1+9 = 16, Bessel var 16/5 = 3.2
    s = math.sqrt(3.2)
    close(adv, [-1 / (s + EPS), 0.0, 1 / (s + EPS), -2 / (s + EPS), 0.0, 2 / (s + EPS)])
    close(std, [1.0, 2.0])  # group stds are reported whatever the scaling


def test_group_advantages_no_scaling():
    adv, _ = group_advantages(REWARDS, 3, "none")
    close(adv, [-1.0, 0.0, 1.0, -2.0, 0.0, 2.0])


def test_group_advantages_nan_rows_and_zero_std_groups():
    rewards = torch.tensor([1.0, NAN, 3.0, NAN, 5.0, NAN, NAN, NAN, NAN, 0.1, 0.1, 0.1])
    adv, std = group_advantages(rewards, 3, "group")
    # g0: scorable {1, 3}: mean 2, Bessel std sqrt(2); NaN row -> 0
    # g1: one scorable row -> std 0 -> all 0; g2: all NaN -> 0; g3: constant -> exactly 0
    r2 = math.sqrt(2)
    close(std, [r2, 0.0, 0.0, 0.0])
    close(adv, [-1 / (r2 + EPS), 0.0, 1 / (r2 + EPS)] + [0.0] * 9)
    assert not torch.isnan(adv).any()
    assert (adv[3:] == 0).all()


def test_group_advantages_batch_and_none_with_nan():
    rewards = torch.tensor([1.0, NAN, 3.0, NAN, 5.0, NAN])
    # batch std over scorable {1, 3, 5}: mean 3, var (4+0+4)/2 = 4 -> 2
    adv, _ = group_advantages(rewards, 3, "batch")
    close(adv, [-1 / (2 + EPS), 0.0, 1 / (2 + EPS), 0.0, 0.0, 0.0])
    adv, _ = group_advantages(rewards, 3, "none")
    close(adv, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def test_group_advantages_validation():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(REWARDS, 3, "bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(REWARDS, 4)


# ----------------------------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_matches_full_log_softmax(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    index = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits / temperature, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    close(selective_log_softmax(logits, index, temperature), expected, atol=1e-5)


def test_selective_log_softmax_bf16_upcasts_and_has_grad():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7, dtype=torch.bfloat16, requires_grad=True)
    index = torch.randint(0, 7, (2, 4))
    out = selective_log_softmax(logits, index)
    assert out.dtype == torch.float32 and out.shape == (2, 4)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    close(out, expected.detach(), atol=1e-5)
    out.sum().backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape


def test_selective_log_softmax_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        selective_log_softmax(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), 0.0)


def test_entropy_from_logits():
    ninf = float("-inf")
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, ninf, ninf, ninf], [0.0, math.log(3), ninf, ninf]]])
    # uniform over 4 -> ln 4; one allowed token -> 0; p = (1/4, 3/4) -> 0.25 ln 4 + 0.75 ln(4/3) = 0.562335
    close(entropy_from_logits(logits), [[math.log(4), 0.0, 0.5623351446]])
    # temperature 2 on doubled logits gives the same distribution
    close(entropy_from_logits(2 * logits, temperature=2.0), [[math.log(4), 0.0, 0.5623351446]])


# ---------------------------------------------------------------------------------------------- GRPO terms


def test_k3_kl_value_and_zero():
    logp = torch.log(torch.tensor([[0.5, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.3]]))
    # d = ln(0.25/0.5) = -ln 2: exp(d) - d - 1 = 0.5 + 0.693147 - 1 = 0.193147; equal log-probs -> 0
    close(k3_kl(logp, ref), [[0.5 + math.log(2) - 1, 0.0]])
    assert (k3_kl(ref, logp) >= 0).all()


RATIOS = torch.tensor([[0.5, 0.8, 1.0, 1.2, 1.5]])


def surrogate(ratios, adv, **kw):
    return clipped_surrogate(torch.log(ratios), torch.zeros_like(ratios), torch.tensor([adv]), **kw)


def test_clipped_surrogate_symmetric():
    loss, ratio = surrogate(RATIOS, 1.0)
    close(ratio, RATIOS)
    # A > 0: -min(r, clip(r, 0.8, 1.2)) -> upper clip binds at 1.5, lower never binds
    close(loss, [[-0.5, -0.8, -1.0, -1.2, -1.2]])
    loss, _ = surrogate(RATIOS, -1.0)
    # A < 0: max(r, clip(r)) -> lower clip binds at 0.5, upper never binds
    close(loss, [[0.8, 0.8, 1.0, 1.2, 1.5]])
    loss, _ = surrogate(RATIOS, 2.0)
    close(loss, [[-1.0, -1.6, -2.0, -2.4, -2.4]])


def test_clipped_surrogate_asymmetric_epsilon_high():
    ratios = torch.tensor([[0.7, 1.25, 1.5]])
    loss, _ = surrogate(ratios, 1.0, epsilon_high=0.28)
    close(loss, [[-0.7, -1.25, -1.28]])
    loss, _ = surrogate(ratios, -1.0, epsilon_high=0.28)
    close(loss, [[0.8, 1.25, 1.5]])  # lower bound still 1 - 0.2


def test_clipped_surrogate_delta_caps_unclipped_branch():
    ratios = torch.tensor([[1.3, 2.0]])
    loss, ratio = surrogate(ratios, -1.0, delta=1.4)
    close(loss, [[1.3, 1.4]])  # max(min(r, 1.4), clip(r)) for A < 0
    close(ratio, ratios)  # returned ratio is uncapped
    loss, _ = surrogate(ratios, -1.0)
    close(loss, [[1.3, 2.0]])
    loss, _ = surrogate(ratios, 1.0, delta=1.4)
    close(loss, [[-1.2, -1.2]])  # for A > 0 the 1 + eps clip is below delta anyway


def test_clipped_tokens_get_zero_gradient():
    ratios = torch.tensor([[0.5, 1.5, 0.5, 1.5, 2.0]])
    logp = torch.log(ratios).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0]])  # (B, T) advantages are accepted too
    loss, _ = clipped_surrogate(logp, torch.zeros_like(logp), adv, delta=1.8)
    loss.sum().backward()
    # d(-r A)/d logp = -r A where unclipped; 0 where the clip (or delta cap) binds
    close(logp.grad, [[-0.5, 0.0, 0.0, 1.5, 0.0]])


def test_clip_ratio_stats():
    ratio = torch.tensor([[0.5, 1.5, 1.0], [0.5, 1.5, 0.7]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    stats = clip_ratio_stats(ratio, adv, mask)
    # 5 active tokens: high-clipped (0, 1) [A > 0]; low-clipped (1, 0) [A < 0]; (1, 2) is masked;
    # (0, 0) and (1, 1) are past a bound on the side where the clip does not bind
    close(stats["low_mean"], 0.2)
    close(stats["high_mean"], 0.2)
    close(stats["region_mean"], 0.4)
    stats = clip_ratio_stats(ratio, adv, mask, epsilon_high=0.6)
    close(stats["high_mean"], 0.0)
    close(clip_ratio_stats(ratio, adv, torch.zeros(2, 3))["region_mean"], 0.0)


# ----------------------------------------------------------------------------------------------- aggregation

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])  # active: 1, 2 | 4 -> sum 7 over 3 tokens


def test_aggregate_grpo():
    # per-sequence means (1+2)/2 = 1.5 and 4/1 = 4 -> 2.75
    close(aggregate_loss(LOSS, MASK, "grpo"), 2.75)
    close(aggregate_loss(LOSS, MASK, "grpo", num_micro_batches=2), 1.375)
    # fully masked sequence counts as 0, not NaN: (1.5 + 0) / 2
    close(aggregate_loss(LOSS, torch.tensor([[1, 1, 0], [0, 0, 0]]), "grpo"), 0.75)


def test_aggregate_bnpo():
    close(aggregate_loss(LOSS, MASK, "bnpo"), 7 / 3)
    close(aggregate_loss(LOSS, MASK, "bnpo", num_micro_batches=2), 7 / 6)
    close(aggregate_loss(LOSS, torch.zeros(2, 3), "bnpo"), 0.0)


def test_aggregate_dr_grpo():
    close(aggregate_loss(LOSS, MASK, "dr_grpo", max_completion_length=4), 7 / 8)  # 7 / (2 * 4)
    close(aggregate_loss(LOSS, MASK, "dr_grpo", max_completion_length=4, num_micro_batches=2), 7 / 16)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_loss(LOSS, MASK, "dr_grpo")


def test_aggregate_dapo():
    close(aggregate_loss(LOSS, MASK, "dapo"), 7 / 3)  # defaults to the local token count
    close(aggregate_loss(LOSS, MASK, "dapo", num_items_in_batch=10), 0.7)
    close(aggregate_loss(LOSS, MASK, "dapo", num_items_in_batch=10, num_micro_batches=4), 0.7)
    close(aggregate_loss(LOSS, torch.zeros(2, 3), "dapo", num_items_in_batch=0), 0.0)


def test_dapo_micro_batches_sum_to_global_token_mean():
    loss2 = torch.tensor([[7.0, 8.0, 9.0], [10.0, 11.0, 12.0]])
    mask2 = torch.tensor([[1, 1, 1], [0, 0, 0]])  # sum 24 over 3 tokens
    total = aggregate_loss(LOSS, MASK, "dapo", num_items_in_batch=6) + aggregate_loss(
        loss2, mask2, "dapo", num_items_in_batch=6
    )
    close(total, 31 / 6)
    close(total, aggregate_loss(torch.cat([LOSS, loss2]), torch.cat([MASK, mask2]), "bnpo"))


def test_aggregate_unknown_loss_type():
    with pytest.raises(ValueError, match="grpo.*bnpo.*dr_grpo.*dapo"):
        aggregate_loss(LOSS, MASK, "cispo")  # type: ignore[arg-type]


def test_mask_truncated():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    out = mask_truncated(mask, torch.tensor([False, True, False]))
    assert torch.equal(out, torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]]))


def test_grpo_per_token_loss_with_kl_and_importance_weights():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    adv = torch.tensor([2.0])
    kl0 = 0.5 + math.log(2) - 1  # 0.193147, see test_k3_kl_value_and_zero
    # ratio 1 -> surrogate -2 per token; + 0.1 * KL
    loss, ratio, kl = grpo_per_token_loss(logp, logp, adv, ref, beta=0.1)
    close(ratio, [[1.0, 1.0]])
    close(kl, [[kl0, 0.0]])
    close(loss, [[-2 + 0.1 * kl0, -2.0]])
    # IS weights scale the surrogate only: -2 * 0.5 + 0.1 * KL
    loss, _, _ = grpo_per_token_loss(logp, logp, adv, ref, beta=0.1, importance_weights=torch.tensor([[0.5]]))
    close(loss, [[-1 + 0.1 * kl0, -1.0]])
    # beta 0: KL reported but not added; no reference -> None
    loss, _, kl = grpo_per_token_loss(logp, logp, adv, ref)
    close(loss, [[-2.0, -2.0]])
    assert kl is not None
    assert grpo_per_token_loss(logp, logp, adv)[2] is None
    with pytest.raises(ValueError, match="ref_log_probs"):
        grpo_per_token_loss(logp, logp, adv, beta=0.1)


def test_bias_correction_kl_weights_the_kl_by_the_ratio_and_gives_the_reverse_kl_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    kl0 = 0.5 + math.log(2) - 1
    zero = torch.tensor([0.0])  # no surrogate: the loss is the KL term alone
    # off-policy, ratio [2, 1]: the KL term is 0.1 * k3 * ratio; the IS weights (here 0) never touch it
    old = torch.log(torch.tensor([[0.25, 0.5]]))
    loss, ratio, kl = grpo_per_token_loss(logp, old, zero, ref, beta=0.1, importance_weights=torch.zeros(1, 1))
    close(ratio, [[2.0, 1.0]])
    close(kl, [[2 * kl0, 0.0]])
    close(loss, [[0.1 * 2 * kl0, 0.0]])
    loss, _, kl = grpo_per_token_loss(logp, old, zero, ref, beta=0.1, use_bias_correction_kl=False)
    close(kl, [[kl0, 0.0]])
    close(loss, [[0.1 * kl0, 0.0]])
    # on-policy the value is the same, the gradient is not: d/dlogp of k3 * ratio at ratio 1 is logp - ref (the
    # reverse-KL gradient, ln 2 here), of the plain k3 it is 1 - ref / p (0.5)
    for correct, expected in ((True, math.log(2)), (False, 0.5)):
        lp = logp.clone().requires_grad_(True)
        loss, _, _ = grpo_per_token_loss(lp, lp.detach(), zero, ref, beta=1.0, use_bias_correction_kl=correct)
        close(loss, [[kl0, 0.0]])
        (grad,) = torch.autograd.grad(loss.sum(), lp)
        close(grad, [[expected, 0.0]])


# ------------------------------------------------------------------------------------------------------- PPO


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    close(masked_mean(values, mask), 8 / 3)
    close(masked_mean(values, mask, dim=1), [1.0, 3.5])
    close(masked_mean(values, torch.zeros(2, 2)), 0.0)


def test_masked_whiten():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # masked mean 2, Bessel var (1 + 0 + 1) / 2 = 1
    close(masked_whiten(values, mask), [[-1.0, 0.0, 1.0, 0.0]])
    close(masked_whiten(values, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])
    close(masked_whiten(values, torch.tensor([[1, 0, 0, 0]])), [[0.0, 0.0, 0.0, 0.0]])  # single token: no NaN


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0], [2.0, 9.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0], [0.5, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0 (gamma*lam = 0.72), next value 0 after the last active token, padding ignored:
    #   t2: delta = 1 + 0.9*0 - 0.7 = 0.3                          A2 = 0.3
    #   t1: delta = 0 + 0.9*0.7 - 0.6 = 0.03; A1 = 0.03 + 0.72*0.3 = 0.246
    #   t0: delta = 0 + 0.9*0.6 - 0.5 = 0.04; A0 = 0.04 + 0.72*0.246 = 0.21712
    # row 1: single token: A0 = 2 - 0.5 = 1.5
    close(adv, [[0.21712, 0.246, 0.3, 0.0], [1.5, 0.0, 0.0, 0.0]])
    close(ret, [[0.71712, 0.846, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])


def test_clipped_value_loss_at_clip_boundary():
    # old 1.0, clip 0.2, return 2.0
    values = torch.tensor([[1.5, 1.2, 0.5, 7.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    returns = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss = clipped_value_loss(values, old, returns, mask)
    # V=1.5: max(0.25, (1.2-2)^2 = 0.64) = 0.64; V=1.2 (boundary): 0.64; V=0.5: max(2.25, (0.8-2)^2 = 1.44) = 2.25
    close(loss, 0.5 * (0.64 + 0.64 + 2.25) / 3)
    loss.backward()
    # clipped branch wins at V=1.5 -> no gradient; V=0.5: d/dV 0.5 * (V-R)^2 / 3 = (0.5 - 2) / 3 = -0.5
    close(values.grad[0, 0], 0.0)
    close(values.grad[0, 2], -0.5)
    close(values.grad[0, 3], 0.0)


# -- importance-sampling weights, by hand -----------------------------------------------------


def _is_inputs():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    sampled = torch.tensor([[-1.5, -1.0, -9.0], [-3.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # d = mask * (old - sampled): row 0 -> [0.5, -1.0, 0 (masked)], row 1 -> [2.0, 0, 0]
    return old, sampled, mask


def test_importance_sampling_token_modes_by_hand():
    old, sampled, mask = _is_inputs()
    e = torch.exp
    w = importance_sampling_weights(old, sampled, mask, mode="token_truncate", cap=3.0)
    expected = torch.stack([e(torch.tensor([0.5, -1.0, 0.0])), torch.tensor([3.0, 1.0, 1.0])])  # e^2 = 7.39 -> 3
    torch.testing.assert_close(w, expected)
    w = importance_sampling_weights(old, sampled, mask, mode="token_mask", cap=3.0)
    expected = torch.stack([e(torch.tensor([0.5, -1.0, 0.0])), torch.tensor([0.0, 1.0, 1.0])])  # e^2 > 3 -> 0
    torch.testing.assert_close(w, expected)
    w = importance_sampling_weights(old, sampled, mask, mode="token_mask", cap=3.0, cap_min=0.5)
    expected = torch.tensor([[e(torch.tensor(0.5)), 0.0, 1.0], [0.0, 1.0, 1.0]])  # e^-1 = 0.37 < 0.5 -> 0
    torch.testing.assert_close(w, expected)


def test_importance_sampling_sequence_modes_by_hand():
    old, sampled, mask = _is_inputs()
    # sums of d: row 0 -> 0.5 - 1.0 = -0.5 (weight 0.607), row 1 -> 2.0 (weight 7.39 > cap)
    w = importance_sampling_weights(old, sampled, mask, mode="sequence_truncate", cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[torch.exp(torch.tensor(-0.5))], [3.0]]))
    w = importance_sampling_weights(old, sampled, mask, mode="sequence_mask", cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[torch.exp(torch.tensor(-0.5))], [0.0]]))
    w = importance_sampling_weights(old, sampled, mask, mode="sequence_truncate", cap=10.0, cap_min=0.7)
    torch.testing.assert_close(w, torch.tensor([[0.7], [torch.exp(torch.tensor(2.0))]]))
    assert importance_sampling_weights(old, old, mask).eq(1).all()  # on-policy: every weight is 1
    with pytest.raises(ValueError, match="mode"):
        importance_sampling_weights(old, sampled, mask, mode="tokens")


def test_importance_sampling_nan_sampler_log_probs_count_as_on_policy():
    old = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    sampled = torch.tensor([[NAN, -2.5], [-1.0, NAN]])  # a token whose log-prob the sampler did not report
    mask = torch.ones(2, 2)
    w = importance_sampling_weights(old, sampled, mask, mode="token_truncate", cap=3.0)
    close(w, [[1.0, math.exp(0.5)], [1.0, 1.0]])
    w = importance_sampling_weights(old, sampled, mask, mode="sequence_mask", cap=3.0)
    close(w, [[math.exp(0.5)], [1.0]])
