"""Training with compressed weights: bit-exact fused optimizers, accumulation, LoRA, budgets."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload.scheduler.plan import HOST
from tests.helpers import check_device_memory, model_bytes, same_bits, tiny_llama


def _batches(n: int, batch: int = 2, seq: int = 12, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (batch, seq), generator=g) for _ in range(n)]


def _train_plain(model, opt, batches) -> list[float]:
    losses = []
    for b in batches:
        loss = model(b, labels=b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _train_ours(model, batches) -> list[float]:
    losses = []
    for b in batches:
        loss = model(b, labels=b).loss
        loss.backward()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: nzo.optim.SGD(lr=1e-2), lambda p: torch.optim.SGD(p, lr=1e-2)),
        (
            lambda: nzo.optim.SGD(lr=1e-2, momentum=0.9, weight_decay=1e-3),
            lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=1e-3, foreach=False),
        ),
        (lambda: nzo.optim.AdamW(lr=1e-3), lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=False)),
    ],
    ids=["sgd", "sgd-momentum", "adamw"],
)
def test_fused_training_is_bit_identical_to_plain_training(tied, ours, theirs):
    base = tiny_llama(tied=tied).train()
    plain, model = copy.deepcopy(base), copy.deepcopy(base)
    batches = _batches(5)
    ref_losses = _train_plain(plain, theirs(plain.parameters()), batches)
    nzo.dispatch(
        model,
        max_gpu_mem=int(0.7 * model_bytes(base)),
        reserve=0,
        prefetch=1,
        trainable=True,
        optimizer=ours(),
        progress=False,
    )
    assert HOST in model.neuzip.plan.tiers  # the weights stream and are re-encoded each step
    assert _train_ours(model, batches) == ref_losses
    nzo.undispatch(model)
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert same_bits(a, b), name


def test_gradient_accumulation_equals_one_large_batch():
    base = tiny_llama(dtype=torch.float32).train()
    big, model = copy.deepcopy(base), copy.deepcopy(base)
    micro = _batches(4, batch=2)
    opt = torch.optim.SGD(big.parameters(), lr=1e-2)
    whole = torch.cat(micro)
    big(whole, labels=whole).loss.backward()
    opt.step()
    nzo.dispatch(
        model,
        max_gpu_mem=int(0.7 * model_bytes(base)),
        reserve=0,
        prefetch=1,
        trainable=True,
        optimizer=nzo.optim.SGD(lr=1e-2),
        grad_accum_steps=4,
        progress=False,
    )
    for b in micro:
        (model(b, labels=b).loss / 4).backward()
    nzo.undispatch(model)
    for (name, a), (_, b) in zip(big.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert not all(
        torch.equal(a, b) for a, b in zip(base.parameters(), big.parameters(), strict=True)
    )


def test_updates_wait_for_the_last_micro_batch():
    model = tiny_llama(dtype=torch.float32).train()
    before = copy.deepcopy(model.state_dict())
    nzo.dispatch(
        model,
        max_gpu_mem="1GB",
        trainable=True,
        progress=False,
        optimizer=nzo.optim.SGD(lr=1e-2),
        grad_accum_steps=3,
    )
    b = _batches(1)[0]
    for _ in range(2):
        model(b, labels=b).loss.backward()
    assert model.neuzip.trainer.steps == 0
    model(b, labels=b).loss.backward()
    assert model.neuzip.trainer.steps == 1
    nzo.undispatch(model)
    assert not torch.equal(model.state_dict()["model.norm.weight"], before["model.norm.weight"])


def test_hyper_parameters_change_through_the_handle():
    model = tiny_llama().train()
    nzo.dispatch(
        model, max_gpu_mem="1GB", trainable=True, optimizer=nzo.optim.SGD(lr=1e-2), progress=False
    )
    model.neuzip.optimizer.lr = 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b = _batches(1)[0]
    model(b, labels=b).loss.backward()
    for k, v in model.state_dict().items():
        assert same_bits(v, before[k]), k


def _raw_gradient_norms(model, batches, lr: float, mode: str) -> list[dict[str, float]]:
    """The oracle for clipping: per step, the norm of each parameter's raw gradient in a plain
    copy trained by torch.optim.SGD on the gradients clipping lets through at step 1 (lagged
    mode: all of them; tensor mode: each cut to 0.01 by torch.nn.utils.clip_grad_norm_)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, foreach=False)
    norms = []
    for i, b in enumerate(batches):
        model(b, labels=b).loss.backward()
        norms.append({n: float(p.grad.norm()) for n, p in model.named_parameters()})
        if i == 0:
            if mode == "tensor":
                for p in model.parameters():
                    torch.nn.utils.clip_grad_norm_([p], 0.01, foreach=False)
            opt.step()
        opt.zero_grad()
    return norms


