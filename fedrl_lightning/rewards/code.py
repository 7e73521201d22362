"""Code-execution rewards: run the last fenced Python block of a completion against stdin/stdout tests, sandboxed.

Each test runs the program in a fresh ``python3 -I -S`` process (isolated mode, no site-packages: only the standard
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
    below), which is weaker than a kernel boundary.
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

The fallback audit hook (``setuid`` and ``rlimit`` modes; ``sys.addaudithook`` hooks cannot be removed from Python)
refuses: creating sockets; opening for writing, creating, renaming or deleting paths outside the working directory
(``/dev/null`` excepted), writes through ``..`` and file operations with ``dir_fd`` (so ``shutil.rmtree`` fails even
inside); symlinks and hard links to outside files; opening outside directories; starting programs (``exec*``,
``subprocess``, ``posix_spawn``, ``os.system``); ``kill(-1)``; importing ``ctypes``; and the introspection that could
tamper with the hook (``gc.get_objects``, assigning ``__code__``). It is a speed bump, not a security boundary: a
determined program may find a way around it. Reads are not restricted beyond file permissions, so in ``rlimit`` mode
the program can read whatever the calling user can. Prefer the ``namespace`` mode for untrusted code.

The working directory is created under :func:`tempfile.gettempdir`; in ``setuid`` mode ``nobody`` must be able to
traverse it (the default ``/tmp`` is fine). The interpreter must be executable by ``nobody`` in the root modes:
``sys.executable`` is tried first, then ``python3`` from ``/usr/local/bin``, ``/usr/bin`` or ``/bin``.

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
import dataclasses
import errno
import functools
import inspect
import json
import logging
import marshal
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from fedrl_lightning.rewards._text import completion_text

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

log = logging.getLogger("fedrl_lightning.rewards.code")

NAMESPACE, SETUID, RLIMIT = "namespace", "setuid", "rlimit"
_MODES = (NAMESPACE, SETUID, RLIMIT)
SANDBOX_UID = SANDBOX_GID = 65534  # nobody / nogroup
_SCRIPT = "solution.py"
_ENV_MARKER = "FEDRL_SANDBOX_ID"
_TMPFS_BYTES = 64 * 1024 * 1024  # size of the working directory in namespace mode
_TMPFS_INODES = 4096
_MAX_OPEN_FILES = 64
_DEFAULT_FILE_BYTES = 16 * 1024 * 1024
_DEFAULT_PROCESSES = 32
_TERMINATE_GRACE_S = 2.0  # how long the launcher gets to kill the sandbox before it is killed itself


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program in it): the launcher could not start or set up the process."""


class _ProcessLimitBusy(SandboxError):
    """The sandbox user is at its process limit (a concurrent fork bomb); retried by :func:`run_sandboxed`."""


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
# Code that runs in other processes. These functions are shipped as source (inspect.getsource) and executed with
# ``python -I -S -c``: they must be self-contained (stdlib imports inside, no module globals) and are never called
# in this process.
# --------------------------------------------------------------------------------------------------------------------


