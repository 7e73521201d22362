"""Reward for reasoning-gym tasks, scored by each task's own verifier."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import reasoning_gym

from fedrl_lightning.rewards._text import completion_text, extract_answer, extract_tag_answer, last_line, last_word

__all__ = ["answer_candidates", "reasoning_gym_reward"]

log = logging.getLogger("fedrl_lightning.rewards")


@functools.cache
def _score_fn(source_dataset: str) -> Callable[[str | None, dict[str, Any]], float]:
    # get_score_answer_fn instantiates the dataset class on every call; cache one per task.
    return reasoning_gym.get_score_answer_fn(source_dataset)


def answer_candidates(text: str) -> list[str]:
    """Candidate answers to score for a reasoning-gym completion.

    If a non-blank ``<answer>`` is present it is the only candidate: the model committed to it. Otherwise the
    lenient math extraction (``\\boxed{}`` / last number / last line) is not enough, because many tasks have
    non-numeric answers (``spell_backward`` expects a word, ``countdown`` an expression), so the last line and
    the last word are tried too and the caller keeps the best score. This can only over-credit an untagged
    completion whose last line or word happens to be the answer, which is the behaviour we want to shape.

    Example:
        >>> answer_candidates("Reversed, it is: nus.")
        ['Reversed, it is: nus.', 'nus']
        >>> answer_candidates("<answer>nus</answer>")
        ['nus']
    """
    tagged = extract_tag_answer(text)
    if tagged is not None:
        return [tagged]
    candidates = [extract_answer(text), last_line(text), last_word(text)]
    return list(dict.fromkeys(c for c in candidates if c))


def _entry(raw: Any) -> dict[str, Any] | None:
    # Entries may round-trip through datasets/JSON as strings.
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = json.loads(raw)
    if not isinstance(raw, Mapping):
        raise TypeError(f"rg_entry must be a mapping or JSON string, got {type(raw).__name__}")
    return dict(raw)


def _score(score_fn: Callable[[str | None, dict[str, Any]], float], candidate: str, entry: dict[str, Any]) -> float:
    try:
        return float(score_fn(candidate, entry))
    except Exception as exc:  # a verifier choking on a malformed answer means the answer is wrong
        log.debug("reasoning-gym scorer raised on %r: %s", candidate[:80], exc)
        return 0.0


def reasoning_gym_reward(
    prompts: list[Any], completions: list[Any], rg_entry: list[Any] | None = None, **kwargs: Any
) -> list[float | None]:
    """Scores each completion with the verifier of its reasoning-gym task (usually in [0, 1]).

    The task is ``rg_entry["metadata"]["source_dataset"]``; the score is the maximum over
    :func:`answer_candidates`.

    Args:
        prompts: The prompts (unused).
        completions: Strings or conversational message lists.
        rg_entry: reasoning-gym entries ``{"question", "answer", "metadata"}`` aligned with ``completions``.
        **kwargs: Other dataset columns (ignored).

    Returns:
        One reward per completion; None where the entry is None (not a reasoning-gym sample).

    Example:
        >>> import reasoning_gym
        >>> entry = reasoning_gym.create_dataset("spell_backward", size=1, seed=0)[0]
        >>> completions = [f"<answer>{entry['answer']}</answer>", "no"]
        >>> right, wrong = reasoning_gym_reward(None, completions, rg_entry=[entry, entry])
        >>> right, wrong < 1.0
        (1.0, True)
    """
    if rg_entry is None:
        return [None] * len(completions)
    rewards: list[float | None] = []
    for completion, raw in zip(completions, rg_entry, strict=True):
        entry = _entry(raw)
        if entry is None:
            rewards.append(None)
            continue
        score_fn = _score_fn(entry["metadata"]["source_dataset"])
        candidates = answer_candidates(completion_text(completion))
        rewards.append(max((_score(score_fn, c, entry) for c in candidates), default=0.0))
    return rewards
