"""vLLM rollouts from an in-process engine (colocated); ``rollout/vllm_server.py`` drives a ``vllm serve`` process.

Both backends implement the rollout protocol of ``HFRollout`` and return the sampler's log-probs of the sampled
tokens (``Rollout.sampling_log_probs``) for the importance-sampling correction (``losses.importance_sampling_weights``).
Prompt token ids are exactly ``HFRollout``'s (``encode_prompts``); vLLM receives token ids, never text.

The engine holds a *copy* of the policy, which each backend keeps current by itself: right before every generation
its ``WeightSync`` (``rollout/vllm_sync.py``) compares the live adapter with the engine's copy and pushes only what
changed. Everything that touches vLLM internals is in this file and in the worker functions below, behind the small
"engine operations" interface that the sync uses (``vllm_sync.EngineOps``: ``push_weights``, ``load_adapter``,
``use_adapter``, ``remove_adapter``, ``reset_prefix_cache``, ``packed_modules_mapping``).
"""

from __future__ import annotations

import gc
import logging
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedrl_lightning.rollout import Rollout, SamplingParams, completion_masks
from fedrl_lightning.rollout.hf import encode_prompts, eos_token_ids
from fedrl_lightning.rollout.vllm_sync import Batches, SyncMethod, WeightSync

if TYPE_CHECKING:  # annotations only: the rollout never imports the modules at run time
    from fedrl_lightning.modules.policy import PolicyModule

log = logging.getLogger(__name__)


# -- shared helpers -------------------------------------------------------------------------------------------


def unpad_left(ids: Tensor, mask: Tensor) -> list[list[int]]:
    """Rows of a left-padded batch without their padding."""
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def build_rollout(
    tokenizer: Any,
    enc: dict[str, Tensor],
    num_generations: int,
    samples: list[tuple[list[int], list[float]]],
    eos_ids: list[int],
) -> Rollout:
    """A ``Rollout`` from N (token ids, sampled-token log-probs) pairs, padded and masked as ``HFRollout`` does.

    ``enc`` holds the encoded prompts; each is repeated ``num_generations`` times, matching the samples' order.
    """
    prompt_ids = enc["input_ids"].repeat_interleave(num_generations, dim=0)
    prompt_mask = enc["attention_mask"].repeat_interleave(num_generations, dim=0)
    pad = tokenizer.pad_token_id
    width = max([len(ids) for ids, _ in samples] + [1])
    completion_ids = torch.full((len(samples), width), pad, dtype=torch.long)
    log_probs = torch.zeros((len(samples), width), dtype=torch.float32)
    for i, (ids, lps) in enumerate(samples):
        completion_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        log_probs[i, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
    completion_mask, is_truncated = completion_masks(completion_ids, eos_ids)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)
    log_probs = log_probs.masked_fill(completion_mask == 0, 0.0)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, is_truncated, texts, log_probs)


def request_seed(params: SamplingParams, seed_from_torch: bool) -> int | None:
    """A per-call seed drawn from torch's RNG, so a client's RNG state (swapped per client) drives its sampling."""
    if not seed_from_torch or params.temperature <= 0:
        return None
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _model_path(module: Any, model_path: str | None) -> str:
    if model_path is not None:
        return model_path
    from fedrl_lightning.models import TINY, resolve_model_path

    name = getattr(module, "model_name", None)
    if name is None or name == TINY:
        raise ValueError(
            f"vLLM loads the policy from a checkpoint directory, and model {name!r} has none: save the base model "
            "with save_pretrained (plus its tokenizer) and build the module from that path, or pass model_path"
        )
    return resolve_model_path(name, getattr(module, "cache_dir", None))


@contextmanager
def _quiet(*logger_names: str, level: int = logging.ERROR):
    """Silence vLLM's per-layer reload chatter (a partial reload warns about every layer it leaves alone)."""
    loggers = [logging.getLogger(n) for n in logger_names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old, strict=True):
            lg.setLevel(lv)


_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload",)


# -- worker-side functions (run inside vLLM's worker through collective_rpc) ----------------------------------


def _worker_packed_modules_mapping(worker: Any) -> dict[str, list[str]]:
    model = worker.model_runner.get_model()
    return {k: list(v) for k, v in dict(getattr(model, "packed_modules_mapping", {}) or {}).items()}


