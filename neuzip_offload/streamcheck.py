"""Checking mode of the CPU stand-ins: a stream-order checker and a host-synchronization counter.

The CPU stand-ins (neuzip_offload.backend) run every stream's work at once, so an ordering bug of
the executor — a missing ``wait_event``, a slot or staging buffer reused before its "free" event —
cannot show on the CPU. In checking mode the stand-ins keep a vector clock per stream and per host
thread, as if each stream ran on its own, and the executor declares the buffers it reads and
writes on each stream. An access is checked against earlier accesses to overlapping bytes from
other streams or threads: unless the earlier one happens-before it (through events recorded and
waited, stream/event synchronizations, or host order for work a thread issues), a read-after-write,
write-after-read or write-after-write raises StreamOrderError.

Happens-before, as CUDA defines it for the calls the executor makes:

    work a host thread issues on a stream  comes after everything that thread did before
    event.record(s)                        snapshots the clock of stream s
    s.wait_event(e)                        s continues after e's snapshot
    e.synchronize() / s.synchronize()      the calling host thread continues after e / s
    host_joined(buf)                       the calling thread continues after the host thread
                                           that last wrote buf (a Future's result)

The same mode counts host synchronizations on the thread that enabled it: event and stream
synchronizations, and tensor operations that make the host wait for the device (``.item()``,
``.tolist()``, ``bool(t)``, ``.cpu()``, ``.numpy()``, ``nonzero``, boolean-mask indexing, ...).
Each is attributed to the innermost block the executor has entered (``None`` between blocks).
Operations issued inside ``on_stream(side stream)`` are not counted: on the CPU backend that is
the CPU codec standing in for device kernels.

Off by default and free when off: the stand-ins test one module global. On with
``with backend.checking() as chk:`` (order checking and sync counting on this thread), or for a
whole process with NEUZIP_CHECK_STREAMS=1 (order checking; ``chk.counting()`` adds the counter).
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

ENV_VAR = "NEUZIP_CHECK_STREAMS"


class StreamOrderError(RuntimeError):
    """A buffer was accessed on one stream while another stream's access to it was unordered."""


@dataclass(frozen=True)
class HostSync:
    """One host synchronization seen in checking mode."""

    op: str  # e.g. "item", "tolist", "__getitem__ (boolean mask)", "event.synchronize"
    block: str | None  # the innermost block entered when it happened (None: between blocks)
    where: str  # file:line of the first caller outside torch and this module
    library: bool  # the caller is a file of this project (not the model's own code)


@dataclass
class _Agent:
    """A stream or a host thread: its vector clock and the events recorded on it."""

    id: int
    name: str
    stream: bool
    clock: dict[int, int] = field(default_factory=dict)
    recorded: list[tuple[int, str, str]] = field(default_factory=list)  # (epoch, event, where)

    def tick(self) -> int:
        epoch = self.clock.get(self.id, 0) + 1
        self.clock[self.id] = epoch
        return epoch

    def merge(self, clock: dict[int, int]) -> None:
        for k, v in clock.items():
            if self.clock.get(k, 0) < v:
                self.clock[k] = v

    def saw(self, other: _Agent, epoch: int) -> bool:
        return self is other or self.clock.get(other.id, 0) >= epoch


@dataclass
class _Access:
    lo: int  # byte range [lo, hi) of the storage
    hi: int
    agent: _Agent
    epoch: int
    write: bool
    purpose: str
    where: str
    clock: dict[int, int] | None  # the writer's clock, kept for host-thread writes (joins)


@dataclass
class _EventMark:
    """What a stand-in event carries in checking mode: who recorded it, and the clock then."""

    checker: StreamChecker
    agent: _Agent
    clock: dict[int, int]
    name: str


