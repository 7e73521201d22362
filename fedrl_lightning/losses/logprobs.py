"""Per-token log-probs and entropies from logits, one batch row at a time.

The (B, T, V) log-softmax is never materialised at once; each (T, V) row is upcast to float32 before the softmax.
Shapes: B completions per micro-batch, T completion tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def _rowwise_log_softmax(logits: Tensor, temperature: float) -> Iterator[Tensor]:
    """Yield the (T, V) log-softmax of logits / temperature one batch row at a time (bounded peak memory)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # Upcast one row at a time: a bf16 log-softmax over a large vocabulary is too coarse for importance ratios.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    for row in logits:
        yield torch.log_softmax(row.to(dtype) / temperature, dim=-1)


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probs of the chosen tokens without materialising the (B, T, V) log-softmax at once.

    Args:
        logits: (B, T, V) raw logits.
        index: (B, T) token ids.
        temperature: sampling temperature dividing the logits.

    Returns:
        (B, T) log-probs in float32 (float64 for float64 logits).
    """
    rows = _rowwise_log_softmax(logits, temperature)
    return torch.stack([lp.gather(-1, idx.unsqueeze(-1)).squeeze(-1) for lp, idx in zip(rows, index)])


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Token entropy of softmax(logits / temperature), computed row by row.

    Args:
        logits: (B, T, V) raw logits.
        temperature: sampling temperature.

    Returns:
        (B, T) entropies in nats, float32 (float64 for float64 logits).
    """
    return torch.stack([entropy_from_log_softmax(logp) for logp in _rowwise_log_softmax(logits, temperature)])


def entropy_from_log_softmax(log_probs: Tensor) -> Tensor:
    """(..., V) log-softmax -> (...) entropies in nats. -inf entries (banned tokens) have p = 0: their 0 * -inf term
    counts 0, not NaN."""
    p = log_probs.exp()
    return -torch.where(p > 0, p * log_probs, 0.0).sum(-1)
