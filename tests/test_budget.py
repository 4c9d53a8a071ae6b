"""Budget strings: parsed once, bits and unknown units refused with a hint."""

from __future__ import annotations

import pytest

from neuzip_offload.budget import format_size, host_available, parse_size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (123, 123),
        ("8GB", 8 * 10**9),
        ("8 GB", 8 * 10**9),
        ("8GiB", 8 * 2**30),
        ("512MB", 512 * 10**6),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("100", 100),
        ("64KiB", 65536),
        ("2TB", 2 * 10**12),
        ("8e9", 8 * 10**9),  # a number without a unit, as `--max-gpu-mem 8e9` gives it
        ("8.5e9", 8_500_000_000),
        ("7.5GB", 7_500_000_000),
        ("1.5e3MB", 1_500_000_000),
        (8e9, 8 * 10**9),  # floats are bytes, as ints are
        (8.5e9, 8_500_000_000),
        (1000.9, 1000),  # rounded down
    ],
)
def test_sizes(value, expected):
    assert parse_size(value, "max_gpu_mem") == expected


@pytest.mark.parametrize("value", ["8Gb", "8gb", "512Mb"])
def test_bits_are_refused_with_a_hint(value):
    with pytest.raises(ValueError, match=r"max_gpu_mem=.* is in bits; did you mean"):
        parse_size(value, "max_gpu_mem")


@pytest.mark.parametrize("value", ["8XB", "8 gigs", "GB", "", "-1GB", "1e", "e9", "1e9.5"])
def test_unknown_units_and_garbage_are_refused(value):
    with pytest.raises(ValueError, match="max_cpu_mem"):
        parse_size(value, "max_cpu_mem")


def test_wrong_types_are_refused():
    for value in (True, None, [8], {0: "8GB"}):
        with pytest.raises(TypeError, match="max_gpu_mem"):
            parse_size(value, "max_gpu_mem")
    for value in (-5, -1.0):
        with pytest.raises(ValueError, match="negative"):
            parse_size(value, "max_gpu_mem")
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_gpu_mem must be a finite number of bytes"):
            parse_size(value, "max_gpu_mem")


def test_format_size():
    assert format_size(3 * 2**30) == "3.00 GiB"
    assert format_size(1536) == "1.50 KiB"
    assert format_size(1023) == "1023 B"


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        (100 * 2**30, 90 * 2**30),  # 10% headroom above 10 GiB
        (5 * 2**30, 4 * 2**30),  # at least 1 GiB of headroom
        (2**29, 0),  # less than the headroom: nothing, never negative
    ],
)
def test_host_available_keeps_headroom(monkeypatch, available, expected):
    import types

    from neuzip_offload import budget

    monkeypatch.setattr(
        budget.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=available)
    )
    assert host_available() == expected


def test_host_total_is_the_machines_memory():
    from neuzip_offload.budget import host_total

    assert host_total() >= host_available() > 0
