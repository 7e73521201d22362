"""Linear layers whose weights are pre-packed for oneDNN: the CPU decode path of HF generation's merged copy.

At decode batch sizes a linear layer is a skinny matrix product bound by reading its weight once per token. The
default CPU path (``F.linear`` on the row-major weight) reads it at a fraction of the machine's bandwidth; oneDNN's
blocked layout, packed once per weight change, reads it 2-3x faster at batch 8-32 (``benchmarks/NOTES.md``). vLLM's
CPU backend packs its weights the same way. Packing costs about one copy of the weights, paid once per ``generate``
call, against a saving on every decoded token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def available(weight: Tensor) -> bool:
    """oneDNN packing serves fp32 weights on CPU builds that have it, and bf16 where the CPU has the instructions
    oneDNN's bf16 path needs (AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return weight.dtype == torch.float32


class PackedLinear(nn.Module):
    """Inference-only ``nn.Linear`` holding its weight in oneDNN's packed layout (no plain copy is kept).

    Args:
        linear: the layer to replace; its weight is packed, its bias kept.
        batch_hint: the row count the layout is tuned for; any row count is computed correctly.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = 8) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.batch_hint = batch_hint
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.load(linear.weight)

    @torch.no_grad()
    def load(self, weight: Tensor) -> None:
        """Pack ``weight`` (out_features, in_features) in place of the current one."""
        if weight.shape != (self.out_features, self.in_features):
            shape = (self.in_features, self.out_features)
            raise ValueError(f"weight of shape {tuple(weight.shape)} for a {shape[0]}->{shape[1]} layer")
        # A plain attribute, not a buffer: packed tensors are neither saved nor moved with the module.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), self.batch_hint)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def pack_linears(model: nn.Module, batch_hint: int = 8) -> int:
    """Replace every ``nn.Linear`` of ``model`` whose weight can be packed by a ``PackedLinear``; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and available(child.weight):
                setattr(parent, name, PackedLinear(child, batch_hint))
                count += 1
    return count


def load_weight(layer: Any, weight: Tensor) -> None:
    """Set a generation copy's layer weight, packed or plain."""
    if isinstance(layer, PackedLinear):
        layer.load(weight)
    else:
        layer.weight.copy_(weight)
