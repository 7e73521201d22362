"""Process isolation for untrusted Python programs: :func:`run_sandboxed` runs one and returns a :class:`SandboxResult`.

Each run starts the program in a fresh ``python3 -I -S`` process (isolated mode, no site-packages: only the standard
library can be imported) started by a small launcher process (``python -I -S -c <launcher>``, single-threaded, so no
``preexec_fn`` is needed in this possibly multi-threaded trainer). The launcher applies the strongest isolation this
machine allows:

``namespace`` (running as root with ``CAP_SYS_ADMIN``, the usual case on a dedicated training box or a privileged
container)
    New PID, network, mount, IPC and UTS namespaces (``unshare(2)`` called through ctypes, the same system call as
    util-linux ``unshare --pid --net --mount``). In the mount namespace every mount is remounted read-only and the
    working directory is a fresh, size-limited tmpfs, so it is the only writable place. The network namespace has no
    interface up, so nothing (not even 127.0.0.1) can be reached. The program runs as ``nobody`` (65534) with
    ``no_new_privs``, and killing the namespace's init takes every process of the sandbox with it.
``setuid`` (root without namespaces, e.g. a default Docker container)
    The program runs as ``nobody``, so the filesystem is read-only by permissions except for world-writable
    directories (``/tmp``, ``/var/tmp``, ``/dev/shm``) and the working directory (chowned to ``nobody``). Writes to
    those directories and all network access are blocked by an audit hook installed before the program runs (see
    :mod:`fedrl_lightning.sandbox.guard`), which is weaker than a kernel boundary.
``rlimit`` (not root)
    Best effort: resource limits plus the audit hook only; the program runs as the calling user. If this happens
    to run as root (no interpreter that ``nobody`` can execute), ``fork`` is refused too, as ``RLIMIT_NPROC`` does
    not bind root.

In every mode: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_NPROC`` (fork bombs; per user, so ``nobody``'s
processes are counted across concurrent sandboxes, and a start that hits the limit is retried), ``RLIMIT_FSIZE``,
``RLIMIT_NOFILE`` and ``RLIMIT_CORE`` = 0; a wall-clock timeout after which the whole process tree is killed (the
launcher is a child subreaper and kills every descendant, also ones that called ``setsid``); a minimal environment
(``HOME`` = ``TMPDIR`` = the working directory, no proxies); stdout/stderr read up to ``max_output_bytes`` (the
program is killed when stdout overflows); the working directory is deleted afterwards.

The fallback audit hook (``setuid`` and ``rlimit`` modes) is described in :mod:`fedrl_lightning.sandbox.guard`. It
is a speed bump, not a security boundary: prefer the ``namespace`` mode for untrusted code.

The working directory is created under :func:`tempfile.gettempdir`; in ``setuid`` mode ``nobody`` must be able to
traverse it (the default ``/tmp`` is fine). The interpreter must be executable by ``nobody`` in the root modes:
``sys.executable`` is tried first, then ``python3`` from ``/usr/local/bin``, ``/usr/bin`` or ``/bin``.

The environment variables ``FEDRL_SANDBOX_ISOLATION`` (``namespace``, ``setuid`` or ``rlimit``) and
``FEDRL_SANDBOX_PYTHON`` (the interpreter that runs the programs) override the automatic choices.

Modules: ``runner`` (the host side of one run: working directory, limits, pipes, cleanup), ``launcher`` (the launcher
process, shipped as source) and ``guard`` (the audit hook of the fallback modes, shipped as source). This package
imports only the standard library.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import threading

from fedrl_lightning.sandbox.runner import (
    DEFAULT_FILE_BYTES,
    DEFAULT_PROCESSES,
    NAMESPACE,
    RLIMIT,
    SANDBOX_GID,
    SANDBOX_UID,
    SETUID,
    SandboxError,
    SandboxResult,
    run_with_retry,
)

__all__ = [
    "NAMESPACE",
    "RLIMIT",
    "SANDBOX_GID",
    "SANDBOX_UID",
    "SETUID",
    "SandboxError",
    "SandboxResult",
    "isolation_mode",
    "run_sandboxed",
]

log = logging.getLogger(__name__)

_MODES = (NAMESPACE, SETUID, RLIMIT)  # strongest first: the order isolation_mode() tries them in


def _python_candidates() -> list[str]:
    candidates = [os.environ.get("FEDRL_SANDBOX_PYTHON", "")]
    if sys.executable:
        candidates.append(os.path.realpath(sys.executable))
    candidates.append(getattr(sys, "_base_executable", "") or "")
    candidates.append(shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "")
    return list(dict.fromkeys(c for c in candidates if c))


# Probe programs: each prints "ok" when the mode's guarantees hold.
_PROBES = {
    NAMESPACE: f"""
