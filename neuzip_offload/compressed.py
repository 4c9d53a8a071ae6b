"""CompressedTensor: the planes of one NeuZip-compressed tensor and its small versioned header.

Planes (uint8 tensors, all on one device)::

    exp     the exponent symbols, coded: rANS words (ans) or concatenated zstd frames (zstd)
    meta    the coder's index. ans: final states u32[C*W], word offsets u32[C+1], table starts
            u8[C], table lengths - 1 u8[C], table frequencies packed prob_bits-bit [T entries].
            zstd: frame offsets i64[F+1]
    raw     the bits kept as they are (see kernels/planes.py for each dtype's layout)
    scales  lossy with normalization only: 7 bits per block (the absmax's mantissa), packed

The header is compact JSON: dtype, shape, coder settings that differ from the defaults, the exp
plane's size (every other size follows from the header) and one CRC-32 over all planes.
``nbytes`` counts planes and header. Moving (``to``, ``pin_memory``) never decodes; decoding is the
explicit :func:`neuzip_offload.decompress`.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass

import torch

from . import backend, dtypes
from .kernels import ans, planes, zstd
from .kernels import crc as crc_kernels

FORMAT_VERSION = 1
PLANE_NAMES = ("exp", "meta", "raw", "scales")
SCALE_BITS = 7

# What a version-1 header leaves out ("n", "w", "pb") means. Fixed with the format, not taken
# from the codecs' defaults: those may change (64 lanes are one setting away), and a header
# written without the key must read the same forever.
_ABSENT_CHUNK = {"ans": 1 << 16, "zstd": 1 << 18}
_ABSENT_LANES = 32
_ABSENT_PROB_BITS = 12


class DamagedDataError(ValueError):
    """Compressed data failed a size, structure or checksum check. The message names the tensor."""


def planes_crc(planes_: dict[str, torch.Tensor]) -> int:
    """One CRC-32 over the planes, in PLANE_NAMES order (zlib.crc32 chained plane by plane).

    Host planes go through zlib; CUDA planes are checksummed on their device (kernels/crc.py) and
    only the 32-bit result comes back: one host sync.
    """
    if any(p.device.type != "cpu" for p in planes_.values()):
        return int(planes_crc_tensor(planes_))
    crc = 0
    for k in PLANE_NAMES:
        if k in planes_:
            crc = zlib.crc32(planes_[k].contiguous().numpy(), crc)
    return crc


def planes_crc_tensor(
    planes_: dict[str, torch.Tensor], *, use_triton: bool | None = None
) -> torch.Tensor:
    """:func:`planes_crc` as a 0-d int64 tensor on the planes' device, without a host sync
    (on the CPU it is zlib's value, wrapped). ``use_triton`` forces the device kernel (tests run
    it on CPU planes under TRITON_INTERPRET=1)."""
    crc: int | torch.Tensor = 0
    for k in PLANE_NAMES:
        if k in planes_:
            crc = crc_kernels.crc32_tensor(planes_[k], crc, use_triton=use_triton)
    if isinstance(crc, int):  # no planes at all
        return torch.zeros((), dtype=torch.int64)
    return crc


@dataclass(frozen=True)
class Header:
    dtype: torch.dtype
    shape: tuple[int, ...]
    mode: str  # "lossless" | "lossy"
    codec: str  # "ans" | "zstd"
    mantissa_bits: int = 0  # lossy only
    block_size: int = 1  # lossy with normalization only (1 otherwise)
    normalize: bool = False
    chunk_size: int = ans.DEFAULT_CHUNK
    lanes: int = _ABSENT_LANES  # ans only (zstd headers keep this)
    prob_bits: int = _ABSENT_PROB_BITS  # ans only
    table_len: int = 0  # ans: frequency-table entries, all chunks
    exp_nbytes: int = 0
    crc: int = 0
    version: int = FORMAT_VERSION

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def lossy(self) -> bool:
        return self.mode == "lossy"

    @property
    def n_chunks(self) -> int:
        return ans.n_chunks(self.numel, self.chunk_size)

    def to_json(self) -> str:
        d: dict = {"v": self.version, "t": dtypes.of(self.dtype).header, "s": list(self.shape)}
        d["c"] = self.codec
        if self.chunk_size != _ABSENT_CHUNK[self.codec]:
            d["n"] = self.chunk_size
        if self.lossy:
            d["k"] = self.mantissa_bits
            d["b"] = self.block_size if self.normalize else 0
        if self.codec == "ans":
            if self.lanes != _ABSENT_LANES:
                d["w"] = self.lanes
            if self.prob_bits != _ABSENT_PROB_BITS:
                d["pb"] = self.prob_bits
            d["T"] = self.table_len
        d["e"] = self.exp_nbytes
        d["x"] = self.crc
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, name: str = "tensor") -> Header:
        try:
            d = json.loads(text)
            version = d["v"]
            if version != FORMAT_VERSION:
                raise DamagedDataError(
                    f"{name}: format version {version} is not supported (this reader knows "
                    f"version {FORMAT_VERSION}); upgrade neuzip-offload"
                )
            lossy = "k" in d
            block = int(d.get("b", 0))
            codec = d["c"]
            h = cls(
                dtype=dtypes.of_header(d["t"]).dtype,
                shape=tuple(int(v) for v in d["s"]),
                mode="lossy" if lossy else "lossless",
                codec=codec,
                mantissa_bits=int(d.get("k", 0)),
                block_size=block if block else 1,
                normalize=lossy and block > 0,
                chunk_size=int(d.get("n", _ABSENT_CHUNK[codec])),
                lanes=int(d.get("w", _ABSENT_LANES)),
                prob_bits=int(d.get("pb", _ABSENT_PROB_BITS)),
                table_len=int(d.get("T", 0)),
                exp_nbytes=int(d["e"]),
                crc=int(d["x"]),
                version=version,
            )
        except DamagedDataError:
            raise
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise DamagedDataError(f"{name}: header is not a valid neuzip header ({e!r})") from e
        h.check(name)
        return h

    def check(self, name: str = "tensor") -> None:
        """Validate the header's own values; raise DamagedDataError naming what is wrong."""
        problems = []
        if self.codec not in ("ans", "zstd"):
            problems.append(f"unknown codec {self.codec!r}")
        if any(v < 0 for v in self.shape):
            problems.append(f"negative dimension in shape {self.shape}")
        if not 0 <= self.mantissa_bits <= 7:
            problems.append(f"mantissa_bits {self.mantissa_bits} outside 0..7")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            problems.append(f"block size {self.block_size} is not a power of two")
        if self.chunk_size < 1 or self.chunk_size > 1 << 24:
            problems.append(f"chunk size {self.chunk_size} outside 1..2**24")
        if self.codec == "ans":
            if self.lanes < 1 or self.chunk_size % self.lanes:
                problems.append(f"chunk size {self.chunk_size} is not a multiple of {self.lanes}")
            if not 8 <= self.prob_bits <= 12:
                problems.append(f"prob_bits {self.prob_bits} outside 8..12")
            if self.table_len < 0 or self.table_len > 256 * self.n_chunks:
                problems.append(f"table length {self.table_len} impossible")
            if self.exp_nbytes % 2:
                problems.append("the exp plane is not a whole number of 16-bit words")
        if self.exp_nbytes < 0:
            problems.append(f"negative exp size {self.exp_nbytes}")
        if problems:
            raise DamagedDataError(f"{name}: " + "; ".join(problems))

    def plane_sizes(self) -> dict[str, int]:
        """The size every plane must have."""
        n = self.numel
        layout = (
            planes.lossy_layout(self.mantissa_bits)
            if self.lossy
            else planes.lossless_layout(self.dtype)
        )
        C = self.n_chunks
        if self.codec == "ans":
            meta = 4 * C * self.lanes + 4 * (C + 1) + 2 * C
            meta += ans.table_nbytes(self.table_len, self.prob_bits)
        else:
            meta = 8 * (C + 1)
        sizes = {"exp": self.exp_nbytes, "meta": meta, "raw": layout.raw_nbytes(n)}
        if self.normalize:
            sizes["scales"] = planes.packed_nbytes(planes.n_blocks(n, self.block_size), SCALE_BITS)
        return sizes


