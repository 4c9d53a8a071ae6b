"""What a dispatched model says about its weights: state_dict, save_pretrained, parameters."""

from __future__ import annotations

import copy

import pytest
import torch

import neuzip_offload as nzo
from tests.helpers import model_bytes, same_bits, tiny_llama


def _dispatched(tied: bool = False):
    plain = tiny_llama(tied=tied)
    model = nzo.dispatch(
        copy.deepcopy(plain),
        max_gpu_mem=int(0.6 * model_bytes(plain)),
        reserve=0,
        progress=False,
    )
    return plain, model


@pytest.mark.parametrize("tied", [False, True])
def test_state_dict_returns_every_real_weight(tied):
    plain, model = _dispatched(tied)
    ref, got = plain.state_dict(), model.state_dict()
    assert ref.keys() == got.keys()
    for name, t in ref.items():
        assert same_bits(got[name], t), name


def test_save_pretrained_writes_weights_that_reload_exactly(tmp_path):
    from transformers import LlamaForCausalLM

    plain, model = _dispatched()
    model.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, t in plain.state_dict().items():
        assert same_bits(again.state_dict()[name], t), name


def test_load_state_dict_into_a_dispatched_model_is_refused():
    plain, model = _dispatched()
    with pytest.raises(RuntimeError, match="undispatch"):
        model.load_state_dict(plain.state_dict())


def test_the_handle_counts_the_compressed_parameters():
    plain, model = _dispatched()
    assert model.neuzip.num_parameters() == sum(p.numel() for p in plain.parameters())


def test_state_dict_after_training_holds_the_trained_weights():
    """Streamed and resident weights alike: what undispatch gives back, bit for bit."""
    base = tiny_llama(dtype=torch.float32).train()
    model = nzo.dispatch(
        copy.deepcopy(base),
        max_gpu_mem=int(0.7 * model_bytes(base)),
        reserve=0,
        trainable=True,
        optimizer=nzo.optim.SGD(lr=1e-2),
        progress=False,
    )
    b = torch.randint(0, 1000, (2, 12))
    model(b, labels=b).loss.backward()
    during = model.state_dict()
    assert not same_bits(
        during["model.layers.0.mlp.up_proj.weight"],
        base.state_dict()["model.layers.0.mlp.up_proj.weight"],
    )  # it trained
    nzo.undispatch(model)
    after = model.state_dict()
    for name, t in after.items():
        assert same_bits(during[name], t), name


def test_state_dict_joins_the_pieces_of_a_large_weight():
    plain = tiny_llama()
    model = nzo.dispatch(
        copy.deepcopy(plain),
        max_gpu_mem=int(0.5 * model_bytes(plain)),
        reserve=0,
        max_block_bytes=40_000,
        progress=False,
    )
    assert len(model.model.embed_tokens.pieces) > 1
    for name, t in plain.state_dict().items():
        assert same_bits(model.state_dict()[name], t), name
