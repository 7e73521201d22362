"""Format and length rewards for ``<think>...</think><answer>...</answer>`` style completions."""

from __future__ import annotations

import re
from typing import Any

from fedrl_lightning.rewards._text import completion_text
from fedrl_lightning.rewards.math import is_correct

__all__ = ["answer_tag_reward", "format_reward", "len_reward", "tag_count_reward"]

_FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TAGS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")


def format_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
    """1.0 if the whole completion is ``<think>...</think>`` followed by ``<answer>...</answer>``, else 0.0.

    Whitespace around and between the two blocks is allowed; block contents may span lines.

    Example:
        >>> format_reward(None, ["<think>\\nhm\\n</think>\\n<answer>4</answer>", "4"])
        [1.0, 0.0]
    """
    return [1.0 if _FORMAT_RE.match(completion_text(c)) else 0.0 for c in completions]


def tag_count_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
    """Partial format credit: 0.25 for each of four newline-delimited tags that appears exactly once.

    The tags are ``"<think>\\n"``, ``"\\n</think>\\n"``, ``"\\n<answer>\\n"`` and ``"\\n</answer>"`` (the
    open-r1 convention), so the reward is a dense signal on the way to the strict layout
    ``<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>``; duplicated tags earn nothing for that tag.

    Example:
        >>> tag_count_reward(None, ["<think>\\nx\\n</think>\\n<answer>\\n1\\n</answer>", "<think>\\nx"])
        [1.0, 0.25]
    """
    rewards: list[float | None] = []
    for completion in completions:
        text = completion_text(completion)
        rewards.append(sum(0.25 for tag in _TAGS if text.count(tag) == 1))
    return rewards


def answer_tag_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
    """1.0 if exactly one ``<answer>...</answer>`` with non-blank content is present, else 0.0.

    A gentler format bonus than :func:`format_reward` for small models: the thinking block is optional.

    Example:
        >>> answer_tag_reward(None, ["so <answer>4</answer>", "<answer> </answer>", "<answer>1</answer>" * 2])
        [1.0, 0.0, 0.0]
    """
    rewards: list[float | None] = []
    for completion in completions:
        text = completion_text(completion)
        single = text.count("<answer>") == 1 and text.count("</answer>") == 1
        match = _ANSWER_RE.search(text) if single else None
        rewards.append(1.0 if match and match.group(1).strip() else 0.0)
    return rewards


def len_reward(
    prompts: list[Any], completions: list[Any], answer: list[Any] | None = None, **kwargs: Any
) -> list[float | None]:
    """Kimi 1.5 length reward: favours short correct answers and penalises long wrong ones.

    Over the completions of one call, ``lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)`` (length in
    characters); a correct completion gets ``lambda_i`` and an incorrect one ``min(0, lambda_i)``. Correctness is
    the check of :func:`~fedrl_lightning.rewards.math.accuracy_reward`. If all lengths are equal every reward is
    0.0. Samples whose reference is missing or unparsable get None but still count towards min/max length.

    Example:
        >>> len_reward(None, ["12", "it is 12", "it is 13"], answer=["12", "12", "12"])
        [0.5, -0.5, -0.5]
    """
    texts = [completion_text(c) for c in completions]
    references = answer if answer is not None else [None] * len(texts)
    correct = [is_correct(t, r) for t, r in zip(texts, references, strict=True)]
    lengths = [len(t) for t in texts]
    if not lengths:
        return []
    min_len, max_len = min(lengths), max(lengths)
    if min_len == max_len:
        return [None if ok is None else 0.0 for ok in correct]
    rewards: list[float | None] = []
    for length, ok in zip(lengths, correct, strict=True):
        lam = 0.5 - (length - min_len) / (max_len - min_len)
        rewards.append(None if ok is None else (lam if ok else min(0.0, lam)))
    return rewards
