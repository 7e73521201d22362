"""The lean decoder's CPU kernels (``kernels.cpp``), built on first use by ``torch.utils.cpp_extension.load``.

- ``linear``: the skinny matmul. At decode batch sizes (a few rows) an fp32 linear layer should run at the speed of
  streaming its weight from memory; oneDNN's packed kernels reach well under half of that on an AVX2 host, and this
  kernel is 1.7-2.3x faster than them at batch 1-8 (``benchmarks/NOTES.md``). It can add into the residual in place.
- ``rms_norm``, ``rope_cache``, ``attend``, ``silu_mul``: a decode step's glue, one call each instead of 5-10 small
  torch ops (each costing more in dispatch than in arithmetic at these sizes).

They need x86-64 with AVX2 and FMA, a C++ compiler (``$CXX``, default ``c++``) and ``ninja``; where one is missing,
the build fails, or ``FEDRL_DECODE_KERNELS=0``, ``library()`` returns None (the reason logged once as a warning) and
the decoder runs on oneDNN and torch ops. The build lives in ``$FEDRL_CACHE_DIR/kernels/<name>``, the name keyed by
a hash of the source, the flags and the torch version, so an edit rebuilds. The kernels take fp32 CPU tensors and
check them in C++: inputs are made contiguous, outputs written in place must already be (else ``ValueError``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sysconfig
import time
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # cpp_extension adds -fPIC, -shared and its -std
LDFLAGS = ["-fopenmp"]
PANEL = 8  # output columns per panel (one AVX2 register of fp32)
LARGE_M = 64  # from this many rows on, a plain GEMM (compute-bound) beats streaming panels 8 rows at a time
STALE_LOCK_S = 900.0  # a build lock older than this was left by a killed build (one takes 20-90 s)


@functools.cache
def library() -> ModuleType | None:
    """The built extension module, or None (the reason logged once, as a warning)."""
    reason = _missing()
    if reason is None:
        try:
            return _build()
        except Exception as err:  # whatever breaks the build or the import, decoding goes on without the kernels
            reason = f"the build failed: {_first_error_line(str(err)) or type(err).__name__}"
    log.warning("decode kernels unavailable (%s): the lean decoder uses oneDNN and torch ops", reason)
    return None


def _missing() -> str | None:
    """Why the kernels cannot be built here, or None."""
    if os.environ.get("FEDRL_DECODE_KERNELS", "1") == "0":
        return "FEDRL_DECODE_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not x86-64 ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return "the CPU has no AVX2"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} not found (set $CXX)"
    if not _find_ninja():
        return "ninja not found (pip install ninja)"
    return None


def _find_ninja() -> bool:
    """Whether ``ninja`` is on PATH, putting this environment's scripts directory there if it holds it.

    cpp_extension runs ``ninja`` by name, and a virtualenv's interpreter run by path (``.venv/bin/python``, not
    activated) does not have the environment's ``bin``, where ``pip install ninja`` puts it, on PATH.
    """
    if shutil.which("ninja"):
        return True
    scripts = sysconfig.get_path("scripts")
    if not shutil.which("ninja", path=scripts):
        return False
    os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    return True


def _build() -> ModuleType:
    """Build (or find built) and import the extension."""
    from torch.utils import cpp_extension

    from fedrl_lightning.models import default_cache_dir

    key = b"\0".join([SOURCE.read_bytes(), *(f.encode() for f in FLAGS + LDFLAGS), torch.__version__.encode()])
    name = f"fedrl_decode_kernels_{hashlib.sha256(key).hexdigest()[:16]}"
    directory = default_cache_dir() / "kernels" / name
    directory.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(directory / "lock")
    # cpp_extension locks the directory while it builds: concurrent processes build once and all import the result.
    return cpp_extension.load(
        name, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=LDFLAGS, build_directory=str(directory)
    )


def _clear_stale_lock(lock: Path) -> None:
    """Remove a build lock a killed process left behind: cpp_extension would wait for it forever."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.warning("removing %s, left %.0f s ago by a decode-kernels build that did not finish", lock, age)
        lock.unlink(missing_ok=True)


def _first_error_line(message: str) -> str:
    """The compiler's first ``error:`` line in a build log (else its first non-empty line), without the path."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    if not errors:
        return lines[0] if lines else ""
    line = errors[0]
    return line[line.index(SOURCE.name) :] if SOURCE.name in line else line


def available(weight: Tensor) -> bool:
    """Whether ``weight`` can go through ``linear`` (fp32 on the CPU, with the kernels built)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and library() is not None


