"""The forward pass that scores completion tokens: vocabulary logits, or only the last hidden states for the
chunked log-probs (``losses.chunked_log_probs``), with or without one prompt pass shared by a group of completions.

Shapes: B completions, P prompt tokens, C completion tokens, H hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import Tensor, nn

# Config attributes of models whose logits are not ``lm_head(hidden)`` (soft-capping, scaling): those keep the dense
# path, whose logits come from the model's own forward.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model: PeftModel) -> nn.Linear | None:
    """The LM head when log-probs may be computed from the last hidden states: a plain ``nn.Linear`` (frozen or not,
    tied to the input embedding or not) whose output the model returns unchanged as its logits. None when the head
    is adapted, wrapped or quantized, or the model transforms its logits: the caller then uses the logits."""
    base = model.get_base_model()
    try:
        head, decoder = base.get_output_embeddings(), base.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    if type(head) is not nn.Linear or decoder is None or decoder is base:
        return None
    if any(getattr(base.config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head


def completion_pass(
    model: PeftModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    share_prompt_prefix: bool,
    logits: bool = True,
    with_hidden: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """One forward pass that scores each completion token.

    Only the last C + 1 positions get vocabulary logits (``logits_to_keep``); with ``logits=False`` none do: the
    decoder alone runs (the LM head is skipped) and the hidden states come back.

    Args:
        prompt_ids: (B, P) left-padded.
        prompt_mask: (B, P).
        completion_ids: (B, C) right-padded.
        completion_mask: (B, C).
        share_prompt_prefix: one prompt pass per run of identical prompts (``prompt_groups``).
        logits: compute the vocabulary logits.
        with_hidden: return the last hidden states (always returned when ``logits`` is False).

    Returns:
        (logits (B, C, V) or None, hidden (B, C, H) or None); position t of either scores completion token t.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    # Positions as generate() assigns them under left padding.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    with_hidden = with_hidden or not logits
    groups = prompt_groups(prompt_ids, prompt_mask) if share_prompt_prefix else None
    net = model if logits else model.get_base_model().get_decoder()
    if groups is not None:
        return _shared_prefix_pass(
            net, input_ids, attention_mask, position_ids, prompt_ids.shape[1], groups, logits, with_hidden
        )
    c = completion_ids.shape[1]
    if not logits:
        out = net(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return None, out.last_hidden_state[:, -c - 1 : -1]
    out = net(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=c + 1,
        output_hidden_states=with_hidden,
    )
    hidden = out.hidden_states[-1][:, -c - 1 : -1] if with_hidden else None
    return out.logits[:, :-1], hidden


def _shared_prefix_pass(
    net: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    p: int,
    groups: tuple[Tensor, list[int]],
    logits: bool,
    with_hidden: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """``completion_pass`` with one prompt pass per group: the prompt's KV cache is repeated to every row of its group
    (an autograd op, so each row's gradient flows back into the one prompt pass) and the completions attend to it.
    The last completion token predicts nothing and is not fed. ``net`` is the causal LM (``logits``) or its decoder."""

    def last_hidden(out: object) -> Tensor:
        return out.hidden_states[-1] if logits else out.last_hidden_state

    first, counts = groups
    head_kwargs = dict(output_hidden_states=with_hidden) if logits else {}
    prefix = net(
        input_ids=input_ids[first, :p],
        attention_mask=attention_mask[first, :p],
        position_ids=position_ids[first, :p],
        use_cache=True,
        **(dict(head_kwargs, logits_to_keep=1) if logits else {}),
    )
    scores = [_repeat_rows(prefix.logits, counts)] if logits else None
    hidden = [_repeat_rows(last_hidden(prefix)[:, -1:], counts)] if with_hidden else None
    if input_ids.shape[1] - p > 1:
        cache = prefix.past_key_values
        for layer in cache.layers:
            layer.keys, layer.values = _repeat_rows(layer.keys, counts), _repeat_rows(layer.values, counts)
        out = net(
            input_ids=input_ids[:, p:-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=position_ids[:, p:-1],
            past_key_values=cache,
            use_cache=True,
            **head_kwargs,
        )
        if scores is not None:
            scores.append(out.logits)
        if hidden is not None:
            hidden.append(last_hidden(out))
    return (
        None if scores is None else torch.cat(scores, dim=1),
        None if hidden is None else torch.cat(hidden, dim=1),
    )


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


__all__ = ["completion_pass", "output_head", "prompt_groups"]
