"""Compression methods. Each is ``method(model, ctx, **config) -> nn.Module``: a new model, input untouched."""

from .base import CHANGES, Context, compression_info, mark

__all__ = ["CHANGES", "Context", "compression_info", "mark"]
