"""compress() and decompress(): float tensors ⇄ CompressedTensor.

Splitting into planes runs where the tensor is (Triton on CUDA, torch on the CPU); so does rANS
encoding (the Triton encoder: one launch for a call's CUDA tensors of one setting; else the
vectorized CPU encoder), while zstd encodes on the CPU. Decoding runs where the compressed planes
are: on CUDA the rANS Triton kernel writes finished floats; on the CPU the zstd frames (thread
pool) or the vectorized torch rANS decoder produce symbols that the plane merge turns into
floats.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Executor

import torch
import zstandard
from tqdm.auto import tqdm

from . import compressed as fmt
from .compressed import CompressedTensor, DamagedDataError, Header
from .config import CodecConfig
from .kernels import HAS_TRITON, ans, ans_encode_triton, ans_triton, planes, planes_triton, zstd
from .workers import shared_pool

log = logging.getLogger(__name__)


def _check_input(w: object, cfg: CodecConfig, label: str) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in planes.SUPPORTED_DTYPES:
        raise TypeError(f"{label} has dtype {w.dtype}; expected one of bfloat16, float16, float32")
    if w.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{label} is on {w.device}; expected a CPU or CUDA tensor")
    if cfg.mode == "lossy" and w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError(
            f"{label} contains inf or NaN; lossy mode needs finite values (use mode='lossless')"
        )
    return w


def _use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.device.type == "cuda"


def _split(w: torch.Tensor, cfg: CodecConfig):
    """(symbols, raw, scales) on w's device."""
    if cfg.mode == "lossless":
        sym, raw = planes_triton.split_triton(w) if _use_triton(w) else planes.split(w)
        return sym, raw, None
    fn = planes_triton.lossy_split_triton if _use_triton(w) else planes.lossy_split
    return fn(w, cfg.mantissa_bits, cfg.block_size, cfg.normalize)


def compress(
    w: torch.Tensor,
    mode: str = "lossless",
    *,
    codec: str | None = None,
    mantissa_bits: int = 3,
    block_size: int = 512,
    normalize: bool = True,
    chunk_size: int | None = None,
    config: CodecConfig | None = None,
    name: str | None = None,
) -> CompressedTensor:
    """Compress one float tensor (bf16, fp16 or fp32; any shape, contiguous or not).

    ``codec=None`` picks rANS for CUDA tensors (GPU decoding) and zstd for CPU tensors. The result
    lives on ``w.device``; see :class:`~neuzip_offload.config.CodecConfig` for the settings.
    """
    if config is None:
        config = CodecConfig(
            mode=mode,
            codec=codec,
            mantissa_bits=mantissa_bits,
            block_size=block_size,
            normalize=normalize,
            chunk_size=chunk_size,
        )
    return _compress_many([w], config, [name], [name or "w"])[0]


def compress_many(
    tensors: Sequence[torch.Tensor],
    config: CodecConfig | None = None,
    names: Sequence[str] | None = None,
    *,
    pool: Executor | None = None,
    progress: bool = False,
) -> list[CompressedTensor]:
    """Compress several tensors with one config; rANS encodes them in shared vectorized passes.

    ``names`` (optional) label the results, so that errors about them name the tensor.
    """
    if names is not None and len(names) != len(tensors):
        raise ValueError(f"names has {len(names)} entries for {len(tensors)} tensors")
    names = list(names) if names is not None else [None] * len(tensors)
    labels = [n or f"tensors[{i}]" for i, n in enumerate(names)]
    return _compress_many(tensors, config, names, labels, pool=pool, progress=progress)


