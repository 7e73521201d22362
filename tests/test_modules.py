"""The policy and GRPO module on the tiny random model."""

import math
from dataclasses import replace

import lightning as L
import pytest
import torch

from conftest import length_reward, make_data, make_module
from fedrl_lightning.client import local_step
from fedrl_lightning.losses import k3_kl
from fedrl_lightning.modules import FedMOAModule, GRPOModule, PPOModule
from fedrl_lightning.modules.pg import PolicyGradientBatch
from fedrl_lightning.modules.policy import prompt_groups
from fedrl_lightning.rollout import Rollout, completion_masks
from fedrl_lightning.rollout.hf import HFRollout
from fedrl_lightning.rollout.packed import PackedLinear, pack_linears

PROMPTS = [
    {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"},
    {"prompt": [{"role": "user", "content": "What is 4 + 4?"}], "answer": "8"},
]


def _perturb_lora_b(module):
    # LoRA B starts at zero, so A gets no gradient on the very first step; start from a non-zero adapter as after
    # any aggregation round.
    state = module.trainable_state()
    gen = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(v.shape, generator=gen) * 0.1 if "lora_B" in k else v) for k, v in state.items()}
    module.load_trainable_state(state)


def test_one_training_step_changes_every_lora_parameter_and_no_base_parameter():
    module = make_module(loss_type="grpo", beta=0.04)
    _perturb_lora_b(module)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    optimizer = module.configure_optimizers()
    module, optimizer = fabric.setup(module, optimizer)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    torch.manual_seed(0)
    tokens = local_step(fabric, module, optimizer, HFRollout(), PROMPTS)
    assert tokens > 0
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, param in module.model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in trainable), name
    metrics = module.tracker.compute_and_reset()
    for key in (
        "reward",
        "reward_std",
        "rewards/length_reward/mean",
        "completions/mean_length",
        "kl",
        "entropy",
        "clip_ratio/region_mean",
        "frac_reward_zero_std",
        "timing/generate",
    ):
        assert key in metrics, key
    assert metrics["kl"] >= 0


def test_trainable_state_round_trip_is_exact():
    module = make_module()
    _perturb_lora_b(module)
    state = module.trainable_state()
    other = {k: torch.zeros_like(v) for k, v in state.items()}
    module.load_trainable_state(other)
    assert all(torch.equal(v, other[k]) for k, v in module.trainable_state().items())
    module.load_trainable_state(state)
    assert all(torch.equal(v, state[k]) for k, v in module.trainable_state().items())


def test_hf_rollout_shapes_groups_and_masks():
    module = make_module(num_generations=3, max_completion_length=5)
    rollout = HFRollout().generate(module, [p["prompt"] for p in PROMPTS], module.sampling)
    assert rollout.completion_ids.shape[0] == 6 and rollout.completion_ids.shape[1] <= 5
    # prompts are repeated G times consecutively and left-padded
    assert torch.equal(rollout.prompt_ids[0], rollout.prompt_ids[2])
    assert (rollout.prompt_mask[:, -1] == 1).all()
    assert len(rollout.completions) == 6
    assert rollout.is_truncated.dtype == torch.bool


def test_merged_copy_decodes_like_the_lora_policy_and_follows_adapter_updates():
    module = make_module(num_generations=2, max_completion_length=6, temperature=0.0)
    prompts = [p["prompt"] for p in PROMPTS]
    merged, lean = HFRollout(lean_decoder=False, merged_copy=True), HFRollout()
    for seed in range(2):  # the second adapter checks that the copy is refreshed, not built once
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in module.trainable_parameters().items():
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
        expected = HFRollout(lean_decoder=False, merged_copy=False).generate(module, prompts, module.sampling)
        got = merged.generate(module, prompts, module.sampling)
        assert torch.equal(got.completion_ids, expected.completion_ids)
        assert torch.equal(lean.generate(module, prompts, module.sampling).completion_ids, expected.completion_ids)
    base = module.model.get_base_model()
    q = base.model.layers[0].self_attn.q_proj
    copy_q = merged._copy.model.layers[0].self_attn.q_proj
    assert isinstance(copy_q, PackedLinear)  # fp32 on CPU: the copy's linears are oneDNN-packed
    x = torch.randn(3, q.in_features)
    expected_q = torch.nn.functional.linear(x, q.base_layer.weight + q.get_delta_weight("default"), q.base_layer.bias)
    torch.testing.assert_close(copy_q(x), expected_q, rtol=1e-5, atol=1e-5)
    auto = HFRollout(lean_decoder=False)  # merged_copy=None: on for a LoRA model on CPU
    auto.generate(module, prompts[:1], module.sampling)
    assert auto._copy is not None and auto._copy_of is module.model
    plain = HFRollout(lean_decoder=False, merged_copy=True, packed_weights=False)
    plain.generate(module, prompts, module.sampling)
    plain_q = plain._copy.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(plain_q.weight, q.base_layer.weight + q.get_delta_weight("default"))
    # min_tokens suppresses EOS: make the greedy first token the EOS, then force 6 tokens
    first = int(expected.completion_ids[0, 0])
    module.model.generation_config.eos_token_id = first
    try:
        for rollout in (HFRollout(lean_decoder=False), HFRollout()):
            stopped = rollout.generate(module, prompts[:1], module.sampling)
            forced = rollout.generate(module, prompts[:1], replace(module.sampling, min_tokens=6))
            assert stopped.completion_mask.sum(dim=1).tolist() == [1, 1]
            assert forced.completion_mask.sum(dim=1).tolist() == [6, 6]
    finally:
        module.model.generation_config.eos_token_id = module.tokenizer.eos_token_id


