"""Argument checks that fail early with a message naming the parameter and what it accepts."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

MAX_SEED = 2**63 - 1


def check_choice(param: str, value: Any, choices: Iterable[Any]) -> Any:
    """Raise ValueError unless ``value`` is one of ``choices``; return it."""
    choices = list(choices)
    if value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{param}={value!r} is not supported; accepted values: {accepted}")
    return value


def check_device(device: Any, param: str = "device") -> str:
    """``device`` as a string ("cpu", "cuda" or "cuda:N"); ValueError naming ``param`` for any other value, and for
    a CUDA device on a machine whose torch sees none (or fewer)."""
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"{param} must be a str such as 'cpu' or 'cuda', got {type(device).__name__} ({device!r})")
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ValueError(f"{param}={device!r} is not supported; accepted values: 'cpu', 'cuda', 'cuda:N'")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count <= (int(index) if index else 0):
            raise ValueError(f"{param}={device!r}: this machine's torch {torch.__version__} sees {count} CUDA device(s); "
                             "accepted values here: 'cpu'" + (", 'cuda'" if count else ""))
    return device


def check_int(param: str, value: Any, *, min_value: int | None = None, max_value: int | None = None) -> int:
    """Raise TypeError unless ``value`` is an integer (NumPy ones too), ValueError unless in [min_value, max_value]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{param} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    _check_range(param, value, min_value, max_value)
    return value


def check_float(param: str, value: Any, *, min_value: float | None = None, max_value: float | None = None) -> float:
    """Raise TypeError unless ``value`` is a real number, ValueError unless finite and in [min_value, max_value]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{param} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"{param} must be a finite number, got {value!r}")
    _check_range(param, value, min_value, max_value)
    return float(value)


def _check_range(param: str, value: float, lo: float | None, hi: float | None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        raise ValueError(f"{param}={value!r} is out of range; accepted: {lo_s} <= {param} <= {hi_s}")


def check_seed(seed: Any) -> int:
    """Raise unless ``seed`` is an int in [0, 2**63 - 1] (what torch's generators accept)."""
    return check_int("seed", seed, min_value=0, max_value=MAX_SEED)


def check_type(param: str, value: Any, types: type | tuple[type, ...], expected: str) -> Any:
    """Raise TypeError naming ``param`` and ``expected`` unless ``value`` is an instance of ``types``."""
    if not isinstance(value, types):
        raise TypeError(f"{param} must be {expected}, got {type(value).__name__}")
    return value


def check_fraction(param: str, value: Any, *, meaning: str = "", allow_zero: bool = True) -> float:
    """A number in [0, 1) (or (0, 1) without ``allow_zero``); TypeError or ValueError naming ``param``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{param} must be a number in the range [0, 1), got {type(value).__name__} ({value!r})")
    v = float(value)
    low_ok = v >= 0.0 if allow_zero else v > 0.0
    if not (math.isfinite(v) and low_ok and v < 1.0):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{param}={value!r} is out of range; accepted range: {interval}{meaning}")
    return v


def check_model(model: Any) -> Any:
    """Raise TypeError unless ``model`` is a torch.nn.Module; return it."""
    from torch import nn

    return check_type("model", model, nn.Module, "a torch.nn.Module")


def check_bool(param: str, value: Any) -> bool:
    """Raise TypeError unless ``value`` is True or False; return it."""
    return check_type(param, value, bool, "True or False")


def check_tensor(param: str, value: Any, *, ndim: int | tuple[int, ...] | None = None, shape: str = "") -> Any:
    """TypeError unless ``value`` is a torch.Tensor; ValueError unless it has ``ndim`` dims (``shape`` names them)."""
    import torch

    check_type(param, value, torch.Tensor, "a torch.Tensor" + (f" of shape {shape}" if shape else ""))
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if dims is not None and value.dim() not in dims:
        raise ValueError(f"{param} must have shape {shape or f'with {ndim} dims'}, got {tuple(value.shape)}")
    return value


def check_finite(param: str, value: Any) -> Any:
    """Raise ValueError if the tensor ``value`` holds NaN or inf; return it."""
    import torch

    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{param} must be finite: it holds NaN or inf")
    return value


def check_labels(param: str, value: Any, num_classes: int) -> Any:
    """Raise TypeError unless ``value`` is an integer tensor, ValueError unless its classes lie in [0, num_classes)."""
    import torch

    check_tensor(param, value)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{param} must hold integer class indices (e.g. int64), got {value.dtype}")
    lo, hi = (int(value.min()), int(value.max())) if value.numel() else (0, 0)
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{param} holds class {lo if lo < 0 else hi}; accepted classes: 0..{num_classes - 1} "
                         f"(the task has {num_classes} classes)")
    return value


def check_mapping(param: str, value: Any, expected: str) -> Any:
    """Raise TypeError naming ``param`` and ``expected`` unless ``value`` is a Mapping (a dict)."""
    from collections.abc import Mapping

    return check_type(param, value, Mapping, expected)


def run_forward(model: Any, x: Any, param: str = "example_input") -> Any:
    """``model(x)``; a shape/dtype mismatch (RuntimeError/IndexError in torch) becomes a ValueError naming ``param``."""
    try:
        return model(x)
    except (RuntimeError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{param} of shape {tuple(getattr(x, 'shape', ()))} ({getattr(x, 'dtype', type(x).__name__)}) "
            f"does not fit model: {first} "
            "(dim 0 is the batch: pass x.unsqueeze(0) for a single example)"
        ) from err