def _compress_many(
    tensors: Sequence[torch.Tensor],
    config: CodecConfig | None,
    names: Sequence[str | None],
    labels: Sequence[str],
    *,
    pool: Executor | None = None,
    progress: bool = False,
) -> list[CompressedTensor]:
    config = config or CodecConfig()
    cfgs = [config.for_device(t.device) if isinstance(t, torch.Tensor) else config for t in tensors]
    for t, c, label in zip(tensors, cfgs, labels, strict=True):
        _check_input(t, c, label)
    parts = [_split(t, c) for t, c in zip(tensors, cfgs, strict=True)]
    # rANS: every tensor in one batch of passes; zstd: frames in the pool, tensor by tensor.
    ans_idx = [i for i, c in enumerate(cfgs) if c.codec == "ans"]
    streams: dict[int, ans.AnsStream] = {}
    by_settings: dict[tuple[int, int, int], list[int]] = {}
    for i in ans_idx:
        c = cfgs[i]
        by_settings.setdefault((c.resolved_chunk_size, c.lanes, c.prob_bits), []).append(i)
    for (chunk, lanes, pb), idx in by_settings.items():
        rest: list[int] = []
        on_device: dict[torch.device, list[int]] = {}
        for i in idx:  # encoded where they are: on a GPU by the Triton encoder
            if _use_triton(parts[i][0]):
                on_device.setdefault(parts[i][0].device, []).append(i)
            else:
                rest.append(i)
        for block in on_device.values():  # one launch over all their chunks
            encoded = ans_encode_triton.encode_block_triton(
                [parts[i][0] for i in block], chunk, lanes, pb
            )
            streams.update(zip(block, encoded, strict=True))
        encoded = ans.encode_many([parts[i][0].cpu() for i in rest], chunk, lanes, pb)
        streams.update(zip(rest, encoded, strict=True))
    built = []
    bar = tqdm(total=len(tensors), desc="compressing", unit="tensor", disable=not progress)
    for i, (t, c) in enumerate(zip(tensors, cfgs, strict=True)):
        sym, raw, scales = parts[i]
        chunk = c.resolved_chunk_size
        if c.codec == "ans":
            st = streams[i]
            exp, meta = st.words.view(torch.uint8), fmt.pack_ans_meta(st)
            # the tables' entries: read back with the CRCs below (not one sync per tensor)
            table_len: int | torch.Tensor = st.table_len.to(torch.int64).sum()
            table_len += st.table_len.numel()
        else:
            exp, offsets = zstd.encode(sym.cpu(), chunk, pool)
            meta, table_len = offsets.view(torch.uint8), 0
        # Planes live where the tensor is: the zstd planes (host-coded) move over; raw and scales
        # are already there (no host copies of device planes).
        final = {"exp": exp.to(t.device), "meta": meta.to(t.device), "raw": raw}
        if scales is not None:
            final["scales"] = scales
        if t.device.type == "cpu":
            crc: int | torch.Tensor = fmt.planes_crc(final)
        else:  # checksummed on the device; the values come back together below
            crc = fmt.planes_crc_tensor(final)
        built.append((final, table_len, crc))
        bar.update(1)
    bar.close()
    # one sync per device for all device CRCs and table lengths
    values = _host_values([b[2] for b in built] + [b[1] for b in built])
    crcs, table_lens = values[: len(built)], values[len(built) :]
    out = []
    for i, (t, c) in enumerate(zip(tensors, cfgs, strict=True)):
        final, table_len = built[i][0], table_lens[i]
        lossy = c.mode == "lossy"
        header = Header(
            dtype=t.dtype,
            shape=tuple(t.shape),
            mode=c.mode,
            codec=c.codec,
            mantissa_bits=c.mantissa_bits if lossy else 0,
            block_size=c.block_size if (lossy and c.normalize) else 1,
            normalize=lossy and c.normalize,
            chunk_size=c.resolved_chunk_size,
            lanes=c.lanes if c.codec == "ans" else Header.lanes,
            prob_bits=c.prob_bits if c.codec == "ans" else Header.prob_bits,
            table_len=table_len,
            exp_nbytes=final["exp"].numel(),
            crc=crcs[i],
        )
        out.append(CompressedTensor(header, final, names[i]))
    return out


def _host_values(values: Sequence[int | torch.Tensor]) -> list[int]:
    """Python ints of ints and 0-d tensors: the tensors of each device in one transfer (sync)."""
    out: list[int | None] = [v if isinstance(v, int) else None for v in values]
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
    for idx in by_device.values():
        got = torch.stack([values[i] for i in idx]).tolist()
        for i, g in zip(idx, got, strict=True):
            out[i] = int(g)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------


