"""The CPUs this process may use, and the workers that use them.

One thread pool serves the whole process (zstd frames, host encoders and checksums release the
GIL while they work), sized to the CPUs the process may run on: its affinity mask, which
containers, cgroups-aware launchers and ``taskset`` narrow, not the machine's core count.

Conversion (conversion.py) runs shards in :class:`WorkerProcesses`: fresh interpreters started
as ``python -c "... from neuzip_offload.workers import serve; serve(...)"``, never forked. Forking a
process that runs threads (torch's, the pool above) can deadlock the child, and
multiprocessing's spawn and forkserver children import the caller's ``__main__`` again, which
re-runs a script without an ``if __name__ == "__main__"`` guard and fails for one read from
stdin. A worker imports only this package, reads jobs (a module-level function and its
arguments, pickled) from its stdin and writes each outcome to its stdout, one frame each.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

import torch

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------
# worker processes
# ---------------------------------------------------------------------------------------------

# stdout carries the replies: kept as another descriptor, and fd 1 pointed at stderr before
# anything is imported, so that nothing printed (at import or later) lands among the replies
_WORKER_CODE = (
    "import os; replies = os.dup(1); os.dup2(2, 1); "
    "from neuzip_offload.workers import serve; serve(replies)"
)
_LENGTH = struct.Struct("<Q")  # each frame: its length in bytes, then a pickle
_PARENT_POLL_S = 0.5  # how soon a worker notices that its parent is gone
_EXIT_WAIT_S = 10.0  # how long an idle worker may take to exit after its stdin closes


class WorkerError(RuntimeError):
    """A job failed in a worker process, or the worker died running it. The message names the
    job (for conversion: the shard); ``__cause__`` carries the worker's traceback."""


class RemoteTracebackError(Exception):
    """The traceback of an exception raised in a worker process, as text."""

    def __str__(self) -> str:
        return f"\n\n(in the worker process)\n{self.args[0]}"


@dataclass(frozen=True)
class Job:
    """``fn(*args)`` run in a worker. ``fn`` must be a module-level function of an installed
    module (it is pickled by name); ``args`` and the result must pickle. ``label`` is what an
    error names."""

    fn: Callable[..., Any]
    args: tuple
    label: str


class _Failure:
    """What a job that failed leaves for the caller's thread: the error to raise."""

    def __init__(self, error: WorkerError):
        self.error = error


def _write_frame(f: IO[bytes], data: bytes) -> None:
    f.write(_LENGTH.pack(len(data)))
    f.write(data)
    f.flush()


def _read_exactly(f: IO[bytes], n: int) -> bytes | None:
    """``n`` bytes, or None at the end of the stream (the other side closed it or died)."""
    parts, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _read_frame(f: IO[bytes]) -> bytes | None:
    head = _read_exactly(f, _LENGTH.size)
    return None if head is None else _read_exactly(f, _LENGTH.unpack(head)[0])


