"""The piece rule (neuzip_offload/pieces.py): its properties, and the agreement it exists for.

Dispatch cuts large weights outside the layers with ``pieces.cut``; the converter cuts a
checkpoint's tensors with it too, so that ``load()`` places the stored pieces as they are instead
of decoding and compressing them again.
"""

from __future__ import annotations

import itertools
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import neuzip_offload as nzo
from neuzip_offload import pieces
from neuzip_offload.checkpoint import Checkpoint
from neuzip_offload.kernels import planes
from neuzip_offload.model_analysis import analyze, layer_bytes
from tests.helpers import same_bits, tiny_gpt2, tiny_llama

shapes = st.tuples(
    st.integers(1, 5000),  # rows (the cut dimension)
    st.integers(1, 4096),  # bytes per row
    st.integers(-1, 1 << 22),  # limit
)


@given(shapes)
def test_pieces_cover_the_rows_in_order_without_gaps(case):
    length, row, limit = case
    cut = pieces.cut(length, length * row, limit)
    assert cut[0][0] == 0 and cut[-1][1] == length
    assert all(a < b for a, b in cut)  # none empty
    assert all(x[1] == y[0] for x, y in itertools.pairwise(cut))  # contiguous
    sizes = [b - a for a, b in cut]
    assert len(set(sizes[:-1])) <= 1 and sizes[-1] <= sizes[0]  # equal, the last may be shorter


@given(shapes)
def test_pieces_are_the_fewest_within_the_limit(case):
    length, row, limit = case
    nbytes = length * row
    cut = pieces.cut(length, nbytes, limit)
    if limit <= 0 or nbytes <= limit:
        assert cut == [(0, length)]
        return
    rows_per_piece = limit // row  # the most rows a piece of at most `limit` bytes holds
    if rows_per_piece == 0:  # a single row is larger than the limit: one row a piece
        assert cut == [(a, a + 1) for a in range(length)]
        return
    assert all((b - a) * row <= limit for a, b in cut)  # the planner sizes slots from these
    assert len(cut) == math.ceil(length / rows_per_piece)  # no cut within the limit has fewer


def test_pieces_are_at_most_the_limit():
    # 10 rows of 10 bytes, limit 34: at most 3 rows a piece, so four pieces (3, 3, 3, 1 rows);
    # equal pieces of ceil(10 / ceil(100 / 34)) = 4 rows would be 40 bytes
    assert pieces.cut(10, 100, 34) == [(0, 3), (3, 6), (6, 9), (9, 10)]


# ------------------------------------------------------------------------------------------
# the agreement: a converted checkpoint's pieces are dispatch's, and load() compresses nothing
# ------------------------------------------------------------------------------------------


def _no_compression(monkeypatch) -> list[str]:
    """Make every compression path fail loudly: both codecs start by splitting floats into
    planes (kernels.planes), lossless or lossy, on the host or on a GPU."""
    calls: list[str] = []
    for name in ("split", "lossy_split", "split_triton", "lossy_split_triton"):
        real = getattr(planes, name, None)
        if real is None:
            continue

        def refuse(*args, _name=name, **kwargs):
            calls.append(_name)
            raise AssertionError(f"planes.{_name}: a weight was compressed")

        monkeypatch.setattr(planes, name, refuse)
    return calls


def _llama_with_vocab(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _convert_load_dispatch(tmp_path, model, monkeypatch):
    """(the checkpoint's embedding pieces, load()'s, dispatch()'s) as (key, start, stop)."""
    model.save_pretrained(tmp_path / "hf")
    out = nzo.convert(tmp_path / "hf", tmp_path / "nz", progress=False)
    stored = Checkpoint(out).entries["model.embed_tokens.weight"].pieces
    with monkeypatch.context() as m:
        calls = _no_compression(m)
        loaded = nzo.load(out, max_gpu_mem="1GB", progress=False)
    assert calls == []
    nzo.dispatch(model, max_gpu_mem="1GB", progress=False)
    return (
        [(name, a, b) for name, _, a, b in stored],
        [(p.key, p.start, p.stop) for p in loaded.model.embed_tokens.pieces],
        [(p.key, p.start, p.stop) for p in model.model.embed_tokens.pieces],
        loaded,
    )


def test_load_places_a_converted_checkpoints_pieces_without_compressing(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = _llama_with_vocab(1000)  # a 1000 x 64 embedding: 1.7 layers of weights
    stored, loaded_pieces, dispatched, loaded = _convert_load_dispatch(tmp_path, model, monkeypatch)
    assert len(stored) > 1  # the converter cut it
    assert loaded_pieces == stored == dispatched  # one rule: dispatch cuts the same pieces
    assert {k for k, _, _ in stored} <= set(loaded.neuzip.compressed)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    # built as load() builds it, from the config (its buffers are computed, not stored)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto").eval()
    with torch.no_grad():
        assert same_bits(loaded(ids).logits, ref(ids).logits)


def test_the_converter_and_dispatch_cut_at_the_same_limit(tmp_path, monkeypatch):
    # 1155 x 64 bf16 = 147,840 bytes: 2.005 layers of weights (73,728 bytes each), 1.998
    # layers with the norms (73,984): cut at the second limit, it would be 2 pieces, not 3
    model = _llama_with_vocab(1155)
    stored, loaded_pieces, dispatched, _ = _convert_load_dispatch(tmp_path, model, monkeypatch)
    assert len(stored) == 3
    assert loaded_pieces == stored  # load takes the checkpoint's pieces (nothing compressed)
    assert dispatched == stored


def test_the_converters_limit_is_dispatchs_in_the_dtype_converted_to(tmp_path):
    """Dispatch measures a layer by its compressed weights in their dtype: a conversion from
    fp32 to bf16 cuts at the bf16 layer's bytes, with norms and biases left out (GPT-2 has
    both, and Conv1D weights)."""
    for name, model in (("llama", tiny_llama(dtype=torch.float32)), ("gpt2", tiny_gpt2())):
        model.save_pretrained(tmp_path / name)
        out = nzo.convert(tmp_path / name, tmp_path / f"{name}-nz", dtype="bf16", progress=False)
        weights, _ = analyze(model.to(torch.bfloat16), None)
        limit = max(layer_bytes(weights).values())
        assert Checkpoint(out).settings["max_piece_bytes"] == limit, name
