"""neuzip_offload/storage.py: safetensors headers, deterministic atomic writes, plane reads."""

from __future__ import annotations

import json
import os
import stat
import struct

import pytest
import torch
from safetensors import safe_open

from neuzip_offload import storage
from neuzip_offload.compressed import DamagedDataError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.randint(0, 256, (11,), generator=g, dtype=torch.uint8),
        "empty": torch.zeros(0, 4, dtype=torch.float32),
    }


def test_written_files_read_back_with_safetensors_own_reader(tmp_path):
    path = tmp_path / "a.safetensors"
    tensors = _tensors()
    storage.write_safetensors(tensors, {"x": "1", "a": "2"}, path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"x": "1", "a": "2"}
        assert sorted(f.keys()) == sorted(tensors)
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and torch.equal(got.view(-1), t.view(-1)), k
    header, start = storage.read_safetensors_header(path)
    assert header["__metadata__"] == {"a": "2", "x": "1"}
    assert start % 8 == 0  # the header is padded to 8 bytes
    for k, t in tensors.items():  # every tensor aligned to its element size
        assert (start + header[k]["data_offsets"][0]) % t.element_size() == 0, k


def test_the_same_content_gives_the_same_bytes(tmp_path):
    """Insertion order of tensors and metadata does not matter (a resumed conversion reproduces
    its files)."""
    tensors = _tensors()
    storage.write_safetensors(tensors, {"x": "1", "a": "2"}, tmp_path / "one")
    backwards = dict(reversed(list(tensors.items())))
    storage.write_safetensors(backwards, {"a": "2", "x": "1"}, tmp_path / "two")
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes()


def test_pread_into_reads_a_plane_and_names_a_truncated_file(tmp_path):
    path = tmp_path / "s.safetensors"
    data = torch.arange(100, dtype=torch.uint8)
    storage.write_safetensors({"p": data}, {}, path)
    header, start = storage.read_safetensors_header(path)
    a = header["p"]["data_offsets"][0]
    loc = storage.PlaneLocation(path, start + a + 10, 50)
    out = torch.empty(50, dtype=torch.uint8)
    storage.pread_into(loc, out)
    assert torch.equal(out, data[10:60])
    with open(path, "r+b") as f:
        f.truncate(start + 30)
    with pytest.raises(DamagedDataError, match="s.safetensors: truncated"):
        storage.pread_into(loc, out)


def test_damaged_headers_raise_damaged_data_error(tmp_path):
    path = tmp_path / "d.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(DamagedDataError, match="no safetensors header"):
        storage.read_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(DamagedDataError, match="header of 1000 bytes"):
        storage.read_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{x}\xff")
    with pytest.raises(DamagedDataError, match="damaged"):
        storage.read_safetensors_header(path)
    header = json.dumps({"t": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 10)
    with pytest.raises(DamagedDataError, match="its header needs"):
        storage.read_safetensors_header(path)


def test_atomic_write_syncs_the_file_then_renames_then_syncs_the_folder(tmp_path, monkeypatch):
    """The order that makes a published file durable: fsync(file) → rename → fsync(folder)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind))
        real_fsync(fd)

    def replace(a, b) -> None:
        events.append(("replace", os.path.basename(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    storage.write_json(tmp_path / "index.json", {"b": 1, "a": [1, 2]})
    storage.write_safetensors(_tensors(), {}, tmp_path / "s.safetensors")
    step = [("fsync", "file"), ("replace", "index.json"), ("fsync", "dir")]
    step2 = [("fsync", "file"), ("replace", "s.safetensors"), ("fsync", "dir")]
    assert events == (
        step + step2 if os.name == "posix" else [e for e in step + step2 if e[1] != "dir"]
    )
    assert json.loads((tmp_path / "index.json").read_text()) == {"a": [1, 2], "b": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "s.safetensors"]


def test_a_failed_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "index.json"
    storage.write_json(path, {"old": True})
    with pytest.raises(RuntimeError, match="disk full"), storage.atomic_write(path, "w") as f:
        f.write('{"new": ')
        raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"old": True}