_SKIP_DIRS = (
    os.path.dirname(torch.__file__),
    contextlib.__file__,
    threading.__file__,
    os.path.dirname(concurrent.futures.__file__),
)
# frames of the checker's own plumbing: the caller named in reports is the one above them
_SKIP_SUFFIXES = (
    os.path.join("neuzip_offload", "streamcheck.py"),
    os.path.join("neuzip_offload", "backend.py"),
    os.path.join("scheduler", "streams.py"),
)


def _caller() -> str:
    """file:line of the first frame outside torch, contextlib and the checker's plumbing."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if not (name.startswith(_SKIP_DIRS) or name.endswith(_SKIP_SUFFIXES)):
            return f"{name}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _library_roots() -> tuple[str, ...]:
    """Folders of this project's packages (the scheduler and kernels install under it)."""
    roots = {os.path.dirname(os.path.abspath(__file__))}
    for name in ("neuzip_offload.scheduler", "neuzip_offload.kernels"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__file__", None):
            roots.add(os.path.dirname(os.path.abspath(mod.__file__)))
    return tuple(sorted(roots))


class StreamChecker:
    """The state of checking mode: clocks, access histories, host synchronizations seen."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._local = threading.local()  # per thread: host agent, stream stack, blocks, counting
        self._agents: dict[int, tuple[object, _Agent]] = {}  # id(stream) → (stream, agent)
        self._next_id = 0
        # storage data_ptr → (weak reference to the storage, accesses to it)
        self._buffers: dict[int, tuple[weakref.ref, list[_Access]]] = {}
        self.default_stream: object | None = None  # the compute stream stand-in (backend sets it)
        self.syncs: list[HostSync] = []
        self.checked = 0  # accesses checked: a test can see that the checker saw the work
        self.waits = 0  # wait_event calls that ordered something
        self._roots: tuple[str, ...] | None = None

    # -- agents ----------------------------------------------------------------------------------
    def _new_agent(self, name: str, stream: bool) -> _Agent:
        self._next_id += 1
        return _Agent(self._next_id, name, stream)

    def _host(self) -> _Agent:
        agent = getattr(self._local, "host", None)
        if agent is None:
            agent = self._new_agent(f"host thread {threading.current_thread().name!r}", False)
            self._local.host = agent
        return agent

    def _stream(self, stream: object) -> _Agent:
        entry = self._agents.get(id(stream))
        if entry is None or entry[0] is not stream:
            name = getattr(stream, "name", None) or "stream"
            entry = (stream, self._new_agent(f"{name} stream", True))
            self._agents[id(stream)] = entry  # the stream is kept alive, so its id stays unique
        return entry[1]

    def _issue(self, stream: object | None) -> _Agent:
        """The agent that runs work issued now on ``stream`` (None: this host thread). Work
        issued on a stream comes after everything the issuing thread did before."""
        host = self._host()
        if stream is None:
            return host
        agent = self._stream(stream)
        agent.merge(host.clock)
        return agent

    # -- streams and events ----------------------------------------------------------------------
    def current_stream(self) -> object | None:
        stack = getattr(self._local, "streams", None)
        return stack[-1] if stack else self.default_stream

    @contextlib.contextmanager
    def on_stream(self, stream: object) -> Iterator[None]:
        stack = getattr(self._local, "streams", None)
        if stack is None:
            stack = self._local.streams = []
        stack.append(stream)
        try:
            yield
        finally:
            stack.pop()

    def record(self, event: object, stream: object | None, name: str) -> None:
        with self._lock:
            agent = self._issue(stream if stream is not None else self.current_stream())
            epoch = agent.tick()
            agent.recorded.append((epoch, name, _caller()))
            event._mark = _EventMark(self, agent, dict(agent.clock), name)

    def _mark(self, event: object) -> _EventMark | None:
        mark = getattr(event, "_mark", None)
        return mark if mark is not None and mark.checker is self else None

    def wait_event(self, stream: object, event: object) -> None:
        with self._lock:
            agent = self._issue(stream)
            mark = self._mark(event)
            if mark is not None:  # waiting for an event never recorded is a no-op, as in CUDA
                agent.merge(mark.clock)
                self.waits += 1

    def wait_stream(self, stream: object, other: object) -> None:
        with self._lock:
            self._issue(stream).merge(self._stream(other).clock)

    def event_synchronize(self, event: object) -> None:
        with self._lock:
            mark = self._mark(event)
            if mark is not None:
                self._host().merge(mark.clock)
        self.note_sync("event.synchronize")

    def stream_synchronize(self, stream: object) -> None:
        with self._lock:
            self._host().merge(self._stream(stream).clock)
        self.note_sync("stream.synchronize")

    def host_joined(self, t: torch.Tensor) -> None:
        """This thread has waited for the host threads that wrote ``t`` (e.g. Future.result())."""
        key, lo, hi = _span(t)
        if hi <= lo:
            return
        with self._lock:
            host = self._host()
            _, accesses = self._buffers.get(key, (None, []))
            for a in accesses:
                if a.clock is not None and a.lo < hi and lo < a.hi:
                    host.merge(a.clock)

    # -- buffer accesses -------------------------------------------------------------------------
    def access(self, t: torch.Tensor, stream: object | None, write: bool, purpose: str) -> None:
        """``t``'s bytes are read (or written) by work issued now on ``stream`` (None: by this
        host thread itself); raise StreamOrderError if an earlier conflicting access from another
        stream or thread is not ordered before it."""
        key, lo, hi = _span(t)
        if hi <= lo:
            return
        storage = t.untyped_storage()
        where = _caller()
        with self._lock:
            agent = self._issue(stream)
            ref, accesses = self._buffers.get(key, (None, None))
            if ref is None or ref() is not storage:  # a new allocation at a reused address
                accesses = []
                self._buffers[key] = (weakref.ref(storage), accesses)
            for a in accesses:
                overlap = a.lo < hi and lo < a.hi
                if overlap and (write or a.write) and not agent.saw(a.agent, a.epoch):
                    raise StreamOrderError(self._explain(a, agent, write, purpose, lo, hi, where))
            epoch = agent.tick()
            # Earlier accesses covered by this one are ordered before it (checked just now, or
            # same agent), so by transitivity of the clocks a later check against this access
            # covers them: drop them (reads only when this one is a read by the same agent).
            accesses[:] = [
                a
                for a in accesses
                if not (lo <= a.lo and a.hi <= hi and (write or (not a.write and a.agent is agent)))
            ]
            clock = None if agent.stream else dict(agent.clock)
            accesses.append(_Access(lo, hi, agent, epoch, write, purpose, where, clock))
            self.checked += 1

    def _explain(
        self, a: _Access, agent: _Agent, write: bool, purpose: str, lo: int, hi: int, where: str
    ) -> str:
        verb = "writes" if write else "reads"
        before = "write" if a.write else "read"
        hazard = {
            (True, True): "write-after-write",
            (True, False): "write-after-read",
            (False, True): "read-after-write",
        }[(write, a.write)]
        later = a.agent.recorded[bisect.bisect_left(a.agent.recorded, (a.epoch,)) :]
        named = [r for r in later if r[1] != "event"]  # prefer events the executor named
        if later:
            _, name, at = (named or later)[0]
            missing = (
                f"the {agent.name} never waited for an event recorded on the {a.agent.name} after "
                f"that {before}, such as {name!r} (recorded at {at})"
            )
        else:
            missing = (
                f"no event was recorded on the {a.agent.name} after that {before}, so nothing the "
                f"{agent.name} waited for covers it"
            )
        return (
            f"{hazard} on the {purpose} (bytes [{lo}, {hi})): the {agent.name} {verb} it at "
            f"{where}, but the {a.agent.name}'s {before} of the {a.purpose} "
            f"(bytes [{a.lo}, {a.hi}), at {a.where}) is not ordered before: {missing}"
        )

    # -- host synchronizations -------------------------------------------------------------------
    def entered(self, block: str) -> None:
        stack = getattr(self._local, "blocks", None)
        if stack is None:
            stack = self._local.blocks = []
        stack.append(block)

    def exited(self, block: str) -> None:
        stack = getattr(self._local, "blocks", None)
        if stack and block in stack:
            del stack[len(stack) - 1 - stack[::-1].index(block)]

    def note_sync(self, op: str) -> None:
        """Count a host synchronization, if this thread counts and runs on the compute stream."""
        if not getattr(self._local, "counting", 0):
            return
        current = self.current_stream()
        if current is not None and current is not self.default_stream:
            return  # inside a side stream: the CPU codec standing in for device kernels
        blocks = getattr(self._local, "blocks", None)
        where = _caller()
        if self._roots is None:
            self._roots = _library_roots()
        library = where.startswith(self._roots)
        self.syncs.append(HostSync(op, blocks[-1] if blocks else None, where, library))

    @contextlib.contextmanager
    def counting(self) -> Iterator[StreamChecker]:
        """Count host synchronizations on this thread while the block runs."""
        self._local.counting = getattr(self._local, "counting", 0) + 1
        try:
            with _SyncCounter(self):
                yield self
        finally:
            self._local.counting -= 1

    def syncs_per_block(self) -> dict[str | None, int]:
        """Host synchronizations seen, by block (None: outside every block)."""
        return dict(collections.Counter(s.block for s in self.syncs))

    def clear_syncs(self) -> None:
        self.syncs.clear()


def _span(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, end byte) of the bytes ``t`` spans in its storage."""
    if t.numel() == 0:
        return 0, 0, 0
    size = t.element_size()
    lo = t.storage_offset() * size
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True))
    return t.untyped_storage().data_ptr(), lo, lo + extent * size