def pack(weight: Tensor) -> Tensor:
    """(N, K) -> panels (ceil(N / 8), K, 8), the last one zero-padded."""
    n, k = weight.shape
    padded = torch.nn.functional.pad(weight.detach(), (0, 0, 0, -n % PANEL))
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()


def pack_sum(
    parts: list[tuple[Tensor, Tensor | None, Tensor | None, float, float]], out: Tensor | None = None
) -> Tensor:
    """``pack`` of the row-concatenation of ``scale * (W + alpha * B @ A)`` over ``parts``, in one pass.

    The panels are written straight from W and the low-rank factors (one ``baddbmm`` per part), where merging,
    concatenating and packing would each pass over the weights. ``out``, a previous result of the same shape, is
    written in place (no new allocation after an optimizer step).

    Args:
        parts: (W (n_i, K), B (n_i, r) or None, A (r, K) or None, alpha, scale) per part; each n_i a multiple of
            ``PANEL``; B and A in W's dtype.
        out: panels (N / PANEL, K, PANEL) to overwrite, or None.
    """
    k = parts[0][0].shape[1]
    shape = (sum(w.shape[0] for w, *_ in parts) // PANEL, k, PANEL)
    if out is None or out.shape != shape or out.dtype != parts[0][0].dtype:
        out = torch.empty(shape, dtype=parts[0][0].dtype)
    start = 0
    for w, b, a, alpha, scale in parts:
        panels = w.shape[0] // PANEL
        lib = library()
        if lib is not None:  # one read of W, one write of the panels (8 x 8 blocks transposed in registers)
            lib.pack_low_rank(w.detach(), _detach(b), _detach(a), out[start : start + panels], scale, alpha * scale)
        else:
            dst, src = out[start : start + panels], w.detach().view(panels, PANEL, k).transpose(1, 2)
            if b is None or a is None:
                torch.mul(src, scale, out=dst)
            else:  # (K, r) @ (r, 8) per panel: the delta's panel, transposed as the layout wants it
                rank = a.shape[0]
                factors = (a.detach().t().expand(panels, k, rank), b.detach().view(panels, PANEL, rank).transpose(1, 2))
                torch.baddbmm(src, *factors, beta=scale, alpha=alpha * scale, out=dst)
        start += panels
    return out


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def unpack(packed: Tensor, n: int) -> Tensor:
    """Panels back to the (N, K) weight (a copy)."""
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:n]


def linear(x: Tensor, packed: Tensor, n: int, bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """(..., K) @ W^T + bias -> (..., N) for ``packed = pack(W)``; with ``residual`` (..., N), added into it in place
    and returned. Many rows go through a plain GEMM instead (compute-bound, where panels do not pay)."""
    rows = x.reshape(-1, packed.shape[1])
    if rows.shape[0] >= LARGE_M:  # prefill: the transient unpack costs a few % of the GEMM
        y = torch.nn.functional.linear(x, unpack(packed, n), bias)
        return y if residual is None else residual.add_(y)
    return library().skinny_linear(rows, packed, n, bias, residual).view(*x.shape[:-1], n)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """(..., K) -> (..., K): x * rsqrt(mean(x^2) + eps) * weight."""
    return library().rms_norm(x, weight, eps)


def rope_cache(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, heads: int, pos: int) -> None:
    """Rotate q (in ``qkv`` (B, H + 2 KVH, D), in place) and k, and write k, v to the caches (B, KVH, T, D) at pos.

    ``cos``/``sin`` are (B, D), sin's first half negated (``LeanDecoder._rope``).
    """
    library().rope_cache(qkv, cos, sin, k_cache, v_cache, heads, pos)


def attend(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor, heads: int, length: int) -> Tensor:
    """One query per sequence (the q heads of ``qkv``) over cache positions [0, length) -> (B, H * D).

    ``mask`` is the additive key mask (B, T); the 1/sqrt(D) scale is already in q.
    """
    return library().attend(qkv, k_cache, v_cache, mask, heads, length)


def silu_mul(gate_up: Tensor) -> Tensor:
    """(M, 2I) -> (M, I): silu(gate) * up."""
    return library().silu_mul(gate_up)
