"""save_compressed of a dispatched model: the index records what was written, and only that."""

from __future__ import annotations

import json
import warnings

import pytest

import neuzip_offload as nzo
from neuzip_offload.checkpoint import INDEX_NAME, Checkpoint
from tests.helpers import same_bits, tiny_llama


@pytest.mark.parametrize(
    ("dispatch_kw", "recorded"),
    [
        ({}, {"mode": "lossless", "codec": "zstd"}),  # the CPU's codec
        ({"mode": "lossy", "mantissa_bits": 4}, {"mode": "lossy", "codec": "zstd"}),
    ],
    ids=["lossless", "lossy"],
)
def test_the_index_records_the_settings_the_weights_were_coded_with(
    tmp_path, dispatch_kw, recorded
):
    model = nzo.dispatch(tiny_llama(), max_gpu_mem=10**8, progress=False, **dispatch_kw)
    nzo.save_compressed(model, tmp_path / "out", progress=False)
    settings = json.loads((tmp_path / "out" / INDEX_NAME).read_text())["settings"]
    assert {k: settings[k] for k in recorded} == recorded
    ck = Checkpoint(tmp_path / "out")
    for e in ck.entries.values():  # every stored piece says the same as the index
        for piece, shard, _, _ in e.pieces or []:
            assert ck.header(piece, shard).codec == recorded["codec"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a zstd checkpoint on the CPU: no codec advice
        again = nzo.load(tmp_path / "out", max_gpu_mem=10**8, progress=False)
    written, held = again.state_dict(), model.state_dict()
    for name, t in held.items():
        if t.is_floating_point() and t.dim() == 2:  # the weights (buffers are rebuilt)
            assert same_bits(written[name], t), name


def test_settings_that_disagree_with_the_dispatched_weights_are_refused(tmp_path):
    model = nzo.dispatch(tiny_llama(), max_gpu_mem=10**8, progress=False)
    with pytest.raises(ValueError, match=r"codec='zstd'.*undispatch"):
        nzo.save_compressed(model, tmp_path / "out", codec="ans", progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    nzo.save_compressed(model, tmp_path / "out", codec="zstd", progress=False)  # agrees: fine


def test_saving_a_dispatched_model_decodes_no_weight(tmp_path, monkeypatch):
    """Its weights are written as held; state_dict() would decode each one."""
    model = nzo.dispatch(tiny_llama(), max_gpu_mem=10**8, progress=False)
    monkeypatch.setattr(
        type(model.neuzip), "decoded", lambda *a, **k: pytest.fail("a weight was decoded")
    )
    nzo.save_compressed(model, tmp_path / "out", progress=False)