def test_packed_linear_computes_the_linear_and_follows_new_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5, bias=False))
    model.append(torch.nn.Linear(5, 3).double())  # not packable: stays a plain Linear
    x = torch.randn(2, 7, 12)
    expected = model[:3](x)
    assert pack_linears(model) == 2 and type(model[3]) is torch.nn.Linear
    assert isinstance(model[0], PackedLinear) and not list(model[0].parameters())  # no plain weight kept
    torch.testing.assert_close(model[:3](x), expected, rtol=1e-5, atol=1e-5)
    weight = torch.randn(5, 20)
    model[2].load(weight)
    h = torch.randn(4, 20)
    torch.testing.assert_close(model[2](h), h @ weight.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"weight of shape \(20, 5\) for a 20->5 layer"):
        model[2].load(weight.T)


def test_generate_kwargs_override_the_derived_ones():
    module = make_module(num_generations=2, max_completion_length=6)
    out = HFRollout(generate_kwargs={"max_new_tokens": 2}).generate(module, [PROMPTS[0]["prompt"]], module.sampling)
    assert out.completion_ids.shape[1] <= 2


def test_completion_masks_through_first_eos():
    ids = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8]])
    mask, truncated = completion_masks(ids, [9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, True]


def test_num_iterations_caches_old_log_probs_and_beta_adds_reference():
    module = make_module(num_iterations=2, beta=0.1)
    rollout = HFRollout().generate(module, [p["prompt"] for p in PROMPTS], module.sampling)
    rewards = module.score(rollout, PROMPTS, module.num_generations)
    batch = module.make_batch(rollout, rewards)
    assert batch.old_log_probs is not None and batch.ref_log_probs is not None
    # adapter B = 0 at init: the policy equals the reference exactly
    assert torch.allclose(batch.old_log_probs, batch.ref_log_probs, atol=1e-5)
    assert batch.num_items_in_batch == float(rollout.completion_mask.sum())
    micro = batch.micro_batches(3)
    assert [len(m.rollout) for m in micro] == [3, 3, 2] and all(m.num_micro_batches == 3 for m in micro)
    plain = make_module()
    assert plain.make_batch(rollout, rewards).old_log_probs is None


def test_sampler_log_probs_weight_the_loss_by_the_capped_importance_ratio():
    module = make_module(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_cap=10.0)
    rollout = HFRollout().generate(module, [p["prompt"] for p in PROMPTS], module.sampling)
    batch = module.make_batch(rollout, module.score(rollout, PROMPTS, module.num_generations))
    batch.advantages = torch.ones(len(rollout))  # group advantages sum to zero; ones give a loss of exactly -1
    plain = module.training_step(batch)
    torch.testing.assert_close(plain, torch.tensor(-1.0))
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    with torch.no_grad():
        trainer_lp = module.completion_log_probs(*args, temperature=module.sampling.temperature)[0]
    # a sampler that put 0.5 nats more on every sampled token: each token's weight is e^-0.5
    rollout.sampling_log_probs = (trainer_lp + 0.5) * rollout.completion_mask
    corrected = module.training_step(batch)
    torch.testing.assert_close(corrected, plain * torch.exp(torch.tensor(-0.5)), rtol=1e-4, atol=1e-6)
    metrics = module.tracker.compute_and_reset()
    assert abs(metrics["sampling/sampling_logp_difference/mean"] - 0.5) < 1e-4
    assert abs(metrics["sampling/importance_sampling_ratio/max"] - float(torch.exp(torch.tensor(-0.5)))) < 1e-4
    # above the cap, sequence_mask drops the whole sequence
    module.is_mode, module.is_cap = "sequence_mask", 1.01
    rollout.sampling_log_probs = (trainer_lp - 0.5) * rollout.completion_mask  # ratios e^(0.5 * length) > cap
    assert module.training_step(batch).item() == 0.0
    module.is_correction = False
    torch.testing.assert_close(module.training_step(batch), plain)


def test_vllm_importance_weights_multiply_the_surrogate_only_not_the_beta_kl_term():
    """The module's loss path on synthetic log-probs (no generation): L = w * surrogate + beta * k3 * ratio (TRL)."""
    module = make_module(
        loss_type="bnpo", beta=0.04, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_cap=10.0
    )
    gen = torch.Generator().manual_seed(0)
    n, c = 4, 5
    log_probs = torch.log_softmax(torch.randn(n, c, 7, generator=gen), -1)[..., 0].requires_grad_(True)
    old = log_probs.detach() + 0.2 * torch.randn(n, c, generator=gen)
    ref = log_probs.detach() + 0.3 * torch.randn(n, c, generator=gen)
    mask = torch.ones(n, c)
    ids = torch.zeros(n, c, dtype=torch.long)
    # the sampler put 0.5 nats more on every token: each token's IS weight is e^-0.5
    rollout = Rollout(ids, mask, ids, mask, torch.zeros(n, dtype=torch.bool), [""] * n, old + 0.5)
    advantages = torch.randn(n, generator=gen)
    batch = PolicyGradientBatch(rollout, advantages, mask, old, ref, float(mask.sum()))
    loss = module.policy_loss(batch, log_probs, old, advantages)

    ratio = torch.exp(log_probs - old)
    surrogate = -torch.min(ratio * advantages[:, None], ratio.clamp(0.8, 1.2) * advantages[:, None])
    kl = k3_kl(log_probs, ref) * ratio  # use_bias_correction_kl (GRPOModule's default)
    w = math.exp(-0.5)
    torch.testing.assert_close(loss, (w * surrogate + 0.04 * kl).mean(), rtol=1e-6, atol=1e-7)
    wrong = (w * (surrogate + 0.04 * kl)).mean()  # weighting the KL term too, the old behaviour
    assert abs(float(loss - wrong)) > 1e-4
    # every sequence masked out (sequence_mask, ratio e^2.5 above the cap): the KL term alone remains
    module.is_mode, module.is_cap = "sequence_mask", 3.0
    rollout.sampling_log_probs = old - 0.5
    torch.testing.assert_close(module.policy_loss(batch, log_probs, old, advantages), (0.04 * kl).mean())
    module.use_bias_correction_kl = False
    torch.testing.assert_close(
        module.policy_loss(batch, log_probs, old, advantages), (0.04 * k3_kl(log_probs, ref)).mean()
    )


def test_prompt_groups_finds_runs_of_identical_prompts():
    ids = torch.tensor([[0, 1], [0, 1], [2, 3], [2, 3], [2, 3], [0, 1]])
    mask = torch.ones_like(ids)
    first, counts = prompt_groups(ids, mask)
    assert first.tolist() == [0, 2, 5]
    assert counts == [2, 3, 1]
    assert prompt_groups(ids[[0, 2, 5]], mask[:3]) is None
    mask[1, 0] = 0  # same ids, other padding: not the same prompt
    assert prompt_groups(ids[:2], mask[:2]) is None


def test_shared_prompt_prefix_gives_the_unshared_log_probs_hidden_states_and_gradients():
    module = make_module(max_completion_length=5)
    _perturb_lora_b(module)
    prompts = [p["prompt"] for p in PROMPTS] + [[{"role": "user", "content": "A much longer question: 17 + 25?"}]]
    torch.manual_seed(0)
    rollout = HFRollout().generate(module, prompts, module.sampling)
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    assert (rollout.prompt_mask == 0).any(), "the batch should exercise left padding"
    assert prompt_groups(rollout.prompt_ids, rollout.prompt_mask)[0].numel() == len(prompts)
    results = {}
    for share in (False, True):
        module.share_prompt_prefix = share
        module.zero_grad(set_to_none=True)
        log_probs, _, hidden = module.completion_forward(*args, temperature=0.7, with_hidden=True)
        ((log_probs * rollout.completion_mask).sum() + hidden.square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in module.trainable_parameters().items()}
        results[share] = (log_probs.detach(), hidden.detach(), grads)
    (lp0, h0, g0), (lp1, h1, g1) = results[False], results[True]
    m = rollout.completion_mask.bool()
    torch.testing.assert_close(lp1[m], lp0[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys() and any(g.abs().sum() > 0 for g in g0.values())
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("module_class", [GRPOModule, FedMOAModule, PPOModule], ids=["grpo", "fedmoa", "ppo"])
def test_the_trainer_precision_autocasts_the_training_and_old_log_prob_passes(module_class):
    """Fabric autocasts only a wrapped module's forward; a local step calls other methods and must enter the
    precision itself: under bf16-mixed every log-prob pass runs in autocast, under 32-true none does."""
    for precision, expected in (("bf16-mixed", True), ("32-true", False)):
        extra = {"reward_funcs": [length_reward, length_reward]} if module_class is FedMOAModule else {}
        module = make_module(module_class, **extra)
        seen = []
        forward = module.completion_forward

        def spy(*args, _forward=forward, **kwargs):
            seen.append(torch.is_autocast_enabled("cpu"))
            return _forward(*args, **kwargs)

        module.completion_forward = spy
        fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
        wrapped, optimizer = fabric.setup(module, module.configure_optimizers())
        before = {k: v.clone() for k, v in module.trainable_state().items()}
        local_step(fabric, wrapped, optimizer, HFRollout(), make_data().train_examples(0)[: module.prompts_per_step])
        assert seen and set(seen) == {expected}, (precision, seen)
        after = module.trainable_state()
        assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
