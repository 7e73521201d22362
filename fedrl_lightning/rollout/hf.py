"""Rollouts with HF ``generate`` on the live policy: no weight sync needed, the default on CPU."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from fedrl_lightning.rollout import Rollout, SamplingParams, completion_masks
from fedrl_lightning.rollout.decoder import (
    LeanDecoder,
    UnsupportedModel,
    base_model,
    check_supported,
    effective_weight,
    is_lora,
)
from fedrl_lightning.rollout.packed import load_weight, pack_linears

if TYPE_CHECKING:  # annotations only: the rollout never imports the modules at run time
    from fedrl_lightning.modules.policy import PolicyModule


def encode_prompts(tokenizer: Any, prompts: list[Any], max_prompt_length: int | None = None) -> dict[str, torch.Tensor]:
    """Chat-template and left-pad prompts; a prompt is a list of chat messages or a plain string.

    Long prompts keep their last ``max_prompt_length`` tokens (the question and the generation prompt).
    """
    if tokenizer.chat_template is None and not all(isinstance(p, str) for p in prompts):
        raise ValueError(
            f"the tokenizer of {tokenizer.name_or_path!r} has no chat template, but the prompts are chat messages: "
            "use an instruct model, set tokenizer.chat_template, or give plain-string prompts"
        )
    texts = [
        p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    return tokenizer(
        texts,
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
        truncation=max_prompt_length is not None,
        max_length=max_prompt_length,
    )


class HFRollout:
    """Batched decoding of all prompts x ``num_generations`` at once on the live policy: the lean decode loop
    (``rollout.decoder``) where it applies, else HF ``generate``.

    Args:
        max_prompt_length: keep at most this many prompt tokens (left-truncated); None keeps all.
        generation_batch_size: completions per ``generate`` call; None does the whole batch in one call.
        lean_decoder: decode with ``LeanDecoder``: fused, oneDNN-packed weights with the adapter merged in as they are
            packed, a preallocated KV cache, each prompt prefilled once for its ``num_generations`` copies.
            None (the default) = on for a supported (Llama-family) model on CPU when no ``generate_kwargs`` are
            given: 1.5x HF ``generate`` on the merged packed copy at batch 8 (``benchmarks/NOTES.md``). True on an
            unsupported model is an error; ``merged_copy``/``packed_weights`` then do not apply.
        merged_copy: decode with a plain copy of the base model into which the current adapter is merged before
            each call (one extra copy of the base weights, not per client), so the decode loop runs no LoRA
            matmuls. The copy is rebuilt from the frozen base each time: no rounding drift accumulates. None (the
            default) = on for a model on CPU, where with ``packed_weights`` it decodes 2.2x faster than the LoRA
            model at batch 8 (``benchmarks/NOTES.md``), and off on accelerators, where the copy costs scarce memory.
        packed_weights: with ``merged_copy`` on CPU, hold the copy's linear weights in oneDNN's packed layout
            (``rollout.packed``), repacked after each merge: 2-3x faster skinny matmuls at decode batch sizes.
        generate_kwargs: extra keyword arguments for ``generate`` (e.g. ``repetition_penalty``, or
            ``cache_implementation: static``); they override the ones derived from the sampling parameters.
    """

    def __init__(
        self,
        max_prompt_length: int | None = 512,
        generation_batch_size: int | None = None,
        lean_decoder: bool | None = None,
        merged_copy: bool | None = None,
        packed_weights: bool = True,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.max_prompt_length = max_prompt_length
        self.generation_batch_size = generation_batch_size
        self.lean_decoder = lean_decoder
        self.merged_copy = merged_copy
        self.packed_weights = packed_weights
        self.generate_kwargs = dict(generate_kwargs or {})
        self._copy: Any = None
        self._copy_of: Any = None
        self._decoder: LeanDecoder | None = None
        self._decoder_of: Any = None

    def uses_lean_decoder(self, model: Any) -> bool:
        """Whether ``generate`` on ``model`` runs the lean decode loop (see ``lean_decoder``)."""
        if self.lean_decoder is False:
            return False
        try:
            check_supported(base_model(model).config)
        except UnsupportedModel as err:
            if self.lean_decoder:
                raise UnsupportedModel(f"HFRollout(lean_decoder=True): unsupported model: {err}") from None
            return False
        return bool(self.lean_decoder) or (not self.generate_kwargs and next(model.parameters()).device.type == "cpu")

    def decoder(self, model: Any) -> LeanDecoder:
        """The lean decoder of ``model``, its packed weights brought up to the current parameters."""
        if self._decoder is None or self._decoder_of is not model:
            self._decoder, self._decoder_of = LeanDecoder(model), model
        else:
            self._decoder.load(model)
        return self._decoder

    @torch.no_grad()
    def merged_model(self, peft_model: Any) -> Any:
        """The plain generation copy with ``peft_model``'s current adapter merged: W = W_base + scale * B @ A."""
        if self._copy is None or self._copy_of is not peft_model:
            self._copy = copy.deepcopy(peft_model).merge_and_unload().eval()
            if self.packed_weights:
                pack_linears(self._copy)
            self._copy_of = peft_model
        targets = dict(self._copy.named_modules())
        for name, layer in peft_model.named_modules():
            if is_lora(layer):
                load_weight(targets[name.removeprefix("base_model.model.")], effective_weight(layer))
        return self._copy

    @torch.no_grad()
    def generate(self, module: PolicyModule, prompts: list[Any], params: SamplingParams) -> Rollout:
        model, tokenizer = module.model, module.tokenizer
        lean = self.uses_lean_decoder(model)
        merged = False if lean else self.merged_copy
        if merged is None:
            merged = next(model.parameters()).device.type == "cpu" and _has_lora(model)
        if merged:
            model = self.merged_model(model)
        enc = encode_prompts(tokenizer, prompts, self.max_prompt_length)
        device = next(model.parameters()).device
        prompt_ids = enc["input_ids"].repeat_interleave(params.num_generations, dim=0).to(device)
        prompt_mask = enc["attention_mask"].repeat_interleave(params.num_generations, dim=0).to(device)
        eos_ids = eos_token_ids(module.model, tokenizer)  # the live config, not the copy's snapshot of it
        sampling = params.temperature > 0
        gen_kwargs = dict(
            max_new_tokens=params.max_completion_length,
            do_sample=sampling,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
            use_cache=True,
            min_new_tokens=params.min_tokens or None,
        )
        if sampling:
            gen_kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0)
        else:  # greedy: silence the model's default sampling settings
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        gen_kwargs.update(self.generate_kwargs)
        was_training = model.training
        model.eval()
        step = self.generation_batch_size or len(prompt_ids)
        chunks = []
        try:
            decoder = self.decoder(model) if lean else None
            for start in range(0, len(prompt_ids), step):
                ids, mask = prompt_ids[start : start + step], prompt_mask[start : start + step]
                if decoder is not None:
                    chunks.append(
                        decoder.generate(
                            ids,
                            mask,
                            params.max_completion_length,
                            eos_ids,
                            tokenizer.pad_token_id,
                            temperature=params.temperature,
                            top_p=params.top_p,
                            top_k=params.top_k,
                            min_new_tokens=params.min_tokens,
                        )
                    )
                    continue
                out = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
                chunks.append(out[:, ids.shape[1] :])
        finally:
            model.train(was_training)
        width = max(c.shape[1] for c in chunks)
        completion_ids = torch.cat(
            [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=tokenizer.pad_token_id) for c in chunks]
        )
        completion_mask, is_truncated = completion_masks(completion_ids, eos_ids)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, is_truncated, texts)


def _has_lora(model: Any) -> bool:
    return any(is_lora(m) for m in model.modules())


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a completion: the model's generation-config EOS ids, plus the tokenizer's EOS id."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
