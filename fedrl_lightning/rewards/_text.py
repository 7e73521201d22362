"""Text helpers shared by the reward functions: completion flattening and lenient answer extraction.

The policy is a tiny model that rarely follows a strict output format, so extraction is deliberately forgiving:
an explicit ``<answer>`` tag wins, then a ``\\boxed{}`` expression, then the last number, then the last line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "completion_text",
    "extract_answer",
    "extract_boxed",
    "extract_tag_answer",
    "last_line",
    "last_number",
    "last_word",
]

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)

# A number is: an optional minus sign that is not a hyphen inside a word or expression ("pages 3-4", "x-1"),
# then either a comma-grouped integer (1,234 / 12,345.6), a decimal (3.5 / .5) or a plain integer, and
# optionally a "/denominator" so that fractions such as 3/4 survive as one token.
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]}])-)?"
    r"(?:\d{1,3}(?:,\d{3})+(?!\d|,\d)(?:\.\d+)?|\d*\.\d+|\d+)"
    r"(?:/(?:\d+(?:\.\d+)?))?"
)
# Numeric LaTeX fractions, rewritten to a/b before number search so that "$\frac{1}{2}$" yields 1/2, not 2.
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")
_BOXED = "\\boxed{"


def completion_text(completion: Any) -> str:
    """Flattens a completion to plain text.

    Args:
        completion: A string, a single message mapping, or a conversational list of messages such as
            ``[{"role": "assistant", "content": "..."}]``. Message content may itself be a list of parts
            (``{"type": "text", "text": ...}``), as used by multimodal chat templates.

    Returns:
        The text of the completion; message contents are joined with newlines. ``None`` becomes ``""``.

    Example:
        >>> completion_text([{"role": "assistant", "content": "42"}])
        '42'
        >>> completion_text("plain")
        'plain'
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content"))
    if isinstance(completion, Sequence):
        return "\n".join(completion_text(message) for message in completion)
    return str(completion)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = (part.get("text", "") if isinstance(part, Mapping) else str(part) for part in content)
        return "".join(p for p in parts if isinstance(p, str))
    return str(content)


def extract_tag_answer(text: str) -> str | None:
    """Returns the stripped content of the last ``<answer>...</answer>`` pair, or None if absent or empty.

    Example:
        >>> extract_tag_answer("<answer>1</answer> then <answer> 2 </answer>")
        '2'
        >>> extract_tag_answer("no tags") is None
        True
    """
    matches = _ANSWER_TAG_RE.findall(text)
    if not matches:
        return None
    content = matches[-1].strip()
    return content or None


def extract_boxed(text: str) -> str | None:
    """Returns the content of the last ``\\boxed{...}`` (brace balanced), or None.

    Example:
        >>> extract_boxed(r"so \\boxed{\\frac{3}{4}}.")
        '\\\\frac{3}{4}'
    """
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    i = start + len(_BOXED)
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                content = text[i:j].strip()
                return content or None
    return None  # unbalanced: truncated generation


def last_number(text: str) -> str | None:
    """Returns the last number in ``text`` with thousands separators removed, or None.

    Handles negatives, decimals, comma-grouped integers and simple fractions (``3/4`` and numeric ``\\frac{3}{4}``,
    returned as ``3/4``); a unicode minus is treated as ``-``.

    Example:
        >>> last_number("I have 1,234 apples and give -3/4 away, leaving 0.5")
        '0.5'
        >>> last_number("total: 1,234.")
        '1234'
        >>> last_number("x = −7")
        '-7'
        >>> last_number("pages 3-4")
        '4'
        >>> last_number(r"half: $\\frac{1}{2}$")
        '1/2'
    """
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text.replace("\u2212", "-"))
    matches = _NUMBER_RE.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "")


def last_line(text: str) -> str | None:
    """Returns the last non-empty line, stripped, or None.

    Example:
        >>> last_line("first\\n  second  \\n\\n")
        'second'
    """
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return None


def last_word(text: str) -> str | None:
    """Returns the last whitespace-separated word with surrounding punctuation stripped, or None.

    Example:
        >>> last_word("The reversed word is: nus.")
        'nus'
    """
    for word in reversed(text.split()):
        word = word.strip(".,;:!?\"'`()[]{}*")
        if word:
            return word
    return None


def extract_answer(text: str) -> str | None:
    """Leniently extracts the final answer from a completion's text.

    Order: the content of the last ``<answer>...</answer>``; else the content of the last ``\\boxed{...}``
    (small models trained on math data emit this spontaneously, and the last-number rule would cut
    ``\\boxed{\\frac{3}{4}}`` down to ``4``); else the last number; else the last non-empty line.

    Args:
        text: The completion text (see :func:`completion_text`).

    Returns:
        The extracted answer, or None when ``text`` is blank.

    Example:
        >>> extract_answer("<think>2+2</think><answer>4</answer>")
        '4'
        >>> extract_answer("So the answer is -12.5.")
        '-12.5'
        >>> extract_answer("blue\\nred")
        'red'
    """
    return extract_tag_answer(text) or extract_boxed(text) or last_number(text) or last_line(text)
