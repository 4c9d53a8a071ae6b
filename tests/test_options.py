"""DispatchOptions / TrainOptions: the user's arguments validated once, shared by dispatch, load
and plan_model; every refusal names the argument."""

from __future__ import annotations

import warnings

import pytest
import torch

import neuzip_offload as nzo
from neuzip_offload.options import DispatchOptions, TrainOptions
from tests.helpers import tiny_llama


def test_sizes_codec_and_rates_are_resolved_once():
    o = DispatchOptions.build(
        "2MiB",
        max_cpu_mem="1GB",
        reserve="64KiB",
        max_block_bytes="1KB",
        device="cpu",
        decode_gbps=7,
    )
    assert (o.device_bytes, o.host_bytes, o.reserve, o.max_block_bytes) == (
        2 << 20,
        10**9,
        64 << 10,
        1000,
    )
    assert o.device == torch.device("cpu")
    assert o.codec.codec == "zstd"  # the host's codec where the host decodes
    assert (o.decode_rate.gbps, o.decode_rate.source) == (7.0, "given")
    assert o.encode_budget is None  # a CPU dispatch encodes on the host
    assert DispatchOptions.build(1, device="cpu").decode_rate.source == "default"
    assert DispatchOptions.build(1, device="cpu", reserve=None).reserve is None
    assert DispatchOptions.build(1, device="cpu").reserve == "auto"