class CompressedTensor:
    """One compressed tensor: ``header`` + ``planes`` (uint8 tensors on one device).

    ``name`` is only for error messages and is not part of the format.
    """

    __slots__ = ("header", "name", "planes")

    def __init__(self, header: Header, planes_: dict[str, torch.Tensor], name: str | None = None):
        self.header = header
        self.planes = planes_
        self.name = name

    # -- shape and size ---------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.header.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.header.dtype

    @property
    def numel(self) -> int:
        return self.header.numel

    @property
    def mode(self) -> str:
        return self.header.mode

    @property
    def codec(self) -> str:
        return self.header.codec

    @property
    def device(self) -> torch.device:
        return self.planes["raw"].device

    @property
    def header_nbytes(self) -> int:
        return len(self.header.to_json().encode())

    @property
    def nbytes(self) -> int:
        """Bytes of all planes plus the serialized header."""
        return sum(p.numel() for p in self.planes.values()) + self.header_nbytes

    @property
    def bits_per_weight(self) -> float:
        """8 * nbytes / numel, headers included (inf for an empty tensor)."""
        return 8 * self.nbytes / self.numel if self.numel else math.inf

    @property
    def decoded_nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __repr__(self) -> str:
        extra = f", k={self.header.mantissa_bits}" if self.header.lossy else ""
        return (
            f"CompressedTensor({self.name + ', ' if self.name else ''}shape={tuple(self.shape)}, "
            f"dtype={self.dtype}, {self.mode}{extra}, codec={self.codec}, "
            f"{self.bits_per_weight:.3f} bits/weight, device={self.device})"
        )

    # -- moving -------------------------------------------------------------------------------
    def with_planes(self, planes_: dict[str, torch.Tensor]) -> CompressedTensor:
        return CompressedTensor(self.header, planes_, self.name)

    def placeholder(self) -> CompressedTensor:
        """The same header with its planes on the meta device: sizes without the bytes."""
        return self.to("meta")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CompressedTensor:
        """Move the compressed bytes (never decodes)."""
        device = torch.device(device)
        return self.with_planes(
            {k: p.to(device, non_blocking=non_blocking) for k, p in self.planes.items()}
        )

    def cpu(self) -> CompressedTensor:
        return self.to("cpu")

    def cuda(self, device: int | None = None, non_blocking: bool = False) -> CompressedTensor:
        return self.to(torch.device("cuda", device) if device is not None else "cuda", non_blocking)

    def pin_memory(self) -> CompressedTensor:
        """Page-locked planes (unchanged where CUDA is absent: nothing can be pinned)."""
        return self.with_planes({k: backend.pin(p) for k, p in self.planes.items()})

    def is_pinned(self) -> bool:
        return all(p.is_pinned() for p in self.planes.values())

    # -- integrity and serialization ----------------------------------------------------------
    def verify(self) -> None:
        """Check every plane's size, the checksum and the coder's index (read on the host)."""
        label = self.name or "tensor"
        sizes = self.header.plane_sizes()
        if set(self.planes) != set(sizes):
            raise DamagedDataError(
                f"{label}: planes {sorted(self.planes)}, expected {sorted(sizes)}"
            )
        for k, size in sizes.items():
            p = self.planes[k]
            if p.dtype != torch.uint8 or p.dim() != 1 or p.numel() != size:
                raise DamagedDataError(
                    f"{label}: plane {k!r} has {p.numel()} bytes ({p.dtype}, {p.dim()}-D), "
                    f"expected {size} uint8 bytes"
                )
        if planes_crc(self.planes) != self.header.crc:
            raise DamagedDataError(f"{label}: the data fails its checksum")
        problem = self.structure_problem()
        if problem:
            raise DamagedDataError(f"{label}: {problem}")

    def structure_problem(self) -> str | None:
        """What is inconsistent in the coder's index (None if nothing): cheap, O(chunks)."""
        h = self.header
        if h.codec == "ans":
            return ans.validate(self.ans_stream(), h.numel, h.chunk_size, h.lanes, h.prob_bits)
        offsets = self.planes["meta"].view(torch.int64)
        return zstd.validate(self.planes["exp"], offsets, h.numel, h.chunk_size)

    def state(self) -> tuple[str, dict[str, torch.Tensor]]:
        """(header JSON, planes): what a checkpoint stores."""
        return self.header.to_json(), dict(self.planes)

    @classmethod
    def from_state(
        cls,
        header_json: str,
        planes_: dict[str, torch.Tensor],
        name: str | None = None,
        verify: bool = True,
    ) -> CompressedTensor:
        """Rebuild from :meth:`state`, checking header, sizes and (by default) the checksum."""
        header = Header.from_json(header_json, name or "tensor")
        ct = cls(header, dict(planes_), name)
        if verify:
            ct.verify()
        else:
            sizes = header.plane_sizes()
            if set(ct.planes) != set(sizes) or any(
                ct.planes[k].numel() != v for k, v in sizes.items()
            ):
                raise DamagedDataError(f"{name or 'tensor'}: planes are missing or mis-sized")
        return ct

    # -- coder views ----------------------------------------------------------------------------
    def ans_stream(self) -> ans.AnsStream:
        """Typed views of the exp and meta planes (no copies; any device)."""
        h = self.header
        C = h.n_chunks
        meta = self.planes["meta"]
        a = 4 * C * h.lanes
        b = a + 4 * (C + 1)
        return ans.AnsStream(
            words=self.planes["exp"].view(torch.int16),
            states=meta[:a].view(torch.int32),
            word_offsets=meta[a:b].view(torch.int32),
            table_lo=meta[b : b + C],
            table_len=meta[b + C : b + 2 * C],
            table_freq=meta[b + 2 * C :],
        )


def pack_ans_meta(stream: ans.AnsStream) -> torch.Tensor:
    """The meta plane of an ans-coded tensor (see :meth:`CompressedTensor.ans_stream`)."""
    return torch.cat(
        [
            stream.states.contiguous().view(torch.uint8),
            stream.word_offsets.contiguous().view(torch.uint8),
            stream.table_lo,
            stream.table_len,
            stream.table_freq,
        ]
    )
