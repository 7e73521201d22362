"""The lean decoder's CPU kernels (``kernels.cpp``), compiled on first use and called through ctypes.

- ``linear``: the skinny matmul. At decode batch sizes (a few rows) an fp32 linear layer should run at the speed of
  streaming its weight from memory; oneDNN's packed kernels reach well under half of that on an AVX2 host, and this
  kernel is 1.7-2.3x faster than them at batch 1-8 (``benchmarks/NOTES.md``). It can add into the residual in place.
- ``rms_norm``, ``rope_cache``, ``attend``, ``silu_mul``: a decode step's glue, one call each instead of 5-10 small
  torch ops (each costing more in dispatch than in arithmetic at these sizes).

They need x86-64 with AVX2 and FMA and a C++ compiler (``$CXX``, default ``g++``); where either is missing, or
``FEDRL_DECODE_KERNELS=0``, ``library()`` returns None and the decoder runs on oneDNN and torch ops. The shared
library is cached under ``$FEDRL_CACHE_DIR/kernels`` keyed by a hash of the source and the flags. The kernels take
fp32 CPU tensors; inputs are made contiguous, outputs written in place must already be.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
PANEL = 8  # output columns per panel (one AVX2 register of fp32)
LARGE_M = 64  # from this many rows on, a plain GEMM (compute-bound) beats streaming panels 8 rows at a time


def _cpu_ok() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not x86-64 ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return "the CPU has no AVX2"
    return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (the reason logged once)."""
    reason = "FEDRL_DECODE_KERNELS=0" if os.environ.get("FEDRL_DECODE_KERNELS", "1") == "0" else _cpu_ok()
    if reason is None:
        try:
            return _load()
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            reason = f"{type(err).__name__}: {err} {detail.decode(errors='replace')[-500:]}".strip()
    log.info("decode kernels unavailable (%s): the lean decoder uses oneDNN and torch ops", reason)
    return None


def _load() -> ctypes.CDLL:
    from fedrl_lightning.models import default_cache_dir

    compiler = os.environ.get("CXX", "g++")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    path = default_cache_dir() / "kernels" / f"decode-{digest}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp)], check=True, capture_output=True)
        os.replace(tmp, path)  # atomic: concurrent processes each compile, one file wins, none reads a partial one
    lib = ctypes.CDLL(str(path))
    ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {
        "skinny_linear": [ptr, i64, i64, ptr, i64, ptr, ptr, i32, i32],
        "rms_norm": [ptr, ptr, ptr, i64, i64, f32],
        "rope_cache": [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64],
        "attend": [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i32],
        "silu_mul": [ptr, ptr, i64, i64],
    }
    for name, args in signatures.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
    return lib


def available(weight: Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and library() is not None


def pack(weight: Tensor) -> Tensor:
    """(N, K) -> panels (ceil(N / 8), K, 8), the last one zero-padded."""
    n, k = weight.shape
    padded = torch.nn.functional.pad(weight.detach(), (0, 0, 0, -n % PANEL))
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()


def unpack(packed: Tensor, n: int) -> Tensor:
    """Panels back to the (N, K) weight (a copy)."""
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:n]


def linear(x: Tensor, packed: Tensor, n: int, bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """(..., K) @ W^T + bias -> (..., N) for ``packed = pack(W)``; with ``residual`` (..., N), added into it in place
    and returned. Many rows go through a plain GEMM instead (compute-bound, where panels do not pay)."""
    k = packed.shape[1]
    rows = x.reshape(-1, k)
    if rows.shape[0] >= LARGE_M:  # prefill: the transient unpack costs a few % of the GEMM
        y = torch.nn.functional.linear(x, unpack(packed, n), bias)
        return y if residual is None else residual.add_(y)
    rows = rows.contiguous()
    out = torch.empty(rows.shape[0], n, dtype=x.dtype) if residual is None else _writable(residual)
    bias_ptr = None if bias is None else bias.data_ptr()
    library().skinny_linear(
        rows.data_ptr(),
        rows.shape[0],
        k,
        packed.data_ptr(),
        n,
        bias_ptr,
        out.data_ptr(),
        residual is not None,
        torch.get_num_threads(),
    )
    return out.view(*x.shape[:-1], n)


def _writable(t: Tensor) -> Tensor:
    """A tensor the kernels write into: it must be laid out as they index it."""
    if not t.is_contiguous() or t.dtype != torch.float32:
        raise ValueError(f"decode kernels write into contiguous fp32 tensors, got {t.dtype} strides {t.stride()}")
    return t


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """(..., K) -> (..., K): x * rsqrt(mean(x^2) + eps) * weight."""
    x = x.contiguous()
    out = torch.empty_like(x)
    library().rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return out


def rope_cache(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, heads: int, pos: int) -> None:
    """Rotate q (in ``qkv`` (B, H + 2 KVH, D), in place) and k, and write k, v to the caches (B, KVH, T, D) at pos.

    ``cos``/``sin`` are (B, D), sin's first half negated (``LeanDecoder._rope``).
    """
    b, kvh, t, d = k_cache.shape
    qkv, cos, sin = _writable(qkv), cos.contiguous(), sin.contiguous()
    _writable(k_cache), _writable(v_cache)
    library().rope_cache(
        qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), b, heads, kvh, d, t, pos
    )


def attend(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor, heads: int, length: int) -> Tensor:
    """One query per sequence (the q heads of ``qkv``) over cache positions [0, length) -> (B, H * D).

    ``mask`` is the additive key mask (B, T); the 1/sqrt(D) scale is already in q.
    """
    b, kvh, t, d = k_cache.shape
    qkv, k_cache, v_cache, mask = (v.contiguous() for v in (qkv, k_cache, v_cache, mask))
    out = torch.empty(b, heads * d, dtype=qkv.dtype)
    library().attend(
        qkv.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        mask.data_ptr(),
        out.data_ptr(),
        b,
        heads,
        kvh,
        d,
        t,
        length,
        torch.get_num_threads(),
    )
    return out


def silu_mul(gate_up: Tensor) -> Tensor:
    """(M, 2I) -> (M, I): silu(gate) * up."""
    gate_up = gate_up.contiguous()
    m, width = gate_up.shape
    out = torch.empty(m, width // 2, dtype=gate_up.dtype)
    library().silu_mul(gate_up.data_ptr(), out.data_ptr(), m, width // 2)
    return out
