"""PPO on the tiny model: value head, KL-shaped rewards and GAE in the batch, epochs of minibatches, a reward model."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import length_reward, make_data, make_module
from fedrl_lightning.client import local_step
from fedrl_lightning.losses import gae, masked_whiten
from fedrl_lightning.modules import PPOModule
from fedrl_lightning.rollout.hf import HFRollout

PROMPTS = [
    {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"},
    {"prompt": [{"role": "user", "content": "What is 4 + 4?"}], "answer": "8"},
]


def ppo_module(**kw) -> PPOModule:
    kw.setdefault("num_generations", 2)
    return make_module(module_class=PPOModule, **kw)


def test_batch_holds_kl_shaped_token_rewards_and_their_gae():
    module = ppo_module(kl_coef=0.1, whiten_advantages=False)
    state = module.trainable_state()  # move the adapter and the value head so KL and values are not zero
    gen = torch.Generator().manual_seed(0)
    module.load_trainable_state({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()})
    rollout = HFRollout().generate(module, [p["prompt"] for p in PROMPTS], module.sampling)
    rewards = module.score(rollout, PROMPTS, module.num_generations)
    batch = module.make_batch(rollout, rewards)
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    with torch.no_grad():
        logp, _, values = module.log_probs_and_values(*args)
        ref = module.reference_log_probs(*args, temperature=module.sampling.temperature)
    mask = rollout.completion_mask
    token_rewards = -0.1 * (logp - ref) * mask
    last = mask.sum(1) - 1
    token_rewards[torch.arange(len(last)), last] += rewards[:, 0]
    adv, ret = gae(token_rewards, values, mask, 1.0, 0.95)
    torch.testing.assert_close(batch.old_log_probs, logp)
    torch.testing.assert_close(batch.old_values, values)
    torch.testing.assert_close(batch.advantages, adv)
    torch.testing.assert_close(batch.returns, ret)
    assert batch.ref_log_probs is None  # beta = 0: the reference enters through the reward only
    assert (values * mask).abs().sum() > 0 and ((logp - ref) * mask).abs().sum() > 0


def test_penalties_replace_the_score():
    module = ppo_module(penalize_no_eos=True, min_response_length=3, penalty_score=-3.0)
    rollout = HFRollout().generate(module, [p["prompt"] for p in PROMPTS], module.sampling)
    rollout.is_truncated = torch.tensor([True, False, False, False])
    rollout.completion_mask = torch.ones_like(rollout.completion_mask)
    rollout.completion_mask[2, 2:] = 0  # 2 tokens < 3
    scores = module.sequence_scores(rollout, torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
    assert scores.tolist() == [-3.0, 2.0, -3.0, 4.0]


def test_epochs_of_minibatches_are_optimizer_steps_over_a_shuffled_batch():
    module = ppo_module(num_iterations=2, num_mini_batches=2, micro_batch_size=1)
    rollout = HFRollout().generate(module, [p["prompt"] for p in PROMPTS], module.sampling)
    batch = module.make_batch(rollout, module.score(rollout, PROMPTS, module.num_generations))
    steps = list(module.optimizer_steps(batch))
    assert len(steps) == 4 and all(len(micro) == 2 and micro[0].num_micro_batches == 2 for micro in steps)
    for epoch in (steps[:2], steps[2:]):  # each epoch sees every completion once
        rows = sorted(int(m.rollout.completion_ids.shape[0]) for step in epoch for m in step)
        assert sum(rows) == len(rollout)
    # a minibatch's token count is its loss normaliser, shared by its micro-batches
    assert steps[0][0].num_items_in_batch == steps[0][1].num_items_in_batch
    with pytest.raises(ValueError, match="num_mini_batches"):
        ppo_module(num_mini_batches=100)


def test_a_local_step_trains_adapter_and_value_head_and_logs_ppo_metrics():
    module = ppo_module(learning_rate=1e-2)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0)
    wrapped, optimizer = fabric.setup(module, module.configure_optimizers())
    before = module.trainable_state()
    assert any(k.startswith("value_head.") for k in before)
    local_step(fabric, wrapped, optimizer, HFRollout(), make_data().train_examples(0)[:2])
    after = module.trainable_state()
    assert not torch.equal(before["value_head.weight"], after["value_head.weight"])
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("lora_B" in k for k in changed)
    metrics = module.tracker.compute_and_reset()
    for name in ("objective/scores", "objective/kl", "loss/value_avg", "loss/policy_avg", "val/clipfrac_avg"):
        assert name in metrics, name


def test_a_separate_value_lora_trains_apart_from_the_policy_adapter():
    module = ppo_module(learning_rate=1e-2, value_model="lora")
    value_keys = [k for k in module.trainable_state() if ".value." in k]
    policy_keys = [k for k in module.trainable_state() if ".default." in k]
    assert value_keys and policy_keys
    rollout = HFRollout().generate(module, [p["prompt"] for p in PROMPTS], module.sampling)
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    with torch.no_grad():  # make the value adapter differ from the base, so it would show up in the policy
        for name, p in module.trainable_parameters().items():
            if ".value." in name and "lora_B" in name:
                p.add_(0.1)
    log_probs, _, values = module.log_probs_and_values(*args)
    plain = ppo_module()  # same seed, same policy adapter, no value adapter
    torch.testing.assert_close(log_probs, plain.completion_log_probs(*args, temperature=module.sampling.temperature)[0])
    # the value loss reaches the value adapter and the head, never the policy adapter
    module.value_head.weight.data.fill_(0.1)  # a zero head (its init) passes no gradient back
    values = module.log_probs_and_values(*args)[2]
    (values * rollout.completion_mask).sum().backward()
    params = module.trainable_parameters()
    assert all(params[k].grad is None or not params[k].grad.any() for k in policy_keys)
    assert any(params[k].grad is not None and params[k].grad.any() for k in value_keys)
    with pytest.raises(ValueError, match="value_model"):
        ppo_module(value_model="critic")


def test_whitened_advantages_have_zero_mean_unit_variance():
    module = ppo_module()
    rollout = HFRollout().generate(module, [p["prompt"] for p in PROMPTS], module.sampling)
    batch = module.make_batch(rollout, module.score(rollout, PROMPTS, module.num_generations))
    mask = rollout.completion_mask
    torch.testing.assert_close(batch.advantages, masked_whiten(batch.advantages, mask), atol=1e-4, rtol=1e-4)


def test_reward_model_scores_prompt_plus_completion(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from fedrl_lightning.models import load_tokenizer, tiny_config
    from fedrl_lightning.rewards.model import RewardModel

    tokenizer = load_tokenizer("tiny-random")
    config = tiny_config(len(tokenizer))
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    rm = RewardModel(str(tmp_path))
    prompts = [p["prompt"] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "eight"}]]
    scores = rm(prompts, completions)
    assert len(scores) == 2 and scores[0] != scores[1]
    single = rm(prompts[:1], completions[:1])  # padding in a batch does not change a score
    assert single[0] == pytest.approx(scores[0], abs=1e-5)
    module = ppo_module(reward_funcs=[rm, length_reward], reward_weights=[1.0, 0.0])
    rollout = HFRollout().generate(module, prompts, module.sampling)
    rewards = module.score(rollout, PROMPTS, module.num_generations)
    texts = [[{"role": "assistant", "content": c}] for c in rollout.completions]
    expected = rm([p for p in prompts for _ in range(2)], texts)
    torch.testing.assert_close(rewards[:, 0], torch.tensor(expected))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        RewardModel("org/not-here")
