"""Reward functions, called as TRL calls them: ``f(prompts=..., completions=..., completion_ids=..., trainer_state=...,
**columns) -> list[float | None]``.

``completions`` follow the prompts' format (``as_completions``): strings for string prompts, one-message lists
``[{"role": "assistant", "content": ...}]`` for conversational prompts; ``completion_ids`` are the completions' token
ids (lists of ints, through the first EOS); ``trainer_state`` is a ``TrainerState``; the other keyword arguments
are dataset columns aligned with ``completions`` (unknown ones are ignored: every function takes ``**kwargs``).
``None`` marks a reward as not applicable to a sample. :func:`compute_rewards` runs several functions over a batch
and stacks them into an ``(N, K)`` tensor. The built-in functions here read either completion format
(``completion_text``).
"""

from __future__ import annotations

import functools
import logging
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedrl_lightning.rewards._text import completion_text, extract_answer
from fedrl_lightning.rewards.code import CodeReward, binary_code_reward, code_reward, extract_code, make_code_reward
from fedrl_lightning.rewards.format import answer_tag_reward, format_reward, len_reward, tag_count_reward
from fedrl_lightning.rewards.math import accuracy_reward
from fedrl_lightning.rewards.qa import qa_exact_match, qa_reward
from fedrl_lightning.rewards.reasoning_gym import reasoning_gym_reward
from fedrl_lightning.rewards.scaled import ScaledReward
from fedrl_lightning.rewards.timeout import RewardTimeout, call_with_timeout

__all__ = [
    "CodeReward",
    "RewardFunc",
    "ScaledReward",
    "TrainerState",
    "as_completions",
    "binary_code_reward",
    "code_reward",
    "extract_code",
    "make_code_reward",
    "accuracy_reward",
    "answer_tag_reward",
    "completion_text",
    "compute_rewards",
    "extract_answer",
    "format_reward",
    "len_reward",
    "qa_exact_match",
    "qa_reward",
    "reasoning_gym_reward",
    "reward_func_name",
    "reward_inputs",
    "tag_count_reward",
]

if TYPE_CHECKING:  # annotations only
    from fedrl_lightning.rollout import Rollout

RewardFunc = Callable[..., list[float | None]]

log = logging.getLogger("fedrl_lightning.rewards")

# Not _NAN: the submodule fedrl_lightning.rewards.math shadows the stdlib name in this package namespace.
_NAN = float("nan")


@dataclass(frozen=True)
class TrainerState:
    """What a reward function gets as ``trainer_state`` (TRL passes its ``transformers.TrainerState``).

    Attributes:
        global_step: the run's local steps before this one, ``(round - 1) * local_steps + step`` (TRL: optimizer
            steps so far; the position the learning-rate schedule uses); held-out evaluation gets the last one.
        round: the federated round (1-based); None outside a client's round.
        client_id: the client being trained; None outside a client's round.
    """

    global_step: int = 0
    round: int | None = None
    client_id: int | None = None


def as_completions(prompts: Sequence[Any], texts: Sequence[str]) -> list[Any]:
    """Completions in the format of their prompts, as TRL passes them to reward functions.

    Example:
        >>> as_completions(["2+2="], ["4"]), as_completions([[{"role": "user", "content": "2+2?"}]], ["4"])
        (['4'], [[{'role': 'assistant', 'content': '4'}]])
    """
    if len(prompts) != len(texts):
        raise ValueError(f"got {len(prompts)} prompts for {len(texts)} completions")
    return [t if isinstance(p, str) else [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]


def reward_inputs(prompts: Sequence[Any], rollout: Rollout) -> tuple[list[Any], list[list[int]]]:
    """A rollout's ``completions`` in its prompts' format and ``completion_ids`` (the token ids through the first
    EOS), as TRL passes them to reward functions."""
    ids, mask = rollout.completion_ids.cpu(), rollout.completion_mask.cpu().bool()
    return as_completions(prompts, rollout.completions), [row[m].tolist() for row, m in zip(ids, mask, strict=True)]


def reward_func_name(f: RewardFunc) -> str:
    """A stable display name for a reward function.

    Plain functions use ``__name__``; a ``functools.partial`` uses the name of the function it wraps (the class
    name ``partial`` would be useless in logs); other callables use their class name.

    Example:
        >>> reward_func_name(functools.partial(accuracy_reward, answer=["1"]))
        'accuracy_reward'
    """
    while isinstance(f, functools.partial):
        f = f.func
    name = getattr(f, "__name__", None)
    return name if isinstance(name, str) else type(f).__name__


def _to_floats(name: str, values: Any, expected: int) -> list[float]:
    if values is None or len(values) != expected:
        got = "None" if values is None else len(values)
        raise ValueError(f"reward function {name!r} returned {got} values for {expected} samples")
    out: list[float] = []
    for v in values:
        if v is None:
            out.append(_NAN)
        elif isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.numel() == 1):
            out.append(float(v))
        else:
            raise TypeError(f"reward function {name!r} returned a {type(v).__name__}, expected float or None")
    return out


