"""keep_freed_memory: freed activations stay in the heap for the next step instead of going back to the kernel."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocates and touches 8 x 16 MiB (as one prefill step's temporaries), frees them, and prints how much of that
# memory the process still holds. glibc's default mmaps blocks this large and unmaps them on free, so the next
# step faults every page in again.
PROBE = """
import os, sys, torch
from shardserve.worker.malloc_tuning import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tune" else False
def rss(): return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
buffers = [torch.empty(4 << 20).fill_(1.0) for _ in range(8)]
del buffers
print(tuned, (rss() - before) >> 20)
"""


def _probe(mode: str, env_extra: dict | None = None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | (env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=60,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and /proc: Linux only")


def test_freed_buffers_stay_in_the_heap():
    tuned, kept_mib = _probe("tune")
    assert tuned and kept_mib >= 120              # the 128 MiB stay mapped, ready for the next step
    _, default_kept_mib = _probe("plain")
    assert default_kept_mib < 16                  # glibc's default gave them back


def test_user_tunables_win():
    tuned, _ = _probe("tune", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"})
    assert not tuned
