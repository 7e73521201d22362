"""Generation backends behind one small protocol: HF ``generate`` (default, CPU) and vLLM."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only: the rollout never imports the modules at run time
    from fedrl_lightning.modules.policy import PolicyModule


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled; ``temperature == 0`` means greedy."""

    num_generations: int = 8
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_tokens: int = 0
    """Suppress EOS before this many new tokens (0 = off; benchmarks force full-length decoding with it)."""


@dataclass
class Rollout:
    """A batch of N = num_prompts x num_generations completions; each prompt's G completions are consecutive.

    Attributes:
        prompt_ids: (N, P) left-padded prompt token ids.
        prompt_mask: (N, P) 1 for real prompt tokens.
        completion_ids: (N, C) right-padded completion token ids.
        completion_mask: (N, C) 1 up to and including the first EOS.
        is_truncated: (N,) True where no EOS was produced within ``max_completion_length``.
        completions: N decoded completion texts (special tokens removed).
        sampling_log_probs: (N, C) log-probs reported by the sampler (vLLM), or None.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    is_truncated: Tensor
    completions: list[str]
    sampling_log_probs: Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, index: slice | Tensor) -> Rollout:
        """Rows ``index`` of every field (a micro-batch)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value[index]
            elif isinstance(value, list):
                rows = range(len(value))[index] if isinstance(index, slice) else index.tolist()
                out[f.name] = [value[i] for i in rows]
            else:
                out[f.name] = value
        return Rollout(**out)


def completion_masks(completion_ids: Tensor, eos_token_ids: list[int]) -> tuple[Tensor, Tensor]:
    """Mask through the first EOS and the truncation flags.

    Args:
        completion_ids: (N, C) generated ids (anything after the first EOS is padding).
        eos_token_ids: ids that end a completion.

    Returns:
        (mask (N, C) long, is_truncated (N,) bool).
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    n, c = completion_ids.shape
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full((n,), c, device=is_eos.device))
    positions = torch.arange(c, device=completion_ids.device).expand(n, c)
    mask = (positions <= first_eos.unsqueeze(1)).long()
    return mask, ~is_eos.any(dim=1)


class RolloutBackend(Protocol):
    """What the client needs from a generation backend."""

    def generate(self, module: PolicyModule, prompts: list[Any], params: SamplingParams) -> Rollout:
        """Sample ``params.num_generations`` completions for each prompt (chat messages or a string)."""
        ...
