"""neuzip_offload: NeuZip-compressed weights, tiered offloading and prefetch for small GPUs.

    import neuzip_offload as nzo
    ct = nzo.compress(w)                  # lossless; or mode="lossy", mantissa_bits=3
    w2 = nzo.decompress(ct)
"""

from __future__ import annotations

import logging

from .codec import compress, compress_many, decompress, decompress_many
from .compressed import FORMAT_VERSION, CompressedTensor, DamagedDataError
from .config import CodecConfig

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "FORMAT_VERSION",
    "CodecConfig",
    "CompressedTensor",
    "DamagedDataError",
    "compress",
    "compress_many",
    "decompress",
    "decompress_many",
]
__version__ = "0.1.0"