# -- which tensor operations make the host wait for the device -----------------------------------
_SYNC_OPS = frozenset(
    {
        "item",
        "tolist",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "__complex__",
        "cpu",
        "numpy",
        "nonzero",
        "argwhere",
        "unique",
        "unique_consecutive",
        "masked_select",
        "equal",
        "allclose",
        "bincount",
        "histc",
        "_local_scalar_dense",
    }
)
_INDEXING = frozenset({"__getitem__", "__setitem__", "index", "index_put", "index_put_"})


def _is_mask(x: object) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dtype in (torch.bool, torch.uint8)
    if isinstance(x, (tuple, list)):
        return any(_is_mask(y) for y in x)
    return False


def _to_cpu(args: tuple, kwargs: dict) -> bool:
    """``.to("cpu")`` spelled out. A ``.to(device)`` with a torch.device usually follows the
    data (``x.device``), which on the CPU stand-ins is the CPU too: not counted."""
    return any(
        isinstance(x, str) and x.split(":")[0] == "cpu" for x in (*args[1:], kwargs.get("device"))
    )


def sync_op(func: object, args: tuple, kwargs: dict) -> str | None:
    """The name of a host-synchronizing torch call, or None."""
    name = getattr(func, "__name__", "")
    if name in _SYNC_OPS:
        return name
    if name in _INDEXING and len(args) > 1 and _is_mask(args[1]):
        return f"{name} (boolean mask)"
    if name == "to" and _to_cpu(args, kwargs):
        return "to(cpu)"
    if name == "where" and len(args) + len(kwargs) == 1:
        return "where (one argument)"
    if name == "repeat_interleave" and kwargs.get("output_size") is None:
        repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
        if repeats is None or isinstance(repeats, torch.Tensor):  # the output size is data
            return "repeat_interleave"
    return None


class _SyncCounter(TorchFunctionMode):
    """Sees every torch call on this thread and tells the checker about synchronizing ones."""

    def __init__(self, checker: StreamChecker):
        super().__init__()
        self.checker = checker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = sync_op(func, args, kwargs)
        if op is not None:
            self.checker.note_sync(op)
        return func(*args, **kwargs)