def _launcher_main(config_hex):  # pragma: no cover - runs in the launcher process
    """The launcher: sets up isolation, starts the program, reaps and kills its process tree, reports its status.

    ``config_hex`` is the hex of a ``marshal``-ed dict (marshal is built in: no json/re imports, which would double
    the start-up time of every run). Writes one line to the status fd: ``status:<wait status>`` or
    ``error:<type>:<errno>:<message>``.
    """
    import ctypes
    import marshal
    import os
    import resource
    import select
    import signal
    import time

    cfg = marshal.loads(bytes.fromhex(config_hex))
    mode = cfg["mode"]
    status_fd = cfg["status_fd"]
    workdir = cfg["workdir"]

    pr_set_pdeathsig, pr_set_child_subreaper, pr_set_no_new_privs = 1, 36, 38
    clone_newns, clone_newuts, clone_newipc, clone_newpid, clone_newnet = (
        0x00020000,
        0x04000000,
        0x08000000,
        0x20000000,
        0x40000000,
    )
    ms_rdonly, ms_nosuid, ms_nodev, ms_noexec, ms_remount = 1, 2, 4, 8, 32
    ms_noatime, ms_nodiratime, ms_bind, ms_rec, ms_private, ms_relatime = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.unshare.argtypes = [ctypes.c_int]

    def check(rc, what):
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def prctl(option, value):
        check(libc.prctl(option, value, 0, 0, 0), f"prctl({option})")

    def write_line(fd, text):
        try:
            os.write(fd, (text.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    def describe(exc):
        return f"{type(exc).__name__}:{getattr(exc, 'errno', None) or 0}:{exc}"

    def kill(pid, group=False):
        try:
            (os.killpg if group else os.kill)(pid, signal.SIGKILL)
        except OSError:
            pass

    def parent_gone(alive_r):
        return alive_r is not None and bool(select.select([alive_r], [], [], 0)[0])

    state = {"child": 0, "stop": False}

    def on_term(signum, frame):
        state["stop"] = True
        if state["child"]:
            kill(state["child"])
            kill(state["child"], group=True)

    signal.signal(signal.SIGTERM, on_term)

    def own_process_count(uid):
        count = 0
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    count += os.stat(f"/proc/{name}").st_uid == uid
                except OSError:
                    pass
        return count

    def exec_program(alive_r, err_w):
        """Runs in the program's process: limits, credentials, then exec. Never returns."""
        os.setsid()
        os.chdir(workdir)
        for name, (soft, hard) in cfg["limits"].items():
            res = getattr(resource, name, None)
            if res is None:
                continue
            if name == "RLIMIT_NPROC" and cfg["uid"] is None:  # counted per user: allow this many more
                soft = hard = own_process_count(os.getuid()) + soft
                cur_hard = resource.getrlimit(res)[1]
                if cur_hard != resource.RLIM_INFINITY:
                    soft = hard = min(soft, cur_hard)
            resource.setrlimit(res, (soft, hard))
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        prctl(pr_set_no_new_privs, 1)
        prctl(pr_set_pdeathsig, signal.SIGKILL)  # after setuid, which clears it
        if parent_gone(alive_r):
            os._exit(127)
        os.close(status_fd)
        os.umask(0o077)
        os.execve(cfg["argv"][0], cfg["argv"], dict(os.environ))

    def unescape(field):  # mountinfo writes space, tab, newline and backslash as a backslash + 3 octal digits
        parts = field.split("\\")
        return parts[0] + "".join(chr(int(p[:3], 8)) + p[3:] for p in parts[1:])

    def remount_readonly():
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
        keep = (
            ("nosuid", ms_nosuid),
            ("nodev", ms_nodev),
            ("noexec", ms_noexec),
            ("noatime", ms_noatime),
            ("nodiratime", ms_nodiratime),
            ("relatime", ms_relatime),
        )
        for line in lines:
            fields = line.split()
            target, options = unescape(fields[4]), fields[5].split(",")
            flags = ms_remount | ms_bind | ms_rdonly
            for option, bit in keep:
                if option in options:
                    flags |= bit
            rc = libc.mount(None, target.encode(), None, flags, None)
            if target == "/":
                check(rc, "remount / read-only")

    def namespace_init(alive_r, err_w):
        """PID 1 of the new PID namespace, still root: mounts, then starts the program and reaps orphans."""
        prctl(pr_set_pdeathsig, signal.SIGKILL)
        if parent_gone(alive_r):
            os._exit(127)
        os.close(alive_r)
        check(libc.unshare(clone_newns | clone_newnet | clone_newipc | clone_newuts), "unshare")
        check(libc.mount(None, b"/", None, ms_rec | ms_private, None), "make / private")
        with open(os.path.join(workdir, cfg["script"]), "rb") as f:
            source = f.read()
        remount_readonly()
        options = (
            f"size={cfg['tmpfs_bytes']},nr_inodes={cfg['tmpfs_inodes']},mode=0700,uid={cfg['uid']},gid={cfg['gid']}"
        )
        check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", ms_nosuid | ms_nodev, options.encode()), "mount tmpfs")
        fd = os.open(os.path.join(workdir, cfg["script"]), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, source)
        os.close(fd)
        # A /proc of this PID namespace hides the host's processes; best effort.
        libc.mount(b"proc", b"/proc", b"proc", ms_nosuid | ms_nodev | ms_noexec, None)
        pid = os.fork()
        if pid == 0:
            try:
                exec_program(None, err_w)
            except BaseException as exc:
                write_line(err_w, describe(exc))
            os._exit(127)
        os.close(err_w)
        while True:
            reaped, status = os.waitpid(-1, 0)
            if reaped == pid:
                break
        write_line(status_fd, f"status:{status}")
        os._exit(0)  # the kernel kills every other process of the namespace

    def children():
        me = os.getpid()
        try:
            with open(f"/proc/{me}/task/{me}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            pass
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == me:
                    found.append(int(name))
        return found

    def kill_descendants():
        # Orphans of the program are re-parented to this subreaper: kill and reap until no child is left.
        deadline = time.monotonic() + 5.0
        while True:
            for pid in children():
                kill(pid)
            try:
                reaped, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if reaped == 0:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.001)

    try:
        err_r, err_w = os.pipe()
        alive_r, alive_w = os.pipe()
        prctl(pr_set_child_subreaper, 1)
        if mode == "namespace":
            check(libc.unshare(clone_newpid), "unshare(CLONE_NEWPID)")
        pid = os.fork()
        if pid == 0:
            try:
                os.close(err_r)
                os.close(alive_w)
                if mode == "namespace":
                    namespace_init(alive_r, err_w)
                else:
                    exec_program(alive_r, err_w)
            except BaseException as exc:
                write_line(err_w, describe(exc))
            os._exit(127)
        state["child"] = pid
        if state["stop"]:
            on_term(signal.SIGTERM, None)
        os.close(err_w)
        os.close(alive_r)
        error = b""
        while chunk := os.read(err_r, 4096):
            error += chunk
        os.close(err_r)
        while True:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            if info.si_pid == pid:
                if mode != "namespace":
                    kill(pid, group=True)  # its process group, while the zombie still holds the group id
                _, status = os.waitpid(pid, 0)
                break
            os.waitpid(info.si_pid, 0)
        if error:
            write_line(status_fd, "error:" + error.decode("utf-8", "replace").strip())
        elif mode != "namespace":
            write_line(status_fd, f"status:{status}")
        kill_descendants()
    except BaseException as exc:
        write_line(status_fd, "error:" + describe(exc))
    os._exit(0)


def _sandbox_guard(block_fork):  # pragma: no cover - runs inside the sandbox (fallback modes)
    """Installs the audit hook of the fallback modes; see the module docstring. Every value the hook uses is a
    default argument (assigning ``__defaults__`` is refused), so the program cannot rebind it."""
    import posix
    import sys

    root = posix.getcwd()
    outside_ok = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr", "/dev/fd/1", "/dev/fd/2"})

    def resolve(path, getcwd=posix.getcwd, fspath=posix.fspath, isinstance=isinstance, bytes=bytes):
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def climbs(path, fspath=posix.fspath, isinstance=isinstance, bytes=bytes):
        # A write through "..": the hook resolves relative paths against the working directory, but os.open may
        # resolve them against a dir_fd that the audit event does not show.
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        return "/../" in "/" + path + "/"

    def refuse(what, path=None):
        if path is None:
            raise PermissionError(1, f"sandbox: {what} is not allowed")
        raise PermissionError(1, f"sandbox: {what} is not allowed", path)

    def hook(
        event,
        args,
        resolve=resolve,
        climbs=climbs,
        refuse=refuse,
        root=root,
        prefix=root.rstrip("/") + "/",
        isinstance=isinstance,
        int=int,
        stat=posix.stat,
        outside_ok=outside_ok,
        write_flags=posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND,
        dir_flags=posix.O_DIRECTORY | getattr(posix, "O_PATH", 0),
        spawn_events=frozenset(
            {"os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "pty.spawn", "os.startfile"}
        ),
        fork_events=frozenset({"os.fork", "os.forkpty"}) if block_fork else frozenset(),
        path_events=frozenset(
            {"os.mkdir", "os.rmdir", "os.remove", "os.chmod", "os.chown", "os.utime", "os.chflags", "os.lchflags"}
            | {"os.setxattr", "os.removexattr", "os.truncate"}
        ),
        no_dir_fd=(None, -1),  # how the audit events show "no dir_fd"
        dir_fd_events=frozenset({"os.mkdir", "os.rmdir", "os.remove", "os.chmod", "os.chown", "os.utime"}),
        denied_imports=frozenset({"ctypes", "_ctypes", "cffi", "_cffi_backend"}),
        introspection=frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents"}),
        guarded_attrs=frozenset({"__code__", "__defaults__", "__kwdefaults__"}),
    ):
        def inside(path):
            p = resolve(path)
            return p == root or p.startswith(prefix)

        if event == "open":
            path, flags = args[0], args[2]
            if isinstance(path, int):
                return
            writing = not isinstance(flags, int) or flags & write_flags
            if writing and climbs(path):
                refuse("writing through '..'", path)
            if inside(path):
                return
            p = resolve(path)
            if writing:
                if p not in outside_ok:
                    refuse("writing outside the working directory", p)
            elif flags & dir_flags:
                refuse("opening a directory outside the working directory", p)
            else:
                try:
                    mode = stat(p).st_mode
                except OSError:
                    return
                if mode & 0o170000 == 0o040000:
                    refuse("opening a directory outside the working directory", p)
        elif event in path_events:
            path = args[0]
            if isinstance(path, int):
                if event != "os.truncate":
                    refuse(f"{event} on a file descriptor")
            elif not inside(path):
                refuse(f"{event} outside the working directory", resolve(path))
            if event in dir_fd_events and args[-1] not in no_dir_fd:
                refuse(f"{event} with dir_fd")
        elif event in ("os.rename", "os.link"):
            if args[2] not in no_dir_fd or args[3] not in no_dir_fd:
                refuse(f"{event} with dir_fd")
            if not (inside(args[0]) and inside(args[1])):
                refuse(f"{event} outside the working directory")
        elif event == "os.symlink":
            refuse("creating symlinks")
        elif event == "socket.__new__":
            refuse("network access")
        elif event == "os.kill" and args[0] == -1:
            refuse("signalling every process")
        elif event in spawn_events:
            refuse("starting programs")
        elif event in fork_events:
            refuse("forking")
        elif event == "import":
            if args[0] in denied_imports:
                raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        elif event in introspection:
            refuse(event)
        elif event == "object.__setattr__" and args[1] in guarded_attrs:
            refuse(f"assigning {args[1]}")

    def denied(*args, **kwargs):
        raise PermissionError(1, "sandbox: not allowed")

    import _posixsubprocess  # its fork_exec raises no audit event

    _posixsubprocess.fork_exec = denied
    for module in (posix, sys.modules.get("os")):
        for name in ("mkfifo", "mknod"):  # no audit events either
            if module is not None and hasattr(module, name):
                delattr(module, name)
    sys.addaudithook(hook)


_RUNNER = """
import sys
sys.argv[:] = [{script!r}]
with open({script!r}, "rb") as _sandbox_file:
    _sandbox_source = _sandbox_file.read()
del _sandbox_file
__file__ = {script!r}
exec(compile(_sandbox_source, {script!r}, "exec", dont_inherit=True), globals())
"""


@functools.cache
def _launcher_source() -> str:
    return textwrap.dedent(inspect.getsource(_launcher_main)) + "\nimport sys\n_launcher_main(sys.argv[1])\n"


@functools.cache
def _guarded_runner_source(block_fork: bool) -> str:
    guard = textwrap.dedent(inspect.getsource(_sandbox_guard))
    return f"{guard}\n_sandbox_guard({block_fork!r})\ndel _sandbox_guard\n{_RUNNER.format(script=_SCRIPT)}"


# --------------------------------------------------------------------------------------------------------------------
# Running a program
# --------------------------------------------------------------------------------------------------------------------


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
                        result = _run_with_retry(_PROBES[mode], "", 10.0, 256, None, 4096, mode, python)
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
    max_file_bytes: int = _DEFAULT_FILE_BYTES,
    max_processes: int = _DEFAULT_PROCESSES,
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
    return _run_with_retry(code, stdin, timeout_s, memory_mb, limits, max_output_bytes, mode, python)


def _run_with_retry(
    code: str,
    stdin: str,
    timeout_s: float,
    memory_mb: int,
    limits: dict[str, Any] | None,
    max_output_bytes: int,
    mode: str,
    python: str,
) -> SandboxResult:
    limits = limits or {}
    cpu_s = int(limits.get("cpu_s") or math.ceil(timeout_s) + 1)
    rlimits = {
        "RLIMIT_AS": (int(memory_mb) << 20,) * 2,
        "RLIMIT_CPU": (cpu_s, cpu_s + 1),
        "RLIMIT_NPROC": (limits.get("max_processes", _DEFAULT_PROCESSES),) * 2,
        "RLIMIT_FSIZE": (limits.get("max_file_bytes", _DEFAULT_FILE_BYTES),) * 2,
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
            argv = [python, "-I", "-S", "-c", _guarded_runner_source(block_fork), _SCRIPT]
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
    launcher = [sys.executable, "-I", "-S", "-c", _launcher_source(), config_hex]
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
