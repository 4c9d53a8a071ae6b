"""kernels/crc.py: CRC-32 on the device equals zlib.crc32, running value included."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from neuzip_offload.kernels import crc
from tests.helpers import TRITON_DEVICE, requires_triton

# Small segments and blocks keep the interpreter fast (about 1 ms per program and loop step).
SEG, BLOCK = 64, 16


def _bytes(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g, dtype=torch.int64).to(torch.uint8)


def _zlib(t: torch.Tensor, value: int = 0) -> int:
    return zlib.crc32(t.cpu().numpy().tobytes(), value)


def test_combine_and_zero_shift_follow_zlib():
    for seed in range(20):
        a, b = _bytes(37 * seed + 3, seed), _bytes(101 * seed, seed + 100)
        assert crc.crc32_combine(_zlib(a), _zlib(b), b.numel()) == _zlib(torch.cat([a, b]))
    # crc32(data, v) = ~(Z_n(~v) ^ R(0, data)): with data all zeros, R(0, data) = 0
    zeros = torch.zeros(1000, dtype=torch.uint8)
    for v in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
        assert crc.shift_zeros(v ^ 0xFFFFFFFF, 1000) ^ 0xFFFFFFFF == _zlib(zeros, v)
    assert crc.shift_zeros(0x12345678, 0) == 0x12345678


def test_cpu_tensors_use_zlib():
    x = _bytes(5000).view(50, 100)
    assert crc.crc32(x) == _zlib(x)
    assert crc.crc32(x, 0xABCDEF01) == _zlib(x, 0xABCDEF01)
    assert int(crc.crc32_tensor(x[:, ::2])) == _zlib(x[:, ::2].contiguous())  # any layout
    assert crc.crc32(torch.empty(0, dtype=torch.uint8), 7) == 7


@requires_triton
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1000, 3001, 4097])
def test_device_crc_equals_zlib_on_odd_sizes(n):
    x = _bytes(n, seed=n).to(TRITON_DEVICE)
    got = crc.crc32_tensor(x, segment=SEG, block=BLOCK, use_triton=True)
    assert got.device == x.device and got.dim() == 0
    assert int(got) == _zlib(x)
    value = 0x9E3779B9
    got = crc.crc32_tensor(x, value, segment=SEG, block=BLOCK, use_triton=True)
    assert int(got) == _zlib(x, value)


@requires_triton
def test_device_segments_are_the_raw_registers_of_the_padded_data():
    """Each lane's output is R(0, segment) of the zero-left-padded data (checked in Python)."""
    x = _bytes(150, seed=5).to(TRITON_DEVICE)  # 3 segments of 64, 42 zero bytes in front
    regs = crc.segment_crcs_triton(x, SEG, BLOCK).cpu().tolist()
    padded = [0] * (3 * SEG - 150) + x.cpu().tolist()
    table = crc.byte_table()
    for i, reg in enumerate(regs):
        s = 0
        for b in padded[i * SEG : (i + 1) * SEG]:
            s = (s >> 8) ^ table[(s ^ b) & 0xFF]
        assert reg == s, i


@requires_triton
def test_device_value_chains_over_planes_like_zlib():
    """A running CRC kept on the device (no host sync between planes) equals zlib's chain."""
    planes = [_bytes(n, seed=n) for n in (700, 0, 129, 2050)]
    want = 0
    for p in planes:
        want = _zlib(p, want)
    value: int | torch.Tensor = 0
    for p in planes:
        value = crc.crc32_tensor(
            p.to(TRITON_DEVICE), value, segment=SEG, block=BLOCK, use_triton=True
        )
        assert isinstance(value, torch.Tensor)
    assert int(value) == want


@requires_triton
def test_device_crc_sees_every_flipped_bit():
    x = _bytes(777, seed=1)
    base = int(crc.crc32_tensor(x.to(TRITON_DEVICE), segment=SEG, block=BLOCK, use_triton=True))
    for pos, bit in [(0, 1), (400, 0x80), (776, 0x10)]:
        y = x.clone()
        y[pos] ^= bit
        got = int(crc.crc32_tensor(y.to(TRITON_DEVICE), segment=SEG, block=BLOCK, use_triton=True))
        assert got == _zlib(y) and got != base


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="data must be a uint8 tensor"):
        crc.crc32(torch.zeros(4))
    with pytest.raises(TypeError, match="data must be a torch.Tensor"):
        crc.crc32(b"abc")
    with pytest.raises(ValueError, match="value must be an int"):
        crc.crc32(torch.zeros(4, dtype=torch.uint8), -1)
    with pytest.raises(ValueError, match="value must be an int"):
        crc.crc32_tensor(torch.zeros(4, dtype=torch.uint8), 1 << 32)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        crc.shift_zeros(1, -1)


@requires_triton
def test_bad_segment_is_refused():
    with pytest.raises(ValueError, match="segment must be a power of two"):
        crc.segment_crcs_triton(torch.zeros(4, dtype=torch.uint8), segment=100)


_AOT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from neuzip_offload.kernels import crc

    signature = {
        "data_ptr": "*u8", "out_ptr": "*i32", "table_ptr": "*i32",
        "n": "i64", "pad": "i64", "n_segments": "i64", "SEG": "constexpr", "BLOCK": "constexpr",
    }
    for cap in (80, 90):
        src = ASTSource(
            fn=crc._segment_crc_kernel,
            signature=signature,
            constexprs={"SEG": crc.DEFAULT_SEGMENT, "BLOCK": crc.DEFAULT_BLOCK},
        )
        k = triton.compile(src, target=GPUTarget("cuda", cap, 32))
        assert k.asm.get("cubin"), cap  # through ptxas: a real binary
    print("compiled")
    """
)


@requires_triton
def test_kernel_compiles_for_real_gpus(tmp_path):
    """The interpreter accepts code the compiler refuses: compile for sm_80 and sm_90 (no GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    r = subprocess.run(
        [sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
