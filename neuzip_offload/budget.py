"""Memory sizes: parsed once, at the boundary, into bytes.

"8GB" is 8·10^9 bytes and "8GiB" 8·2^30; ints and floats (8e9) are bytes, and so is a number
without a unit ("8e9"). Bits ("8Gb") and unknown units are refused with a hint. The host budget
defaults to what psutil reports as available, less headroom.
"""

from __future__ import annotations

import math
import re

import psutil

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# a decimal number, optionally with an exponent ("1.5", ".5", "8e9"), then an optional unit
_PATTERN = re.compile(
    r"^\s*((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$"
)

HOST_HEADROOM = 0.10  # keep this fraction of the available host memory free
HOST_HEADROOM_MIN = 1 << 30


def parse_size(value: int | float | str, name: str) -> int:
    """Bytes from an int, a float (``8e9``; rounded down) or a string such as "8GB", "6GiB",
    "512MB", "512MiB", "1.5GB", "8e9"."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(
            f"{name} must be a number of bytes (8000000000 or 8e9) or a string like '8GB', "
            f"got {value!r}"
        )
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number of bytes, got {value}")
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")
        return int(value)
    m = _PATTERN.match(value)
    if not m:
        raise ValueError(
            f"{name}={value!r} is not a size; expected e.g. '8GB', '6GiB' or 512000000"
        )
    number, unit = m.groups()
    unit = unit or "B"
    if len(unit) == 2 and unit[1] == "b" and unit[0].upper() in "KMGT":  # "8Gb", "8gb": bits
        raise ValueError(
            f"{name}={value!r} is in bits; did you mean '{number}{unit[:-1].upper()}B' (bytes)?"
        )
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"{name}={value!r}: unknown unit {unit!r}; use B, KB, MB, GB, TB (powers of 10) "
            "or KiB, MiB, GiB, TiB (powers of 2)"
        )
    return int(float(number) * factor)


def format_size(n: float) -> str:
    """Human-readable bytes, powers of 2 (e.g. '1.50 GiB')."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{int(n)} B"


def host_total() -> int:
    """The host's physical memory in bytes (what no budget can exceed)."""
    return psutil.virtual_memory().total


def host_available() -> int:
    """Host bytes a plan may use by default: available memory less 10% (at least 1 GiB)."""
    avail = psutil.virtual_memory().available
    return max(0, avail - max(int(avail * HOST_HEADROOM), HOST_HEADROOM_MIN))


# What transient work costs on the device, per weight, for plans and for the encoder's batches.
# Encoding n weights of itemsize s on the device (kernels/ans_encode_triton.py) holds at most: the
# weights (s n), the symbol and raw planes (~s n), the planes back to back in one buffer (n), the
# word scratch (2 n, int16), the words (at most 12 bits per symbol: 1.5 n; ~n/3 for weights) and
# per 64K-symbol chunk ~2.8 KiB of tables and states plus <= 80 bytes per table entry while they
# are packed (< 0.4 n): under (2 s + 5) n, counted as (2 s + 6) n; plus the word gather's index
# buffers (<= 36 MiB) and the tables of chunks shorter than 64K symbols, rounded up.
ENCODE_FIXED_BYTES = 64 << 20


def device_encode_bytes(numel: int, itemsize: int) -> int:
    """Device bytes that compressing ``numel`` weights of ``itemsize`` bytes on a GPU may hold."""
    if numel <= 0:
        return 0
    return numel * (2 * itemsize + 6) + ENCODE_FIXED_BYTES
