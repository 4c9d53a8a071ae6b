"""neuzip_offload/dtypes.py: the one dtype table, against safetensors' own writer and reader."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from neuzip_offload import dtypes
from neuzip_offload.compressed import Header


def _torch_dtypes() -> list[torch.dtype]:
    return sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


def _tensor(dtype: torch.dtype) -> torch.Tensor:
    """Three elements of ``dtype`` (made through uint8 for the dtypes that have no fill)."""
    try:
        return torch.zeros(3, dtype=dtype)
    except (RuntimeError, NotImplementedError):
        return torch.zeros(3 * torch.empty(0, dtype=dtype).element_size(), dtype=torch.uint8).view(
            dtype
        )


def _written_dtype(path) -> tuple[str, int]:
    """(dtype name, bytes of data) of tensor "t" as the file's header records them."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    info = json.loads(raw[8 : 8 + n])["t"]
    a, b = info["data_offsets"]
    return info["dtype"], b - a


@pytest.mark.filterwarnings("ignore::UserWarning")  # complex32, quantized dtypes
def test_every_dtype_safetensors_writes_is_in_the_table(tmp_path):
    """safetensors' writer is the oracle: each torch dtype it accepts for a plain tensor has an
    entry here, with the name and element size the writer put in the file, and its reader gives
    back the dtype the table maps that name to."""
    written = 0
    for dtype in _torch_dtypes():
        try:
            t = _tensor(dtype)
        except (RuntimeError, NotImplementedError, TypeError):
            continue  # quantized dtypes: no plain tensor to write
        path = tmp_path / f"{str(dtype)[6:]}.safetensors"
        try:
            save_file({"t": t}, str(path))
        except (KeyError, ValueError, TypeError):
            continue  # a dtype safetensors does not store
        name, nbytes = _written_dtype(path)
        entry = dtypes.of(dtype)
        assert entry.safetensors == name, dtype
        assert entry.itemsize * t.numel() == nbytes, dtype
        assert dtypes.of_safetensors(name).dtype == load_file(str(path))["t"].dtype == dtype
        written += 1
    assert written == len(dtypes.TABLE)  # and nothing in the table that safetensors cannot write


@pytest.mark.parametrize("entry", dtypes.TABLE, ids=lambda d: d.name)
def test_each_entry_round_trips_through_every_name(entry):
    assert dtypes.of(entry.dtype) is entry
    assert dtypes.of_name(entry.name) is entry
    assert getattr(torch, entry.name) == entry.dtype  # torch's own name, as indexes record it
    assert dtypes.of_safetensors(entry.safetensors) is entry
    assert torch.empty(0, dtype=entry.dtype).element_size() == entry.itemsize
    if entry.short is not None:
        assert dtypes.of_short(entry.short) is entry
        assert dtypes.of_header(entry.header) is entry


def test_the_names_on_disk_and_at_the_command_line_stay_as_they_are():
    """Files written before the table existed must still read: the strings are fixed."""
    got = {d.dtype: (d.short, d.header, d.safetensors) for d in dtypes.COMPRESSIBLE}
    assert got == {
        torch.bfloat16: ("bf16", "bf16", "BF16"),
        torch.float16: ("fp16", "f16", "F16"),
        torch.float32: ("fp32", "f32", "F32"),
    }
    assert dtypes.SHORT_NAMES == ("bf16", "fp16", "fp32")
    assert {d.name for d in dtypes.COMPRESSIBLE} == {"bfloat16", "float16", "float32"}


def test_a_header_written_with_the_old_names_reads():
    text = '{"v":1,"t":"f16","s":[2,3],"c":"zstd","e":5,"x":7}'
    h = Header.from_json(text)
    assert h.dtype == torch.float16
    assert h.to_json() == text


@pytest.mark.parametrize(
    ("lookup", "name"),
    [
        (dtypes.of_short, "float16"),
        (dtypes.of_short, "int8"),
        (dtypes.of_header, "fp16"),
        (dtypes.of_safetensors, "bf16"),
        (dtypes.of_name, "BF16"),
    ],
)
def test_unknown_names_raise_key_error(lookup, name):
    with pytest.raises(KeyError):
        lookup(name)