import errno, os, socket
ok = os.getuid() == {SANDBOX_UID}
for d in ("/tmp", "/var/tmp", "/dev/shm"):
    p = os.path.join(d, ".fedrl-sandbox-probe-%d" % os.getpid())
    try:
        open(p, "w").close()
    except OSError:
        continue
    os.remove(p)
    ok = False
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1).close()
    ok = False
except OSError as e:
    ok = ok and e.errno == errno.ENETUNREACH
print("ok" if ok else "no")
""",
    SETUID: f"import os\nprint('ok' if os.getuid() == {SANDBOX_UID} else 'no')\n",
    RLIMIT: "print('ok')\n",
}

_probe_lock = threading.Lock()
_probed: dict[str, str | None] = {}


def _interpreter_for(mode: str) -> str | None:
    """The first interpreter that runs a probe program in ``mode`` with its guarantees, or None (cached)."""
    with _probe_lock:
        if mode not in _probed:
            found = None
            if mode == RLIMIT or os.geteuid() == 0:
                for python in _python_candidates():
                    try:
                        result = run_with_retry(_PROBES[mode], "", 10.0, 256, None, 4096, mode, python)
                    except SandboxError as exc:
                        log.debug("sandbox mode %s with %s unavailable: %s", mode, python, exc)
                        continue
                    if result.returncode == 0 and result.stdout.strip() == "ok":
                        found = python
                        break
                    log.debug("sandbox mode %s with %s failed its probe: %s", mode, python, result)
            _probed[mode] = found
        return _probed[mode]


@functools.cache
def isolation_mode() -> str:
    """The isolation that :func:`run_sandboxed` uses by default here: ``namespace``, ``setuid`` or ``rlimit``.

    The first mode (in that order) whose probe passes; ``FEDRL_SANDBOX_ISOLATION`` forces one. The result is cached.
    """
    forced = os.environ.get("FEDRL_SANDBOX_ISOLATION")
    if forced:
        if forced not in _MODES:
            raise ValueError(f"FEDRL_SANDBOX_ISOLATION must be one of {_MODES}, got {forced!r}")
        return forced
    for mode in _MODES:
        if _interpreter_for(mode) is not None:
            if mode != NAMESPACE:
                log.warning(
                    "code sandbox: no namespaces here, using the weaker %r isolation (audit-hook network and "
                    "filesystem guards)",
                    mode,
                )
            else:
                log.info("code sandbox: %r isolation with %s", mode, _interpreter_for(mode))
            return mode
    raise SandboxError(f"no Python interpreter could be started in a sandbox (tried {_python_candidates()})")


def run_sandboxed(
    code: str,
    stdin: str = "",
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    cpu_s: int | None = None,
    max_output_bytes: int = 65536,
    *,
    max_file_bytes: int = DEFAULT_FILE_BYTES,
    max_processes: int = DEFAULT_PROCESSES,
    isolation: str | None = None,
) -> SandboxResult:
    """Runs a Python program in a sandbox (see the module docstring) and returns what it did.

    Args:
        code: The program's source.
        stdin: Its standard input.
        timeout_s: Wall-clock limit in seconds (including the ~50 ms start-up); then the process tree is killed.
        memory_mb: Address-space limit (``RLIMIT_AS``) in MiB; allocating more raises ``MemoryError``.
        cpu_s: CPU-time limit (``RLIMIT_CPU``) in seconds; None = ``ceil(timeout_s) + 1``.
        max_output_bytes: At most this many bytes of stdout and of stderr are kept; a program whose stdout
            exceeds it is killed (``killed_reason="output_limit"``).
        max_file_bytes: Largest file the program may write (``RLIMIT_FSIZE``).
        max_processes: ``RLIMIT_NPROC``: processes of the sandbox user (``nobody``, shared by concurrent sandboxes),
            or in ``rlimit`` mode this many more than the user already runs.
        isolation: ``namespace``, ``setuid`` or ``rlimit``; None = :func:`isolation_mode`.

    Returns:
        A :class:`SandboxResult`.

    Raises:
        SandboxError: If the sandbox could not be set up (not a failure of the program).
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_output_bytes < 0:
        raise ValueError("timeout_s and memory_mb must be > 0 and max_output_bytes >= 0")
    mode = isolation or isolation_mode()
    if mode not in _MODES:
        raise ValueError(f"isolation must be one of {_MODES}, got {mode!r}")
    python = _interpreter_for(mode)
    if python is None:
        raise SandboxError(f"isolation {mode!r} is not available on this machine")
    limits = {"cpu_s": cpu_s, "max_file_bytes": max_file_bytes, "max_processes": max_processes}
    return run_with_retry(code, stdin, timeout_s, memory_mb, limits, max_output_bytes, mode, python)
