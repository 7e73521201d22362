"""What the data sources share: the example format, argument checks, seeded random streams, JSON-safe values.

Every client owns a private train split and a held-out eval split of examples in one of TRL's two prompt formats::

    {"prompt": [{"role": "system", ...}, {"role": "user", ...}], "answer": str, "task": str, "rg_entry": dict | None}
    {"prompt": "a plain-text prompt", "answer": str, "task": str, "rg_entry": None, **other_columns}

A conversational prompt (a list of messages) is chat-templated for generation; a string prompt is tokenized as is.

All randomness is derived from ``seed`` with numpy ``SeedSequence`` keys (``seeded_rng``), each use under its own
stream tag below, so the same arguments always give the same examples, independent of which client is built first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Example = dict[str, Any]
RESERVED_COLUMNS = ("prompt", "answer", "task", "rg_entry")
"""The keys every source sets on an example; extra columns may not override them."""
REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")
"""The keyword arguments a reward function gets besides the columns; a column may not take one of these names."""
# SeedSequence stream tags, so that e.g. the mixture draw and the item seeds of one client never share a stream.
MIX_STREAM, ORDER_STREAM, ITEMS_STREAM, FILES_STREAM, SAMPLER_STREAM = 11, 12, 13, 14, 15


def check(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``."""
    if not ok:
        raise ValueError(message)


def seeded_rng(*key: int) -> np.random.Generator:
    """A numpy generator seeded by ``SeedSequence(key)``, e.g. ``seeded_rng(seed, ORDER_STREAM, client_id, split)``."""
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def json_safe(obj: Any) -> Any:
    """Return ``obj`` as plain JSON types so that ``json.loads(json.dumps(x)) == x`` (tuples -> lists, ...)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return [json_safe(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, np.ndarray | np.generic):
        return json_safe(obj.tolist())
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def chat_messages(system_prompt: str | None, user: str) -> list[dict[str, str]]:
    """A chat prompt: the system message (omitted when ``system_prompt`` is None or empty), then the user's."""
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return head + [{"role": "user", "content": user}]
