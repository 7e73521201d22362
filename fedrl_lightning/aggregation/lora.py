"""LoRA-aware averaging: pair the A/B factors of each module, average their products and re-factorise by SVD.

``average_states`` is the entry point of the aggregators: ``separate`` averages A and B independently (a plain
``weighted_average``), ``product`` averages ΔW = B A per module (``product_average``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedrl_lightning.aggregation.base import (
    F64,
    LORA_MODES,
    LoraMode,
    check_choice,
    check_same_keys,
    mean64,
    normalised,
)

_LORA_FACTORS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


def lora_pairs(state: Mapping[str, Tensor]) -> dict[str, tuple[str, str]]:
    """Pair the LoRA factors of each module: ``{module_prefix: (a_key, b_key)}``.

    ``...q_proj.lora_A.default.weight`` pairs with ``...q_proj.lora_B.default.weight`` under the prefix
    ``...q_proj`` (``lora_embedding_A``/``lora_embedding_B`` likewise). Keys that are not LoRA factors are left out.

    Raises:
        ValueError: an A without its B (or the reverse), or two adapters on one module.
    """
    pairs: dict[str, tuple[str, str]] = {}
    b_keys = set()
    for key in state:
        parts = key.split(".")
        for a_tok, b_tok in _LORA_FACTORS:
            if b_tok in parts:
                b_keys.add(key)
            if a_tok not in parts:
                continue
            i = parts.index(a_tok)
            prefix, b_key = ".".join(parts[:i]), ".".join([*parts[:i], b_tok, *parts[i + 1 :]])
            if b_key not in state:
                raise ValueError(f"LoRA factor {key!r} has no matching {b_key!r}")
            if prefix in pairs:
                raise ValueError(f"module {prefix!r} has two LoRA pairs ({pairs[prefix][0]!r}, {key!r})")
            pairs[prefix] = (key, b_key)
    unpaired = b_keys - {b for _, b in pairs.values()}
    if unpaired:
        raise ValueError(f"LoRA factors without their A: {sorted(unpaired)}")
    return pairs


def _product_mean64(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float], reference: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    check_same_keys(states)
    pairs = lora_pairs(states[0])
    paired = {k for ab in pairs.values() for k in ab}
    out = mean64([{k: v for k, v in s.items() if k not in paired} for s in states], weights)
    p = normalised(weights)
    for prefix, (a_key, b_key) in pairs.items():
        a0, b0 = states[0][a_key], states[0][b_key]
        if a0.ndim != 2 or b0.ndim != 2 or a0.shape[0] != b0.shape[1]:
            raise ValueError(f"product mode needs 2-D factors B (out, r) @ A (r, in) at {prefix!r}")
        rank = a0.shape[0]
        prod = sum(w * (s[b_key].to(F64) @ s[a_key].to(F64)) for s, w in zip(states, p))
        u, sv, vh = torch.linalg.svd(prod, full_matrices=False)
        k = min(rank, sv.numel())
        root = sv[:k].sqrt()
        b = torch.zeros(b0.shape, dtype=F64)
        a = torch.zeros(a0.shape, dtype=F64)
        b[:, :k], a[:k] = u[:, :k] * root, root[:, None] * vh[:k]
        # [CHOICE] A component with a (numerically) zero singular value would be zero in both factors and then get
        # no gradient ever again (e.g. a round where no client moved B). Keep B's column at zero and give A's row
        # the singular vector at the clients' RMS row norm of A, so the product is unchanged and B can still learn.
        tol = max(prod.shape) * torch.finfo(F64).eps * (float(sv[0]) if sv.numel() else 0.0)
        dead = [j for j in range(k) if float(sv[j]) <= tol]
        if dead:
            row_norm = math.sqrt(sum(w * float(s[a_key].to(F64).pow(2).sum()) / rank for s, w in zip(states, p)))
            a[dead] = vh[dead] * row_norm
        # [CHOICE] SVD signs are arbitrary; flip each component to agree with the current global adapter so that the
        # factor-space delta (used by server optimizers) does not jump between rounds. The product is unchanged.
        if reference is not None and a_key in reference and b_key in reference:
            ref_a, ref_b = reference[a_key].to(F64), reference[b_key].to(F64)
            if ref_a.shape == a.shape and ref_b.shape == b.shape:
                sign = torch.where((a * ref_a).sum(1) + (b * ref_b).sum(0) < 0, -1.0, 1.0).to(F64)
                a, b = a * sign[:, None], b * sign
        out[a_key], out[b_key] = a, b
    return {k: out[k] for k in states[0]}


def product_average(
    states: Sequence[dict[str, Tensor]], weights: Sequence[float], reference: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Average LoRA adapters in weight space: ΔW = Σ p_i B_i A_i per module, re-factorised to the adapter rank r.

    With ΔW = U S Vᵀ (truncated SVD), B = U_r √S_r and A = √S_r V_rᵀ, so B A is the best rank-r approximation of the
    mean product (exact when that mean has rank <= r). Keys that are not LoRA factors are averaged plainly.

    Args:
        states: client adapters.
        weights: their aggregation weights (normalised here).
        reference: the current global adapter; each SVD component's sign is chosen to agree with it.
    """
    return {k: v.to(states[0][k].dtype) for k, v in _product_mean64(states, weights, reference).items()}


def average_states(
    states: Sequence[dict[str, Tensor]],
    weights: Sequence[float],
    lora_mode: LoraMode = "separate",
    reference: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``weighted_average`` (``separate``: A and B averaged independently) or ``product_average`` (``product``)."""
    return {k: v.to(states[0][k].dtype) for k, v in average64(states, weights, lora_mode, reference).items()}


def average64(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    lora_mode: LoraMode,
    reference: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``average_states`` on CPU, left in float64 (the dtype of the inputs is not restored)."""
    check_choice("lora_mode", lora_mode, LORA_MODES)
    if lora_mode == "product":
        return _product_mean64(states, weights, reference)
    return mean64(states, weights)
