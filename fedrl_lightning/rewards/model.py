"""A reward model as a reward function: any local sequence-classification checkpoint scores prompt + completion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedrl_lightning.rewards._text import completion_text


class RewardModel:
    """The first logit of a sequence-classification model on prompt + completion (loaded once, lazily, offline).

    Chat prompts are rendered with the reward model's chat template (prompt messages + the completion as the
    assistant turn) when it has one, else as plain text. Example YAML (``reward_funcs`` entry)::

        - class_path: fedrl_lightning.rewards.model.RewardModel
          init_args: {path: /models/my-reward-model}

    Args:
        path: local checkpoint directory (``AutoModelForSequenceClassification`` + tokenizer); nothing is downloaded.
        batch_size: sequences per forward pass.
        max_length: tokens per sequence at most (the start is cut, keeping the completion).
        dtype: parameter dtype.
    """

    def __init__(self, path: str, batch_size: int = 8, max_length: int = 1024, dtype: str = "float32") -> None:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"reward model {path!r}: not a local checkpoint directory (nothing is downloaded)")
        self.path, self.batch_size, self.max_length, self.dtype = path, batch_size, max_length, dtype
        self.__name__ = "reward_model"
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self._tokenizer.truncation_side = "left"
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(
            self.path, local_files_only=True, dtype=getattr(torch, self.dtype)
        )
        model.config.pad_token_id = self._tokenizer.pad_token_id
        self._model = model.eval()

    def text(self, prompt: Any, completion: Any) -> str:
        """The scored text of one sample."""
        answer = completion_text(completion)
        if isinstance(prompt, list) and getattr(self._tokenizer, "chat_template", None):
            messages = [*prompt, {"role": "assistant", "content": answer}]
            return self._tokenizer.apply_chat_template(messages, tokenize=False)
        if isinstance(prompt, list):
            prompt = "\n".join(str(m.get("content", "")) for m in prompt)
        return f"{prompt}{answer}"

    @torch.no_grad()
    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        if self._model is None:
            self._load()
        texts = [self.text(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self._tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            )
            logits = self._model(**enc).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores
