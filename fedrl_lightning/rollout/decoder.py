"""A lean decode loop for Llama-family causal LMs: fused, packed weights and a preallocated KV cache.

HF ``generate`` spends about half of a CPU decode step outside the matmuls (cache bookkeeping, logits processors,
per-module dispatch). This loop runs the same mathematics with what a step needs and nothing else:

- q/k/v and gate/up are fused into one matmul each (4 matmuls per layer instead of 7), their weights packed for
  the skinny-matmul kernel (``rollout.kernels``; oneDNN's layout where it is unavailable) with the LoRA adapter
  merged in as they are packed: no copy of the HF model is kept;
- the KV cache is allocated once per call, (batch, kv_heads, prompt + new tokens, head_dim) per layer, and
  attention for the one new token is two batched matmuls over the grouped heads;
- sampling draws one uniform per row and inverts the CDF (HF draws one exponential per vocabulary entry).

It mirrors HF's Llama/Qwen2/Mistral forward (RMSNorm, rotate-half RoPE with the default rope, SwiGLU MLP, grouped
query attention, optional q/k/v bias) and raises ``UnsupportedModel`` for anything else, so the caller can fall back
to ``generate``. ``tests/test_decoder.py`` checks its logits and greedy tokens against HF.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedrl_lightning.rollout import kernels
from fedrl_lightning.rollout.fused import FusedLinear, base_model, effective_weight, is_lora

__all__ = ["LeanDecoder", "UnsupportedModel", "base_model", "check_supported", "effective_weight", "is_lora"]

SUPPORTED = ("llama", "mistral", "qwen2")


class UnsupportedModel(ValueError):
    """The model's architecture or config is outside what ``LeanDecoder`` mirrors."""


