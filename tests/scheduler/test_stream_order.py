"""Checking mode of the CPU stand-ins: stream order proven on real schedules, hazards caught, and
no host synchronization in the per-block path of inference."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload import backend, planning
from neuzip_offload.backend import StreamOrderError
from neuzip_offload.scheduler.plan import DISK, HOST
from tests.helpers import model_bytes, same_bits, tiny_llama

CPU = torch.device("cpu")


@pytest.fixture
def copies(monkeypatch):
    """Plans made with copies, as on CUDA: host → staging (copy stream) → slot (decode stream)."""
    plan_options = planning.plan_options

    def with_copies(*args, **kwargs):
        return dataclasses.replace(plan_options(*args, **kwargs), copies=True)

    monkeypatch.setattr(planning, "plan_options", with_copies)


def _streamed(prefetch: int, layers: int = 5, **kw):
    """A tiny Llama near its minimum budget: the layers stream through few slots."""
    # No reserve: the plan itself counts the setup copy of resident blocks (gpu-audit H9).
    args = dict(reserve=0, prefetch=prefetch, progress=False, granularity="layer", **kw)
    with pytest.raises(nzo.PlanError) as e:
        nzo.dispatch(tiny_llama(layers=layers), max_gpu_mem=1, **args)
    model = tiny_llama(layers=layers)
    nzo.dispatch(model, max_gpu_mem=e.value.minimum_device_bytes, **args)
    assert HOST in model.neuzip.plan.tiers
    return model


def _skip_wait(stream, name: str):
    """Make ``stream`` drop its waits on events called ``name`` (a bug planted on purpose)."""
    wait = stream.wait_event

    def wait_event(event):
        if getattr(event, "name", None) != name:
            wait(event)

    stream.wait_event = wait_event


IDS = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))


# -- the checker itself ----------------------------------------------------------------------------
def test_off_by_default_and_the_stand_ins_do_nothing():
    assert backend.checker() is None
    s = backend.new_stream(CPU, "copy")
    e = backend.new_event(CPU)
    e.record(s)
    s.wait_event(e)
    e.synchronize()
    assert backend.current_stream(CPU) is not backend.current_stream(CPU)  # nothing kept
    from neuzip_offload.scheduler.streams import Streams

    st = Streams(CPU)
    assert not st.ordered
    st.write(torch.empty(4), st.copy, "x")  # no checker: nothing is recorded anywhere
    with backend.checking() as chk:
        assert st.ordered and backend.checker() is chk
        assert backend.current_stream(CPU) is chk.default_stream
    assert backend.checker() is None


def test_happens_before_through_events_and_synchronization():
    buf = torch.empty(64, dtype=torch.uint8)
    with backend.checking(count_syncs=False) as chk:
        copy, decode = backend.new_stream(CPU, "copy"), backend.new_stream(CPU, "decode")
        compute = backend.current_stream(CPU)
        chk.access(buf[:32], copy, True, "staging buffer")
        with pytest.raises(StreamOrderError, match="read-after-write on the staging buffer"):
            chk.access(buf[:8], decode, False, "staging buffer")  # decode did not wait
        copied = backend.CpuEvent("copied")
        copied.record(copy)
        decode.wait_event(copied)
        chk.access(buf[:32], decode, False, "staging buffer")
        chk.access(buf[32:], copy, True, "staging buffer")  # other bytes: no conflict
        # reuse of the first half without waiting for the decode's read
        with pytest.raises(StreamOrderError, match="write-after-read") as e:
            chk.access(buf[16:40], copy, True, "staging buffer")
        assert "copy stream" in str(e.value) and "decode stream" in str(e.value)
        free = backend.CpuEvent("stage.free")
        free.record(decode)
        copy.wait_event(free)
        chk.access(buf[:32], copy, True, "staging buffer")
        # transitively: compute waits decode, which had waited copy (after the first write)
        ready = backend.CpuEvent("ready")
        ready.record(copy)
        decode.wait_event(ready)
        done = backend.CpuEvent("done")
        done.record(decode)
        compute.wait_event(done)
        chk.access(buf, compute, False, "slot")
        # a host thread's write after the compute stream's read needs a synchronization
        with pytest.raises(StreamOrderError, match="record|never waited"):
            chk.access(buf[:4], None, True, "host buffer")
        compute.synchronize()
        chk.access(buf[:4], None, True, "host buffer")
        assert chk.checked == 6


def test_a_reused_address_of_a_new_buffer_has_no_history():
    with backend.checking(count_syncs=False) as chk:
        copy, decode = backend.new_stream(CPU, "copy"), backend.new_stream(CPU, "decode")
        # The same memory under two storages, one after the other: what an allocator that
        # reuses an address does, made deterministic.
        raw = np.empty(1 << 16, dtype=np.uint8)
        a = torch.from_numpy(raw)
        chk.access(a, copy, True, "staging buffer")
        ptr = a.data_ptr()
        del a  # its storage is freed: its history must go with it
        b = torch.from_numpy(raw)
        assert b.data_ptr() == ptr
        chk.access(b, decode, False, "slot")  # a different buffer: nothing to order


def test_host_synchronizations_are_counted_per_block_on_the_compute_stream():
    t = torch.arange(6)
    with backend.checking() as chk:
        t.sum().item()  # between blocks
        chk.entered("layer 0")
        t.tolist()
        _ = t[t > 2]  # boolean mask: the output size is data
        bool(t[0])
        torch.nonzero(t)
        t.to(torch.float32)  # no device change: not a sync
        t.to("cpu")  # device → host, were t on the device
        _ = t[1:3]
        with backend.on_stream(backend.new_stream(CPU, "decode")):
            t.tolist()  # the CPU codec standing in for a kernel: not counted
        backend.CpuEvent().synchronize()
        chk.exited("layer 0")
    ops = [(s.op, s.block) for s in chk.syncs]
    assert ops == [
        ("item", None),
        ("tolist", "layer 0"),
        ("__getitem__ (boolean mask)", "layer 0"),
        ("__bool__", "layer 0"),
        ("nonzero", "layer 0"),
        ("to(cpu)", "layer 0"),
        ("event.synchronize", "layer 0"),
    ]
    assert chk.syncs_per_block() == {None: 1, "layer 0": 6}
    assert all(s.where.startswith(__file__) and not s.library for s in chk.syncs)


def test_the_environment_variable_turns_checking_on():
    code = "from neuzip_offload import backend; print(backend.checker() is not None)"
    env = dict(os.environ, NEUZIP_CHECK_STREAMS="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "True"


# -- real schedules under checking mode ------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [1, 2])
def test_inference_with_copies_and_prefetch_is_ordered(copies, prefetch):
    ref_model = tiny_llama(layers=5)
    with torch.no_grad():
        ref = ref_model(IDS).logits
    model = _streamed(prefetch)
    ex = model.neuzip.executor
    assert ex.copies and ex.plan.n_staging >= 1
    with backend.checking() as chk, torch.no_grad():
        for _ in range(3):
            assert same_bits(model(IDS).logits, ref)
    # each fetch: copy reads host + writes staging, decode reads staging + writes slot
    assert ex.stats.copied_bytes > 0
    assert chk.checked >= 4 * ex.stats.fetches and chk.waits >= 3 * ex.stats.fetches


def test_inference_without_copies_is_ordered():
    model = _streamed(prefetch=2)
    ex = model.neuzip.executor
    with backend.checking() as chk, torch.no_grad():
        for _ in range(2):
            model(IDS)
    assert chk.checked >= ex.stats.fetches and chk.waits > 0


@pytest.fixture
def on_disk(tmp_path, copies):
    """A tiny Llama loaded from a compressed checkpoint with blocks left on disk (with copies)."""
    src = tmp_path / "hf"
    tiny_llama(layers=4).save_pretrained(src, max_shard_size="100KB")
    out = nzo.convert(src, tmp_path / "nz", progress=False)
    size = model_bytes(tiny_llama(layers=4))
    compressed = nzo.checkpoint.Checkpoint(out).compressed_bytes()
    model = nzo.load(
        out,
        max_gpu_mem=int(0.5 * size) + (256 << 10),
        max_cpu_mem=compressed // 2,
        reserve=256 << 10,  # room for the setup copy of resident blocks (gpu-audit H9)
        prefetch=1,
        progress=False,
    )
    assert DISK in model.neuzip.plan.tiers and model.neuzip.executor.copies
    return model


def test_the_disk_tier_is_ordered(on_disk):
    ex = on_disk.neuzip.executor
    with backend.checking() as chk, torch.no_grad():
        for _ in range(3):
            on_disk(IDS)
    assert ex.stats.read_bytes > 0
    assert chk.checked >= 4 * ex.stats.fetches


def test_a_training_step_is_ordered(copies):
    base = tiny_llama(layers=3).train()
    model = tiny_llama(layers=3).train()
    model.load_state_dict(base.state_dict())
    nzo.dispatch(
        model,
        max_gpu_mem=int(0.7 * model_bytes(base)) + (256 << 10),
        reserve=256 << 10,  # room for the setup copy of resident blocks (gpu-audit H9)
        prefetch=1,
        trainable=True,
        optimizer=nzo.optim.SGD(lr=1e-2),
        progress=False,
    )
    ex = model.neuzip.executor
    assert HOST in ex.plan.tiers and ex.copies
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 1000, (2, 8), generator=g) for _ in range(2)]
    with backend.checking() as chk:
        for b in batches:
            model(b, labels=b).loss.backward()
    assert ex.orders["backward"] is not None and model.neuzip.trainer.steps == 2
    assert chk.checked >= 4 * ex.stats.fetches


# -- hazards planted on purpose: each must be caught -----------------------------------------------
def test_decode_not_waiting_for_the_copy_is_caught(copies):
    model = _streamed(prefetch=1)
    _skip_wait(model.neuzip.executor.streams.decode, "copied")
    with (
        backend.checking(),
        torch.no_grad(),
        pytest.raises(StreamOrderError, match="read-after-write on the staging buffer"),
    ):
        model(IDS)


def test_compute_not_waiting_for_the_decode_is_caught(copies):
    model = _streamed(prefetch=1)
    with backend.checking() as chk, torch.no_grad():
        _skip_wait(chk.default_stream, "slot.ready")
        with pytest.raises(StreamOrderError, match="read-after-write on the slot") as e:
            model(IDS)
    assert "'slot.ready'" in str(e.value)


def test_a_staging_buffer_reused_before_its_decode_read_it_is_caught(copies):
    model = _streamed(prefetch=1)
    _skip_wait(model.neuzip.executor.streams.copy, "stage.free")
    with (
        backend.checking(),
        torch.no_grad(),
        pytest.raises(StreamOrderError, match="write-after-read on the staging buffer"),
    ):
        for _ in range(2):
            model(IDS)


def test_a_slot_rewritten_without_waiting_for_compute_is_caught():
    model = _streamed(prefetch=1)
    _skip_wait(model.neuzip.executor.streams.decode, "slot.free")
    with (
        backend.checking(),
        torch.no_grad(),
        pytest.raises(StreamOrderError, match="write-after-read on the slot"),
    ):
        for _ in range(2):
            model(IDS)


def test_a_slot_released_before_its_last_use_is_caught(copies):
    """exit() records slot.free; a weight still used after it lets the decode of another block
    overwrite the slot under the reader."""
    model = _streamed(prefetch=1)
    ex = model.neuzip.executor
    with torch.no_grad():
        model(IDS)  # the order is recorded
    streamed = [b for b in ex.order if not ex.is_resident(b)]
    first = streamed[0]
    key = ex.blocks()[first].keys[0]
    with backend.checking() as chk:
        ex.begin_forward()
        ex.enter(first)
        w = ex.weight(key)
        ex.exit(first)  # released early: w is used below
        ex.streams.read(w, chk.default_stream, "slot")  # the late use, on the compute stream
        with pytest.raises(StreamOrderError, match="write-after-read on the slot") as e:
            for b in streamed[1:]:  # the slot is claimed again once the window moves on
                ex.enter(b)
                ex.exit(b)
    assert "no event was recorded on the compute stream after that read" in str(e.value)


def test_a_disk_buffer_refilled_before_its_copy_is_caught(on_disk, monkeypatch):
    monkeypatch.setattr(backend.CpuEvent, "synchronize", lambda self: None)  # reader's wait
    with (
        backend.checking(),
        torch.no_grad(),
        pytest.raises(StreamOrderError, match="write-after-read on the disk-read buffer"),
    ):
        for _ in range(3):
            on_disk(IDS)


# -- host synchronizations in the per-block path ---------------------------------------------------
def _in_block_path(syncs):
    """Synchronizations inside a block, or anywhere in this project's code."""
    return [f"{s.op} in block {s.block} at {s.where}" for s in syncs if s.block or s.library]


