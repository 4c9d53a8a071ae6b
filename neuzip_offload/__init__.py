"""neuzip_offload: NeuZip-compressed weights, tiered offloading and prefetch for small GPUs.

Run a model under a device-memory budget, or compress single tensors:

    import neuzip_offload as nzo
    model = nzo.dispatch(model, max_gpu_mem="8GB")       # then model.generate(...) as usual
    ct = nzo.compress(w)                                 # or mode="lossy", mantissa_bits=3
    w2 = nzo.decompress(ct)

See README.md for the rest.
"""

from __future__ import annotations

import logging

from . import optim  # nzo.optim.SGD, nzo.optim.AdamW
from .api import dispatch, load, plan_model, undispatch
from .budget import parse_size
from .checkpoint import Checkpoint, CheckpointError
from .codec import compress, compress_many, decompress, decompress_many
from .compressed import FORMAT_VERSION, CompressedTensor, DamagedDataError
from .config import CodecConfig
from .conversion import convert
from .handle import Dispatched
from .model_analysis import estimate_reserve, model_from_config
from .options import DispatchError
from .save import save_compressed
from .scheduler.plan import Plan, PlanError

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "CodecConfig",
    "CompressedTensor",
    "DamagedDataError",
    "DispatchError",
    "Dispatched",
    "Plan",
    "PlanError",
    "compress",
    "compress_many",
    "convert",
    "decompress",
    "decompress_many",
    "dispatch",
    "estimate_reserve",
    "load",
    "model_from_config",
    "optim",
    "parse_size",
    "plan_model",
    "save_compressed",
    "undispatch",
]
__version__ = "0.1.0"
