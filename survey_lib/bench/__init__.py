"""The standardized benchmark: a method registry, a declarative spec, and a resumable results store."""

from .registry import FAMILIES, Method, get_method, methods
from .store import ResultsStore, StoreError

__all__ = ["FAMILIES", "Method", "ResultsStore", "StoreError", "get_method", "methods"]