def test_inference_has_no_host_synchronization_per_block(copies):
    model = _streamed(prefetch=2, layers=12, max_block_bytes="1GB")  # weights in one piece
    assert all(len(m.pieces) == 1 for m in _compressed_modules(model))
    with torch.no_grad():
        model(IDS)  # the order is recorded
        with backend.checking() as chk:
            for _ in range(2):
                model(IDS)
    assert _in_block_path(chk.syncs) == []
    ex = model.neuzip.executor
    assert ex.stats.fetches > 0
    # the counter is live: a check of every weight on the host is one sync per weight, per block
    weight = ex.weight

    def checked_weight(key):
        w = weight(key)
        assert bool(w.isfinite().all())
        return w

    ex.weight = checked_weight
    with torch.no_grad(), backend.checking() as chk:
        model(IDS)
    per_block = chk.syncs_per_block()
    streamed = [b for b in ex.order if not ex.is_resident(b)]
    names = [b.name for b in ex.blocks()]
    assert streamed and all(per_block.get(names[b], 0) >= 1 for b in streamed)


def test_a_multi_piece_embedding_has_no_host_synchronization_per_block(copies):
    """The embedding is cut into pieces (max_block_bytes below its size); its lookup must not
    ask the host which pieces hold the requested rows."""
    emb = tiny_llama(layers=2).get_input_embeddings().weight
    limit = emb.numel() * emb.element_size() // 3
    model = _streamed(prefetch=1, layers=2, max_block_bytes=limit)
    assert len(model.get_input_embeddings().pieces) > 1
    with torch.no_grad():
        model(IDS)
        with backend.checking() as chk:
            model(IDS)
    assert _in_block_path(chk.syncs) == []


def _compressed_modules(model):
    from neuzip_offload.modules import CompressedModule

    return [m for m in model.modules() if isinstance(m, CompressedModule)]
