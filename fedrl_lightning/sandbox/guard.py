"""The audit-hook guard of the fallback isolation modes (``setuid`` and ``rlimit``, see :mod:`fedrl_lightning.sandbox`).

``_sandbox_guard`` is never called in this process: :func:`guarded_runner_source` ships its source
(``inspect.getsource``) to the sandboxed ``python -I -S -c`` process, which installs the hook and then runs the
program. It must therefore stay self-contained: stdlib imports inside, no module globals.

The hook (``sys.addaudithook`` hooks cannot be removed from Python) refuses: creating sockets; opening for writing,
creating, renaming or deleting paths outside the working directory (``/dev/null`` excepted), writes through ``..``
and file operations with ``dir_fd`` (so ``shutil.rmtree`` fails even inside); symlinks and hard links to outside
files; opening outside directories; starting programs (``exec*``, ``subprocess``, ``posix_spawn``, ``os.system``);
``kill(-1)``; importing ``ctypes``; and the introspection that could tamper with the hook (``gc.get_objects``,
assigning ``__code__``). It is a speed bump, not a security boundary: a determined program may find a way around
it. Reads are not restricted beyond file permissions, so in ``rlimit`` mode the program can read whatever the
calling user can. Prefer the ``namespace`` mode for untrusted code.
"""

from __future__ import annotations

import functools
import inspect
import textwrap


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
def guarded_runner_source(block_fork: bool, script: str) -> str:
    """The program that ``python -I -S -c`` runs in the fallback modes: install the guard, then run ``script``."""
    guard = textwrap.dedent(inspect.getsource(_sandbox_guard))
    return f"{guard}\n_sandbox_guard({block_fork!r})\ndel _sandbox_guard\n{_RUNNER.format(script=script)}"