def _global(norms) -> float:
    return math.sqrt(sum(x * x for x in norms))


@pytest.mark.parametrize("mode", ["tensor", "lagged"])
def test_clipping_bounds_what_the_optimizer_sees(mode):
    seen: list[dict[str, float]] = [{}, {}]
    step = [0]

    class Spy(nzo.optim.SGD):
        def update(self, key, param, grad):
            seen[step[0]][key] = float(grad.float().norm())
            super().update(key, param, grad)

    model = tiny_llama(dtype=torch.float32).train()
    raw = _raw_gradient_norms(copy.deepcopy(model), _batches(2), 1e-3, mode)
    nzo.dispatch(
        model,
        max_gpu_mem="1GB",
        trainable=True,
        optimizer=Spy(lr=1e-3),
        clip_grad_norm=0.01,
        clip_mode=mode,
        progress=False,
        max_block_bytes="1GB",  # whole weights: the optimizer's keys are the parameters' names
    )
    for i, b in enumerate(_batches(2)):
        step[0] = i
        model(b, labels=b).loss.backward()
    g1, g2 = _global(raw[0].values()), _global(raw[1].values())
    assert g1 > 0.01 and g2 > 0.01  # clipping has work to do at both steps
    assert set(seen[0]) == set(seen[1]) == set(raw[0])
    if mode == "tensor":  # each gradient scaled as torch.nn.utils.clip_grad_norm_ scales it
        for i in (0, 1):
            for key, norm in seen[i].items():
                clipped = raw[i][key] * min(1.0, 0.01 / (raw[i][key] + 1e-6))
                assert norm == pytest.approx(clipped, rel=1e-5), (i, key)
    else:
        # step 1 has no previous norm: the optimizer saw the raw gradients; step 2 is scaled
        # by 0.01 / (the global norm of step 1)
        assert model.neuzip.trainer.grad_norm == pytest.approx(g2, rel=1e-4)
        for key in raw[0]:
            assert seen[0][key] == pytest.approx(raw[0][key], rel=1e-4), key
            assert seen[1][key] == pytest.approx(raw[1][key] * 0.01 / g1, rel=1e-4), key


def test_the_budget_holds_during_backward():
    model = tiny_llama().train()
    budget = int(0.7 * model_bytes(model))
    nzo.dispatch(
        model,
        max_gpu_mem=budget,
        reserve=0,
        prefetch=1,
        trainable=True,
        optimizer=nzo.optim.AdamW(lr=1e-3),
        progress=False,
    )
    assert HOST in model.neuzip.plan.tiers

    def steps() -> None:
        for b in _batches(3):
            model(b, labels=b).loss.backward()

    # backward too is handed views into the slots (no weight decoded into memory of its own),
    # and the in-place updates and re-encoding reallocate nothing the budget counts
    check_device_memory(model, budget, steps)
    assert model.neuzip.trainer.steps == 3
    assert model.neuzip.executor.orders["backward"] is not None  # backward order recorded


def test_save_compressed_writes_the_trained_weights(tmp_path):
    model = tiny_llama().train()
    nzo.dispatch(
        model,
        max_gpu_mem=int(0.7 * model_bytes(model)),
        reserve=0,
        prefetch=1,
        trainable=True,
        optimizer=nzo.optim.SGD(lr=1e-1),
        progress=False,
    )
    for b in _batches(2):
        model(b, labels=b).loss.backward()
    nzo.save_compressed(model, tmp_path / "trained", progress=False)
    again = nzo.load(tmp_path / "trained", max_gpu_mem="1GB", progress=False)
    nzo.undispatch(model)
    nzo.undispatch(again)
    trained = model.state_dict()
    for k, v in again.state_dict().items():
        if v.dim() == 2:
            assert same_bits(v, trained[k]), k