def test_a_plan_names_its_target_without_needing_it():
    o = DispatchOptions.build(10**9, max_cpu_mem=10**9, target_only=True)
    assert o.device.type == "cuda" and o.codec.codec == "ans"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda', but CUDA is not available"):
            DispatchOptions.build(10**9, device="cuda")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prefetch": -1}, "prefetch must be an int >= 0, got -1"),
        ({"prefetch": 1.5}, "prefetch"),
        ({"target_bits": 7.0}, "target_bits chooses lossy"),
        ({"mode": "lossy", "target_bits": 40}, "target_bits must be a number in 2..16, got 40"),
        ({"pcie_gbps": 0}, "pcie_gbps must be a positive number, got 0"),
        ({"disk_gbps": "fast"}, "disk_gbps"),
        ({"decode_gbps": -1}, "decode_gbps"),
        ({"mode": "lossy", "mantissa_bits": 9}, "mantissa_bits"),
        ({"mode": "fast"}, "mode"),
        ({"codec": "lz4"}, "codec"),
        ({"block_size": 100}, "block_size"),
        ({"granularity": "row"}, "granularity must be one of"),
        ({"reserve": "x"}, "reserve='x' is not a size"),
        ({"max_block_bytes": "8Gb"}, "max_block_bytes='8Gb' is in bits"),
        ({"max_cpu_mem": "1 parsec"}, "max_cpu_mem='1 parsec': unknown unit"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DispatchOptions.build("1GB", **{"device": "cpu", **kwargs})


def test_dispatch_load_and_plan_share_the_validation(tmp_path):
    """The same argument is refused with the same words wherever it is passed."""
    for call in (
        lambda **kw: nzo.dispatch(tiny_llama(), "1GB", progress=False, **kw),
        lambda **kw: nzo.plan_model(tiny_llama(), "1GB", max_cpu_mem="1GB", **kw),
        lambda **kw: nzo.load(tmp_path, "1GB", model=tiny_llama(), progress=False, **kw),
    ):
        for kw, match in (({"prefetch": -1}, "prefetch"), ({"pcie_gbps": -2}, "pcie_gbps")):
            with pytest.raises(ValueError, match=match):
                call(**kw)


def test_train_options_are_checked_before_anything_runs():
    sgd = nzo.optim.SGD()
    assert TrainOptions.build("lossless", sgd).optimizer is sgd
    with pytest.raises(ValueError, match="needs mode='lossless'"):
        TrainOptions.build("lossy", sgd)
    with pytest.raises(ValueError, match="needs optimizer="):
        TrainOptions.build("lossless", None)
    with pytest.raises(TypeError, match="cannot be fused"):
        TrainOptions.build("lossless", torch.optim.SGD([torch.zeros(1)], lr=0.1))
    for kw, match in (
        ({"grad_accum_steps": 0}, "grad_accum_steps must be an int >= 1, got 0"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm must be > 0 or None, got 0.0"),
        ({"clip_mode": "global"}, "clip_mode must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            TrainOptions.build("lossless", sgd, **kw)


def test_options_are_frozen():
    o = DispatchOptions.build(1, device="cpu")
    with pytest.raises(AttributeError):
        o.prefetch = 3


def test_the_gpu_codec_on_the_cpu_is_advised_against():
    with pytest.warns(UserWarning, match=r"codec='ans'.*slower than zstd"):
        DispatchOptions.build(10**8, device="cpu", codec="ans")


def test_a_float_budget_is_bytes():
    o = DispatchOptions.build(8e6, max_cpu_mem=8.5e6, reserve=1e3, device="cpu")
    assert (o.device_bytes, o.host_bytes, o.reserve) == (8_000_000, 8_500_000, 1000)
    assert nzo.plan_model(tiny_llama(), 8e6, max_cpu_mem=1e9, device="cpu").options.device_bytes
    assert DispatchOptions.build("8e6", device="cpu").device_bytes == 8_000_000


def test_a_budget_per_gpu_is_refused_until_several_gpus_are_supported():
    for budgets in ({0: "8GB", 1: "8GB"}, {0: 8e9, 1: 8e9, 2: 8e9}):
        with pytest.raises(
            ValueError, match="several GPUs are not supported yet.*max_gpu_mem='8GB'"
        ):
            DispatchOptions.build(budgets, target_only=True)
        with pytest.raises(ValueError, match="several GPUs are not supported yet"):
            nzo.plan_model(tiny_llama(), budgets)
    with pytest.raises(ValueError, match="names no GPU"):
        DispatchOptions.build({}, target_only=True)


def test_one_gpus_budget_in_accelerates_form_names_the_device():
    o = DispatchOptions.build({1: "8GB"}, max_cpu_mem="1GB", target_only=True)
    assert (o.device, o.device_bytes) == (torch.device("cuda", 1), 8 * 10**9)
    o = DispatchOptions.build({0: 8e9}, max_cpu_mem="1GB", device="cuda", target_only=True)
    assert (o.device, o.device_bytes) == (torch.device("cuda", 0), 8 * 10**9)
    with pytest.raises(ValueError, match=r"names GPU 0, but device='cpu'; pass device='cuda:0'"):
        DispatchOptions.build({0: "8GB"}, device="cpu")
    for budgets in ({"cpu": "8GB"}, {0: "8GB", "cpu": "30GB"}, {-1: "8GB"}):
        with pytest.raises(ValueError, match="a key must be a GPU index.*max_cpu_mem"):
            DispatchOptions.build(budgets, target_only=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda:0', but CUDA is not available"):
            nzo.dispatch(tiny_llama(), {0: "8GB"}, progress=False)


def test_a_budget_beyond_the_machine_is_warned_about_where_the_user_called():
    from neuzip_offload.budget import format_size, host_total

    host = format_size(host_total())
    with pytest.warns(
        UserWarning,
        match=rf"max_cpu_mem=909.49 TiB is more than this machine's "
        rf"memory \({host}\)",
    ) as w:
        nzo.plan_model(tiny_llama(), "8GB", max_cpu_mem="1000TB")
    assert w[0].filename == __file__  # at the user's call, not inside the library
    with pytest.warns(UserWarning, match=r"max_gpu_mem=909.49 TiB is more than this machine's"):
        DispatchOptions.build("1000TB", max_cpu_mem="1GB", device="cpu")
    if torch.cuda.is_available():
        with pytest.warns(UserWarning, match="max_gpu_mem=909.49 TiB is more than the memory"):
            DispatchOptions.build("1000TB", max_cpu_mem="1GB", device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the machine: nothing
        DispatchOptions.build("1GB", max_cpu_mem="1GB", device="cpu")
