"""One fused, packed matmul over several linear layers (q/k/v, gate/up), their LoRA adapters merged in.

``FusedLinear`` keeps the concatenated weight in the layout of the skinny-matmul kernel (``rollout.kernels``;
oneDNN's where the kernels are unavailable) and repacks only the layers whose sources changed. With the kernels and a
plain LoRA adapter it writes the panels straight from the base weight and the low-rank factors (``kernels.pack_sum``,
one pass), instead of merging, concatenating and packing (three).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import Tensor

from fedrl_lightning.rollout import kernels
from fedrl_lightning.rollout.packed import available


def base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_lora(module: Any) -> bool:
    """A PEFT LoRA layer that can compute its weight delta."""
    return isinstance(module, LoraLayer) and hasattr(module, "get_delta_weight")


def _sources(module: Any) -> list[Tensor]:
    """The tensors a linear layer's effective weight is computed from (base weight, LoRA factors)."""
    if is_lora(module):
        out = [module.get_base_layer().weight]
        for name in module.active_adapters:
            if name in module.lora_A:
                out += [module.lora_A[name].weight, module.lora_B[name].weight]
        return out
    return [module.weight]


def effective_weight(module: Any) -> Tensor:
    """A linear layer's weight with its active, unmerged LoRA adapters merged in (W + scale * B @ A)."""
    if is_lora(module):
        base = weight = module.get_base_layer().weight
        for name in module.active_adapters:
            if name in module.lora_A and not module.merged:
                weight = weight + module.get_delta_weight(name)
        return weight.to(base.dtype)  # PEFT may hold the adapter in fp32 over a bf16 base
    return module.weight


def _bias(module: Any) -> Tensor | None:
    base = _base(module)
    return None if base.bias is None else base.bias.detach()


def _base(module: Any) -> Any:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _low_rank_parts(modules: list[Any], row_scale: tuple[int, float] | None) -> list[tuple] | None:
    """``kernels.pack_sum``'s parts (W, B, A, LoRA scaling, row scale) for these layers, or None where that path does
    not apply (no kernels, not fp32, DoRA or more than one active adapter, rows not whole panels, a row scale that
    does not cover exactly the first layer)."""
    weights = [_base(m).weight for m in modules]
    if not kernels.available(weights[0]) or any(w.shape[0] % kernels.PANEL for w in weights):
        return None
    if row_scale is not None and row_scale[0] != weights[0].shape[0]:
        return None
    parts = []
    for i, (m, w) in enumerate(zip(modules, weights)):
        scale = row_scale[1] if row_scale is not None and i == 0 else 1.0
        names = [n for n in m.active_adapters if n in m.lora_A] if is_lora(m) and not m.merged else []
        if len(names) > 1 or (names and (m.use_dora.get(names[0]) or m.fan_in_fan_out)):
            return None
        if not names:
            parts.append((w, None, None, 0.0, scale))
            continue
        a, b = m.lora_A[names[0]].weight.to(w.dtype), m.lora_B[names[0]].weight.to(w.dtype)
        parts.append((w, b, a, m.scaling[names[0]], scale))
    return parts


class FusedLinear:
    """One fused, packed matmul (..., in) -> (..., out) over the concatenated weights of ``modules``.

    ``row_scale`` multiplies leading output rows (attention's 1/sqrt(d) folded into q). ``refresh`` repacks only when
    a source tensor changed (its identity or in-place version counter): a frozen, untargeted layer (the tied
    ``lm_head``, 21% of the embedded model's weights) is packed once.
    """

    def __init__(self, modules: list[Any], batch_hint: int, row_scale: tuple[int, float] | None = None) -> None:
        self.batch_hint, self.row_scale = batch_hint, row_scale
        self.key: tuple = ()
        self.refresh(modules)

    @staticmethod
    def _key(modules: list[Any]) -> tuple:
        return tuple((id(t), t._version, t.data_ptr()) for m in modules for t in _sources(m))

    @torch.no_grad()
    def refresh(self, modules: list[Any]) -> bool:
        """Repack from ``modules`` if any source changed; returns whether it did."""
        key = self._key(modules)
        if key == self.key:
            return False
        rows = [(_base(m).out_features) for m in modules]
        biases = [_bias(m) for m in modules]
        bias = None
        if any(b is not None for b in biases):  # a layer without a bias among fused ones with biases adds zeros
            bias = torch.cat(
                [b if b is not None else _base(m).weight.new_zeros(n) for b, n, m in zip(biases, rows, modules)]
            )
        parts = _low_rank_parts(modules, self.row_scale)
        if parts is not None:  # one pass from W and the LoRA factors straight into the kernel's panels
            previous = self.weight if getattr(self, "kind", None) == "kernel" else None
            self.kind, self.weight = "kernel", kernels.pack_sum(parts, previous)
        else:
            weights = [effective_weight(m).detach() for m in modules]
            weight = torch.cat(weights) if len(weights) > 1 else weights[0]
            if self.row_scale is not None:
                weight = weight.clone()
                weight[: self.row_scale[0]] *= self.row_scale[1]
            weight = weight.contiguous()
            if kernels.available(weight):
                self.kind, self.weight = "kernel", kernels.pack(weight)
            elif available(weight):
                self.kind, self.weight = "onednn", torch.ops.mkldnn._reorder_linear_weight(weight, self.batch_hint)
            else:
                self.kind, self.weight = "plain", weight
        if bias is not None and self.row_scale is not None:
            bias = bias.clone()
            bias[: self.row_scale[0]] *= self.row_scale[1]
        self.out_features = sum(rows)
        self.bias = None if bias is None else bias.contiguous()
        self.key = key
        return True

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x @ W^T + b; with ``residual``, added into it in place (the kernel fuses the add)."""
        if self.kind == "kernel":
            return kernels.linear(x, self.weight, self.out_features, self.bias, residual)
        if residual is not None:
            return residual.add_(self(x))
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
