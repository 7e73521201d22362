"""The host side of one sandboxed run: working directory, resource limits, the launcher process, its pipes, cleanup.

:func:`run_with_retry` writes the program to a fresh working directory, starts the launcher
(:mod:`fedrl_lightning.sandbox.launcher`) with the limits and the isolation mode, feeds stdin, collects stdout,
stderr and the launcher's status line within the wall-clock timeout, kills what is left and deletes the directory.
"""

from __future__ import annotations

import dataclasses
import errno
import marshal
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from fedrl_lightning.sandbox.guard import guarded_runner_source
from fedrl_lightning.sandbox.launcher import launcher_source

NAMESPACE, SETUID, RLIMIT = "namespace", "setuid", "rlimit"
SANDBOX_UID = SANDBOX_GID = 65534  # nobody / nogroup
_SCRIPT = "solution.py"
_ENV_MARKER = "FEDRL_SANDBOX_ID"
_TMPFS_BYTES = 64 * 1024 * 1024  # size of the working directory in namespace mode
_TMPFS_INODES = 4096
_MAX_OPEN_FILES = 64
DEFAULT_FILE_BYTES = 16 * 1024 * 1024
"""Default ``max_file_bytes``: the largest file a sandboxed program may write (``RLIMIT_FSIZE``)."""
DEFAULT_PROCESSES = 32
"""Default ``max_processes``: the sandbox user's process limit (``RLIMIT_NPROC``)."""
_TERMINATE_GRACE_S = 2.0  # how long the launcher gets to kill the sandbox before it is killed itself


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program in it): the launcher could not start or set up the process."""


class _ProcessLimitBusy(SandboxError):
    """The sandbox user is at its process limit (a concurrent fork bomb); retried by :func:`run_with_retry`."""


@dataclasses.dataclass
class SandboxResult:
    """The outcome of :func:`run_sandboxed`.

    Attributes:
        returncode: The program's exit status; negative for a signal (``-9`` after a timeout), as ``subprocess``.
        stdout: Standard output, decoded as UTF-8 (invalid bytes replaced), at most ``max_output_bytes``.
        stderr: Standard error, likewise truncated.
        timed_out: Whether the wall-clock timeout killed the program.
        killed_reason: Why the program was killed, if it was: ``"timeout"``, ``"output_limit"``, ``"cpu_limit"``
            (``SIGXCPU``) or ``"signal:<NAME>"``; None when it exited by itself.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    killed_reason: str | None = None


def run_with_retry(
    code: str,
    stdin: str,
    timeout_s: float,
    memory_mb: int,
    limits: dict[str, Any] | None,
    max_output_bytes: int,
    mode: str,
    python: str,
) -> SandboxResult:
    """Runs ``code`` once in ``mode`` with ``python``, retrying a start that hits the sandbox user's process limit.

    Args:
        code: The program's source.
        stdin: Its standard input.
        timeout_s: Wall-clock limit in seconds.
        memory_mb: Address-space limit in MiB.
        limits: Optional ``cpu_s``, ``max_file_bytes`` and ``max_processes`` (see ``run_sandboxed``); None = defaults.
        max_output_bytes: At most this many bytes of stdout and of stderr are kept.
        mode: ``namespace``, ``setuid`` or ``rlimit``.
        python: The interpreter that runs the program.

    Returns:
        A :class:`SandboxResult`.

    Raises:
        SandboxError: If the sandbox could not be set up.
    """
    limits = limits or {}
    cpu_s = int(limits.get("cpu_s") or math.ceil(timeout_s) + 1)
    rlimits = {
        "RLIMIT_AS": (int(memory_mb) << 20,) * 2,
        "RLIMIT_CPU": (cpu_s, cpu_s + 1),
        "RLIMIT_NPROC": (limits.get("max_processes", DEFAULT_PROCESSES),) * 2,
        "RLIMIT_FSIZE": (limits.get("max_file_bytes", DEFAULT_FILE_BYTES),) * 2,
        "RLIMIT_NOFILE": (_MAX_OPEN_FILES,) * 2,
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_MEMLOCK": (0, 0),
        "RLIMIT_MSGQUEUE": (0, 0),
    }
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="fedrl-sandbox-"))
    try:
        script = os.path.join(workdir, _SCRIPT)
        with open(script, "w", encoding="utf-8") as f:
            f.write(code)
        os.chmod(script, 0o644)
        if mode == SETUID:
            os.chown(workdir, SANDBOX_UID, SANDBOX_GID)
        if mode == NAMESPACE:
            argv = [python, "-I", "-S", _SCRIPT]
        else:
            block_fork = mode == RLIMIT and os.geteuid() == 0  # RLIMIT_NPROC does not bind root
            argv = [python, "-I", "-S", "-c", guarded_runner_source(block_fork, _SCRIPT), _SCRIPT]
        config = {
            "mode": mode,
            "workdir": workdir,
            "script": _SCRIPT,
            "argv": argv,
            "limits": rlimits,
            "uid": None if mode == RLIMIT else SANDBOX_UID,
            "gid": None if mode == RLIMIT else SANDBOX_GID,
            "tmpfs_bytes": _TMPFS_BYTES,
            "tmpfs_inodes": _TMPFS_INODES,
        }
        give_up = time.monotonic() + timeout_s + 5.0
        delay = 0.02
        while True:
            try:
                return _run_once(config, stdin.encode("utf-8"), timeout_s, max_output_bytes)
            except _ProcessLimitBusy:
                if time.monotonic() + delay > give_up:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 0.5)
    finally:
        _remove_tree(workdir)


