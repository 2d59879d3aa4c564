"""Compression methods. Each is ``method(model, ctx, **config) -> nn.Module``: a new model, input untouched.

Importing this package registers the storage formats the methods write ("sparse", "shared",
"deep_compression") with ``survey_lib.cost.stored_bytes``.
"""

from . import coding, pruning, sharing, sparse, structured
from .base import CHANGES, Context, compression_info, mark

__all__ = ["CHANGES", "Context", "compression_info", "mark", "coding", "pruning", "sharing", "sparse", "structured"]