def _worker_weight(worker: Any, module_name: str) -> Tensor:
    """The weight of one engine layer in vLLM's layout (e.g. the fused ``qkv_proj``), for checks.

    On CPU vLLM moves linear weights into prepacked oneDNN handles and leaves an empty parameter behind, so a
    linear layer's weight is read back by applying the layer to an identity matrix.
    """
    layer = worker.model_runner.get_model().get_submodule(module_name)
    layer = getattr(layer, "base_layer", layer)  # LoRA-enabled engines wrap layers
    weight = getattr(layer, "weight", None)
    if weight is not None and weight.numel() > 0:
        return weight.detach().clone()
    eye = torch.eye(layer.input_size_per_partition, dtype=layer.params_dtype)
    with torch.no_grad():
        out = layer(eye)
    out = out[0] if isinstance(out, tuple) else out
    if getattr(layer, "bias", None) is not None and not getattr(layer, "skip_bias_add", False):
        out = out - layer.bias
    return out.t().contiguous()


# -- colocated: an in-process vLLM engine ---------------------------------------------------------------------


class VLLMRollout:
    """Rollouts from an in-process ``vllm.LLM`` built lazily on the first generation from the policy's checkpoint.

    The engine holds its own copy of the weights and follows the policy by itself: before each generation or
    scoring call, ``weight_sync`` pushes the policy if it changed since the last push (``rollout/vllm_sync.py``).

    Args:
        max_prompt_length: keep at most this many prompt tokens (left-truncated), as ``HFRollout``.
        model_path: checkpoint directory for the engine; None = the module's model (``embedded`` resolves to its
            cached safetensors checkpoint; ``tiny-random`` has no directory and needs this argument).
        max_model_len: prompt + completion tokens per sequence at most.
        dtype: engine dtype; ``float32`` on CPU (bf16 decodes ~6x slower on AVX2 CPUs).
        gpu_memory_utilization: fraction of GPU memory for the engine (on CPU: of host memory, when
            ``kv_cache_memory_gb`` is None).
        kv_cache_memory_gb: explicit KV-cache size; None = derived from ``gpu_memory_utilization``.
        enable_prefix_caching: reuse KV blocks of shared prompt prefixes (the G copies of a prompt share them).
        enforce_eager: skip torch.compile (on CPU compilation costs ~40 s at engine start).
        enable_lora: serve LoRA adapters (needed by the ``adapter`` sync method; the ``merge`` method works either way).
        sync_method: how the policy reaches the engine: ``merge`` (changed layers' ``W + BA`` into the base weights;
            no LoRA kernels at generation) or ``adapter`` (one ``LoRARequest`` per adapter version, so one engine
            serves every client; needs ``enable_lora``); None = ``adapter`` when ``enable_lora``, else ``merge``.
        sync_batch_mb: merge method: megabytes of tensors per engine call (bounds the extra memory of a push).
        max_lora_rank: largest adapter rank the engine accepts (>= the policy's ``lora_r``).
        max_loras: adapters resident at once (one per client is enough for one engine to serve every client).
        max_num_seqs: sequences decoded concurrently; None = vLLM's default.
        seed: engine seed.
        logprobs_mode: ``processed_logprobs`` reports log-probs after temperature/top-k/top-p (the distribution the
            token was drawn from); ``raw_logprobs`` before them.
        seed_from_torch: draw a per-call sampling seed from torch's RNG (reproducible per client); False = the
            engine's own RNG stream.
        engine_kwargs: further ``vllm.LLM`` arguments.
    """

    def __init__(
        self,
        max_prompt_length: int | None = 512,
        model_path: str | None = None,
        max_model_len: int = 1024,
        dtype: str = "float32",
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_gb: float | None = 1.0,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = True,
        enable_lora: bool = False,
        sync_method: SyncMethod | None = None,
        sync_batch_mb: float = 256.0,
        max_lora_rank: int = 16,
        max_loras: int = 4,
        max_num_seqs: int | None = None,
        seed: int = 0,
        logprobs_mode: str = "processed_logprobs",
        seed_from_torch: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.max_prompt_length, self.model_path = max_prompt_length, model_path
        self.max_model_len, self.dtype = max_model_len, dtype
        self.gpu_memory_utilization, self.kv_cache_memory_gb = gpu_memory_utilization, kv_cache_memory_gb
        self.enable_prefix_caching, self.enforce_eager = enable_prefix_caching, enforce_eager
        self.enable_lora, self.max_lora_rank, self.max_loras = enable_lora, max_lora_rank, max_loras
        self.max_num_seqs, self.seed, self.logprobs_mode = max_num_seqs, seed, logprobs_mode
        self.seed_from_torch = seed_from_torch
        self.engine_kwargs = dict(engine_kwargs or {})
        method = sync_method or ("adapter" if enable_lora else "merge")
        if method == "adapter" and not enable_lora:
            raise ValueError("sync_method='adapter' needs a LoRA-enabled engine: VLLMRollout(enable_lora=True)")
        self.weight_sync = WeightSync(method, batch_mb=sync_batch_mb, max_adapters=max_loras)
        self.llm: Any = None
        self.lora_request: Any = None
        """The adapter generation uses (set by the adapter sync); None = the engine's own (possibly merged) weights."""
        self._packed: dict[str, list[str]] | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------

    def engine(self, module: PolicyModule) -> Any:
        """The ``vllm.LLM``, built on first use from the module's checkpoint."""
        if self.llm is None:
            self.llm = self._build(_model_path(module, self.model_path))
        return self.llm

    def _build(self, path: str) -> Any:
        # In-process engine: the worker (and its model) live in this process, so weight pushes are plain calls.
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            log.warning("VLLMRollout runs vLLM in-process: overriding VLLM_ENABLE_V1_MULTIPROCESSING=0")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=path,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
            enforce_eager=self.enforce_eager,
            gpu_memory_utilization=self.gpu_memory_utilization,
            seed=self.seed,
            logprobs_mode=self.logprobs_mode,
        )
        if self.kv_cache_memory_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_memory_gb * 2**30)
        if self.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.max_num_seqs
        if self.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=self.max_loras)
        kwargs.update(self.engine_kwargs)
        log.info("Starting an in-process vLLM engine on %s", path)
        set_num_threads = torch.set_num_threads
        try:
            return LLM(**kwargs)
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process once it has bound
            # its threads; the trainer shares this process and keeps its own thread settings.
            torch.set_num_threads = set_num_threads

    def close(self) -> None:
        """Shut the engine down and free its memory (a new one is built on the next generation)."""
        if self.llm is None:
            return
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception as err:  # best effort: the engine is dropped either way
            log.warning("vLLM engine shutdown: %s", err)
        self.llm, self.lora_request, self._packed = None, None, None
        self.weight_sync.reset()  # a new engine starts from the checkpoint with no adapters
        gc.collect()

    def reset_weights(self) -> None:
        """Reload the checkpoint's weights, unregister every adapter version (undoes every sync; the next generation
        pushes the policy again if it is not the checkpoint's)."""
        if self.llm is None:
            return
        with _quiet(*_RELOAD_LOGGERS):
            self.llm.collective_rpc("reload_weights")
        self.weight_sync.reset(self)
        self.lora_request = None
        self.reset_prefix_cache()

    def _prepare(self, module: PolicyModule) -> Any:
        llm = self.engine(module)
        self.weight_sync(self, module)
        return llm

    # -- the rollout protocol ---------------------------------------------------------------------------------

    def generate(self, module: PolicyModule, prompts: list[Any], params: SamplingParams) -> Rollout:
        from vllm import SamplingParams as VSamplingParams

        llm = self._prepare(module)
        tokenizer = module.tokenizer
        enc = encode_prompts(tokenizer, prompts, self.max_prompt_length)
        g = params.num_generations
        eos_ids = eos_token_ids(module.model, tokenizer)
        sampling = VSamplingParams(
            n=g,
            temperature=params.temperature,
            top_p=params.top_p if params.temperature > 0 else 1.0,
            top_k=(params.top_k or 0) if params.temperature > 0 else 0,
            max_tokens=params.max_completion_length,
            min_tokens=params.min_tokens,
            logprobs=0,  # the sampled token's log-prob only
            stop_token_ids=eos_ids,
            detokenize=False,  # we decode with the policy's tokenizer, as HFRollout does
            seed=request_seed(params, self.seed_from_torch),
        )
        requests = [{"prompt_token_ids": ids} for ids in unpad_left(enc["input_ids"], enc["attention_mask"])]
        outputs = llm.generate(requests, sampling, lora_request=self.lora_request, use_tqdm=False)
        samples = []
        for out in outputs:
            for comp in sorted(out.outputs, key=lambda c: c.index):
                ids = list(comp.token_ids)
                samples.append((ids, [step[tok].logprob for step, tok in zip(comp.logprobs, ids, strict=True)]))
        return build_rollout(tokenizer, enc, g, samples, eos_ids)

    @torch.no_grad()
    def completion_log_probs(
        self,
        module: PolicyModule,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion_ids: Tensor,
        completion_mask: Tensor,
        sync: bool = True,
    ) -> Tensor:
        """vLLM's log-probs (temperature 1, no top-k/top-p) of given completions: (N, C), 0 where masked.

        The counterpart of ``PolicyModule.completion_log_probs`` at temperature 1, from the engine's weights;
        ``sync=False`` skips the weight sync (scores whatever the engine holds now).
        """
        from vllm import SamplingParams as VSamplingParams

        llm = self._prepare(module) if sync else self.engine(module)
        prompts = unpad_left(prompt_ids.cpu(), prompt_mask.cpu())
        completions = unpad_left(completion_ids.cpu(), completion_mask.cpu())  # right padding: same unpad
        requests = [{"prompt_token_ids": p + c} for p, c in zip(prompts, completions, strict=True)]
        score = VSamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=1.0)
        if self.enable_lora:
            # vLLM 0.32 CPU: prompt log-probs of several requests in one batch on a LoRA-enabled engine fail in the
            # LoRA logits processor ("einsum(): subscript b has size <requests> for operand 1 which does not
            # broadcast with previously seen size <prompt tokens>"); one request per call works.
            outputs = [llm.generate([r], score, lora_request=self.lora_request, use_tqdm=False)[0] for r in requests]
        else:
            outputs = llm.generate(requests, score, lora_request=self.lora_request, use_tqdm=False)
        out = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for i, (o, p, c) in enumerate(zip(outputs, prompts, completions, strict=True)):
            steps = o.prompt_logprobs[len(p) :]
            out[i, : len(c)] = torch.tensor([step[tok].logprob for step, tok in zip(steps, c, strict=True)])
        return out

    # -- engine operations used by WeightSync ------------------------------------------------------------------

    def packed_modules_mapping(self) -> dict[str, list[str]]:
        """vLLM's fused layers, e.g. ``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``."""
        if self._packed is None:
            self._packed = self.llm.collective_rpc(_worker_packed_modules_mapping)[0]
        return self._packed

    def push_weights(self, batches: Batches) -> None:
        """Load HF-named tensors into the engine in place, one ``reload_weights`` call per batch.

        On CPU vLLM repacks linear weights for oneDNN after loading and drops the original parameters, so a plain
        ``model.load_weights`` fails (``'Parameter' object has no attribute 'weight_loader'``). vLLM's layerwise
        reload restores each layer's checkpoint layout, loads, re-runs the post-load processing and copies the
        result into the existing storage. A layer is rebuilt from what the batch holds: every batch must carry
        *all* tensors of each layer it touches (all shards of a fused qkv/gate_up layer and their biases).
        """
        with _quiet(*_RELOAD_LOGGERS):
            for batch in batches:
                if batch:
                    self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": batch})

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def load_adapter(self, name: str, int_id: int, path: str) -> Any:
        """Register the PEFT adapter saved at ``path``; returns the handle generation uses."""
        if not self.enable_lora:
            raise RuntimeError("the adapter sync needs VLLMRollout(enable_lora=True)")
        from vllm.lora.request import LoRARequest

        request = LoRARequest(name, int_id, path)
        self.llm.llm_engine.add_lora(request)
        return request

    def use_adapter(self, handle: Any) -> None:
        self.lora_request = handle

    def remove_adapter(self, handle: Any) -> None:
        if self.lora_request is handle:
            self.lora_request = None
        if self.llm is not None:
            self.llm.llm_engine.remove_lora(handle.lora_int_id)

    def engine_weight(self, module_name: str) -> Tensor:
        """One engine layer's weight in vLLM's naming and layout (e.g. ``model.layers.0.self_attn.qkv_proj``)."""
        return self.llm.collective_rpc(_worker_weight, args=(module_name,))[0]


__all__ = ["VLLMRollout"]
