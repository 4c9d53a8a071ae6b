"""The CPUs this process may use, and the workers that use them.

One thread pool serves the whole process (zstd frames, host encoders and checksums release the
GIL while they work), sized to the CPUs the process may run on: its affinity mask, which
containers, cgroups-aware launchers and ``taskset`` narrow, not the machine's core count.
Conversion runs shards in worker processes (see process_context for how they start).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None
_lock = threading.Lock()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def shared_pool() -> ThreadPoolExecutor:
    """The process's thread pool (made on first use; a forked child makes its own). Callers
    submit to it and never shut it down."""
    global _pool, _pool_pid
    with _lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=usable_cpus(), thread_name_prefix="neuzip")
            _pool_pid = os.getpid()
        return _pool


def process_context() -> multiprocessing.context.BaseContext:
    """How conversion's worker processes start: fork on Linux, spawn elsewhere.

    A fork server would avoid copying a process with threads, but its workers (like spawn's)
    re-run the caller's main script when it has no ``if __name__ == "__main__"`` guard, and
    fail outright when it came from stdin; until workers start from an entry point of their
    own, fork stays (each worker sets torch to one thread before any work)."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