def check_supported(config: Any) -> None:
    """Raise ``UnsupportedModel`` naming the first config field the lean loop does not mirror."""
    name = getattr(config, "model_type", None)
    if name not in SUPPORTED:
        raise UnsupportedModel(f"model_type {name!r} (the lean decoder mirrors {', '.join(SUPPORTED)})")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {config.hidden_act!r} (only silu)")
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UnsupportedModel(f"rope_type {rope.get('rope_type', rope.get('type'))!r} (only the default rope)")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", name == "mistral"):
        raise UnsupportedModel("sliding-window attention")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModel("mlp_bias")


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class LeanDecoder:
    """Sampled or greedy decoding of a Llama-family model (a PEFT-wrapped one included) with packed weights.

    Args:
        model: the causal LM; its weights are read (and any LoRA adapter merged) by ``load``.
        batch_hint: the row count the packed layout is tuned for (any row count computes correctly).
    """

    def __init__(self, model: Any, batch_hint: int = 8) -> None:
        base = base_model(model)
        check_supported(base.config)
        self.config, self.batch_hint = base.config, batch_hint
        cfg = self.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.layers: list[dict[str, Any]] = []
        self.lm_head: FusedLinear | None = None
        self.load(model)

    @torch.no_grad()
    def load(self, model: Any) -> int:
        """Bring every packed weight up to ``model``'s current parameters (adapters merged); returns how many
        fused matmuls were repacked."""
        base = base_model(model)
        hint, fresh = self.batch_hint, not self.layers
        groups = []
        for layer in base.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            groups.append(
                {
                    "qkv": [attn.q_proj, attn.k_proj, attn.v_proj],
                    "o": [attn.o_proj],
                    "gate_up": [mlp.gate_proj, mlp.up_proj],
                    "down": [mlp.down_proj],
                }
            )
        if fresh:
            q_rows = self.heads * self.head_dim
            self.layers = [
                {
                    name: FusedLinear(mods, hint, (q_rows, self.head_dim**-0.5) if name == "qkv" else None)
                    for name, mods in g.items()
                }
                for g in groups
            ]
            self.lm_head = FusedLinear([base.lm_head], hint)
            repacked = len(groups) * 4 + 1
        else:
            repacked = sum(self.layers[i][n].refresh(mods) for i, g in enumerate(groups) for n, mods in g.items())
            repacked += self.lm_head.refresh([base.lm_head])
        for packed, layer in zip(self.layers, base.model.layers):
            packed["norm1"] = layer.input_layernorm.weight.detach()
            packed["norm2"] = layer.post_attention_layernorm.weight.detach()
        self.embed = base.model.embed_tokens.weight.detach()
        self.norm = base.model.norm.weight.detach()
        return repacked

    def _rms_norm(self, x: Tensor, weight: Tensor) -> Tensor:
        """HF's RMSNorm: normalised in fp32, scaled in the model's dtype."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * weight

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sign-folded sin, (*positions.shape, head_dim), so rope(x) = x * cos + x.roll(half) * sin."""
        half = self.head_dim // 2
        exponents = torch.arange(0, half, dtype=torch.float32, device=positions.device) * 2 / self.head_dim
        inv_freq = 1.0 / (_rope_theta(self.config) ** exponents)
        angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        sin = angles.sin()
        sin[..., :half].neg_()
        return angles.cos().to(dtype), sin.to(dtype)

    def _forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: list[tuple[Tensor, Tensor]], start: int, mask: Tensor
    ) -> Tensor:
        """Run every layer on ``x`` (B, T, hidden) at cache positions [start, start + T); returns (B, T, hidden).

        ``cos``/``sin`` are (B, T, head_dim); ``mask`` is the additive attention mask (B, 1, 1, T, start + T).
        """
        b, t, _ = x.shape
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        groups, half = h // kvh, d // 2
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
        end = start + t
        for layer, (k_cache, v_cache) in zip(self.layers, cache):
            y = self._rms_norm(x, layer["norm1"])
            qkv = layer["qkv"](y).view(b, t, h + 2 * kvh, d)
            qk = qkv[:, :, : h + kvh]
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), sin)  # rotate-half RoPE on q and k together
            k_cache[:, :, start:end] = qk[:, :, h:].transpose(1, 2)
            v_cache[:, :, start:end] = qkv[:, :, h + kvh :].transpose(1, 2)
            # Grouped-query attention without repeating k/v: (B, kvh, groups * T, d) queries per kv head; the
            # 1/sqrt(d) scale is folded into the packed q weights.
            q = qk[:, :, :h].reshape(b, t, kvh, groups, d).permute(0, 2, 3, 1, 4).reshape(b * kvh, groups * t, d)
            keys = k_cache[:, :, :end].reshape(b * kvh, end, d)
            scores = torch.bmm(q, keys.transpose(1, 2)).view(b, kvh, groups, t, end).add_(mask)
            out = torch.bmm(
                scores.softmax(dim=-1).view(b * kvh, groups * t, end), v_cache[:, :, :end].reshape(b * kvh, end, d)
            )
            out = out.view(b, kvh, groups, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, h * d)
            x = x + layer["o"](out)
            y = self._rms_norm(x, layer["norm2"])
            gate, up = layer["gate_up"](y).chunk(2, dim=-1)
            x = x + layer["down"](F.silu(gate).mul_(up))
        return x

    def fused(self, total: int) -> bool:
        """Whether decode steps can run on the compiled kernels (fp32 matmuls on them, context within their bounds)."""
        matmuls = [m for layer in self.layers for m in layer.values() if isinstance(m, FusedLinear)] + [self.lm_head]
        return all(m.kind == "kernel" for m in matmuls) and total <= 8192 and self.head_dim <= 1024

    def _step(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: list[tuple[Tensor, Tensor]], pos: int, mask: Tensor
    ) -> Tensor:
        """One decode position on the compiled kernels: ``x`` (B, hidden) is updated in place and returned.

        ``cos``/``sin`` are (B, head_dim); ``mask`` is the additive key mask (B, T).
        """
        h = self.heads
        for layer, (k_cache, v_cache) in zip(self.layers, cache):
            qkv = layer["qkv"](kernels.rms_norm(x, layer["norm1"], self.eps))
            kernels.rope_cache(qkv, cos, sin, k_cache, v_cache, h, pos)
            layer["o"](kernels.attend(qkv, k_cache, v_cache, mask, h, pos + 1), residual=x)
            gate_up = layer["gate_up"](kernels.rms_norm(x, layer["norm2"], self.eps))
            layer["down"](kernels.silu_mul(gate_up), residual=x)
        return x

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int,
        eos_token_ids: list[int],
        pad_token_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        min_new_tokens: int = 0,
    ) -> Tensor:
        """Decode up to ``max_new_tokens`` after left-padded prompts.

        Args:
            input_ids: (B, P) left-padded prompt ids.
            attention_mask: (B, P) 1 for real prompt tokens.
            temperature: 0 = greedy.
            min_new_tokens: EOS is suppressed before this many new tokens.

        Returns:
            (B, C) completion ids, C <= max_new_tokens; after a row's first EOS it holds ``pad_token_id``.
        """
        b, p = input_ids.shape
        total, dtype, device = p + max_new_tokens, self.embed.dtype, self.embed.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        keep = torch.ones(b, total, dtype=torch.bool, device=device)
        keep[:, :p] = attention_mask.bool()
        cache, hidden = self._prefill(input_ids, keep[:, :p], total)
        key_mask = torch.zeros(b, total, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))
        # The first new token's position is the prompt's length (left padding does not count).
        steps = attention_mask.long().sum(-1, keepdim=True).clamp_(min=1) + torch.arange(max_new_tokens, device=device)
        cos, sin = self._rope(steps.T, dtype)  # (C, B, D): one table for every decode position, a row per step
        eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        out = torch.full((b, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        fused = self.fused(total)
        hidden = hidden.contiguous()  # the residual stream the fused steps update in place
        for step in range(max_new_tokens):
            if fused:
                logits = self.lm_head(kernels.rms_norm(hidden, self.norm, self.eps))
            else:
                logits = self.lm_head(self._rms_norm(hidden, self.norm)).float()
            if step < min_new_tokens:
                logits[:, eos] = float("-inf")
            token = sample(logits, temperature, top_p, top_k).masked_fill_(finished, pad_token_id)
            out[:, step] = token
            finished |= torch.isin(token, eos)
            if step + 1 == max_new_tokens or (step + 1 >= min_new_tokens and bool(finished.all())):
                return out[:, : step + 1]
            pos = p + step
            x = F.embedding(token, self.embed)
            if fused:
                hidden = self._step(x, cos[step], sin[step], cache, pos, key_mask)
            else:
                rope = cos[step, :, None], sin[step, :, None]
                mask = key_mask[:, None, None, None, : pos + 1]
                hidden = self._forward(x[:, None], *rope, cache, pos, mask)[:, 0]
        return out

    def _prefill(self, input_ids: Tensor, keep: Tensor, total: int) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """Run the prompts into a fresh KV cache of length ``total``; returns the per-layer (k, v) caches and the
        last prompt position's hidden state (B, hidden).

        Identical prompt rows (a prompt's ``num_generations`` copies) are computed once and their cache rows copied.
        """
        b, p = input_ids.shape
        dtype, device = self.embed.dtype, self.embed.device
        rows, inverse = torch.unique(torch.cat([input_ids, keep.long()], dim=1), dim=0, return_inverse=True)
        u = rows.shape[0]
        ids, keep = rows[:, :p], rows[:, p:].bool()
        positions = (keep.long().cumsum(-1) - 1).clamp_(min=0)
        shape = (u, self.kv_heads, total, self.head_dim)
        cache = [
            (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in self.layers
        ]
        # Causal over the prompt, padded keys masked; a padded query row sees itself (its output is unused).
        eye = torch.eye(p, dtype=torch.bool, device=device)
        allowed = torch.ones(p, p, dtype=torch.bool, device=device).tril_() & keep[:, None, None, None, :] | eye
        mask = torch.zeros(u, 1, 1, p, p, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        x = self._forward(F.embedding(ids, self.embed), *self._rope(positions, dtype), cache, 0, mask)
        if torch.equal(inverse, torch.arange(b, device=device)):  # distinct prompts, already in order
            return cache, x[:, -1]
        return [(k[inverse], v[inverse]) for k, v in cache], x[inverse, -1]


def filter_logits(logits: Tensor, top_p: float = 1.0, top_k: int | None = None) -> Tensor:
    """HF's top-k then top-p warpers: excluded tokens' logits (B, V) set to -inf.

    top-k keeps the ``top_k`` largest (ties with the k-th kept); top-p keeps the smallest set of tokens whose
    probability mass reaches ``top_p``, at least one.
    """
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits: Tensor, temperature: float, top_p: float = 1.0, top_k: int | None = None) -> Tensor:
    """One token per row of ``logits`` (B, V) -> (B,): greedy at ``temperature == 0``, else from the filtered
    softmax(logits / T), drawn by inverting its CDF with one uniform per row."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    cdf = filter_logits(logits / temperature, top_p, top_k).softmax(dim=-1).cumsum_(dim=-1)
    u = torch.rand(logits.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=logits.shape[-1] - 1).squeeze(-1)
