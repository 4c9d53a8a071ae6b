"""Worker processes (neuzip_offload/workers.py): started fresh, never forked, never orphaned.

Jobs here are functions of the standard library, so that each test says which process runs
what: ``local=False`` leaves every job to the workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from neuzip_offload.workers import Job, WorkerError, WorkerProcesses

REPO = Path(__file__).resolve().parents[1]
# A job the workers are killed in: waiting for it instead would take this long, so half of it
# tells killing from waiting on any machine (a worker starts in seconds, under load in tens)
_LONG = 600


def _children() -> set[int]:
    """This process's live child processes (zombies are dead)."""
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.status() != psutil.STATUS_ZOMBIE
    }


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_workers_are_other_processes_with_one_torch_thread():
    before = _children()
    jobs = [
        Job(os.getpid, (), "pid"),
        Job(torch.get_num_threads, (), "threads"),
        Job(print, ("printed on stdout, which carries the replies",), "print"),
    ]
    with WorkerProcesses(2, local=False) as procs:
        got = dict(procs.run(jobs))
        assert len(_children() - before) == 2
    assert got[0] != os.getpid() and got[1] == 1 and got[2] is None
    assert _children() == before  # told to exit, and reaped


def test_this_process_runs_the_jobs_no_worker_is_ready_for():
    before = _children()
    with WorkerProcesses(1) as procs:  # this process alone: no worker is started
        assert [r for _, r in procs.run([Job(os.getpid, (), "pid")] * 3)] == [os.getpid()] * 3
        assert _children() == before
        with pytest.raises(WorkerError, match="the label: ValueError: invalid literal") as info:
            list(procs.run([Job(int, ("x",), "the label")]))
    assert isinstance(info.value.__cause__, ValueError)


def test_a_worker_that_dies_is_named_and_the_others_are_killed():
    before = _children()
    jobs = [Job(time.sleep, (_LONG,), "a long job"), Job(os._exit, (3,), "the fatal job")]
    t = time.monotonic()
    with (
        pytest.raises(WorkerError, match=r"the fatal job: .* died .*exit code 3"),
        WorkerProcesses(2, local=False) as procs,
    ):
        list(procs.run(jobs))
    assert time.monotonic() - t < _LONG / 2  # the sleeping worker was killed, not waited for
    assert _children() == before


def test_a_job_that_does_not_pickle_is_named():
    with (
        pytest.raises(WorkerError, match="a lambda: "),
        WorkerProcesses(1, local=False) as procs,
    ):
        list(procs.run([Job(lambda: 1, (), "a lambda")]))


def test_an_interrupt_kills_the_workers():
    before, seen = _children(), []

    def interrupt(signum, frame):
        seen.extend(_children() - before)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    t = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt), WorkerProcesses(2, local=False) as procs:
            list(procs.run([Job(time.sleep, (_LONG,), "sleep")] * 2))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert len(seen) == 2  # both were running when the interrupt came
    assert time.monotonic() - t < _LONG / 2
    assert _children() == before


def test_a_worker_ends_when_its_parent_is_killed(tmp_path):
    """SIGKILL gives the parent no chance to clean up: the busy worker notices it alone."""
    marker = tmp_path / "busy"
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from neuzip_offload.workers import Job, WorkerProcesses
        mark = Job(Path.touch, (Path({str(marker)!r}),), "mark")
        with WorkerProcesses(1, local=False) as procs:
            list(procs.run([mark, Job(time.sleep, ({_LONG},), "sleep")]))
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        (worker,) = psutil.Process(parent.pid).children()
        parent.kill()
        parent.wait()
        assert _gone(worker.pid, timeout=_LONG / 2)  # it would sleep on for _LONG
    finally:
        parent.kill()
        parent.wait()
