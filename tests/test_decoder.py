"""The lean decode loop against HF: logits at every step, greedy tokens, sampling, filtering, weight refresh; the
kernels' checks and their fallback."""

import os
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from fedrl_lightning.rollout import decoder as dec
from fedrl_lightning.rollout import kernels
from fedrl_lightning.rollout.decoder import LeanDecoder, UnsupportedModel, check_supported, filter_logits, sample
from fedrl_lightning.rollout.hf import HFRollout

VOCAB = 96
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(kind: str, dtype: str = "float32"):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,  # large weights: varied greedy tokens, so the comparison means something
        rope_theta=5000.0,
        tie_word_embeddings=True,
        dtype=dtype,
    )
    return Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)


def _model(kind: str, lora: bool, dtype: str = "float32"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind, dtype), attn_implementation="eager")
    model = model.to(getattr(torch, dtype)).eval()
    if kind == "qwen2":  # q/k/v carry biases; HF initialises them to zero
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.3)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
        _perturb(model, seed=1)
    return model


def _perturb(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.2)


def _prompts(repeat: bool = True):
    """Three left-padded prompts of different lengths. ``repeat``: the third repeats the first (a shared prefill);
    else three distinct ones, in the order the prefill's de-duplication sorts rows (so none is copied)."""
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(2, VOCAB, (n,), generator=gen) for n in (7, 3, 5)]
    rows[2] = rows[0] if repeat else rows[2]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 7 - len(r) :], mask[i, 7 - len(r) :] = r, 1
    if not repeat:
        ordered = torch.unique(torch.cat([ids, mask], dim=1), dim=0)
        ids, mask = ordered[:, :7], ordered[:, 7:]
    return ids, mask


def _hf_logits(model, ids, mask, completion):
    """HF's logits for each completion position given everything before it: (B, C, V)."""
    full_ids = torch.cat([ids, completion], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(completion)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
    return logits[:, ids.shape[1] - 1 : -1].float()


needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="no AVX2 CPU, C++ compiler or ninja")


@pytest.mark.parametrize("kind, lora, repeat", [("llama", False, True), ("llama", True, False), ("qwen2", True, True)])
@pytest.mark.parametrize("compiled", [pytest.param(True, marks=needs_kernels), False])
def test_logits_at_every_step_and_greedy_tokens_match_hf(monkeypatch, kind, lora, repeat, compiled):
    model = _model(kind, lora)
    ids, mask = _prompts(repeat)
    seen = []
    monkeypatch.setattr(dec, "sample", lambda logits, *a: seen.append(logits.clone()) or logits.argmax(-1))
    if not compiled:  # oneDNN matmuls and torch ops
        monkeypatch.setattr(kernels, "library", lambda: None)
    decoder = LeanDecoder(model)
    assert decoder.fused(100) == compiled
    out = decoder.generate(ids, mask, 10, eos_token_ids=[-1], pad_token_id=0, temperature=0)
    assert out.shape == (3, 10)
    torch.testing.assert_close(torch.stack(seen, dim=1), _hf_logits(model, ids, mask, out), rtol=1e-4, atol=1e-4)
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(out, hf[:, ids.shape[1] :])
    assert torch.equal(out[0], out[2]) == repeat and not torch.equal(out[0], out[1]) and (mask == 0).any()
    assert len(out.unique()) > 5  # not a degenerate repeat of one token


def test_bf16_logits_track_hf_bf16(monkeypatch):
    model = _model("llama", lora=True, dtype="bfloat16")
    ids, mask = _prompts()
    seen = []
    monkeypatch.setattr(dec, "sample", lambda logits, *a: seen.append(logits.clone()) or logits.argmax(-1))
    out = LeanDecoder(model).generate(ids, mask, 6, eos_token_ids=[-1], pad_token_id=0, temperature=0)
    ours, ref = torch.stack(seen, dim=1), _hf_logits(model, ids, mask, out)
    assert (ours - ref).abs().max() <= 0.05 * ref.abs().max()  # bf16 rounding in a different order


