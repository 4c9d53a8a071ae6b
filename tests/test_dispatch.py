"""dispatch(): bit-exact lossless inference at any budget, undispatch, and clear errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import neuzip_offload as nzo
from neuzip_offload import encode, planning, sizing
from neuzip_offload.modules import CompressedEmbedding, CompressedLinear
from neuzip_offload.scheduler.plan import DEVICE, HOST
from tests.helpers import (
    check_device_memory,
    device_storages,
    model_bytes,
    same_bits,
    tiny_gpt2,
    tiny_llama,
)

MODELS = {
    "llama": lambda: tiny_llama(tied=False),
    "llama-tied": lambda: tiny_llama(tied=True),
    "llama-fp32": lambda: tiny_llama(dtype=torch.float32),
    "gpt2": tiny_gpt2,
}


def _minimum(model, **kw) -> int:
    with pytest.raises(nzo.PlanError) as e:
        nzo.dispatch(copy.deepcopy(model), max_gpu_mem=1, reserve=0, progress=False, **kw)
    return e.value.minimum_device_bytes


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("where", ["everything", "half", "minimum"])
def test_lossless_logits_are_bit_identical_at_every_budget(name, where):
    model = MODELS[name]()
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    budget = {
        "everything": 2 * model_bytes(model),
        "half": (model_bytes(model) + _minimum(model, prefetch=1)) // 2,
        "minimum": _minimum(model, prefetch=1),
    }[where]
    model = nzo.dispatch(model, max_gpu_mem=budget, reserve=0, prefetch=1, progress=False)
    tiers = model.neuzip.plan.tiers
    assert (HOST not in tiers) if where == "everything" else (HOST in tiers)

    def forwards() -> None:
        with torch.no_grad():
            for _ in range(2):  # the second forward runs on the recorded order
                assert same_bits(model(ids).logits, ref)

    check_device_memory(model, budget, forwards)


@pytest.mark.parametrize("name", ["llama-tied", "gpt2"])
def test_greedy_generation_gives_the_same_tokens(name):
    model = MODELS[name]()
    ids = torch.randint(1, 500, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    nzo.dispatch(
        model, max_gpu_mem=_minimum(model, prefetch=1), prefetch=1, reserve=0, progress=False
    )
    assert torch.equal(model.generate(ids, **kw), ref)


def test_tied_weights_are_compressed_once_and_restored_tied():
    model = tiny_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    nzo.dispatch(model, max_gpu_mem=10**8, progress=False)
    keys = list(model.neuzip.compressed)
    assert sum("embed_tokens" in k for k in keys) >= 1 and not any("lm_head" in k for k in keys)
    assert isinstance(model.lm_head, CompressedLinear)
    assert isinstance(model.model.embed_tokens, CompressedEmbedding)
    nzo.undispatch(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("name", list(MODELS))
def test_undispatch_restores_the_exact_weights(name):
    model = MODELS[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nzo.dispatch(model, max_gpu_mem=_minimum(model), reserve=0, progress=False)
    assert not any(
        isinstance(p, nn.Parameter) and p.dim() == 2 and p.numel() > 1000
        for p in model.parameters()
    )  # the big weights left the module tree
    nzo.undispatch(model)
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert same_bits(after[k], v) if v.is_floating_point() else torch.equal(after[k], v), k
    assert not hasattr(model, "neuzip")
    assert all(type(m) is not CompressedLinear for m in model.modules())


def test_large_weights_outside_the_layers_stream_in_pieces():
    model = tiny_llama(tied=True)
    ids = torch.randint(0, 1000, (1, 7))
    with torch.no_grad():
        ref = model(ids).logits
    nzo.dispatch(model, max_gpu_mem=_minimum(model), reserve=0, progress=False)
    assert len(model.lm_head.pieces) > 1  # 1000 x 64 embedding > one 4-Linear layer
    with torch.no_grad():
        assert same_bits(model(ids).logits, ref)


def test_plan_and_stats_are_exposed():
    model = tiny_llama()
    nzo.dispatch(model, max_gpu_mem=_minimum(model), reserve=0, progress=False)
    plan = model.neuzip.plan
    assert isinstance(plan, nzo.Plan) and "model.layers.0" in str(plan)
    assert 10.0 < plan.bits_per_weight < 11.5
    assert plan.tiers == tuple(b.tier for b in model.neuzip.executor.blocks())
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 5)))
    stats = model.neuzip.stats
    ex = model.neuzip.executor
    streamed = [b for b in ex.blocks() if b.tier == HOST]
    assert stats["forwards"] == 1 and streamed
    # every streamed block was decoded once at least: its weights' bytes, from their shapes
    decoded = sum(math.prod(ct.shape) * ct.dtype.itemsize for b in streamed for ct in b.cts)
    assert stats["decoded_bytes"] >= decoded and stats["decode_seconds"] > 0
    # the peak the executor reports counts at least what it really allocated
    held = sum(device_storages(ex, model).values())
    assert held <= stats["peak_held_bytes"] <= plan.options.device_bytes


def test_everything_resident_moves_nothing():
    model = tiny_llama()
    nzo.dispatch(model, max_gpu_mem="1GB", progress=False)
    assert set(model.neuzip.plan.tiers) == {DEVICE}
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 5)))
    assert model.neuzip.stats["decoded_bytes"] == 0


def test_lossy_dispatch_runs_and_is_close():
    model = tiny_llama(dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
    nzo.dispatch(model, mode="lossy", mantissa_bits=5, max_gpu_mem=10**8, progress=False)
    with torch.no_grad():
        out = model(ids).logits
    assert not torch.equal(out, ref)
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    assert 8.5 < model.neuzip.plan.bits_per_weight < 9.5


def test_target_bits_stays_under_its_budget_and_spends_it():
    mean_k = {}
    for target in (6.0, 8.0):
        model = tiny_llama(dtype=torch.float32)
        nzo.dispatch(model, mode="lossy", target_bits=target, max_gpu_mem=10**8, progress=False)
        # under the target, but within a quarter bit of it: the budget is used, not ignored
        assert target - 0.25 <= model.neuzip.plan.bits_per_weight <= target
        ks = list(model.neuzip.mantissa_bits.values())
        assert len(ks) == 4 * 7 + 2  # every projection of the 4 layers, the embedding, the head
        mean_k[target] = sum(ks) / len(ks)
    assert mean_k[8.0] >= mean_k[6.0] + 1  # two more bits a weight keep more mantissa bits


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


def test_dispatching_twice_is_refused():
    model = nzo.dispatch(tiny_llama(), max_gpu_mem="1GB", progress=False)
    with pytest.raises(nzo.DispatchError, match="already dispatched"):
        nzo.dispatch(model, max_gpu_mem="1GB")


def test_a_model_without_weights_is_refused():
    with pytest.raises(nzo.DispatchError, match="no Linear, Embedding or Conv1D"):
        nzo.dispatch(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), max_gpu_mem="1GB")


def test_a_model_on_meta_is_refused():
    with torch.device("meta"):
        model = nn.Linear(8, 8)
    with pytest.raises(nzo.DispatchError, match="meta device"):
        nzo.dispatch(model, max_gpu_mem="1GB")


def test_too_small_a_budget_names_the_minimum():
    model = tiny_llama()
    with pytest.raises(nzo.PlanError, match=r"max_gpu_mem=.* too small.*needs at least"):
        nzo.dispatch(model, max_gpu_mem="10KB", reserve=0, progress=False)
    assert not hasattr(model, "neuzip")  # nothing was changed


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_gpu_mem": "8Gb"}, ValueError, "bits"),
        ({"max_gpu_mem": "8 parsecs"}, ValueError, "unknown unit"),
        ({"prefetch": -1}, ValueError, "prefetch"),
        ({"target_bits": 7.0}, ValueError, "mode='lossy'"),
        ({"mode": "lossy", "target_bits": 40}, ValueError, "target_bits"),
        ({"mode": "lossy", "mantissa_bits": 9}, ValueError, "mantissa_bits"),
        (
            {"device": "cuda:0"} if not torch.cuda.is_available() else {"reserve": "x"},
            ValueError,
            "CUDA|reserve",
        ),
    ],
)
def test_bad_options_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        nzo.dispatch(tiny_llama(), **{"max_gpu_mem": "1GB", **kwargs})


def test_undispatch_of_a_plain_model_is_refused():
    with pytest.raises(nzo.DispatchError, match="not dispatched"):
        nzo.undispatch(tiny_llama())


# ------------------------------------------------------------------------------------------
# embeddings cut into row pieces: no host synchronization, prefetched, bit-exact
# ------------------------------------------------------------------------------------------


def _embedding_in_pieces(**kw):
    """A tiny Llama whose (untied) embedding streams in row pieces, and a copy of the original."""
    model = tiny_llama(tied=False)
    original = copy.deepcopy(model.model.embed_tokens)
    nzo.dispatch(
        model, max_gpu_mem=_minimum(model, prefetch=1), reserve=0, prefetch=1, progress=False, **kw
    )
    emb = model.model.embed_tokens
    assert isinstance(emb, CompressedEmbedding) and len(emb.pieces) > 2
    return model, emb, original


def _boundary_ids(emb: CompressedEmbedding) -> torch.Tensor:
    """Every piece's first and last row and its neighbours, in an order that mixes pieces."""
    edges = {0, emb.num_embeddings - 1}
    for p in emb.pieces:
        edges |= {p.start, p.stop - 1, max(p.start - 1, 0), min(p.stop, emb.num_embeddings - 1)}
    ids = torch.tensor(sorted(edges))
    return torch.stack([ids, ids.flip(0)])  # [2, n]


