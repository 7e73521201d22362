"""Code-execution rewards: run the last fenced Python block of a completion against stdin/stdout tests, sandboxed.

Each test runs the program with :func:`fedrl_lightning.sandbox.run_sandboxed`: a fresh ``python3 -I -S`` process
(only the standard library can be imported) under the strongest isolation this machine allows (``namespace``,
``setuid`` or ``rlimit``), with memory, CPU, process, file-size and output limits and a wall-clock timeout after
which the whole process tree is killed. See :mod:`fedrl_lightning.sandbox` for what each mode guarantees.

Configuration from YAML (jsonargparse instantiates callable classes given as ``class_path``)::

    reward_funcs:
      - class_path: fedrl_lightning.rewards.code.CodeReward
        init_args: {timeout_s: 4.0, memory_mb: 512, max_workers: 2, max_tests: 10}
      - fedrl_lightning.rewards.code.binary_code_reward   # a plain function: the defaults

In Python, ``make_code_reward(timeout_s=4.0)`` or ``functools.partial(code_reward, timeout_s=4.0)`` do the same.
The environment variables ``FEDRL_SANDBOX_ISOLATION`` (``namespace``, ``setuid`` or ``rlimit``) and
``FEDRL_SANDBOX_PYTHON`` (the interpreter that runs the programs) override the automatic choices.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fedrl_lightning.rewards._text import completion_text
from fedrl_lightning.sandbox import SandboxError, SandboxResult, isolation_mode, run_sandboxed

__all__ = [
    "CodeReward",
    "SandboxError",
    "SandboxResult",
    "binary_code_reward",
    "code_reward",
    "extract_code",
    "isolation_mode",
    "make_code_reward",
    "run_sandboxed",
]


# --------------------------------------------------------------------------------------------------------------------
# Code extraction and test parsing
# --------------------------------------------------------------------------------------------------------------------

# An opening fence with an optional info string, the code, and the next closing fence. Only unlabelled and Python
# blocks count (a trailing ```text block with sample output must not replace the solution).
_FENCE_RE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_LANGS = frozenset({"", "python", "py", "python3", "py3"})


def extract_code(text: str) -> str | None:
    """Returns the last fenced Python code block of ``text``, or None.

    A block is ````` ```python ... ``` ````` (also ``py``, ``python3``) or an unlabelled ````` ``` ... ``` `````;
    blocks labelled with another language are skipped, an unclosed fence (a truncated generation) does not count,
    and a block holding only whitespace is ignored.

    Example:
        >>> extract_code("Try:\\n```python\\nprint(1)\\n```\\nor better\\n```\\nprint(2)\\n```")
        'print(2)\\n'
        >>> extract_code("no code") is None
        True
    """
    code = None
    for match in _FENCE_RE.finditer(text or ""):
        if match.group(1).lower() in _PYTHON_LANGS and match.group(2).strip():
            code = match.group(2)
    return code


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return "\n".join(_as_text(v) for v in value)
    return str(value)


def _parse_tests(raw: Any) -> list[tuple[str, str]] | None:
    """Normalises one sample's ``test_cases`` to ``[(stdin, expected_stdout), ...]``; None when there are none.

    Accepts a list of ``{"input": ..., "output": ...}`` (open-r1 ``verification_info["test_cases"]``; items whose
    ``type`` is not ``stdin_stdout`` are skipped), a dict ``{"inputs": [...], "outputs": [...]}`` (APPS / TACO /
    FedGRPO), either wrapped in ``{"language": ..., "test_cases": ...}``, or a JSON string of any of these.
    Call-based tests (a ``fn_name``) and other languages are not supported and give None.
    """
    if raw is None:
        return None
    if isinstance(raw, bytes | str):
        if not raw.strip():
            return None
        raw = json.loads(raw)
    if isinstance(raw, Mapping):
        language = raw.get("language")
        if language is not None and str(language).lower() not in _PYTHON_LANGS:
            return None
        if "test_cases" in raw:
            return _parse_tests(raw["test_cases"])
        if "inputs" in raw or "outputs" in raw:
            if raw.get("fn_name"):
                return None
            inputs, outputs = list(raw.get("inputs") or []), list(raw.get("outputs") or [])
            if len(inputs) != len(outputs):
                raise ValueError(f"test_cases has {len(inputs)} inputs but {len(outputs)} outputs")
            tests = [(_as_text(i), _as_text(o)) for i, o in zip(inputs, outputs, strict=True)]
            return tests or None
        raw = [raw]  # a single {"input": ..., "output": ...}
    if not isinstance(raw, Sequence):
        raise TypeError(f"unsupported test_cases of type {type(raw).__name__}")
    tests = []
    for item in raw:
        if not isinstance(item, Mapping):
            raise TypeError(f"a test case must be a mapping, got {type(item).__name__}")
        if item.get("type", "stdin_stdout") != "stdin_stdout" or "output" not in item:
            continue
        tests.append((_as_text(item.get("input")), _as_text(item["output"])))
    return tests or None


def _normalize_output(text: str) -> str:
    """Strips trailing whitespace from every line and drops trailing blank lines."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------------------------


