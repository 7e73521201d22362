"""Per-token log-probs of chosen tokens straight from the last hidden states, a chunk of tokens at a time.

The dense path builds the (T, V) logits ``h W^T`` of all T scored tokens, then a log-softmax of the same size, and
its backward one more (T, V) gradient. Here the tokens are taken ``chunk_size`` rows at a time: a chunk's logits are
formed, reduced to what is kept (the target's log-prob, the log-sum-exp, the entropy) and dropped, so at most a
(chunk_size, V) block exists at once. The gradient is exact (no approximation, only float rounding):

    logp_t = z_t[y_t] - logsumexp(z_t),  z_t = (W h_t + b) / tau,
    d logp_t / d h_t = W^T (onehot(y_t) - softmax(z_t)) / tau,
    d logp_t / d W   = (onehot(y_t) - softmax(z_t)) h_t^T / tau.

Since ``logp_t`` depends on ``h_t`` only, ``d logp_t / d h_t`` is one (H,) vector per token: when W does not train
(LoRA leaves the LM head frozen) the forward stores it, a (T, H) tensor, and the backward is a row scaling, with no
second pass over the vocabulary. When W (or b) trains, the backward recomputes each chunk's logits from the saved
log-sum-exp and accumulates W's gradient in float32.

Shapes: T scored tokens (any leading shape, flattened), H hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from fedrl_lightning.losses.logprobs import entropy_from_log_softmax

LOGIT_CHUNK_ELEMENTS = 1 << 22
"""Logit elements per chunk when ``chunk_size`` is None: 16 MiB of float32, 85 tokens of a 49,152 vocabulary (a chunk's
working set is a few such blocks; on a CPU the (85 x H) @ (H x V) matmul is still compute-bound)."""


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk whose float32 logits fill ``LOGIT_CHUNK_ELEMENTS`` (at least 1)."""
    return max(1, LOGIT_CHUNK_ELEMENTS // max(1, vocab_size))


def chunked_log_probs(
    hidden: Tensor,
    weight: Tensor,
    index: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``index`` under softmax((hidden W^T + b) / temperature), never holding more than a chunk of logits.

    Equals ``selective_log_softmax(F.linear(hidden, weight, bias), index, temperature)`` (and
    ``entropy_from_logits`` of the same logits), values and gradients, up to float rounding. The logits are computed
    in the inputs' dtype (as the LM head computes them) and upcast to float32 for the softmax.

    Args:
        hidden: (..., H) last hidden states, the ones the LM head reads.
        weight: (V, H) LM head weight (may be tied to the input embedding; may require grad).
        index: (...) target token ids, the leading shape of ``hidden``.
        bias: (V,) LM head bias, or None.
        temperature: the logits are divided by it (> 0).
        chunk_size: tokens per chunk; None = ``default_chunk_size(V)``.
        with_entropy: also return the entropy of each token's distribution (no gradient flows through it).

    Returns:
        (log_probs (...), entropy (...) or None), float32 (float64 for float64 inputs).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.shape[:-1] != index.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and index {tuple(index.shape)} disagree")
    chunk = default_chunk_size(weight.shape[0]) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = index.shape
    h, idx = hidden.reshape(-1, hidden.shape[-1]), index.reshape(-1)
    grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if grad:
        log_probs, entropy = _ChunkedLogProbs.apply(h, weight, bias, idx, float(temperature), chunk, with_entropy)
    else:
        log_probs, entropy, _, _ = _forward(h, weight, bias, idx, float(temperature), chunk, with_entropy, False)
    return log_probs.reshape(lead), entropy.reshape(lead) if with_entropy else None


def _accumulation_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)


def _scaled_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, dtype: torch.dtype) -> Tensor:
    """(c, V) logits / temperature in ``dtype``: the matmul in the inputs' dtype (as the LM head), then upcast."""
    z = F.linear(h, weight, bias).to(dtype)
    return z.div_(temperature) if temperature != 1.0 else z


