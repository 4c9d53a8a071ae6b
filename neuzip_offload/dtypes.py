"""The one dtype table: a torch dtype and each name it has in a file, a header or an option.

Part of the format layer, beside compressed.py and the checkpoint: every string that names a dtype
on disk or at the command line is looked up here, so that they cannot drift apart.

    torch            name        short   header   safetensors   itemsize
    torch.bfloat16   "bfloat16"  "bf16"  "bf16"   "BF16"        2
    torch.float16    "float16"   "fp16"  "f16"    "F16"         2
    torch.float32    "float32"   "fp32"  "f32"    "F32"         4
    torch.int64      "int64"     -       -        "I64"         8   ... every dtype a safetensors
                                                                        file can hold plain

``name`` is torch's own (``torch.<name>``), what a checkpoint index records for each tensor;
``short`` is what convert(dtype=) and the CLI accept; ``header`` is a compressed tensor's header
field "t". Strings on disk never change: files written today must read tomorrow.
(kernels/planes.py keeps its own integer format codes: kernels import nothing of the project.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    """One dtype's names. ``short`` and ``header`` only for the floats the codec compresses."""

    dtype: torch.dtype
    safetensors: str
    itemsize: int
    short: str | None = None
    header: str | None = None

    @property
    def name(self) -> str:
        """torch's name: "bfloat16" for torch.bfloat16."""
        return str(self.dtype).removeprefix("torch.")


def _optional(attr: str, safetensors: str, itemsize: int) -> tuple[DType, ...]:
    """A dtype that older torch releases lack (the project supports torch 2.4 on)."""
    dtype = getattr(torch, attr, None)
    return (DType(dtype, safetensors, itemsize),) if isinstance(dtype, torch.dtype) else ()


COMPRESSIBLE = (
    DType(torch.bfloat16, "BF16", 2, short="bf16", header="bf16"),
    DType(torch.float16, "F16", 2, short="fp16", header="f16"),
    DType(torch.float32, "F32", 4, short="fp32", header="f32"),
)
TABLE: tuple[DType, ...] = (
    *COMPRESSIBLE,
    DType(torch.float64, "F64", 8),
    DType(torch.complex64, "C64", 8),
    DType(torch.int64, "I64", 8),
    DType(torch.int32, "I32", 4),
    DType(torch.int16, "I16", 2),
    DType(torch.int8, "I8", 1),
    DType(torch.uint8, "U8", 1),
    DType(torch.bool, "BOOL", 1),
    DType(torch.float8_e4m3fn, "F8_E4M3", 1),
    DType(torch.float8_e4m3fnuz, "F8_E4M3FNUZ", 1),
    DType(torch.float8_e5m2, "F8_E5M2", 1),
    DType(torch.float8_e5m2fnuz, "F8_E5M2FNUZ", 1),
    *_optional("uint64", "U64", 8),
    *_optional("uint32", "U32", 4),
    *_optional("uint16", "U16", 2),
    *_optional("float8_e8m0fnu", "F8_E8M0", 1),
    *_optional("float4_e2m1fn_x2", "F4", 1),  # two 4-bit values per element
)
SHORT_NAMES = tuple(d.short for d in COMPRESSIBLE)

_BY_TORCH = {d.dtype: d for d in TABLE}
_BY_NAME = {d.name: d for d in TABLE}
_BY_SAFETENSORS = {d.safetensors: d for d in TABLE}
_BY_SHORT = {d.short: d for d in COMPRESSIBLE}
_BY_HEADER = {d.header: d for d in COMPRESSIBLE}


def of(dtype: torch.dtype) -> DType:
    """The entry of a torch dtype (KeyError for one no file format here holds)."""
    return _BY_TORCH[dtype]


def of_name(name: str) -> DType:
    """The entry of torch's name ("bfloat16"), as a checkpoint index records it."""
    return _BY_NAME[name]


def of_safetensors(name: str) -> DType:
    """The entry of a safetensors header's dtype ("BF16")."""
    return _BY_SAFETENSORS[name]


def of_short(name: str) -> DType:
    """The entry of a short float name ("bf16", "fp16", "fp32")."""
    return _BY_SHORT[name]


def of_header(name: str) -> DType:
    """The entry of a compressed tensor header's dtype ("bf16", "f16", "f32")."""
    return _BY_HEADER[name]
