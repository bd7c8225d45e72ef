"""The C paged decode-attention kernel (paged_decode.c): compiled once per machine with gcc, called via ctypes.

The shared object is cached under ~/.cache/shardserve (or $XDG_CACHE_HOME) by a hash of the source, the
compiler flags and this CPU, built under a file lock so ranks starting together compile it once. Without a
C compiler, or with SHARDSERVE_ATTENTION_KERNEL=torch, `available()` is False and attention uses the torch
gather path, which gives the same results.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from shardserve.distributed import env

SOURCE = Path(__file__).with_name("paged_decode.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def _build() -> ctypes.CDLL | None:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_identity().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shardserve"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"paged_decode-{key}.so"
    with open(cache / f"paged_decode-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                     # one rank compiles, the others wait and load
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                built = Path(tmp) / "paged_decode.so"
                proc = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True,
                                      text=True, timeout=120)
                if proc.returncode != 0:
                    warnings.warn(f"paged-attention kernel did not compile, using the torch path:\n{proc.stderr}")
                    return None
                os.replace(built, target)                    # atomic: nobody loads a half-written file
    lib = ctypes.CDLL(str(target))
    fn = lib.paged_decode_f32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]
    return lib


def available() -> bool:
    """True when the kernel is built and loaded (and not switched off by SHARDSERVE_ATTENTION_KERNEL=torch)."""
    global _lib, _tried
    if env.attention_kernel() == "torch":
        return False
    if not _tried:
        _tried = True
        try:
            _lib = _build()
        except (OSError, subprocess.SubprocessError) as exc:
            warnings.warn(f"paged-attention kernel unavailable, using the torch path: {exc}")
            _lib = None
    return _lib is not None


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, hd] float32 CPU; caches [S, Hk, hd]; slots [B, L] and lens [B] int64 -> [B, Hq, hd]."""
    assert q.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and slots.dtype == lens.dtype == torch.int64
    q, slots, lens = q.contiguous(), slots.contiguous(), lens.contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    bsz, hq, hd = q.shape
    out = torch.empty_like(q)
    _lib.paged_decode_f32(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), lens.data_ptr(),
                          out.data_ptr(), bsz, hq, k_cache.shape[1], hd, slots.shape[1], scale,
                          torch.get_num_threads())
    return out