def test_embedding_pieces_are_bit_exact_at_their_boundaries():
    _, emb, original = _embedding_in_pieces()
    ids = torch.cat([_boundary_ids(emb), torch.randint(0, 1000, (2, 40))], dim=1)
    with torch.no_grad():
        assert same_bits(emb(ids), original(ids))
        assert same_bits(emb(ids[0]), original(ids[0]))  # 1-d ids too
        assert same_bits(emb(torch.tensor(7)), original(torch.tensor(7)))  # and a 0-d id


@pytest.mark.parametrize("bad", [-1, 1000])
def test_embedding_pieces_refuse_ids_out_of_range_as_nn_embedding_does(bad):
    _, emb, original = _embedding_in_pieces()
    ids = torch.tensor([[3, bad, 5]])
    with pytest.raises(IndexError):
        original(ids)
    with pytest.raises(IndexError), torch.no_grad():
        emb(ids)


def test_embedding_pieces_look_up_without_host_synchronization(monkeypatch):
    model, emb, original = _embedding_in_pieces()
    ids = _boundary_ids(emb)
    ex = model.neuzip.executor
    guard = {"on": False}  # off inside the executor: the CPU backend decodes host data there

    def refuse(name, real):
        def checked(*args, **kwargs):
            if guard["on"]:
                raise AssertionError(f"{name} in a multi-piece embedding lookup")
            return real(*args, **kwargs)

        return checked

    getitem = torch.Tensor.__getitem__

    def no_mask(t, index):  # boolean-mask indexing learns the selection's size on the host
        items = index if isinstance(index, tuple) else (index,)
        if guard["on"] and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items
        ):
            raise AssertionError("boolean-mask indexing in a multi-piece embedding lookup")
        return getitem(t, index)

    def unguarded(real):
        def call(*args, **kwargs):
            guard["on"] = False
            try:
                return real(*args, **kwargs)
            finally:
                guard["on"] = True

        return call

    with monkeypatch.context() as m:
        for name in ("tolist", "item", "nonzero", "__bool__", "index_put", "index_put_"):
            m.setattr(torch.Tensor, name, refuse(name, getattr(torch.Tensor, name)))
        for name in ("unique", "nonzero", "masked_select"):
            m.setattr(torch, name, refuse(name, getattr(torch, name)))
        m.setattr(torch.Tensor, "__getitem__", no_mask)
        for name in ("enter", "exit"):
            m.setattr(ex, name, unguarded(getattr(ex, name)))
        guard["on"] = True
        with torch.no_grad():
            out = emb(ids)
        guard["on"] = False
    assert same_bits(out, original(ids))
    entered = [e[1] for e in ex.events if e[0] == "enter"]
    assert len(entered) >= len(emb.pieces)  # the guard was on while every piece ran


