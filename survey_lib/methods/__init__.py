"""Compression methods. Each is ``method(model, ctx, **config) -> nn.Module``: a new model, input untouched.

Importing this package registers the storage formats the methods write ("sparse", "shared",
"deep_compression", "packed") with ``survey_lib.cost.stored_bytes``.
"""

from . import coding, compact, distillation, dynamic, lowrank, packing, penni, pruning, quantization, search, sharing, sparse, structured, vbmf
from .base import CHANGES, Context, compression_info, mark

__all__ = ["CHANGES", "Context", "compression_info", "mark", "coding", "compact", "distillation", "dynamic", "lowrank", "packing", "penni", "pruning",
           "quantization", "search", "sharing", "sparse", "structured", "vbmf"]
