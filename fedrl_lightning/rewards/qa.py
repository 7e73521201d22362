"""Extractive-QA rewards with SQuAD-style normalisation: exact match and token F1."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping
from typing import Any

from fedrl_lightning.rewards._text import completion_text, extract_tag_answer

__all__ = ["normalize_answer", "qa_exact_match", "qa_reward", "token_f1"]

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercases, drops punctuation and the articles a/an/the, and collapses whitespace (SQuAD).

    Example:
        >>> normalize_answer("The  Eiffel-Tower!")
        'eiffeltower'
    """
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """Token-level F1 between two answers after :func:`normalize_answer`.

    If either side has no tokens the score is 1.0 when both are empty, else 0.0.

    Example:
        >>> round(token_f1("Paris France", "paris"), 4)
        0.6667
    """
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _references(reference: Any) -> list[str]:
    # Accepts a single string, a list of strings, or a SQuAD-style {"text": [...]} mapping.
    if reference is None:
        return []
    if isinstance(reference, Mapping):
        reference = reference.get("text", [])
    if isinstance(reference, str):
        return [reference]
    return [str(r) for r in reference if r is not None]


def _prediction(completion: Any) -> str:
    text = completion_text(completion)
    tagged = extract_tag_answer(text)
    return tagged if tagged is not None else text


def qa_exact_match(
    prompts: list[Any], completions: list[Any], answer: list[Any] | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 if the normalised answer equals any normalised reference, else 0.0.

    The answer is the ``<answer>`` content if present, otherwise the whole completion.

    Returns:
        One reward per completion; None where there is no reference.

    Example:
        >>> qa_exact_match(None, ["<answer>the Beatles</answer>", "Beatles!"], answer=[["Beatles"], "Stones"])
        [1.0, 0.0]
    """
    if answer is None:
        return [None] * len(completions)
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        refs = _references(reference)
        if not refs:
            rewards.append(None)
            continue
        pred = normalize_answer(_prediction(completion))
        rewards.append(float(any(pred == normalize_answer(r) for r in refs)))
    return rewards


def qa_reward(
    prompts: list[Any], completions: list[Any], answer: list[Any] | None = None, **kwargs: Any
) -> list[float | None]:
    """Token F1 of the answer against the best-matching reference (1.0 on exact match).

    The answer is the ``<answer>`` content if present, otherwise the whole completion.

    Returns:
        One reward per completion; None where there is no reference.

    Example:
        >>> qa_reward(None, ["<answer>Paris, France</answer>"], answer=[["Lyon", "Paris"]])
        [0.6666666666666666]
    """
    if answer is None:
        return [None] * len(completions)
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        refs = _references(reference)
        if not refs:
            rewards.append(None)
            continue
        pred = _prediction(completion)
        rewards.append(max(token_f1(pred, r) for r in refs))
    return rewards
