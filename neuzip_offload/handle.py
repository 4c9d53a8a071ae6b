"""``model.neuzip``: the handle of a dispatched model, the one owner of its runtime state.

It holds the plan, the executor (which holds every block's compressed bytes: pinned host,
device, or their file), the trainer when training, the undo log of the module surgery, and one
record per compressed piece: its header, and where the bytes are when the executor does not
hold them as the format has them (a file; a decoded resident weight that is its own truth).
Others read through it: ``compressed_tensor(key)`` gives a piece's planes in host memory
(save_compressed, undispatch), ``export()`` the weights as a checkpoint stores them, and
the trainer reports re-encoded and updated pieces through :class:`PieceRecords`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor as ThreadPool
from dataclasses import dataclass
from types import MappingProxyType

import torch

from .codec import decompress
from .compressed import CompressedTensor
from .config import CodecConfig
from .encode import reencode
from .model_analysis import Weight
from .modules import CompressedLinear, CompressedModule
from .scheduler.executor import Executor
from .scheduler.plan import DEVICE, Plan
from .storage import PlaneLocation, pread_into
from .surgery import Attachment
from .training import Trainer


class PieceRecords:
    """Per compressed piece: its header (a tensor whose planes are placeholders on the meta
    device, or real where only the handle holds them) and its files (a loaded checkpoint)."""

    def __init__(
        self,
        compressed: dict[str, CompressedTensor],
        locations: dict[str, dict[str, PlaneLocation]],
    ):
        self._cts = compressed
        self._locations = locations
        self._decoded_truth: set[str] = set()  # the resident decoded weight is the truth

    @property
    def view(self) -> Mapping[str, CompressedTensor]:
        """Piece key → the tensor held here (read-only)."""
        return MappingProxyType(self._cts)

    def like(self, key: str) -> CompressedTensor:
        """The piece as recorded: its header gives the settings to re-encode it with."""
        return self._cts[key]

    def keep_decoded(self, key: str) -> None:
        """The piece's resident decoded weight is its truth now (updated, or lossless and kept
        decoded): no compressed copy is kept; it is encoded again when read."""
        self._decoded_truth.add(key)
        self._cts[key] = self._cts[key].placeholder()

    def reencoded(self, key: str, ct: CompressedTensor) -> None:
        """``ct`` replaced the piece in the executor, which holds its planes: keep its header."""
        self._cts[key] = ct.placeholder()

    def release(self, executor: Executor) -> None:
        """The executor holds every block's compressed bytes (pinned host, device, or its file),
        so only headers stay here: the model is not held twice. Weights that a lossless plan
        keeps decoded on the device keep no compressed copy either: they are encoded again when
        read (the encoder is deterministic: the same bytes). Lossy ones keep theirs (their
        decoded values do not give their bytes back)."""
        for key, ct in list(self._cts.items()):
            if key in self._locations or ct.device.type == "meta":
                continue
            if executor.tier_of(key) == DEVICE:
                if ct.header.lossy:
                    continue
                self._decoded_truth.add(key)
            self._cts[key] = ct.placeholder()

    def read(self, key: str, executor: Executor, pool: ThreadPool | None) -> CompressedTensor:
        """The piece with its planes in host memory: from the executor, which holds the only
        copy, read from its file if it stays on disk, or encoded from the decoded weight when
        that is the truth."""
        if key in self._decoded_truth:
            return reencode(executor.weight(key), self._cts[key], pool)
        ct = self._cts[key]
        if key not in self._locations:
            if ct.device.type == "meta":  # the executor holds the bytes
                ct = executor.compressed(key)
            return ct.cpu()
        planes = {}
        for k, loc in self._locations[key].items():
            planes[k] = torch.empty(loc.nbytes, dtype=torch.uint8)
            pread_into(loc, planes[k])
        return CompressedTensor.from_state(ct.header.to_json(), planes, key)


@dataclass(frozen=True)
class ExportedWeight:
    """A compressed weight as a checkpoint stores it."""

    name: str  # the parameter name of its first user
    aliases: tuple[str, ...]  # the names of its other users (tied weights)
    shape: torch.Size
    dtype: torch.dtype
    pieces: tuple[tuple[str, int, int], ...]  # (piece key, start, stop) along the split dim

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


class Dispatched:
    """What ``model.neuzip`` holds: the plan, the executor and how to undo the dispatch."""

    def __init__(
        self,
        plan: Plan,
        executor: Executor,
        config: CodecConfig,
        weights: list[Weight],
        records: PieceRecords,
        attachment: Attachment,
        pool: ThreadPool | None,
        mantissa_bits: dict[str, int | None],
        trainer: Trainer | None = None,
    ):
        self.plan = plan
        self.executor = executor
        self.device = executor.device
        self.config = config
        self.pool = pool  # the process's shared pool (workers.py)
        self.mantissa_bits = mantissa_bits  # k per tensor, when target_bits chose them
        self.trainer = trainer  # the fused optimizer's runtime (dispatch(trainable=True))
        self.attachment = attachment
        self._weights = weights
        self._records = records
        # weights decoded for state_dict(): tied users get the one tensor while it lives
        self._decoded: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._leave_out = False  # state_dict() without the compressed weights (save_compressed)
        for m in attachment.modules:
            m.read_weight_with(self.decoded)

    @property
    def optimizer(self):
        """The fused optimizer: change its hyper-parameters here (``.lr = ...``)."""
        if self.trainer is None:
            raise AttributeError("the model was not dispatched with trainable=True")
        return self.trainer.optimizer

    @property
    def compressed(self) -> Mapping[str, CompressedTensor]:
        """Piece key → what the handle holds of it: headers (meta planes) where the executor
        or a file holds the bytes, which is everywhere but lossy weights kept decoded."""
        return self._records.view

    def compressed_tensor(self, key: str) -> CompressedTensor:
        """A piece with its planes in host memory: from the executor, which holds the only copy
        (its pinned host buffer, or the device), read from its file if it stays on disk, or
        encoded from the decoded weight when that is the truth (resident decoded, lossless)."""
        return self._records.read(key, self.executor, self.pool)

    @contextlib.contextmanager
    def compressed_weights_left_out(self) -> Iterator[None]:
        """Within: ``state_dict()`` of the model leaves the compressed weights out (a writer that
        reads them compressed, piece by piece, need not decode the model)."""
        self._leave_out = True
        try:
            yield
        finally:
            self._leave_out = False

    def decoded(
        self, keys: Sequence[str], kind: type[CompressedModule] = CompressedLinear
    ) -> torch.Tensor | None:
        """A weight's current values on the host, decoded from its pieces ``keys`` (joined by
        ``kind.join``: along its split dimension, or stacked experts): what ``state_dict()`` of
        the model returns for a compressed weight. One weight at a time: the model is never
        decoded whole."""
        if self._leave_out:
            return None
        ident = tuple(keys)
        found = self._decoded.get(ident)
        if found is not None:
            return found
        ex = self.executor
        parts = []
        for key in keys:
            if ex.tier_of(key) == DEVICE:  # the decoded weight is the truth (trained in place)
                parts.append(ex.weight(key).detach().to("cpu", copy=True))
            else:
                parts.append(decompress(self.compressed_tensor(key), pool=self.pool).cpu())
        out = kind.join(parts)
        self._decoded[ident] = out
        return out

    def num_parameters(self) -> int:
        """Parameters of the model as dispatched: the compressed weights (which
        ``model.parameters()`` does not list: they are not nn.Parameters any more) plus the
        plain parameters it still has."""
        compressed = sum(w.shape.numel() for w in self._weights)
        model = self.attachment.model()
        plain = 0 if model is None else sum(p.numel() for p in model.parameters())
        return compressed + plain

    def export(self) -> list[ExportedWeight]:
        """The compressed weights in module order, as a checkpoint stores them; read each
        piece's planes with ``compressed_tensor``."""
        return [
            ExportedWeight(
                w.key, tuple(w.names[1:]), w.shape, w.dtype, tuple(tuple(p) for p in w.pieces)
            )
            for w in self._weights
        ]

    @property
    def stats(self) -> dict:
        """Bytes moved and decoded, time spent decoding, peak bytes held: per forward and total."""
        self.executor.settle()
        s = self.executor.stats
        return {
            "forwards": s.forwards,
            "per_forward": s.per_forward(),
            "copied_bytes": s.copied_bytes,
            "decoded_bytes": s.decoded_bytes,
            "decode_seconds": s.decode_seconds,
            "misses": s.misses,
            "peak_held_bytes": s.peak_held_bytes,
            "device_budget_bytes": self.plan.options.device_bytes,
            # mixture-of-experts models: experts used, found decoded, fetched; the guesses
            "experts": (
                self.executor.experts.stats.report(s.forwards)
                if any(b.routed for b in self.plan.blocks)
                else None
            ),
        }

    @property
    def events(self):
        return self.executor.events

    def close(self) -> dict[str, torch.Tensor]:
        """Stop the runtime and return every weight decoded, by key, on its original device
        (the host for a model built on meta), for ``Attachment.detach``."""
        if self.trainer is not None:
            self.trainer.close()
        ex = self.executor
        # Before the executor lets go of its memory, each piece as it is held: decoded (resident),
        # or compressed in host memory (host-tier planes stay valid views after close()).
        held = {
            key: ex.weight(key) if ex.tier_of(key) == DEVICE else self.compressed_tensor(key)
            for w in self._weights
            for key, _, _ in w.pieces
        }
        ex.close()  # its device memory is free again: pieces decode there one by one
        dev = self.device
        out = {}
        for w in self._weights:
            home = w.device if w.device.type != "meta" else torch.device("cpu")  # loaded: host
            parts = []
            for key, _, _ in w.pieces:
                piece = held.pop(key)
                if isinstance(piece, CompressedTensor):
                    if dev.type == "cuda" and piece.codec == "ans":  # the GPU decoder
                        piece = piece.to(dev)
                    piece = decompress(piece, pool=self.pool)
                parts.append(piece.to(home))
            out[w.key] = w.kind.join(parts)
        return out