class _Worker:
    """One worker process and the pipes to it (used by one thread at a time)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.ready = False

    def wait_ready(self) -> bool:
        """Block until the worker has imported what it needs (it says so with an empty frame);
        False if it died first."""
        if not self.ready:
            self.ready = _read_frame(self.proc.stdout) is not None
        return self.ready

    def call(self, job: Job) -> Any:
        """Run ``job`` in the worker and return its result; raise WorkerError naming the job."""
        request = pickle.dumps((job.fn, job.args), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            _write_frame(self.proc.stdin, request)
            reply = _read_frame(self.proc.stdout)
        except OSError:  # a broken pipe: the worker is gone
            reply = None
        if reply is None:
            raise WorkerError(
                f"{job.label}: the worker process (pid {self.proc.pid}) died while running it "
                f"(exit code {self.exit_code()})"
            )
        ok, value = pickle.loads(reply)
        if ok:
            return value
        message, text = value
        raise WorkerError(
            f"{job.label}: failed in a worker process (pid {self.proc.pid}): {message}"
        ) from RemoteTracebackError(text)

    def exit_code(self) -> int | None:
        """The exit code once the process has ended (it closed its pipe: it is ending)."""
        try:
            return self.proc.wait(timeout=_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, kill: bool) -> None:
        """End the process and reap it: close its stdin (an idle worker exits at EOF), or kill
        it (a busy or starting one: its thread is blocked on the pipes, which close only after)."""
        if kill:
            self.proc.kill()
        else:
            self._close(self.proc.stdin)
            if self.exit_code() is None:
                self.proc.kill()
        self.proc.wait()
        self._close(self.proc.stdin)
        self._close(self.proc.stdout)

    @staticmethod
    def _close(f: IO[bytes]) -> None:
        with contextlib.suppress(OSError):  # a broken pipe while flushing: the worker is gone
            f.close()


class WorkerProcesses:
    """``n`` processes that run jobs side by side: this one and ``n - 1`` worker processes.

    Workers take a job once they are ready (starting one imports torch: seconds), and until
    then this process runs jobs itself, so a small job list ends about as fast as it would here
    alone; ``local=False`` leaves every job to the workers (``n`` of them). A worker that fails
    to start is left out with a warning while this process runs jobs too. Every process runs
    torch on one thread (one process a core): this one too while it runs a job beside workers
    (torch's threads spin on a busy machine: several times slower than one thread there).

    Use as a context manager: on leaving it, idle workers are told to exit and, after an error,
    an interrupt (KeyboardInterrupt included) or while any is busy or starting, every worker is
    killed, so none outlives the call. A worker exits by itself when its parent dies (it polls
    its parent's pid: even SIGKILL of the parent leaves no orphan running on).
    """

    def __init__(self, n: int, local: bool = True):
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.n, self.local = n, local
        self._workers: list[_Worker] = []
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()

    def __enter__(self) -> WorkerProcesses:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._closing.set()
        busy = exc_type is not None or any(t.is_alive() for t in self._threads)
        for w in self._workers:
            w.stop(kill=busy or not w.ready)
        for t in self._threads:
            t.join()

    def run(self, jobs: list[Job]) -> Iterator[tuple[int, Any]]:
        """``(index, result)`` of each job as it finishes, in the order they finish; the first
        failure raises WorkerError naming the job (the other workers are killed when the
        context ends). Starts the workers on first use, no more than there are jobs to share."""
        todo: queue.Queue[int] = queue.Queue()
        for i in range(len(jobs)):
            todo.put(i)
        done: queue.Queue[tuple[int, Any]] = queue.Queue()
        wanted = min(self.n - 1, len(jobs) - 1) if self.local else min(self.n, len(jobs))
        while len(self._workers) < wanted:
            try:
                self._workers.append(_Worker())
            except OSError as e:  # no interpreter to start (an embedded Python, say)
                if not self.local:
                    raise
                log.warning("no worker process could be started (%s); going on without", e)
                break
            log.debug("worker process %d started", self._workers[-1].proc.pid)
        # one thread a worker: it hands the worker a job, blocks on the reply, takes the next
        for w in self._workers:
            t = threading.Thread(
                target=self._drive, args=(w, jobs, todo, done), name="neuzip-worker", daemon=True
            )
            t.start()
            self._threads.append(t)
        for _ in jobs:
            try:
                i, value = done.get_nowait()
            except queue.Empty:
                i = _take(todo) if self.local else None
                i, value = done.get() if i is None else (i, _run_here(jobs[i], bool(self._workers)))
            if isinstance(value, _Failure):
                raise value.error
            yield i, value

    def _drive(self, w: _Worker, jobs: list[Job], todo: queue.Queue, done: queue.Queue) -> None:
        if not w.wait_ready():
            error = WorkerError(
                f"a worker process (pid {w.proc.pid}) failed to start "
                f"(exit code {w.exit_code()}); see its error output above"
            )
            if not self.local:
                done.put((-1, _Failure(error)))
            elif not self._closing.is_set():
                log.warning("%s; going on without it", error)
            return
        while not self._closing.is_set():
            i = _take(todo)
            if i is None:
                return
            try:
                done.put((i, w.call(jobs[i])))
            except WorkerError as e:
                done.put((i, _Failure(e)))
                return
            except Exception as e:  # the job did not pickle, or its reply did not unpickle
                error = WorkerError(f"{jobs[i].label}: {type(e).__name__}: {e}")
                error.__cause__ = e
                done.put((i, _Failure(error)))
                return


def _take(todo: queue.Queue) -> int | None:
    try:
        return todo.get_nowait()
    except queue.Empty:
        return None


def _run_here(job: Job, one_thread: bool) -> Any:
    """Run ``job`` in this process; its failure becomes a WorkerError naming it, as in a
    worker. ``one_thread``: on one torch thread, as a worker runs (restored after)."""
    threads = torch.get_num_threads()
    if one_thread:
        torch.set_num_threads(1)
    try:
        return job.fn(*job.args)
    except Exception as e:
        raise WorkerError(f"{job.label}: {type(e).__name__}: {e}") from e
    finally:
        if one_thread:
            torch.set_num_threads(threads)


def _exit_with_parent(parent: int) -> None:
    """In a worker: end the process once its parent is gone (it is then re-parented). A parent
    gone before this started is seen at once too: its end of stdin is closed."""
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


def serve(replies_fd: int) -> None:
    """A worker process's loop: say it is ready, then read a job from stdin, run it, write its
    outcome to ``replies_fd`` (the pipe its parent reads); exit when stdin closes or the parent
    dies. Started by :class:`WorkerProcesses`."""
    torch.set_num_threads(1)  # one process per core: torch's own threads would oversubscribe
    # Ctrl-C reaches the whole process group: the parent decides, and kills its workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    requests = sys.stdin.buffer
    replies = os.fdopen(replies_fd, "wb")
    _write_frame(replies, b"")  # ready: the imports are done
    while (frame := _read_frame(requests)) is not None:
        fn, args = pickle.loads(frame)
        try:
            reply = (True, fn(*args))
        except Exception as e:
            reply = (False, (f"{type(e).__name__}: {e}", traceback.format_exc()))
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # a result that does not pickle
            data = pickle.dumps((False, (f"{type(e).__name__}: {e}", traceback.format_exc())))
        _write_frame(replies, data)
