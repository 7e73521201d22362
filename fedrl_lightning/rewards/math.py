"""Math accuracy reward, verified symbolically with math-verify."""

from __future__ import annotations

import re
import threading
from typing import Any

from math_verify import parse, verify

from fedrl_lightning.rewards._text import completion_text, extract_answer

__all__ = ["accuracy_reward", "is_correct"]

# math-verify's timeouts use SIGALRM, which only the main thread may install. Worker threads (async reward
# computation, rollout servers) therefore run without a timeout; inputs are capped below to bound the risk.
_TIMEOUT_S = 5
# A final answer longer than this is almost certainly wrong; only its tail is parsed to keep sympy fast.
_MAX_PARSE_CHARS = 1000


def _timeout() -> int | None:
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


# LaTeX text blocks (usually units) and commands such as \frac are not prose.
_LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{[^{}]*\}")
_LATEX_CMD_RE = re.compile(r"\\[A-Za-z]+")
_WORD_RE = re.compile(r"[A-Za-z]{3,}")


def _is_delimited(text: str) -> bool:
    return "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text


def _is_prose(text: str) -> bool:
    # A run of 3+ letters outside LaTeX commands and \text{} blocks means natural language ("The answer is 12",
    # "Paris"): math-verify would read "$Paris$" as the product P*a*r*i*s, so prose is never wrapped in $...$.
    stripped = _LATEX_CMD_RE.sub(" ", _LATEX_TEXT_RE.sub(" ", text))
    return _WORD_RE.search(stripped) is not None


def _parse(text: str) -> list:
    """Parses with math-verify; bare expressions are wrapped in ``$...$`` first.

    Unwrapped, math-verify's expression extractor grabs the first number of "1+x" or "2\\sqrt{2}" and misses
    "\\sqrt{2}" entirely, so non-prose text is parsed as inline LaTeX, falling back to the raw string.
    """
    text = text[-_MAX_PARSE_CHARS:]
    timeout = _timeout()
    if _is_delimited(text) or _is_prose(text):
        return parse(text, parsing_timeout=timeout)
    return parse(f"${text}$", parsing_timeout=timeout) or parse(text, parsing_timeout=timeout)


def _normalise(text: str) -> str:
    return re.sub(r"[\s$]", "", text).lower().rstrip(".")


def is_correct(text: str, reference: Any) -> bool | None:
    """Checks a completion's text against a reference answer.

    Args:
        text: The completion text; the answer is extracted with :func:`extract_answer`.
        reference: The reference answer (converted with ``str``), or a list/tuple of acceptable answers.

    Returns:
        None if the reference is missing, is undelimited prose (e.g. "Paris"; see ``_is_prose``) or math-verify
        cannot parse it: the sample is not a math sample. Otherwise whether the extracted answer is equivalent to
        the reference; when math-verify cannot parse the prediction, or fails, normalised string equality decides.

    Example:
        >>> is_correct("The answer is 12.", "12")
        True
        >>> is_correct("\\\\boxed{\\\\frac{3}{4}}", "0.75")
        True
    """
    if reference is None:
        return None
    if isinstance(reference, list | tuple):
        results = [is_correct(text, r) for r in reference]
        return True if True in results else (False if False in results else None)
    reference = str(reference).strip()
    if not reference or (_is_prose(reference) and not _is_delimited(reference)):
        return None
    gold = _parse(reference)
    if not gold:
        return None
    prediction = extract_answer(text)
    if prediction is None:
        return False
    pred = _parse(prediction)
    if pred:
        try:
            if verify(gold, pred, timeout_seconds=_timeout()):
                return True
        except Exception:  # math-verify is best effort; fall through to string equality
            pass
    return _normalise(prediction) == _normalise(reference)


def accuracy_reward(
    prompts: list[Any], completions: list[Any], answer: list[Any] | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 if the extracted answer is mathematically equivalent to the reference, 0.0 if not.

    Args:
        prompts: The prompts (unused).
        completions: Strings or conversational message lists.
        answer: Reference answers aligned with ``completions``.
        **kwargs: Other dataset columns (ignored).

    Returns:
        One reward per completion; None where the reference is missing or unparsable (not applicable).

    Example:
        >>> accuracy_reward(None, ["The answer is 12", "<answer>13</answer>"], answer=["12", "12"])
        [1.0, 0.0]
    """
    if answer is None:
        return [None] * len(completions)
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        ok = is_correct(completion_text(completion), reference)
        rewards.append(None if ok is None else float(ok))
    return rewards