def _check_out(ct: CompressedTensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(ct.numel, dtype=ct.dtype, device=ct.device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != ct.dtype or out.numel() != ct.numel or out.device != ct.device:
        raise ValueError(
            f"out must be a {ct.dtype} tensor of {ct.numel} elements on {ct.device}; got "
            f"{out.dtype}, {out.numel()} elements on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return out.view(-1)


def _damaged(ct: CompressedTensor, what: str) -> DamagedDataError:
    return DamagedDataError(f"{ct.name or 'tensor'}: {what}")


def _merge_range(
    ct: CompressedTensor, sym: torch.Tensor, out: torch.Tensor, start: int, use_triton: bool
) -> None:
    """Symbols of elements [start, start + len) → floats in out[start : start + len]."""
    h = ct.header
    dst = out[start : start + sym.numel()]
    if h.lossy:
        scales = ct.planes.get("scales")
        if use_triton:
            assert start == 0
            planes_triton.lossy_merge_triton(
                sym, ct.planes["raw"], scales, h.mantissa_bits, h.block_size, h.dtype, out=dst
            )
        else:
            planes.lossy_merge(
                sym,
                ct.planes["raw"],
                scales,
                h.mantissa_bits,
                h.block_size,
                h.dtype,
                out=dst,
                start=start,
            )
    elif use_triton:
        assert start == 0
        planes_triton.merge_triton(sym, ct.planes["raw"], h.dtype, out=dst)
    else:
        planes.merge(sym, ct.planes["raw"], h.dtype, out=dst, start=start, total=h.numel)


def _fmt_code(h: Header) -> int:
    return planes.FMT_LOSSY if h.lossy else planes.FMT_OF[h.dtype]


def decode_into(
    ct: CompressedTensor,
    out: torch.Tensor,
    *,
    pool: Executor | None = None,
    workspace: torch.Tensor | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor | None:
    """Decode ``ct`` into the contiguous 1-D ``out`` (same device). The scheduler's entry point.

    On CUDA this only enqueues kernels and returns the per-chunk status (int8, 1 = ok) for the
    caller to check when it likes; on the CPU it checks at once and returns None.
    ``workspace``: scratch to reuse — int32 rANS decode tables on CUDA
    (``ans.table_words(n_chunks, prob_bits)`` words), the uint8 symbol buffer (numel
    bytes) for zstd on the CPU.
    ``use_triton`` forces the Triton path (tests run it on CPU tensors under TRITON_INTERPRET=1).
    """
    h = ct.header
    if h.numel == 0:
        return None
    triton_path = _use_triton(out) if use_triton is None else use_triton
    if h.codec == "ans" and triton_path:
        return ans_triton.decode_triton(
            ct.ans_stream(),
            ct.planes["raw"],
            ct.planes.get("scales"),
            out,
            fmt=_fmt_code(h),
            mantissa_bits=h.mantissa_bits,
            block_size=h.block_size,
            chunk_size=h.chunk_size,
            lanes=h.lanes,
            prob_bits=h.prob_bits,
            workspace=workspace,
        )
    if h.codec == "ans":
        _decode_ans_cpu([ct], [out])
        return None
    _decode_zstd(ct, out, pool, triton_path, workspace)
    return None


def _zstd_frames(
    ct: CompressedTensor, pool: Executor | None, workspace: torch.Tensor | None = None
):
    """(symbols buffer, iterator of decoded frames) for a zstd-coded tensor."""
    h = ct.header
    exp, meta = ct.planes["exp"], ct.planes["meta"]
    if exp.device.type != "cpu":  # zstd is a host coder: bring the (small) coded planes over
        exp, meta = exp.cpu(), meta.cpu()
    offsets = meta.view(torch.int64)
    problem = zstd.validate(exp, offsets, h.numel, h.chunk_size)
    if problem:
        raise _damaged(ct, problem)
    if workspace is not None and workspace.device.type == "cpu" and workspace.numel() >= h.numel:
        symbols = workspace.view(torch.uint8)[: h.numel]
    else:
        symbols = torch.empty(h.numel, dtype=torch.uint8)
    return symbols, zstd.decode(exp, offsets, symbols, h.chunk_size, pool)


def _finish_zstd(ct: CompressedTensor, out: torch.Tensor, frames, symbols, triton_path: bool):
    """Merge the frames of one tensor as they arrive (at the end when they would split a block)."""
    h = ct.header
    # Lossless merges are a few byte operations: worth doing per frame, as frames arrive.
    # Lossy merges cost more per call: one merge once every frame is in.
    per_frame = out.device.type == "cpu" and not triton_path and not h.lossy
    try:
        for start, sym in frames:
            if per_frame:
                _merge_range(ct, sym, out, start, use_triton=False)
    except (ValueError, zstandard.ZstdError) as e:
        if isinstance(e, DamagedDataError):
            raise
        raise _damaged(ct, f"an exponent frame does not decode ({e})") from e
    if not per_frame:
        _merge_range(ct, symbols.to(out.device), out, 0, use_triton=triton_path)


def _decode_zstd(
    ct: CompressedTensor,
    out: torch.Tensor,
    pool: Executor | None,
    triton_path: bool,
    workspace: torch.Tensor | None = None,
) -> None:
    symbols, frames = _zstd_frames(ct, pool, workspace)
    _finish_zstd(ct, out, frames, symbols, triton_path)


def _decode_ans_cpu(cts: Sequence[CompressedTensor], outs: Sequence[torch.Tensor]) -> None:
    by_settings: dict[tuple[int, int, int], list[int]] = {}
    for i, ct in enumerate(cts):
        h = ct.header
        problem = ct.structure_problem()
        if problem:
            raise _damaged(ct, problem)
        by_settings.setdefault((h.chunk_size, h.lanes, h.prob_bits), []).append(i)
    for (chunk, lanes, pb), idx in by_settings.items():
        streams = [_cpu_stream(cts[i]) for i in idx]
        symbols, oks = ans.decode_many(streams, [cts[i].numel for i in idx], chunk, lanes, pb)
        for i, sym, ok in zip(idx, symbols, oks, strict=True):
            if not bool(ok.all()):
                bad = int((~ok).nonzero()[0, 0])
                raise _damaged(cts[i], f"rANS chunk {bad} does not decode to its end state")
            _merge_range(cts[i], sym.to(outs[i].device), outs[i], 0, use_triton=False)


def _cpu_stream(ct: CompressedTensor) -> ans.AnsStream:
    st = ct.ans_stream()
    if ct.device.type == "cpu":
        return st
    return ans.AnsStream(
        *(
            t.cpu()
            for t in (
                st.words,
                st.states,
                st.word_offsets,
                st.table_lo,
                st.table_len,
                st.table_freq,
            )
        )
    )


def verify_checksums(cts: Sequence[CompressedTensor]) -> None:
    """Check every tensor's planes against the CRC-32 in its header.

    Host planes are checksummed with zlib; CUDA planes on their device (kernels/crc.py), with the
    CRCs of all CUDA tensors brought back together: one host sync per device, which decompress()
    allows itself (the scheduler's per-block path, decode_into, never calls this).
    Raises DamagedDataError naming the first tensor whose data fails its checksum.
    """
    got = _host_values(
        [
            fmt.planes_crc(ct.planes)  # zlib
            if ct.device.type == "cpu"
            else fmt.planes_crc_tensor(ct.planes)  # enqueued on the device, no sync yet
            for ct in cts
        ]
    )
    for ct, crc in zip(cts, got, strict=True):
        if crc != ct.header.crc:
            raise _damaged(
                ct,
                f"the data fails its checksum (CRC-32 of the planes {crc:#010x}, "
                f"header {ct.header.crc:#010x})",
            )


def decompress(
    ct: CompressedTensor,
    out: torch.Tensor | None = None,
    *,
    pool: Executor | None = None,
    verify: bool = True,
) -> torch.Tensor:
    """Decode ``ct`` to a tensor of its dtype and shape on its device (into ``out`` if given).

    ``verify`` first checks the planes against the header's CRC-32 (on the device for CUDA planes,
    one host sync); pass False where the bytes were checked when read (the scheduler does).
    Raises DamagedDataError, naming the tensor, when the data fails its checksum or does not
    decode consistently.
    """
    if not isinstance(ct, CompressedTensor):
        raise TypeError(f"ct must be a CompressedTensor, got {type(ct).__name__}")
    flat = _check_out(ct, out)
    if verify:
        verify_checksums([ct])
    status = decode_into(ct, flat, pool=pool)
    if status is not None and not bool(status.all()):  # CUDA: one sync, at the user's request
        bad = int((status == 0).nonzero()[0, 0])
        raise _damaged(ct, f"rANS chunk {bad} does not decode to its end state")
    return flat.view(ct.shape)


def decompress_many(
    cts: Sequence[CompressedTensor],
    outs: Sequence[torch.Tensor | None] | None = None,
    *,
    pool: Executor | None = None,
    verify: bool = True,
) -> list[torch.Tensor]:
    """Decode several tensors (into ``outs`` where given).

    CPU rANS tensors share vectorized passes (much faster than one by one); zstd frames of all
    tensors decode on ``pool`` (a thread pool made for the call when none is given).
    ``verify`` first checks every tensor's CRC-32 (see :func:`decompress`; the CUDA tensors' CRCs
    come back in one sync).
    """
    if outs is not None and len(outs) != len(cts):
        raise ValueError(f"outs has {len(outs)} entries for {len(cts)} tensors")
    for i, ct in enumerate(cts):
        if not isinstance(ct, CompressedTensor):
            raise TypeError(f"cts[{i}] must be a CompressedTensor, got {type(ct).__name__}")
    flat = [_check_out(ct, None if outs is None else outs[i]) for i, ct in enumerate(cts)]
    if verify:
        verify_checksums(cts)
    cpu_ans = {i for i, ct in enumerate(cts) if ct.codec == "ans" and ct.device.type == "cpu"}
    batch = [i for i in sorted(cpu_ans) if cts[i].numel]
    if batch:
        _decode_ans_cpu([cts[i] for i in batch], [flat[i] for i in batch])
    host_zstd = [
        i for i, ct in enumerate(cts) if ct.codec == "zstd" and flat[i].device.type == "cpu"
    ]
    if pool is None and host_zstd:
        pool = shared_pool()
    # every frame of every tensor is queued first; merging follows in order, in this thread
    started = [(i, *_zstd_frames(cts[i], pool)) for i in host_zstd]
    for i, symbols, frames in started:
        _finish_zstd(cts[i], flat[i], frames, symbols, triton_path=False)
    for i, ct in enumerate(cts):
        if i not in cpu_ans and i not in host_zstd:
            decompress(ct, flat[i], pool=pool, verify=False)  # checked above
    return [o.view(ct.shape) for o, ct in zip(flat, cts, strict=True)]
