"""Everything the runtime holds on the device is in the plan, and nothing piles up.

The CPU backend runs the same executor, so the buffers it really allocates (walked, not read from
its accountant) show that a GPU run stays within max_gpu_mem; the setup copy of resident blocks,
training scratch and decode statuses are counted here, a hopeless budget is refused before any
compression, and device-side decode damage is turned into an error at the end of the forward
(the Triton decoder runs under the interpreter for that).
"""

from __future__ import annotations

import gc
from dataclasses import replace

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload.config import CodecConfig
from neuzip_offload.scheduler.accounting import BudgetExceededError
from neuzip_offload.scheduler.executor import Executor
from neuzip_offload.scheduler.plan import DEVICE, PlanOptions, make_plan
from tests.helpers import (
    check_device_memory,
    compressed_blocks,
    device_storages,
    model_bytes,
    requires_triton,
    same_bits,
    tiny_llama,
)


def _blocks(shapes_per_block, codec="zstd", config=None):
    return compressed_blocks(shapes_per_block, config or CodecConfig(codec=codec))


def _forward_checks_weights(ex, weights):
    """One forward through every block; each weight comes out bit for bit."""
    ex.begin_forward()
    for i, ws in enumerate(weights):
        ex.enter(i)
        assert all(same_bits(ex.weight(f"b{i}.w{j}"), w) for j, w in enumerate(ws))
        ex.exit(i)
    ex.end_forward()


def _options(device_bytes, **kw):
    return PlanOptions(device_bytes=device_bytes, host_bytes=10**9, copies=True, device="cpu", **kw)


