"""The launcher process of a sandboxed run (see :mod:`fedrl_lightning.sandbox`).

``_launcher_main`` is never called in this process: :func:`launcher_source` ships its source (``inspect.getsource``)
to a ``python -I -S -c`` process, single-threaded, so no ``preexec_fn`` is needed in a possibly multi-threaded
trainer. It must therefore stay self-contained: stdlib imports inside, no module globals.
"""

from __future__ import annotations

import functools
import inspect
import textwrap


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


@functools.cache
def launcher_source() -> str:
    """The program that ``python -I -S -c`` runs as the launcher; its one argument is the hex-encoded config."""
    return textwrap.dedent(inspect.getsource(_launcher_main)) + "\nimport sys\n_launcher_main(sys.argv[1])\n"