def test_embedding_pieces_join_the_order_and_are_prefetched():
    model, emb, _ = _embedding_in_pieces()
    ex = model.neuzip.executor
    pieces = {ex.blocks()[p.block].name for p in emb.pieces}
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids)  # records the order
        assert [p.block for p in emb.pieces] == [
            b for b in ex.order if b in {p.block for p in emb.pieces}
        ]
        first = ex.blocks()[ex.order[0]].name  # the recording forward did not prefetch it
        for allowed in ({first}, set()):  # from the third forward on: no miss at all
            ex.events.clear()
            model(torch.full((1, 6), 1))  # one piece holds every id: all are still entered
            misses = [e[1] for e in ex.events if e[0] == "miss"]
            entered = [e[1] for e in ex.events if e[0] == "enter"]
            assert pieces <= set(entered)
            assert pieces & set(misses) <= allowed, misses


def test_embedding_pieces_count_no_host_synchronization_in_checking_mode():
    from neuzip_offload import backend

    model, emb, original = _embedding_in_pieces()
    ids = _boundary_ids(emb)
    with torch.no_grad():
        model(ids)  # the order is recorded: the pieces are prefetched from here on
        with backend.checking() as chk:
            out = emb(ids)
    assert chk.syncs == []
    assert same_bits(out, original(ids))


