"""Chunked log-probs (``losses.chunked_log_probs``): the dense path's values and gradients, a chunk at a time.

Function level: against ``selective_log_softmax`` / ``entropy_from_logits`` on the full logits ``F.linear(h, W, b)``
in float64 (to rounding) and float32, with temperature, chunk sizes that do not divide the tokens, masked tokens, a
trainable head and bias, and ``gradcheck``. Module level: a GRPO step (old and reference log-probs, loss, LoRA
gradients) and PPO's log-probs and values with chunking on and off on the tiny random model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_module
from fedrl_lightning.losses import chunked_log_probs, default_chunk_size, entropy_from_logits, selective_log_softmax
from fedrl_lightning.modules import PPOModule
from fedrl_lightning.modules.logprobs import output_head
from fedrl_lightning.rollout import Rollout

B, C, H, V = 3, 7, 16, 50  # 21 tokens: chunks of 1, 4, 5 and 64 cover remainders and a single chunk


def case(dtype: torch.dtype, trainable_head: bool, bias: bool, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, C)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    return {
        "h": torch.randn(B, C, H, generator=gen, dtype=dtype).requires_grad_(True),
        "W": (torch.randn(V, H, generator=gen, dtype=dtype) * 0.5).requires_grad_(trainable_head),
        "b": torch.randn(V, generator=gen, dtype=dtype).requires_grad_(trainable_head) if bias else None,
        "index": torch.randint(0, V, (B, C), generator=gen),
        # the upstream gradient of a masked loss: zero on masked tokens
        "g": torch.randn(B, C, generator=gen, dtype=dtype) * mask.to(dtype),
    }


def dense(x: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(x["h"], x["W"], x["b"])
    return selective_log_softmax(logits, x["index"], temperature), entropy_from_logits(logits.detach(), temperature)


def grads(log_probs: torch.Tensor, x: dict) -> list[torch.Tensor]:
    inputs = [t for t in (x["h"], x["W"], x["b"]) if t is not None and t.requires_grad]
    return list(torch.autograd.grad((log_probs * x["g"]).sum(), inputs))


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen_head", "trainable_head"])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_and_gradients_equal_the_dense_path(dtype, temperature, chunk_size, trainable_head, bias):
    x = case(dtype, trainable_head, bias)
    ref_lp, ref_ent = dense(x, temperature)
    lp, ent = chunked_log_probs(x["h"], x["W"], x["index"], x["b"], temperature, chunk_size, with_entropy=True)
    assert lp.dtype == ref_lp.dtype == dtype and lp.shape == (B, C) and not ent.requires_grad
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lp, ref_lp, **tol)
    torch.testing.assert_close(ent, ref_ent, **tol)
    ref_grads, ours = grads(ref_lp, x), grads(lp, x)
    assert len(ours) == (3 if trainable_head and bias else 2 if trainable_head else 1)
    for got, want in zip(ours, ref_grads, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)
    # masked tokens get no gradient into their hidden states
    assert float(ours[0][2, 1:].abs().max()) == 0.0 and float(ours[0].abs().max()) > 1e-3


@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen_head", "trainable_head"])
def test_gradcheck(trainable_head):
    x = case(torch.float64, trainable_head, bias=True)
    h = x["h"].detach()[:, :4].requires_grad_(True)  # 12 tokens, 20 words: a small numerical Jacobian
    W = x["W"].detach()[:20].requires_grad_(trainable_head)
    b = x["b"].detach()[:20].requires_grad_(trainable_head)
    index = x["index"][:, :4] % 20
    fn = lambda h, W, b: chunked_log_probs(h, W, index, b, temperature=0.7, chunk_size=5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, W, b))


def test_no_grad_flattened_and_empty_inputs():
    x = case(torch.float32, trainable_head=False, bias=False)
    with torch.no_grad():
        lp, ent = chunked_log_probs(x["h"], x["W"], x["index"], chunk_size=4)
        assert lp.grad_fn is None and ent is None
        flat, _ = chunked_log_probs(x["h"].reshape(-1, H), x["W"], x["index"].reshape(-1), chunk_size=4)
    torch.testing.assert_close(flat, lp.reshape(-1), rtol=0, atol=0)
    empty, ent = chunked_log_probs(x["h"][:, :0], x["W"], x["index"][:, :0], with_entropy=True)
    assert empty.shape == ent.shape == (B, 0)
    assert default_chunk_size(49152) == 85 and default_chunk_size(10**9) == 1
    with pytest.raises(ValueError, match="temperature"):
        chunked_log_probs(x["h"], x["W"], x["index"], temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_log_probs(x["h"], x["W"], x["index"], chunk_size=0)


def test_banned_tokens_give_a_finite_entropy():
    x = case(torch.float64, trainable_head=False, bias=True)
    x["b"] = x["b"].clone()
    x["b"][:10] = float("-inf")
    x["index"] = x["index"].clamp(min=10)
    ref_lp, ref_ent = dense(x, 1.0)
    lp, ent = chunked_log_probs(x["h"], x["W"], x["index"], x["b"], chunk_size=4, with_entropy=True)
    assert torch.isfinite(ent).all()
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    for got, want in zip(grads(lp, x), grads(ref_lp, x), strict=True):
        torch.testing.assert_close(got, want)


def test_bfloat16_scores_like_the_dense_bfloat16_path():
    """bf16 logits as the LM head computes them, upcast for the softmax; the gradient near the dense bf16 one."""
    x = case(torch.bfloat16, trainable_head=True, bias=False)
    ref_lp, ref_ent = dense(x, 0.7)
    lp, ent = chunked_log_probs(x["h"], x["W"], x["index"], temperature=0.7, chunk_size=5, with_entropy=True)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(lp, x), grads(ref_lp, x), strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


# -- the module: chunking on and off ---------------------------------------------------------------------------


def synthetic_rollout(module, groups: int = 2, group_size: int = 4, p: int = 5, c: int = 7) -> Rollout:
    """Random prompts (the second left-padded), each repeated ``group_size`` times, and right-padded completions."""
    gen = torch.Generator().manual_seed(0)
    pad, vocab = module.tokenizer.pad_token_id, module.model.get_base_model().config.vocab_size
    prompt_ids = torch.randint(1, vocab, (groups, p), generator=gen)
    prompt_mask = torch.ones(groups, p, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_ids[prompt_mask == 0] = pad
    n = groups * group_size
    lengths = torch.tensor([c, 3, 5, 1, c, 4, 2, 6][:n])
    completion_mask = (torch.arange(c) < lengths[:, None]).long()
    completion_ids = torch.randint(1, vocab, (n, c), generator=gen).masked_fill(completion_mask == 0, pad)
    return Rollout(
        prompt_ids.repeat_interleave(group_size, 0),
        prompt_mask.repeat_interleave(group_size, 0),
        completion_ids,
        completion_mask,
        lengths == c,
        [""] * n,
    )


def perturb_adapter(module) -> None:
    """A non-zero LoRA B (as after any round), so that every adapter tensor gets a gradient."""
    gen = torch.Generator().manual_seed(1)
    state = module.trainable_state()
    module.load_trainable_state(
        {k: torch.randn(v.shape, generator=gen) * 0.1 if "lora_B" in k else v for k, v in state.items()}
    )


@pytest.mark.parametrize("share_prompt_prefix", [True, False], ids=["shared_prefix", "unshared"])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_a_grpo_step_has_the_dense_loss_and_gradients(dtype, tol, share_prompt_prefix):
    module = make_module(
        dtype=dtype,
        loss_type="grpo",
        beta=0.04,
        num_iterations=2,  # old log-probs cached (no grad), reference log-probs with the adapter disabled
        temperature=0.7,
        share_prompt_prefix=share_prompt_prefix,
    )
    perturb_adapter(module)
    rollout = synthetic_rollout(module)
    rewards = torch.randn(len(rollout), 1, generator=torch.Generator().manual_seed(2))
    assert output_head(module.model) is not None
    results = {}
    for chunk in (0, 5, None):  # dense, 5 tokens (not dividing 8 x 7), the default
        module.logprob_chunk_size = chunk
        batch = module.make_batch(rollout, rewards)
        module.zero_grad(set_to_none=True)
        loss = module.training_step(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.trainable_parameters().items()}
        results[chunk] = (batch.old_log_probs, batch.ref_log_probs, loss.detach(), grads)
    old0, ref0, loss0, grads0 = results[0]
    assert all(g.abs().max() > 0 for g in grads0.values())
    for chunk in (5, None):
        old, ref, loss, grads = results[chunk]
        torch.testing.assert_close(old, old0, rtol=tol, atol=tol)
        torch.testing.assert_close(ref, ref0, rtol=tol, atol=tol)
        torch.testing.assert_close(loss, loss0, rtol=tol, atol=tol)
        for name, g in grads.items():
            scale = float(grads0[name].abs().max())
            torch.testing.assert_close(g, grads0[name], rtol=tol, atol=tol * scale, msg=name)


def test_a_trainable_tied_lm_head_gets_the_dense_gradient_and_entropy():
    """SmolLM2 ties the LM head to the input embedding: its gradient is the sum of both uses, chunked or dense."""
    module = make_module(dtype="float64")
    perturb_adapter(module)
    base = module.model.get_base_model()
    head = output_head(module.model)
    assert head.weight is base.get_input_embeddings().weight
    head.weight.requires_grad_(True)
    rollout = synthetic_rollout(module)
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    weights = torch.randn(rollout.completion_ids.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = {}
    for chunk in (0, 6):
        module.logprob_chunk_size = chunk
        module.zero_grad(set_to_none=True)
        head.weight.grad = None
        log_probs, entropy = module.completion_log_probs(*args, temperature=0.7, with_entropy=True)
        (log_probs * weights * rollout.completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.trainable_parameters().items()}
        results[chunk] = (log_probs.detach(), entropy, head.weight.grad.clone(), grads)
    (lp0, ent0, w0, g0), (lp1, ent1, w1, g1) = results[0], results[6]
    torch.testing.assert_close(lp1, lp0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent1, ent0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w1, w0, rtol=1e-10, atol=1e-12)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-12, msg=name)


def test_ppo_log_probs_and_values_equal_with_chunking_on_and_off():
    module = make_module(PPOModule, dtype="float64", num_generations=4, temperature=0.7)
    perturb_adapter(module)
    with torch.no_grad():
        module.value_head.weight.normal_(generator=torch.Generator().manual_seed(4))
    rollout = synthetic_rollout(module)
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    results = {}
    for chunk in (0, 4):
        module.logprob_chunk_size = chunk
        module.zero_grad(set_to_none=True)
        log_probs, _, values = module.log_probs_and_values(*args)
        ((log_probs + values) * rollout.completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.trainable_parameters().items()}
        results[chunk] = (log_probs.detach(), values.detach(), grads)
    (lp0, v0, g0), (lp1, v1, g1) = results[0], results[4]
    torch.testing.assert_close(lp1, lp0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(v1, v0, rtol=1e-10, atol=1e-10)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-12, msg=name)


def test_an_adapted_lm_head_keeps_the_dense_logits():
    """A LoRA on the LM head changes its output: the chunked path, which reads the base weight, must not be used."""
    module = make_module(lora_target_modules=["q_proj", "lm_head"])
    assert output_head(module.model) is None
    rollout = synthetic_rollout(module)
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    perturb_adapter(module)
    chunked = module.completion_log_probs(*args)[0]
    module.logprob_chunk_size = 0
    torch.testing.assert_close(chunked, module.completion_log_probs(*args)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="logprob_chunk_size"):
        make_module(logprob_chunk_size=-1)


def test_only_real_completion_tokens_reach_the_vocabulary_head(monkeypatch):
    """Right padding is not scored: the head sees mask.sum() rows, and padded positions hold 0 on both paths."""
    import fedrl_lightning.modules.policy as policy

    module = make_module(dtype="float64")
    perturb_adapter(module)
    rollout = synthetic_rollout(module)
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    mask = rollout.completion_mask.bool()
    assert not mask.all()
    rows = []

    def counting(hidden, *a, **kw):
        rows.append(hidden.shape[0])
        return chunked_log_probs(hidden, *a, **kw)

    monkeypatch.setattr(policy, "chunked_log_probs", counting)
    chunked, ent = module.completion_log_probs(*args, with_entropy=True)
    assert rows == [int(mask.sum())]
    module.logprob_chunk_size = 0
    dense, dense_ent = module.completion_log_probs(*args, with_entropy=True)
    for values in (chunked, ent, dense, dense_ent):
        assert (values[~mask] == 0).all() and (values[mask] != 0).all()
    torch.testing.assert_close(chunked, dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, dense_ent, rtol=1e-10, atol=1e-10)
