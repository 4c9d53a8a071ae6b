"""neuzip_offload/backend.py: pinning, and the CPU stand-ins for streams and events."""

from __future__ import annotations

import pytest
import torch

from neuzip_offload import backend

CUDA = torch.cuda.is_available()


def test_pin_refuses_a_tensor_that_is_not_on_the_cpu():
    with pytest.raises(ValueError, match="only CPU tensors can be pinned, got one on meta"):
        backend.pin(torch.empty(4, device="meta"))


def test_pin_keeps_the_values_and_pins_only_where_cuda_is():
    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    p = backend.pin(t)
    assert torch.equal(p, t) and p.shape == t.shape and p.dtype == t.dtype
    if CUDA:
        assert p.is_pinned()
        assert backend.pin(p) is p  # already pinned: not copied again
    else:
        assert not p.is_pinned()


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 10_001])
def test_empty_pinned_is_exactly_the_bytes_asked(nbytes):
    buf = backend.empty_pinned(nbytes)
    assert buf.dtype == torch.uint8 and buf.shape == (nbytes,) and buf.device.type == "cpu"
    if CUDA and nbytes:
        assert buf.is_pinned()
    buf.fill_(7)  # writable end to end
    assert int(buf.sum()) == 7 * nbytes


def test_the_cpu_device_gets_the_stand_ins():
    cpu = torch.device("cpu")
    s, ev = backend.new_stream(cpu, "copy"), backend.new_event(cpu, "copied")
    assert isinstance(s, backend.CpuStream) and s.name == "copy"
    assert isinstance(ev, backend.CpuEvent) and ev.name == "copied"
    assert isinstance(backend.current_stream(cpu), backend.CpuStream)


def test_stand_in_events_are_complete_once_recorded_and_streams_run_work_at_once():
    s = backend.CpuStream("side")
    ev = backend.CpuEvent()
    t = torch.zeros(3)
    with backend.on_stream(s):
        t.add_(1)  # "submitted" on the side stream: done when the call returns
    ev.record(s)
    assert ev.query()
    ev.synchronize()
    s.wait_event(ev)
    s.synchronize()
    assert torch.equal(t, torch.ones(3))


def test_checking_mode_is_scoped_and_restores_the_previous_checker():
    before = backend.checker()
    with backend.checking() as outer:
        assert backend.checker() is outer
        with backend.checking(count_syncs=False) as inner:
            assert backend.checker() is inner and inner is not outer
        assert backend.checker() is outer
    assert backend.checker() is before


def test_checking_mode_catches_a_read_that_does_not_wait_for_its_write():
    buf = torch.zeros(16, dtype=torch.uint8)
    with backend.checking(count_syncs=False) as c:
        copy, compute = backend.CpuStream("copy"), backend.CpuStream("compute")
        c.access(buf, copy, write=True, purpose="staging")
        with pytest.raises(backend.StreamOrderError):
            c.access(buf, compute, write=False, purpose="staging")
    with backend.checking(count_syncs=False) as c:
        copy, compute = backend.CpuStream("copy"), backend.CpuStream("compute")
        c.access(buf, copy, write=True, purpose="staging")
        done = backend.CpuEvent("copied")
        done.record(copy)
        compute.wait_event(done)  # the read is ordered after the write: no error
        c.access(buf, compute, write=False, purpose="staging")