def _evaluate(
    completions: list,
    test_cases: list | None,
    *,
    binary: bool,
    timeout_s: float,
    memory_mb: int,
    max_workers: int | None,
    max_tests: int | None,
) -> list[float | None]:
    n = len(completions)
    if test_cases is None:
        return [None] * n
    if len(test_cases) != n:
        raise ValueError(f"got {len(test_cases)} test_cases for {n} completions")
    scores: list[float | None] = [None] * n
    jobs: list[tuple[int, str, str, str]] = []
    totals: dict[int, int] = {}
    for i, (completion, raw) in enumerate(zip(completions, test_cases, strict=True)):
        tests = _parse_tests(raw)
        if not tests:
            continue
        if max_tests is not None:
            tests = tests[:max_tests]
        code = extract_code(completion_text(completion))
        if code is None:
            scores[i] = 0.0
            continue
        totals[i] = len(tests)
        jobs.extend((i, code, test_in, test_out) for test_in, test_out in tests)
    if not jobs:
        return scores

    failed: set[int] = set()  # binary mode: samples with a failed test skip the rest

    def run(job: tuple[int, str, str, str]) -> bool:
        i, code, test_in, test_out = job
        if binary and i in failed:
            return False
        result = run_sandboxed(code, stdin=test_in, timeout_s=timeout_s, memory_mb=memory_mb)
        ok = (
            result.returncode == 0
            and result.killed_reason is None
            and _normalize_output(result.stdout) == _normalize_output(test_out)
        )
        if not ok:
            failed.add(i)
        return ok

    workers = max_workers or min(4, os.cpu_count() or 1)
    passed = dict.fromkeys(totals, 0)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code-reward") as pool:
        futures = [(job[0], pool.submit(run, job)) for job in jobs]
        try:
            for i, future in futures:
                passed[i] += future.result()
        except BaseException:
            for _, future in futures:
                future.cancel()
            raise
    for i, total in totals.items():
        scores[i] = float(passed[i] == total) if binary else passed[i] / total
    return scores


def code_reward(
    prompts: list,
    completions: list,
    test_cases: list | None = None,
    *,
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    max_workers: int | None = None,
    max_tests: int | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """The fraction of a sample's stdin/stdout tests that the last Python code block of its completion passes.

    A test passes when the program exits with status 0 within the limits and its stdout equals the expected
    output after trailing whitespace is stripped from every line (and trailing blank lines are dropped).

    Args:
        prompts: Unused (TRL signature).
        completions: Strings or conversational message lists.
        test_cases: Dataset column: per sample a list of ``{"input": str, "output": str}`` or a dict
            ``{"inputs": [...], "outputs": [...]}`` (see :func:`_parse_tests` for all accepted shapes).
        timeout_s: Wall-clock limit per test.
        memory_mb: Memory limit per test.
        max_workers: Tests run concurrently; None = ``min(4, os.cpu_count())``.
        max_tests: Use at most this many tests per sample (the first ones); None = all.
        **kwargs: Other dataset columns, ignored.

    Returns:
        Per sample: the pass fraction in [0, 1]; 0.0 without a code block; None when the sample has no
        (supported) test cases.

    Example:
        >>> code_reward(["q"], ["```python\\nprint(int(input()) * 2)\\n```"], [[{"input": "2", "output": "4"}]])
        [1.0]
    """
    return _evaluate(
        completions,
        test_cases,
        binary=False,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_workers=max_workers,
        max_tests=max_tests,
    )


def binary_code_reward(
    prompts: list,
    completions: list,
    test_cases: list | None = None,
    *,
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    max_workers: int | None = None,
    max_tests: int | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 when the completion's code passes all of the sample's tests, else 0.0 (None without tests).

    Same arguments as :func:`code_reward`; the remaining tests of a sample are skipped after its first failure.
    """
    return _evaluate(
        completions,
        test_cases,
        binary=True,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_workers=max_workers,
        max_tests=max_tests,
    )


class CodeReward:
    """A configured :func:`code_reward` (or :func:`binary_code_reward`), for YAML configs.

    Example YAML (``reward_funcs`` entry)::

        - class_path: fedrl_lightning.rewards.code.CodeReward
          init_args: {timeout_s: 4.0, memory_mb: 512, max_workers: 2, binary: true}

    Args:
        timeout_s: Wall-clock limit per test.
        memory_mb: Memory limit per test.
        max_workers: Concurrent tests; None = ``min(4, os.cpu_count())``.
        max_tests: At most this many tests per sample; None = all.
        binary: Score 1.0 only when all tests pass (:func:`binary_code_reward`).
    """

    def __init__(
        self,
        timeout_s: float = 2.0,
        memory_mb: int = 256,
        max_workers: int | None = None,
        max_tests: int | None = None,
        binary: bool = False,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if memory_mb <= 0:
            raise ValueError(f"memory_mb must be > 0, got {memory_mb}")
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if max_tests is not None and max_tests < 1:
            raise ValueError(f"max_tests must be >= 1, got {max_tests}")
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_workers = max_workers
        self.max_tests = max_tests
        self.binary = binary
        # reward_func_name() uses __name__: logs show the reward, not the class.
        self.__name__ = "binary_code_reward" if binary else "code_reward"

    def __call__(self, prompts: list, completions: list, test_cases: list | None = None, **kwargs: Any) -> list:
        return _evaluate(
            completions,
            test_cases,
            binary=self.binary,
            timeout_s=self.timeout_s,
            memory_mb=self.memory_mb,
            max_workers=self.max_workers,
            max_tests=self.max_tests,
        )

    def __repr__(self) -> str:
        return (
            f"CodeReward(timeout_s={self.timeout_s}, memory_mb={self.memory_mb}, max_workers={self.max_workers}, "
            f"max_tests={self.max_tests}, binary={self.binary})"
        )


def make_code_reward(
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    max_workers: int | None = None,
    max_tests: int | None = None,
    binary: bool = False,
) -> CodeReward:
    """Returns a configured code reward; see :class:`CodeReward` (use that class as ``class_path`` in YAML)."""
    return CodeReward(
        timeout_s=timeout_s, memory_mb=memory_mb, max_workers=max_workers, max_tests=max_tests, binary=binary
    )