def _run_once(config: dict[str, Any], stdin: bytes, timeout_s: float, max_output_bytes: int) -> SandboxResult:
    token = uuid.uuid4().hex
    workdir = config["workdir"]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        _ENV_MARKER: token,
    }
    status_r, status_w = os.pipe()
    config_hex = marshal.dumps({**config, "status_fd": status_w}).hex()
    launcher = [sys.executable, "-I", "-S", "-c", launcher_source(), config_hex]
    try:
        proc = subprocess.Popen(
            launcher,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=env,
            start_new_session=True,
            pass_fds=(status_w,),
        )
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    deadline = time.monotonic() + timeout_s
    out, err, status = bytearray(), bytearray(), bytearray()
    killed_reason = None
    sel = selectors.DefaultSelector()
    try:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        if stdin:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "in")
        else:
            proc.stdin.close()
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ, out)
        sel.register(proc.stderr.fileno(), selectors.EVENT_READ, err)
        sel.register(status_r, selectors.EVENT_READ, status)
        sent = 0
        status_done_at = None
        while sel.get_map() and killed_reason is None:
            now = time.monotonic()
            if now >= deadline:
                killed_reason = "timeout"
                break
            if status_done_at is not None and now - status_done_at > 0.5:
                break  # the launcher is gone; whatever still holds the pipes is swept below
            for key, _ in sel.select(min(deadline - now, 0.5)):
                if key.data == "in":
                    try:
                        sent += os.write(key.fd, stdin[sent : sent + 65536])
                    except BlockingIOError:
                        continue
                    except OSError:  # the program exited or closed its stdin
                        sent = len(stdin)
                    if sent >= len(stdin):
                        sel.unregister(key.fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                buf = key.data
                if not chunk:
                    sel.unregister(key.fd)
                    if buf is status:
                        status_done_at = time.monotonic()
                elif buf is status:
                    buf += chunk
                elif len(buf) <= max_output_bytes:
                    buf += chunk[: max_output_bytes + 1 - len(buf)]
                    if buf is out and len(buf) > max_output_bytes:
                        killed_reason = "output_limit"
    finally:
        sel.close()
        if killed_reason:
            _terminate(proc)
        else:
            try:
                proc.wait(timeout=_TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                _terminate(proc)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:
                    pass
        # Anything still unread on the status pipe (the launcher has exited now).
        os.set_blocking(status_r, False)
        try:
            while chunk := os.read(status_r, 4096):
                status += chunk
        except OSError:
            pass
        os.close(status_r)
        if config["mode"] != NAMESPACE:
            _kill_marked_processes(token)
    return _result(status.decode("utf-8", "replace"), proc, out, err, killed_reason, max_output_bytes)


def _result(
    status: str,
    proc: subprocess.Popen,
    out: bytearray,
    err: bytearray,
    killed_reason: str | None,
    max_output_bytes: int,
) -> SandboxResult:
    stdout = bytes(out[:max_output_bytes]).decode("utf-8", "replace")
    stderr = bytes(err[:max_output_bytes]).decode("utf-8", "replace")
    lines = status.strip().splitlines()
    # A setup error wins over the exit status that the namespace's init reports for the failed start.
    line = next((x for x in lines if x.startswith("error:")), lines[0] if lines else "")
    if line.startswith("error:"):
        _, kind, code, message = (line.split(":", 3) + ["", "", ""])[:4]
        if code.isdigit() and int(code) == errno.EAGAIN:
            raise _ProcessLimitBusy(f"sandbox start failed: {kind}: {message}")
        raise SandboxError(f"sandbox setup failed: {kind}: {message}")
    if line.startswith("status:"):
        returncode = os.waitstatus_to_exitcode(int(line.split(":", 1)[1]))
    elif killed_reason:
        returncode = -signal.SIGKILL
    else:
        raise SandboxError(f"the sandbox launcher failed (exit status {proc.returncode}): {stderr.strip()[-2000:]}")
    if killed_reason is None and returncode < 0:
        killed_reason = "cpu_limit" if -returncode == signal.SIGXCPU else f"signal:{_signal_name(-returncode)}"
    return SandboxResult(
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        timed_out=killed_reason == "timeout",
        killed_reason=killed_reason,
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _terminate(proc: subprocess.Popen) -> None:
    """Asks the launcher to kill the program's process tree; kills the launcher's group if it does not comply."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=_TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet, so the group id is still ours
        except OSError:
            pass
        proc.wait()


def _kill_marked_processes(token: str) -> None:
    """Kills leftover processes that carry this run's environment marker (fallback modes; the launcher normally
    leaves none, but it may have been killed)."""
    marker = f"{_ENV_MARKER}={token}".encode()
    for _ in range(50):
        found = False
        try:
            names = os.listdir("/proc")
        except OSError:
            return
        for name in names:
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if marker not in f.read().split(b"\0"):
                        continue
                os.kill(int(name), signal.SIGKILL)
                found = True
            except OSError:
                continue
        if not found:
            return
        time.sleep(0.01)


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):  # the program may have removed permissions from its own directories
        for dirpath, _dirnames, _filenames in os.walk(path):
            try:
                os.chmod(dirpath, 0o700)
            except OSError:
                pass
        shutil.rmtree(path, ignore_errors=True)