# ------------------------------------------------------------------------------------------
# a model that is not a transformers model
# ------------------------------------------------------------------------------------------


class _Plain(nn.Module):
    """No _no_split_modules: the blocks are found as the largest ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(10))
        self.heads = nn.ModuleList([nn.Linear(64, 8), nn.Linear(64, 8)])
        self.out = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.out(x) + torch.cat([h(x) for h in self.heads], -1)


def test_a_plain_module_streams_its_largest_module_list_bit_exactly():
    torch.manual_seed(0)
    model = _Plain().to(torch.bfloat16).eval()
    x = torch.randn(3, 32).to(torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    size = model_bytes(model)
    nzo.dispatch(model, max_gpu_mem=int(0.5 * size), reserve=0, progress=False)
    names = [b.name for b in model.neuzip.plan.blocks]
    assert {f"blocks.{i}" for i in range(10)} <= set(names)  # each block of the list is a block
    assert not any(n.startswith("heads.") and n.count(".") == 1 for n in names)
    assert "host" in model.neuzip.plan.tiers  # some blocks really stream
    with torch.no_grad():
        out = model(x)
    assert same_bits(out, ref)


def test_the_compressed_model_is_held_once():
    """The executor holds each block's compressed bytes; the handle keeps headers only and
    reads through it. Weights kept decoded keep no compressed copy: saving encodes them again,
    to the same bytes as the first encoding (the encoder is deterministic)."""
    model = tiny_llama()
    originals = {k: v.clone() for k, v in model.state_dict().items() if v.dim() == 2}
    nzo.dispatch(model, max_gpu_mem=model_bytes(model) // 2, reserve=0, prefetch=1, progress=False)
    handle = model.neuzip
    tiers = {handle.executor.tier_of(k) for k in handle.compressed}
    assert {DEVICE, HOST} <= tiers
    held = {k: ct for k, ct in handle.compressed.items() if ct.device.type != "meta"}
    assert held == {}  # was every piece's planes, beside the executor's (and decoded) copies
    for key in handle.compressed:
        if "[" in key:  # pieces of a cut weight: checked through undispatch below
            continue
        again = nzo.compress(originals[key], config=handle.config)
        got = handle.compressed_tensor(key)
        assert got.header == again.header, key
        assert all(torch.equal(p, again.planes[k]) for k, p in got.planes.items()), key
    nzo.undispatch(model)
    for k, v in originals.items():
        assert same_bits(model.state_dict()[k], v), k


@pytest.mark.parametrize("option", ["max_norm", "scale_grad_by_freq"])
def test_embedding_options_pieces_cannot_honour_are_refused(option):
    """max_norm rewrites the weight in place and scale_grad_by_freq counts ids: neither can work
    on an embedding cut into pieces, and both used to be ignored silently."""
    _, emb, _ = _embedding_in_pieces()
    setattr(emb, option, 1.0 if option == "max_norm" else True)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(NotImplementedError, match=f"{option}.*max_block_bytes"):
        emb(ids)


def test_an_unreachable_target_bits_is_said_not_silently_missed():
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"target_bits=2 cannot be reached.*bits per weight"):
        nzo.dispatch(model, mode="lossy", target_bits=2, max_gpu_mem=10**8, progress=False)


@pytest.mark.parametrize(
    ("calibration", "match"),
    [
        ("some text", "token ids.*got str"),
        ([torch.randn(1, 8)], r"calibration\[0\] must be an integer tensor"),
        ([torch.zeros(1, 2, 3, dtype=torch.long)], "shape"),
        ([], "non-empty"),
    ],
)
def test_calibration_of_the_wrong_kind_says_what_it_expects(calibration, match):
    with pytest.raises(TypeError, match=match):
        nzo.dispatch(
            tiny_llama(),
            mode="lossy",
            target_bits=4.0,
            calibration=calibration,
            max_gpu_mem=10**8,
            progress=False,
        )


# ------------------------------------------------------------------------------------------
# lossless blocks the plan keeps decoded are never encoded
# ------------------------------------------------------------------------------------------


@pytest.fixture
def encoded(monkeypatch) -> list[str]:
    """The piece keys dispatch sends through the encoder (encode.compress_many), in order."""
    seen: list[str] = []
    real = encode.compress_many

    def counting(tensors, config=None, names=None, **kw):
        seen.extend(names or ["?"] * len(tensors))
        return real(tensors, config, names, **kw)

    monkeypatch.setattr(encode, "compress_many", counting)
    return seen


def _pieces_of_streamed_weights(model) -> set[str]:
    """The piece keys of every weight with a piece outside the device tier (a weight cut into
    pieces is left unencoded only when all its pieces stay decoded)."""
    ex = model.neuzip.executor
    return {
        key
        for w in model.neuzip.export()
        if any(ex.tier_of(k) != DEVICE for k, _, _ in w.pieces)
        for key, _, _ in w.pieces
    }


@pytest.mark.parametrize("codec", ["ans", "zstd"])
def test_a_model_that_fits_is_never_encoded_and_saves_exactly(codec, encoded, tmp_path):
    model = tiny_llama(tied=True)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    budget = 2 * model_bytes(model)
    nzo.dispatch(model, max_gpu_mem=budget, reserve=0, codec=codec, progress=False)
    assert set(model.neuzip.plan.tiers) == {DEVICE}
    assert encoded == []  # not one weight went through the encoder
    assert "never encoded" in str(model.neuzip.plan)

    def forwards() -> None:
        with torch.no_grad():
            assert same_bits(model(ids).logits, ref)

    check_device_memory(model, budget, forwards)
    # saving encodes them now, to the bytes a dispatch that encoded them would have held
    nzo.save_compressed(model, tmp_path / "saved", codec=codec, progress=False)
    key = "model.layers.0.mlp.up_proj.weight"
    again = nzo.compress(originals[key], config=model.neuzip.config)
    got = model.neuzip.compressed_tensor(key)
    assert got.header == again.header
    assert all(torch.equal(p, again.planes[k]) for k, p in got.planes.items())
    loaded = nzo.load(tmp_path / "saved", max_gpu_mem="1GB", progress=False)
    nzo.undispatch(model)
    nzo.undispatch(loaded)
    for m in (model, loaded):
        state = m.state_dict()
        for k, v in originals.items():
            assert same_bits(state[k], v) if v.is_floating_point() else torch.equal(state[k], v)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_only_the_streamed_blocks_are_encoded(name, encoded):
    model = MODELS[name]()
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    budget = int(0.8 * model_bytes(model))  # a layer or two stay, the rest streams
    nzo.dispatch(model, max_gpu_mem=budget, reserve=0, prefetch=1, progress=False)
    tiers = model.neuzip.plan.tiers
    assert DEVICE in tiers and HOST in tiers
    assert sorted(encoded) == sorted(_pieces_of_streamed_weights(model))
    assert len(encoded) < len(model.neuzip.compressed)  # resident weights were left alone

    def forwards() -> None:
        with torch.no_grad():
            for _ in range(2):
                assert same_bits(model(ids).logits, ref)

    check_device_memory(model, budget, forwards)


def test_lossy_weights_are_all_encoded_even_resident(encoded):
    model = tiny_llama(dtype=torch.float32)
    nzo.dispatch(model, mode="lossy", mantissa_bits=5, max_gpu_mem="1GB", progress=False)
    assert set(model.neuzip.plan.tiers) == {DEVICE}
    assert sorted(encoded) == sorted(model.neuzip.compressed)


def test_estimates_that_were_off_fall_back_to_encoding_everything(monkeypatch, encoded):
    """Should the measured plan stream a block the stand-ins' plan kept resident, dispatch
    encodes what it skipped and plans as if it had encoded everything from the start."""
    base = tiny_llama()
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = base(ids).logits
    budget = (model_bytes(base) + _minimum(base, prefetch=1)) // 2
    kw = dict(max_gpu_mem=budget, reserve=0, prefetch=1, progress=False)
    monkeypatch.setattr(planning, "kept_decoded", lambda *a: {})  # today's dispatch
    everything = nzo.dispatch(copy.deepcopy(base), **kw)
    encoded.clear()

    def everything_stays_decoded(opts, model, weights, trainable):  # a wrong estimate
        return {
            key: sizing.unencoded(w.piece_of(w.param, a, b), opts.codec, key)
            for w in weights
            for key, a, b in w.pieces
        }

    monkeypatch.setattr(planning, "kept_decoded", everything_stays_decoded)
    model = nzo.dispatch(copy.deepcopy(base), **kw)
    assert sorted(encoded) == sorted(model.neuzip.compressed)  # the fallback encoded them all
    assert model.neuzip.plan.tiers == everything.neuzip.plan.tiers
    assert model.neuzip.plan.blocks == everything.neuzip.plan.blocks

    def forwards() -> None:
        with torch.no_grad():
            assert same_bits(model(ids).logits, ref)

    check_device_memory(model, budget, forwards)


def test_trained_weights_never_encoded_are_saved_as_trained(tmp_path, encoded):
    model = tiny_llama().train()
    nzo.dispatch(
        model,
        max_gpu_mem="1GB",
        trainable=True,
        optimizer=nzo.optim.SGD(lr=1e-1),
        progress=False,
    )
    assert encoded == [] and set(model.neuzip.plan.tiers) == {DEVICE}
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(6))
    model(ids, labels=ids).loss.backward()
    nzo.save_compressed(model, tmp_path / "trained", progress=False)
    again = nzo.load(tmp_path / "trained", max_gpu_mem="1GB", progress=False)
    nzo.undispatch(model)
    nzo.undispatch(again)
    trained, loaded = model.state_dict(), again.state_dict()
    assert not same_bits(trained["lm_head.weight"], tiny_llama().lm_head.weight)  # it trained
    for k, v in loaded.items():
        assert same_bits(v, trained[k]), k
