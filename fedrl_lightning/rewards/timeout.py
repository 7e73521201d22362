"""Run a reward call with a wall-clock limit that holds while the call runs.

A thread cannot be stopped, so the call runs in a forked child (it inherits the function and its arguments, nothing
is pickled on the way in; the result comes back through a pipe). A child still running at the deadline is killed
and ``RewardTimeout`` raised: only that call's samples fail. Forking costs a few milliseconds, so this is used only
when a ``reward_timeout`` is set.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any


class RewardTimeout(TimeoutError):
    """A reward call ran past its limit and was killed."""


def _child(conn: Any, func: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    try:
        values = func(**kwargs)
        conn.send(("ok", None if values is None else list(values)))
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent, which decides
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def call_with_timeout(func: Callable[..., Any], timeout: float, **kwargs: Any) -> Any:
    """``func(**kwargs)`` in a forked child, killed after ``timeout`` seconds.

    Raises:
        RewardTimeout: the call did not finish in time.
        RuntimeError: the call raised (its type and message), or the child died without an answer.
    """
    ctx = mp.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, func, kwargs), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            raise RewardTimeout(f"no result after {timeout:g} s (reward_timeout)")
        status, value = receive.recv()
    except EOFError:
        raise RuntimeError(f"the reward process died (exit code {child.exitcode})") from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()
    if status == "error":
        raise RuntimeError(value)
    return value
