"""The C kernels (the `SOURCES` next to this file): compiled once per machine with gcc, loaded with ctypes.

The shared object is cached under ~/.cache/shardserve (or $XDG_CACHE_HOME) by a hash of the sources, the
compiler flags and this CPU, built under a file lock so ranks starting together compile it once. Without a
C compiler, or with SHARDSERVE_CPU_KERNELS=torch, `available()` is False and every caller takes its torch
path, which computes the same values.
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

SOURCES = [Path(__file__).with_name(name) for name in ("paged_decode.c", "prefill_attention.c", "linear_f32.c",
                                                      "linear_bf16.c", "fused_ops.c", "decoder_f32.c", "greedy_head.c", "sampling.c",
                                                      "quant_linear.c", "quant_panels.c")]
HEADERS = [Path(__file__).with_name(name) for name in ("cpu_math.h", "half.h")]
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {                                  # C function -> (return type, argument types)
    "paged_decode_f32": (None, [_P] * 6 + [_I] * 5 + [_F, ctypes.c_int]),
    "paged_decode_bf16": (None, [_P] * 6 + [_I] * 5 + [_F, ctypes.c_int]),
    "prefill_attention_f32": (None, [_P, _I, _P, _P, _P, _I, _P, _P, _I, _I, _I, _F, ctypes.c_int]),
    "prefill_attention_bf16": (None, [_P, _I, _P, _P, _P, _I, _P, _P, _I, _I, _I, _F, ctypes.c_int]),
    "linear_f32_preferred": (ctypes.c_int, []),
    "linear_f32": (None, [_P, _I, _P, _P, _P] + [_I] * 4 + [ctypes.c_int]),
    "linear_silu_f32": (None, [_P, _I, _P, _P] + [_I] * 4 + [ctypes.c_int]),
    "linear_bf16_supported": (ctypes.c_int, []),
    "linear_bf16": (ctypes.c_int, [_P, _I, _P, _P, _P] + [_I] * 4 + [ctypes.c_int]),
    "decoder_layers_f32": (_I, [_P, _I, _P, _P, _P, ctypes.c_int]),
    "rms_norm_f32": (None, [_P] * 5 + [_I] * 2 + [_F, ctypes.c_int]),
    "rotary_f32": (None, [_P] * 5 + [_I] * 4 + [ctypes.c_int]),
    "silu_mul_f32": (None, [_P] * 2 + [_I] * 3 + [ctypes.c_int]),
    "kv_write_f32": (_I, [_P, _I, _P, _I, _P, _P, _P, _I, _I, _I, ctypes.c_int]),
    "kv_write_bf16": (_I, [_P, _I, _P, _I, _P, _P, _P, _I, _I, _I, ctypes.c_int]),
    "round_bf16_rows": (None, [_P, _I, _I, _I, ctypes.c_int]),
    "argmax_rows_f32": (None, [_P, _I, _I, _I, _P, ctypes.c_int]),
    "greedy_head_supported": (ctypes.c_int, []),
    "top_p_filter_f32": (None, [_P, _I, _I, _I, _P, _P, ctypes.c_int]),
    "top_k_filter_f32": (None, [_P, _I, _I, _I, _P, ctypes.c_int]),
    "greedy_head_f32": (_I, [_P, _I, _I, _I, _P, _P, _P, _I, _I] + [_P] * 8 + [ctypes.c_int]),
    "quant_linear_avx512": (ctypes.c_int, []),
    "quant_linear_f32": (ctypes.c_int, [_P, _I, _P, _I, _P, _P, _P] + [_I] * 4 + [ctypes.c_int] * 2),
    "quant_dequant_rows_f32": (ctypes.c_int, [_P, _I, _P, _P, _I, _P, _I, ctypes.c_int, ctypes.c_int]),
    "quant_panels_avx512": (ctypes.c_int, []),
    "quant_panels_linear_f32": (ctypes.c_int, [_P, _I, _P, _P, _P] + [_I] * 4 + [ctypes.c_int] * 2),
    "quant_panels_linear_scalar_f32": (ctypes.c_int, [_P, _I, _P, _P, _P] + [_I] * 4 + [ctypes.c_int] * 2),
}
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
    text = b"".join(src.read_bytes() for src in SOURCES + HEADERS)
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + _cpu_identity().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shardserve"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"kernels-{key}.so"
    with open(cache / f"kernels-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                     # one rank compiles, the others wait and load
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                built = Path(tmp) / "kernels.so"
                proc = subprocess.run([compiler, *FLAGS, "-o", str(built), *map(str, SOURCES), "-lm"],
                                      capture_output=True, text=True, timeout=120)
                if proc.returncode != 0:
                    warnings.warn(f"the C kernels did not compile, using the torch paths:\n{proc.stderr}")
                    return None
                os.replace(built, target)                    # atomic: nobody loads a half-written file
    lib = ctypes.CDLL(str(target))
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def available() -> bool:
    """True when the kernels are built and loaded (and not switched off by SHARDSERVE_CPU_KERNELS=torch)."""
    global _lib, _tried
    if env.cpu_kernels() == "torch":
        return False
    if not _tried:
        _tried = True
        try:
            _lib = _build()
        except (OSError, subprocess.SubprocessError) as exc:
            warnings.warn(f"the C kernels are unavailable, using the torch paths: {exc}")
            _lib = None
    return _lib is not None


def applies(*tensors: torch.Tensor) -> bool:
    """True when the kernels can take these tensors: float32 on the CPU, and the library is loaded."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


def lib() -> ctypes.CDLL:
    assert _lib is not None, "call available() first"
    return _lib