def compute_rewards(
    reward_funcs: Sequence[RewardFunc],
    prompts: list,
    completions: list,
    columns: dict[str, list],
    timeout: float | None = None,
    *,
    completion_ids: list[list[int]] | None = None,
    trainer_state: Any = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Evaluates reward functions over a batch.

    Each function is called once on the whole batch as ``f(prompts=..., completions=..., completion_ids=...,
    trainer_state=..., **columns)`` (the two middle ones only when given). If that raises, a warning is logged and
    the function is retried sample by sample, so only the samples that fail become NaN (a batch-level function such
    as :func:`len_reward` then sees one sample at a time).

    Args:
        reward_funcs: The reward functions (K of them).
        prompts: N prompts.
        completions: N completions.
        columns: Dataset columns, each a list of N values, passed as keyword arguments.
        timeout: seconds a function's call on the batch may run (enforced while it runs, in a forked process); a
            call past it is killed and all its samples fail (no per-sample retry). None = no limit, in process.
        completion_ids: N lists of the completions' token ids, passed as ``completion_ids``; None = not passed.
        trainer_state: passed as ``trainer_state`` (a ``TrainerState``); None = not passed.

    Returns:
        ``(rewards, errors)``: ``rewards`` is an ``(N, K)`` float32 tensor with NaN where a function returned None
        or failed; ``errors`` maps every function name to its number of failed samples (0 if none; functions
        sharing a name share a count).

    Raises:
        ValueError: If ``prompts``, ``completions``, ``completion_ids`` or a column differ in length, a column is
            named like a reward argument, or a function returns the wrong number of values (a bug in the function,
            not a sample failure).
        TypeError: If a function returns a value that is neither a number nor None.

    Example:
        >>> rewards, errors = compute_rewards([format_reward], ["q"], ["<think>a</think><answer>1</answer>"], {})
        >>> rewards.tolist(), errors
        ([[1.0]], {'format_reward': 0})
    """
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} completions")
    if completion_ids is not None and len(completion_ids) != n:
        raise ValueError(f"got {len(completion_ids)} completion_ids for {n} completions")
    for key, column in columns.items():
        if len(column) != n:
            raise ValueError(f"column {key!r} has {len(column)} values for {n} completions")
        if key in ("prompts", "completions", "completion_ids", "trainer_state"):
            raise ValueError(f"column {key!r} has the name of a reward function argument; rename it")
    # Aligned per-sample arguments (sliced on a per-sample retry) and the shared state.
    aligned = {**columns, **({"completion_ids": completion_ids} if completion_ids is not None else {})}
    shared = {"trainer_state": trainer_state} if trainer_state is not None else {}

    rewards = torch.full((n, len(reward_funcs)), _NAN, dtype=torch.float32)
    errors: dict[str, int] = {}
    for k, func in enumerate(reward_funcs):
        name = reward_func_name(func)
        errors.setdefault(name, 0)
        try:
            batch = dict(prompts=prompts, completions=completions, **aligned, **shared)
            values = func(**batch) if timeout is None else call_with_timeout(func, timeout, **batch)
        except RewardTimeout as exc:
            log.warning("reward function %r: %s; its %d samples count as failed", name, exc, n)
            values, errors[name] = [None] * n, errors[name] + n
        except Exception as exc:
            log.warning("reward function %r failed on a batch of %d (%s); retrying per sample", name, n, exc)
            values, failed = _per_sample(func, name, prompts, completions, aligned, shared, timeout)
            errors[name] += failed
            if failed:
                log.warning("reward function %r failed on %d/%d samples; those rewards are NaN", name, failed, n)
        column = torch.tensor(_to_floats(name, values, n), dtype=torch.float32)
        returned = torch.tensor([v is not None for v in values], dtype=torch.bool)
        bad = returned & ~torch.isfinite(column)  # NaN or inf returned as a value (None is an abstention)
        if bad.any():
            count = int(bad.sum())
            log.warning("reward function %r returned %d non-finite values of %d; they count as failed", name, count, n)
            column[bad] = _NAN
            errors[name] += count
        rewards[:, k] = column
    return rewards, errors


def _per_sample(
    func: RewardFunc,
    name: str,
    prompts: list,
    completions: list,
    aligned: dict[str, list],
    shared: dict[str, Any],
    timeout: float | None,
) -> tuple[list[float | None], int]:
    values: list[float | None] = []
    failed = 0
    for i in range(len(completions)):
        sample = {key: column[i : i + 1] for key, column in aligned.items()}
        try:
            one = dict(prompts=prompts[i : i + 1], completions=completions[i : i + 1], **sample, **shared)
            out = func(**one) if timeout is None else call_with_timeout(func, timeout, **one)
        except Exception as exc:
            log.debug("reward function %r failed on sample %d: %s", name, i, exc, exc_info=True)
            values.append(None)
            failed += 1
            continue
        values.extend(_to_floats(name, out, 1))
    return values, failed