def test_eos_ends_a_row_with_padding_and_min_tokens_suppresses_it():
    model = _model("llama", lora=False)
    ids, mask = _prompts()
    decoder = LeanDecoder(model)
    greedy = decoder.generate(ids, mask, 8, eos_token_ids=[-1], pad_token_id=0, temperature=0)
    eos = int(greedy[1, 2])  # row 1's third token becomes the EOS
    out = decoder.generate(ids, mask, 8, eos_token_ids=[eos], pad_token_id=0, temperature=0)
    row = out[1].tolist()
    assert row[:3] == greedy[1, :3].tolist() and set(row[3:]) <= {0}
    forced = decoder.generate(ids, mask, 8, eos_token_ids=[eos], pad_token_id=0, temperature=0, min_new_tokens=8)
    assert forced.shape == (3, 8) and eos not in forced[:, :8].tolist()[1][:8]
    all_eos = decoder.generate(ids, mask, 8, eos_token_ids=greedy[:, 0].tolist(), pad_token_id=0, temperature=0)
    assert all_eos.shape == (3, 1)  # every row ended: the loop stops


def test_load_repacks_only_what_changed_and_follows_the_adapter():
    model = _model("llama", lora=True)
    decoder = LeanDecoder(model)
    ids, mask = _prompts()
    before = decoder.generate(ids, mask, 8, eos_token_ids=[-1], pad_token_id=0, temperature=0)
    assert decoder.load(model) == 0  # nothing changed
    with torch.no_grad():
        model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight.add_(0.5)
    assert decoder.load(model) == 1  # one fused matmul; the tied lm_head and the other layers are kept
    _perturb(model, seed=5)
    assert decoder.load(model) == 2 * 4  # every LoRA-targeted fused matmul; still not the lm_head
    after = decoder.generate(ids, mask, 8, eos_token_ids=[-1], pad_token_id=0, temperature=0)
    assert torch.equal(after, LeanDecoder(model).generate(ids, mask, 8, [-1], 0, temperature=0))
    assert not torch.equal(after, before)


def test_sampling_draws_from_the_softmax_at_the_temperature():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0, 0.5]]).repeat(200_000, 1)
    tokens = sample(logits, temperature=0.7)
    freq = torch.bincount(tokens, minlength=6).float() / len(tokens)
    expected = (logits[0] / 0.7).softmax(-1)
    assert (freq - expected).abs().max() < 0.005
    assert freq[4] == 0  # negligible-probability token never drawn
    assert torch.equal(sample(logits[:3], temperature=0), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (None, 0.8), (5, 0.6), (None, 0.01)])
def test_filter_matches_hf_warpers(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(16, 50) * 3
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(filter_logits(logits, top_p, top_k), expected)
    kept = torch.isfinite(expected)
    tokens = sample(logits.repeat(50, 1), 1.0, top_p, top_k)
    assert kept.repeat(50, 1).gather(1, tokens[:, None]).all()  # only kept tokens are drawn


def test_unsupported_models_are_named_and_hf_rollout_falls_back():
    with pytest.raises(UnsupportedModel, match="model_type 'gpt2'"):
        check_supported(GPT2Config())
    with pytest.raises(UnsupportedModel, match="hidden_act 'gelu'"):
        check_supported(LlamaConfig(hidden_act="gelu"))
    with pytest.raises(UnsupportedModel, match="rope_type 'linear'"):
        check_supported(LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    assert not HFRollout().uses_lean_decoder(gpt2)
    with pytest.raises(UnsupportedModel, match=r"lean_decoder=True.*'gpt2'"):
        HFRollout(lean_decoder=True).uses_lean_decoder(gpt2)
    llama = _model("llama", lora=False)
    assert HFRollout().uses_lean_decoder(llama)
    assert not HFRollout(generate_kwargs={"repetition_penalty": 1.1}).uses_lean_decoder(llama)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 8, 11, kernels.LARGE_M + 1])
def test_kernel_linear_computes_the_linear_with_bias_and_residual(rows):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(13, 20), torch.randn(13), torch.randn(rows, 20)  # 13: a zero-padded last panel
    packed = kernels.pack(weight)
    assert packed.shape == (2, 20, 8)
    torch.testing.assert_close(kernels.unpack(packed, 13), weight)
    expected = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(kernels.linear(x, packed, 13, bias), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.linear(x, packed, 13), x @ weight.T, rtol=1e-5, atol=1e-5)
    residual = torch.randn(rows, 13)
    target = residual + expected
    out = kernels.linear(x, packed, 13, bias, residual=residual)
    assert out.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_kernel_glue_matches_torch():
    torch.manual_seed(0)
    x, w = torch.randn(5, 24), torch.randn(24)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), torch.nn.functional.rms_norm(x, (24,), w, 1e-5))
    gate_up = torch.randn(4, 2 * 20) * 8  # 20: two vector blocks and a scalar tail; large |gate| tests the clamp
    gate_up[0, :3] = torch.tensor([-200.0, 200.0, 0.0])
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)