def test_lora_adapters_learn_and_the_compressed_base_stays_exact():
    peft = pytest.importorskip("peft")
    base = tiny_llama(dtype=torch.float32)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
    )
    model = peft.get_peft_model(base, config)
    model = nzo.dispatch(
        model,
        max_gpu_mem=int(0.8 * 4 * sum(v.numel() for v in frozen.values())),
        reserve=0,
        prefetch=1,
        progress=False,
    )
    compressed = set(model.neuzip.compressed)
    assert any("q_proj.base_layer" in k for k in compressed)
    assert not any("lora_" in k for k in compressed)  # adapters stay plain and trainable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    b = _batches(1, batch=4, seq=16)[0]
    losses = []
    for _ in range(15):
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    nzo.undispatch(model)
    merged = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in model.state_dict().items()
        if "lora_" not in k
    }
    for k, v in frozen.items():
        assert same_bits(merged[k], v), k


def test_lora_gradients_through_a_compressed_base_match_a_plain_base():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    torch.manual_seed(0)
    plain = peft.get_peft_model(tiny_llama(dtype=torch.float32), config)
    ours = copy.deepcopy(plain)
    # whole weights: a head cut into row pieces would sum its input gradient piece by piece
    nzo.dispatch(ours, max_gpu_mem="1GB", progress=False, max_block_bytes="1GB")
    b = _batches(1)[0]
    plain(input_ids=b, labels=b).loss.backward()
    ours(input_ids=b, labels=b).loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, grads[n]), n


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def test_training_lossy_weights_is_refused():
    with pytest.raises(ValueError, match="trainable=True needs mode='lossless'.*inference"):
        nzo.dispatch(
            tiny_llama(), max_gpu_mem="1GB", mode="lossy", trainable=True, optimizer=nzo.optim.SGD()
        )


def test_an_optimizer_that_cannot_be_fused_is_refused_with_the_supported_ones():
    model = tiny_llama()
    with pytest.raises(TypeError, match=r"cannot be fused.*optim\.SGD.*optim\.AdamW"):
        nzo.dispatch(
            model, max_gpu_mem="1GB", trainable=True, optimizer=torch.optim.Adam(model.parameters())
        )
    with pytest.raises(ValueError, match="needs optimizer"):
        nzo.dispatch(tiny_llama(), max_gpu_mem="1GB", trainable=True)
    with pytest.raises(ValueError, match="only with trainable=True"):
        nzo.dispatch(tiny_llama(), max_gpu_mem="1GB", optimizer=nzo.optim.SGD())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
        ({"clip_grad_norm": -1.0}, "clip_grad_norm"),
        ({"clip_mode": "global"}, "clip_mode"),
    ],
)
def test_bad_training_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nzo.dispatch(
            tiny_llama(),
            max_gpu_mem="1GB",
            trainable=True,
            progress=False,
            optimizer=nzo.optim.SGD(),
            **kwargs,
        )


def test_bad_optimizer_settings_are_refused():
    with pytest.raises(ValueError, match="lr"):
        nzo.optim.AdamW(lr=-1)
    with pytest.raises(ValueError, match="nesterov"):
        nzo.optim.SGD(nesterov=True)
    with pytest.raises(ValueError, match="state_dtype"):
        nzo.optim.AdamW(state_dtype=torch.int8)