def test_the_setup_copy_of_resident_blocks_is_planned_at_every_budget():
    """Resident blocks are decoded at setup from compressed planes that visit the device; the
    planner counts that moment, so no budget it accepts fails in the executor (before, a tight
    budget raised BudgetExceededError from the setup copy)."""
    # one large tensor per block: its compressed planes exceed what any slack would absorb
    shapes = [[(128, 128)]] * 6 + [[(64, 64)], [(32,)]]
    weights, blocks, specs = _blocks(shapes)
    with pytest.raises(nzo.PlanError) as e:
        make_plan(specs, _options(1, prefetch=1))
    low = e.value.minimum_device_bytes
    high = sum(s.decoded_bytes for s in specs) + max(s.setup_bytes for s in specs)
    tried_resident = 0
    for budget in range(low, high + 1, max(1, (high - low) // 40)):
        plan = make_plan(specs, _options(budget, prefetch=1))
        assert plan.gpu_bytes + plan.options.reserve_bytes <= budget
        ex = Executor(plan, blocks, torch.device("cpu"))  # raises if the setup overflows
        tried_resident += DEVICE in plan.tiers
        held = device_storages(ex)  # found by walking the executor's buffers
        assert sum(held.values()) + plan.transient_bytes <= budget
        _forward_checks_weights(ex, weights)
        assert device_storages(ex) == held
        ex.close()
    assert tried_resident > 5


def test_training_scratch_is_kept_apart_from_the_reserve():
    _, _, specs = _blocks([[(64, 64)], [(64, 64)]])
    base = make_plan(specs, _options(10**8, prefetch=1, reserve_bytes=1000))
    more = make_plan(specs, _options(10**8, prefetch=1, reserve_bytes=1000, scratch_bytes=5000))
    assert more.transient_bytes == 5000 and "transient" in more.table()
    with pytest.raises(nzo.PlanError) as e:
        make_plan(specs, _options(1, prefetch=1, reserve_bytes=1000, scratch_bytes=5000))
    with pytest.raises(nzo.PlanError) as f:
        make_plan(specs, _options(1, prefetch=1, reserve_bytes=1000))
    assert e.value.minimum_device_bytes == f.value.minimum_device_bytes + 5000
    # everything resident: its setup copies beyond the reserve are the transient
    assert base.transient_bytes == max(s.setup_bytes for s in specs) - 1000


def test_executor_scratch_is_checked_against_the_plan():
    _, blocks, specs = _blocks([[(64, 64)], [(64, 64)]])
    plan = make_plan(specs, _options(10**8, prefetch=1, scratch_bytes=4096))
    ex = Executor(plan, blocks, torch.device("cpu"))
    with ex.scratch("re-encode", 4096):
        assert ex.accountant.held["re-encode"] == 4096
    assert ex.accountant.held["re-encode"] == 0
    with pytest.raises(BudgetExceededError, match="scratch"), ex.scratch("re-encode", 4097):
        pass
    ex.close()


def test_a_hopeless_budget_is_refused_before_anything_is_compressed(monkeypatch):
    import neuzip_offload.encode as encode

    def never(*a, **k):
        raise AssertionError("compressed before the budget was checked")

    monkeypatch.setattr(encode, "compress_many", never)
    with pytest.raises(nzo.PlanError, match="before compressing") as e:
        nzo.dispatch(tiny_llama(), max_gpu_mem=1000, reserve=0, progress=False)
    monkeypatch.undo()
    # the budget the refusal names fits, whatever the weights compress to
    model = nzo.dispatch(
        tiny_llama(), max_gpu_mem=e.value.minimum_device_bytes, reserve=0, progress=False
    )

    def forward() -> None:
        with torch.no_grad():
            model(torch.randint(0, 1000, (1, 5)))

    check_device_memory(model, e.value.minimum_device_bytes, forward)


def test_the_decode_rate_the_plan_used_is_printed():
    model = tiny_llama()
    budget = model_bytes(model) // 2
    nzo.dispatch(model, max_gpu_mem=budget, reserve=0, progress=False)
    assert "decode rate: 1.5 GB/s (CPU figure from BENCHMARKS.md)" in model.neuzip.plan.table()
    other = nzo.dispatch(
        tiny_llama(), max_gpu_mem=budget, reserve=0, progress=False, decode_gbps=123.0
    )
    assert other.neuzip.plan.options.decode_gbps == 123.0
    assert "123.0 GB/s (given)" in other.neuzip.plan.table()
    with pytest.raises(ValueError, match="decode_gbps"):
        nzo.dispatch(tiny_llama(), max_gpu_mem=budget, progress=False, decode_gbps=-1)


def _device_decoder(monkeypatch):
    """Make the executor decode with the Triton path (as on CUDA) under the interpreter."""
    import neuzip_offload.scheduler.decoder as decoder_mod
    from neuzip_offload.codec import decode_into

    def triton_decode(ct, out, **kw):
        kw.pop("workspace", None)
        return decode_into(ct, out, use_triton=True, **kw)

    monkeypatch.setattr(decoder_mod, "decode_into", triton_decode)


@requires_triton
def test_device_decode_damage_is_raised_at_the_end_of_the_forward(monkeypatch):
    _device_decoder(monkeypatch)
    _, blocks, specs = _blocks([[(64, 64)], [(64, 64)]], codec="ans")
    o = PlanOptions(device_bytes=1, host_bytes=10**9, copies=False, device="cpu", prefetch=0)
    with pytest.raises(nzo.PlanError) as e:
        make_plan(specs, o)
    plan = make_plan(specs, replace(o, device_bytes=e.value.minimum_device_bytes))
    ex = Executor(plan, blocks, torch.device("cpu"))
    ex.decoder.on_device = True
    streamed = [b for b in ex.blocks() if b.tier != DEVICE]
    assert streamed
    victim = streamed[0]
    exp = victim.cts[0].planes["exp"]
    exp[exp.numel() // 2] ^= 0x5A  # a flipped byte in the middle of the rANS words
    ex.begin_forward()
    for b in range(len(blocks)):
        ex.enter(b)
        ex.exit(b)
    with pytest.raises(nzo.DamagedDataError, match=victim.name):
        ex.end_forward()
    ex.close()


@requires_triton
def test_runtime_objects_do_not_pile_up_over_many_forwards(monkeypatch):
    """Statuses of device decodes are folded into one counter as they finish: after 5 and after
    25 forwards the same number of tensors is alive (before, one status per decode piled up
    until someone read the stats)."""
    _device_decoder(monkeypatch)
    cfg = CodecConfig(codec="ans", prob_bits=8, chunk_size=1024, lanes=32)
    _, blocks, specs = _blocks([[(32, 32)], [(32, 32)], [(32, 32)]], config=cfg)
    o = PlanOptions(device_bytes=1, host_bytes=10**9, copies=False, device="cpu", prefetch=1)
    with pytest.raises(nzo.PlanError) as e:
        make_plan(specs, o)
    ex = Executor(
        make_plan(specs, replace(o, device_bytes=e.value.minimum_device_bytes)),
        blocks,
        torch.device("cpu"),
    )
    ex.decoder.on_device = True

    def forward() -> None:
        ex.begin_forward()
        for b in range(len(blocks)):
            ex.enter(b)
            ex.exit(b)
        ex.end_forward()

    def alive() -> int:
        gc.collect()
        return sum(type(o) is torch.Tensor for o in gc.get_objects())

    for _ in range(5):
        forward()
    first = alive()
    for _ in range(20):
        forward()
    assert alive() <= first
    damage = ex.damage_counts()
    assert damage is not None and int(damage.sum()) == 0  # statuses were folded in
    assert ex.pending_timings() == 0 and ex.stats.fetches >= 25
    ex.close()


@requires_triton
def test_a_streamed_block_decodes_in_one_launch(monkeypatch):
    """A block's rANS tensors, copied to staging as one packed buffer, decode in one LUT and one
    decode launch over all their chunks, into their places in the slot, bit for bit."""
    from neuzip_offload.kernels import ans_triton

    _device_decoder(monkeypatch)
    launches: list[int] = []
    launch = ans_triton._launch

    def counted(jobs, *args, **kw):
        launches.append(len(jobs))
        return launch(jobs, *args, **kw)

    monkeypatch.setattr(ans_triton, "_launch", counted)
    cfg = CodecConfig(codec="ans", prob_bits=8, chunk_size=512, lanes=32)
    weights, blocks, specs = _blocks([[(32, 32), (16, 40), (24,)]] * 3, config=cfg)
    o = _options(1, prefetch=0)
    with pytest.raises(nzo.PlanError) as e:
        make_plan(specs, o)
    plan = make_plan(specs, replace(o, device_bytes=e.value.minimum_device_bytes))
    ex = Executor(plan, blocks, torch.device("cpu"))
    ex.decoder.on_device = True
    streamed = [b.index for b in ex.blocks() if b.tier != DEVICE]
    assert streamed
    launches.clear()  # resident blocks decoded at setup, tensor by tensor
    _forward_checks_weights(ex, weights)
    assert launches == [3] * len(streamed)
    ex.close()


def test_zstd_is_refused_where_it_would_decode_on_the_host_for_a_gpu(monkeypatch, tmp_path):
    """zstd is a host codec: on CUDA every block would make a round trip through the host (a
    synchronization per block). Asked for it, dispatch and load refuse and name the way out."""
    model = tiny_llama(layers=1)
    model.save_pretrained(tmp_path / "hf")
    ck = nzo.convert(tmp_path / "hf", tmp_path / "nz", codec="zstd", progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="codec='ans'"):
        nzo.dispatch(model, max_gpu_mem=10**8, device="cuda", codec="zstd", progress=False)
    with pytest.raises(nzo.DispatchError, match="--codec ans"):
        nzo.load(ck, max_gpu_mem=10**8, device="cuda", progress=False)


def test_gpu_compression_at_dispatch_fits_the_budget_not_the_free_memory(monkeypatch):
    """Whether a batch is encoded on the GPU depends on max_gpu_mem less what the process
    already holds there (it used to be the card's free memory)."""
    import neuzip_offload.encode as encode
    from neuzip_offload.budget import device_encode_bytes

    monkeypatch.setattr(encode, "HAS_TRITON", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 10**8)
    ans = CodecConfig(codec="ans")
    need = device_encode_bytes(10**7, 2)
    assert need > 10**7 * 2 * 2  # the weights, their planes and the encoder's buffers
    assert encode.encode_on_device(ans, 10**7, 2, budget=10**8 + need)
    assert not encode.encode_on_device(ans, 10**7, 2, budget=10**8 + need - 1)
    assert not encode.encode_on_device(ans, 10**7, 2, budget=None)  # a CPU dispatch
    assert not encode.encode_on_device(CodecConfig(codec="zstd"), 10, 2, budget=10**12)


def test_pinned_buffers_are_the_size_asked_and_unpinned_when_freed(monkeypatch):
    """torch's pinned allocator rounds up to powers of two (up to 2x the planned host bytes);
    empty_pinned page-locks exactly nbytes in place and unlocks it when the last view is gone.
    The CUDA runtime is stood in for by a recorder (no GPU here)."""
    from neuzip_offload import backend

    calls = []

    class Runtime:
        def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 (the CUDA name)
            calls.append(("register", ptr, size))
            return 0

        def cudaHostUnregister(self, ptr):  # noqa: N802
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(backend, "has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Runtime())
    monkeypatch.setattr(torch.cuda, "check_error", lambda rc: None)
    buf = backend.empty_pinned(3 * 2**20 + 5)  # torch's allocator would take 4 MiB
    ptr = buf.data_ptr()
    # whole pages of its own are locked (two registrations may not share a page)
    assert buf.numel() == 3 * 2**20 + 5 and ptr % 4096 == 0
    assert calls == [("register", ptr, 3 * 2**20 + 4096)]
    view = buf.view(torch.uint8)[16:32]
    del buf
    gc.collect()
    assert calls[-1][0] == "register"  # a view still uses the memory: still locked
    del view
    gc.collect()
    assert calls[-1] == ("unregister", ptr)


# -- the Accountant and the host arena on their own ---------------------------------------------
def test_the_accountant_refuses_past_its_limit_and_releases_transients():
    from neuzip_offload.scheduler.accounting import Accountant

    acc = Accountant(1000)
    acc.hold("slots", 600)
    buf = acc.allocate("staging", 300, torch.device("cpu"))
    assert buf.numel() == 300 and buf.dtype == torch.uint8 and acc.total == 900
    with pytest.raises(BudgetExceededError, match="workspace"):
        acc.hold("workspace", 101)
    assert acc.total == 900  # a refused hold holds nothing
    with pytest.raises(RuntimeError, match="inside"), acc.transient("setup copy", 100):
        assert acc.total == 1000
        raise RuntimeError("inside")
    assert acc.held["setup copy"] == 0 and acc.peak == 1000
    with acc.transient("setup copy", 500, limit=1400):  # a limit above the budget (setup)
        assert acc.total == 1400
    with pytest.raises(BudgetExceededError):
        acc.transient("setup copy", 101).__enter__()
    acc.release("staging", 300)
    assert acc.total == 600 and acc.peak == 1400


def test_the_host_arena_hands_out_aligned_pieces_of_exactly_its_size():
    from neuzip_offload.scheduler.accounting import HostArena
    from neuzip_offload.scheduler.layout import PLANE_ALIGN

    parts = [100, 64, 1]
    arena = HostArena(HostArena.size(parts))
    assert arena.buf.numel() == 128 + 64 + 64
    pieces = [arena.take(n) for n in parts]
    assert [p.numel() for p in pieces] == parts
    base = arena.buf.data_ptr()
    assert [p.data_ptr() - base for p in pieces] == [0, 128, 192]
    assert all((p.data_ptr() - base) % PLANE_ALIGN == 0 for p in pieces)
    with pytest.raises(BudgetExceededError, match="host arena"):
        arena.take(1)