@needs_kernels
def test_kernels_read_strided_inputs_and_refuse_strided_outputs():
    torch.manual_seed(0)
    weight, x = torch.randn(16, 20), torch.randn(20, 3).T  # a transposed view: read through a contiguous copy
    torch.testing.assert_close(kernels.linear(x, kernels.pack(weight), 16), x @ weight.T, rtol=1e-5, atol=1e-5)
    strided = torch.zeros(16, 3).T  # written in place, a copy would lose the result
    with pytest.raises(ValueError, match="contiguous fp32"):
        kernels.linear(x, kernels.pack(weight), 16, residual=strided)
    qkv, cos = torch.randn(2, 4, 8), torch.randn(2, 8)
    cache = torch.zeros(2, 1, 5, 8)
    with pytest.raises(ValueError, match="contiguous fp32"):
        kernels.rope_cache(qkv.transpose(0, 1), cos, cos, cache, cache.clone(), 2, 0)
    with pytest.raises(ValueError, match="rope_cache"):  # a position past the cache: refused, not written out of bounds
        kernels.rope_cache(qkv, cos, cos, cache, cache.clone(), 2, 5)


@pytest.mark.parametrize(
    "env, value, reason",
    [
        ("FEDRL_DECODE_KERNELS", "0", "FEDRL_DECODE_KERNELS=0"),
        pytest.param("CXX", "no-cxx", "no C++ compiler", marks=needs_kernels),  # else another reason comes first
    ],
)
def test_fallback_is_warned_once_with_its_reason(monkeypatch, caplog, env, value, reason):
    monkeypatch.setenv(env, value)
    kernels.library.cache_clear()
    try:
        assert not kernels.available(torch.zeros(1)) and kernels.library() is None
    finally:
        kernels.library.cache_clear()  # the next test builds (or finds built) the real kernels again
    warnings = [r for r in caplog.records if r.name == kernels.__name__]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING" and reason in warnings[0].getMessage()


@needs_kernels
def test_a_build_error_falls_back_naming_its_first_error(monkeypatch, caplog, tmp_path):
    source = tmp_path / "kernels.cpp"
    source.write_text("void f() {\n  not_declared();\n  also_not_declared();\n}\n")
    monkeypatch.setattr(kernels, "SOURCE", source)
    monkeypatch.setenv("FEDRL_CACHE_DIR", str(tmp_path / "cache"))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
    finally:
        kernels.library.cache_clear()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == kernels.__name__]
    assert "the build failed: kernels.cpp:2:" in warning and "not_declared" in warning
    assert "also_not_declared" not in warning


def test_a_build_lock_left_by_a_killed_build_is_removed(tmp_path):
    fresh, stale = tmp_path / "fresh", tmp_path / "stale"
    fresh.touch(), stale.touch()
    old = time.time() - kernels.STALE_LOCK_S - 1
    os.utime(stale, (old, old))
    kernels._clear_stale_lock(fresh), kernels._clear_stale_lock(stale), kernels._clear_stale_lock(tmp_path / "none")
    assert fresh.exists() and not stale.exists()  # a build in progress keeps its lock


@pytest.mark.skipif(kernels.library() is None, reason="decode kernels unavailable")
def test_one_pass_repack_equals_merge_concatenate_pack_and_reuses_its_buffer():
    from fedrl_lightning.rollout.fused import FusedLinear, effective_weight

    model = _model("llama", lora=True)
    _perturb(model, seed=3)
    attn = model.base_model.model.model.layers[0].self_attn
    modules, scale = [attn.q_proj, attn.k_proj, attn.v_proj], 16**-0.5
    fused = FusedLinear(modules, 8, (attn.q_proj.out_features, scale))
    merged = torch.cat([effective_weight(m) for m in modules]).detach().clone()
    merged[: attn.q_proj.out_features] *= scale
    assert fused.kind == "kernel"
    torch.testing.assert_close(fused.weight, kernels.pack(merged), rtol=1e-6, atol=1e-6)
    buffer = fused.weight.data_ptr()
    _perturb(model, seed=4)
    assert fused.refresh(modules) and fused.weight.data_ptr() == buffer  # repacked in place
    merged = torch.cat([effective_weight(m) for m in modules]).detach().clone()
    merged[: attn.q_proj.out_features] *= scale
    torch.testing.assert_close(fused.weight, kernels.pack(merged), rtol=1e-6, atol=1e-6)