def _one_hot_minus_softmax(log_probs: Tensor, index: Tensor) -> Tensor:
    """(c, V) onehot(index) - softmax, from the (c, V) log-softmax (overwritten)."""
    g = log_probs.exp_().neg_()
    rows = torch.arange(len(index), device=index.device)
    g[rows, index] += 1
    return g


def _forward(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    index: Tensor,
    temperature: float,
    chunk: int,
    with_entropy: bool,
    with_jacobian: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """The chunk loop: (log_probs (T,), entropy (T,) or empty, d logp / d h (T, H) or None, logsumexp (T,))."""
    dtype = _accumulation_dtype(h, weight)
    n = h.shape[0]
    log_probs = torch.empty(n, dtype=dtype, device=h.device)
    lse = torch.empty(n, dtype=dtype, device=h.device)
    entropy = torch.empty(n if with_entropy else 0, dtype=dtype, device=h.device)
    jacobian = torch.empty(n, h.shape[1], dtype=dtype, device=h.device) if with_jacobian else None
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        idx = index[s:e]
        z = _scaled_logits(h[s:e], weight, bias, temperature, dtype)
        lse[s:e] = torch.logsumexp(z, dim=-1)
        logp = z.sub_(lse[s:e, None])  # the (c, V) log-softmax, in place of the logits
        log_probs[s:e] = logp.gather(-1, idx[:, None]).squeeze(-1)
        if with_entropy:
            entropy[s:e] = entropy_from_log_softmax(logp)
        if jacobian is not None:
            g = _one_hot_minus_softmax(logp, idx)
            if temperature != 1.0:
                g.div_(temperature)
            jacobian[s:e] = g.to(weight.dtype) @ weight
        del z, logp
    return log_probs, entropy, jacobian, lse


class _ChunkedLogProbs(torch.autograd.Function):
    """(h (T, H), W (V, H), b (V,) | None, index (T,)) -> (log_probs (T,), entropy (T,) or empty); see the module."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        index: Tensor,
        temperature: float,
        chunk: int,
        with_entropy: bool,
    ) -> tuple[Tensor, Tensor]:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        recompute = need_w or need_b  # W's gradient needs the upstream gradient: a second pass in the backward
        log_probs, entropy, jacobian, lse = _forward(
            h, weight, bias, index, temperature, chunk, with_entropy, need_h and not recompute
        )
        ctx.mark_non_differentiable(entropy)
        ctx.temperature, ctx.chunk, ctx.recompute, ctx.h_dtype = temperature, chunk, recompute, h.dtype
        device = h.device.type  # the backward recomputes the logits under the forward's autocast state
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        if recompute:
            ctx.save_for_backward(h, weight, bias, index, lse)
        else:
            ctx.save_for_backward(jacobian)
        return log_probs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_log_probs: Tensor, _grad_entropy: Tensor) -> tuple:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not ctx.recompute:
            (jacobian,) = ctx.saved_tensors
            grad_h = (grad_log_probs.to(jacobian.dtype)[:, None] * jacobian).to(ctx.h_dtype)
            return grad_h, None, None, None, None, None, None
        h, weight, bias, index, lse = ctx.saved_tensors
        dtype, temperature = lse.dtype, ctx.temperature
        grad = grad_log_probs.to(dtype) / temperature  # (T,): the chain rule through z = logits / temperature
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
        device, autocast_dtype, autocast = ctx.autocast
        for s in range(0, h.shape[0], ctx.chunk):
            e = min(s + ctx.chunk, h.shape[0])
            with torch.autocast(device, dtype=autocast_dtype, enabled=autocast):  # the forward's logits, bit for bit
                logp = _scaled_logits(h[s:e], weight, bias, temperature, dtype)
            g = _one_hot_minus_softmax(logp.sub_(lse[s:e, None]), index[s:e]).mul_(grad[s:e, None])  # d loss / d z
            if grad_h is not None:
                grad_h[s:e] = g.to(weight.dtype) @ weight
            if grad_w is not None:
                grad_w.addmm_(g.t(), h[s:e].to(dtype))
            if grad_b is not None:
                grad_b += g.sum(0)
            del logp, g
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


__all__ = ["LOGIT_CHUNK_ELEMENTS", "chunked_log_probs", "default_chunk_size"]