def test_square_norm_in_pieces_matches_the_whole(monkeypatch):
    """The gradient norm is summed a piece at a time (no fp32 copy of a whole gradient)."""
    from neuzip_offload import training

    monkeypatch.setattr(training, "_NORM_PIECE", 1000)
    g = torch.randn(123, 77, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    want = float(g.float().square().sum())
    assert abs(float(training._square_norm(g)) - want) <= 1e-5 * want


# ------------------------------------------------------------------------------------------
# no host synchronization per tensor: state, sums and re-encoded planes move asynchronously
# ------------------------------------------------------------------------------------------


def _dispatch_streaming(model, optimizer, **kw):
    return nzo.dispatch(
        model,
        max_gpu_mem=int(0.7 * model_bytes(model)),
        reserve=0,
        prefetch=1,
        trainable=True,
        optimizer=optimizer,
        progress=False,
        **kw,
    )


def test_embedding_pieces_train_bit_identically_at_their_boundaries():
    base = tiny_llama().train()
    plain, model = copy.deepcopy(base), copy.deepcopy(base)
    _dispatch_streaming(model, nzo.optim.SGD(lr=1e-1, momentum=0.9))
    emb = model.model.embed_tokens
    assert len(emb.pieces) > 1
    pad = emb.pieces[1].start  # a padding row at a piece's first row: its gradient is zero
    emb.padding_idx = plain.model.embed_tokens.padding_idx = pad
    edges = sorted({x for p in emb.pieces for x in (p.start, p.stop - 1, max(p.start - 1, 0))})
    ids = torch.tensor(edges * 2)[None, :].repeat(2, 1)  # every boundary row, several times
    ids[1, ::3] = pad
    opt = torch.optim.SGD(plain.parameters(), lr=1e-1, momentum=0.9, foreach=False)
    ref = _train_plain(plain, opt, [ids, ids])
    assert _train_ours(model, [ids, ids]) == ref
    nzo.undispatch(model)
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert same_bits(a, b), name


def test_optimizer_state_equals_torch_state_after_the_step():
    base = tiny_llama().train()
    plain, model = copy.deepcopy(base), copy.deepcopy(base)
    batches = _batches(2)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, foreach=False)
    _train_plain(plain, opt, batches)
    _dispatch_streaming(model, nzo.optim.AdamW(lr=1e-3))
    _train_ours(model, batches)
    ours = model.neuzip.optimizer.state
    names = {p: n for n, p in plain.named_parameters()}
    checked = 0
    for p, st in opt.state.items():
        key = names[p]
        if key not in ours:  # a weight cut into pieces keeps state per piece
            continue
        for k in ("exp_avg", "exp_avg_sq"):
            assert same_bits(ours[key][k].view(st[k].shape), st[k]), (key, k)
        checked += 1
    assert checked >= 10


