"""This process's resident memory from ``/proc`` (Linux), for the memory benchmarks."""

from __future__ import annotations


def status_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since start or the last ``reset_peak``) of this process, KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def status_mb(field: str) -> float:
    """``status_kib`` in MB (MiB)."""
    return status_kib(field) / 1024


def reset_peak() -> None:
    """Start ``VmHWM`` over from the current RSS (Linux >= 4.0; OSError where the kernel does not allow it)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