def test_gradient_accumulation_buffers_are_reused_across_steps():
    base = tiny_llama(dtype=torch.float32).train()
    big, model = copy.deepcopy(base), copy.deepcopy(base)
    micro = _batches(6, batch=1)
    opt = torch.optim.SGD(big.parameters(), lr=1e-2, momentum=0.9, foreach=False)
    for i in (0, 3):
        whole = torch.cat(micro[i : i + 3])
        big(whole, labels=whole).loss.backward()
        opt.step()
        opt.zero_grad()
    _dispatch_streaming(model, nzo.optim.SGD(lr=1e-2, momentum=0.9), grad_accum_steps=3)
    trainer = model.neuzip.trainer
    for i, b in enumerate(micro):
        (model(b, labels=b).loss / 3).backward()
        if i == 2:
            homes = {k: v.data_ptr() for k, v in trainer._accum.items()}
    assert trainer.steps == 2 and homes
    assert {k: v.data_ptr() for k, v in trainer._accum.items()} == homes  # the same buffers
    nzo.undispatch(model)
    for (name, a), (_, b) in zip(big.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def test_reencode_async_gives_the_planes_of_reencode():
    from neuzip_offload.compressed import CompressedTensor
    from neuzip_offload.encode import reencode, reencode_async
    from neuzip_offload.optim import StateMover

    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    like = nzo.compress(w)
    assert isinstance(like, CompressedTensor)
    w2 = w * 1.5
    ct, ready = reencode_async(w2, like, StateMover())
    ready.synchronize()
    want = reencode(w2, like)
    assert ct.header == want.header and set(ct.planes) == set(want.planes)
    for k, p in ct.planes.items():
        assert p.device.type == "cpu" and torch.equal(p, want.planes[k]), k
    assert same_bits(nzo.decompress(ct), w2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and streams need CUDA")
def test_state_mover_round_trips_through_pinned_memory_on_cuda():
    from neuzip_offload.optim import StateMover
    from neuzip_offload.scheduler.streams import Streams

    dev = torch.device("cuda", torch.cuda.current_device())
    streams = Streams(dev)
    mover = StateMover(streams)
    home = mover.new_home(torch.Size([1 << 20]), torch.float32, dev, torch.device("cpu"))
    assert home.is_pinned()
    home.zero_()
    want = torch.zeros(1 << 20, dtype=torch.float64)
    for i in range(20):  # each round reads what the previous round's D2H wrote
        local = mover.fetch(home, dev)
        step = torch.full((1 << 20,), float(i + 1), device=dev)
        local.add_(step)
        mover.store(local, home)
        want += i + 1
        del local, step  # freed at once: their memory is reused while copies may be in flight
    mover.synchronize()
    assert torch.equal(home, want.float())
    out = mover.to_host(torch.arange(1000, device=dev, dtype=torch.int32))
    mover.synchronize()
    assert out.is_pinned() and torch.equal(out, torch.arange(1000, dtype=torch.int32))
    streams.close()


def _checked_mover():
    from neuzip_offload.optim import StateMover
    from neuzip_offload.scheduler.streams import Streams

    cpu = torch.device("cpu")
    streams = Streams(cpu)
    mover = StateMover(streams, copies=True)  # copies on the CPU too, as on a GPU
    home = mover.new_home(torch.Size([64]), torch.float32, cpu, cpu)
    home.zero_()
    streams.write(home, None, "home zeroed by the host")
    return streams, mover, home


def test_state_mover_orders_every_copy_in_checking_mode():
    from neuzip_offload import backend

    cpu = torch.device("cpu")
    with backend.checking(count_syncs=False) as chk:
        streams, mover, home = _checked_mover()
        for i in range(5):  # copy in, update on the compute stream, copy out
            local = mover.fetch(home, cpu)
            local.add_(i + 1)
            mover.store(local, home)
        with pytest.raises(backend.StreamOrderError, match="read-after-write"):
            streams.read(home, None, "host reads before the wait")
        mover.synchronize()
        streams.read(home, None, "host reads after the wait")
        assert chk.checked >= 20 and chk.waits >= 10
    assert torch.equal(home, torch.full((64,), 15.0))


def test_the_stream_checker_sees_a_state_used_before_its_copy(monkeypatch):
    from neuzip_offload import backend

    with backend.checking(count_syncs=False):
        _, mover, home = _checked_mover()
        monkeypatch.setattr(backend.CpuStream, "wait_event", lambda self, event: None)
        with pytest.raises(backend.StreamOrderError, match="state on the device"):
            mover.fetch(home, torch.device("cpu"))


def test_fused_training_with_forced_copies_is_stream_ordered_and_exact():
    """State, sums and re-encoded planes through copies (as on a GPU), checked for stream order:
    the same bits as the in-place CPU path."""
    from neuzip_offload import backend

    base = tiny_llama().train()
    direct, model = copy.deepcopy(base), copy.deepcopy(base)
    batches = _batches(4, batch=1)
    for m in (direct, model):
        _dispatch_streaming(m, nzo.optim.AdamW(lr=1e-2), grad_accum_steps=2)
    trainer = model.neuzip.trainer
    trainer.optimizer.bind(model.neuzip.executor.streams, copies=True)
    trainer.mover = mover = trainer.optimizer.mover
    copied = []
    fetch = mover.fetch

    def spy(home, device):
        got = fetch(home, device)
        copied.append(got is not home)
        return got

    mover.fetch = spy
    ref = [(direct(b, labels=b).loss / 2).backward() for b in batches]
    with backend.checking(count_syncs=False) as chk:
        for b in batches:
            (model(b, labels=b).loss / 2).backward()
        assert chk.waits > 0
    assert copied and all(copied)  # state and sums came through copies
    assert len(ref) == 4 and trainer.steps == direct.neuzip.trainer.steps == 2
    nzo.undispatch(model)
    nzo.undispatch(direct)
    for (name, a), (_, b) in zip(
        direct.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert same_bits(a, b), name
    assert not same_bits(base.model.norm.weight, model.model.norm.weight)
