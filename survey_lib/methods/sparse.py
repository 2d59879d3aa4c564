"""Sparse execution: run pruned Linear/Conv2d layers with a torch sparse CSR kernel, and find where it pays.

A masked (pruned) model computes exactly as many MACs as the dense one: the dense kernel multiplies the
zeros too. :class:`SparseLinear` and :class:`SparseConv2d` store the weight in CSR (``crow_indices``,
``col_indices``, ``values`` buffers) and compute ``W_csr @ x`` (a convolution as a matmul over im2col
columns from ``torch.nn.functional.unfold``), touching only the non-zeros. Whether that is *faster*
depends on the sparsity, the shape and the batch: :func:`sparsity_latency_sweep` measures it
(dense vs sparse interleaved with :func:`survey_lib.cost.compare_latency`) and :func:`crossover_sparsity`
reads off the sparsity from which the sparse kernel wins. Inference only (no gradients through CSR).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_fraction, check_int, check_model, check_seed, check_tensor, check_type
from ..cost.latency import MIN_RUNS, compare_latency
from .base import Context, check_ctx, mark, replace_module

# ----------------------------------------------------------------------------------------------------------
# Sparse layers
# ----------------------------------------------------------------------------------------------------------


def _csr_parts(weight2d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(crow_indices, col_indices, values) of a 2-D weight; int32 indices when they fit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = weight2d.detach().to_sparse_csr()
    idx_dtype = torch.int32 if weight2d.numel() < 2**31 else torch.int64
    return csr.crow_indices().to(idx_dtype), csr.col_indices().to(idx_dtype), csr.values().clone()


class _SparseBase(nn.Module):
    """CSR weight held in three buffers; the torch sparse tensor is built once and cached."""

    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor

    def _init_csr(self, weight2d: Tensor, bias: Tensor | None) -> None:
        crow, col, vals = _csr_parts(weight2d)
        self.weight_shape2d = tuple(weight2d.shape)
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        self.register_buffer("values", vals)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._cache: tuple[Any, Tensor] | None = None

    def csr(self) -> Tensor:
        """The weight as a torch sparse CSR tensor (rebuilt when a buffer is replaced or edited)."""
        key = tuple((t.data_ptr(), t._version) for t in (self.crow_indices, self.col_indices, self.values))
        if self._cache is None or self._cache[0] != key:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                t = torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                            self.weight_shape2d, check_invariants=True)
            self._cache = (key, t)
        return self._cache[1]

    @property
    def nnz(self) -> int:
        """Stored non-zeros."""
        return int(self.values.numel())

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights."""
        return 1.0 - self.nnz / math.prod(self.weight_shape2d)

    def dense_weight2d(self) -> Tensor:
        """The weight as a dense 2-D tensor."""
        return self.csr().to_dense()

    def __deepcopy__(self, memo: dict) -> "_SparseBase":
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():  # the cached sparse tensor is rebuilt on demand
            new.__dict__[k] = None if k == "_cache" else copy.deepcopy(v, memo)
        return new


class SparseLinear(_SparseBase):
    """``y = x W^T + b`` with W in CSR: computed as ``(W_csr @ x^T)^T``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear needs an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_csr(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x of shape {tuple(x.shape)} does not fit SparseLinear: its last dim must be "
                             f"in_features={self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = (self.csr() @ x2.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, sparsity={self.sparsity:.3f}"


class SparseConv2d(_SparseBase):
    """A Conv2d (groups=1, zero padding) as CSR matmul over im2col columns (``F.unfold``)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SparseConv2d needs an nn.Conv2d, got {type(conv).__name__}")
        reason = unsupported_conv(conv)
        if reason:
            raise ValueError(f"SparseConv2d cannot run this Conv2d: {reason}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        self._init_csr(conv.weight.reshape(conv.out_channels, -1), conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x, ndim=(3, 4), shape="(N, C, H, W) or (C, H, W)")
        if x.shape[-3] != self.in_channels:
            raise ValueError(f"x of shape {tuple(x.shape)} does not fit SparseConv2d: it has {x.shape[-3]} channels, "
                             f"the conv expects in_channels={self.in_channels}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        csr = self.csr()
        y = torch.stack([csr @ cols[i] for i in range(n)])  # (N, O, L): one CSR matmul per item, no transpose copy
        if self.bias is not None:
            y = y + self.bias[None, :, None]
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        y = y.reshape(n, self.out_channels, ho, wo)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, nnz={self.nnz}, sparsity={self.sparsity:.3f}")


def unsupported_conv(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot become a SparseConv2d (None if it can)."""
    check_type("conv", conv, nn.Conv2d, "an nn.Conv2d")
    if conv.groups != 1:
        return f"groups={conv.groups} (only groups=1)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (only explicit padding)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros')"
    return None


def to_sparse_linear(linear: nn.Linear) -> SparseLinear:
    """A CSR copy of ``linear`` (same outputs)."""
    return SparseLinear(linear)


def to_sparse_conv2d(conv: nn.Conv2d) -> SparseConv2d:
    """A CSR-matmul copy of ``conv`` (same outputs)."""
    return SparseConv2d(conv)


def _layer_sparsity(m: nn.Module) -> float:
    w = m.weight.detach()
    return 1.0 - int(torch.count_nonzero(w)) / w.numel()


def sparsify(model: nn.Module, ctx: Context | None = None, *, min_sparsity: float = 0.0) -> nn.Module:
    """A copy of ``model`` whose Linear/Conv2d layers with at least ``min_sparsity`` zeros run as CSR.

    Grouped/depthwise convs and non-zero padding modes stay dense (listed in ``compression["skipped"]``).
    Inference only: the sparse layers have no weight gradients.
    """
    check_model(model)
    check_ctx(ctx, optional=True)
    check_sparsity(min_sparsity, "min_sparsity", allow_zero=True)
    result = copy.deepcopy(model)
    converted, skipped = [], {}
    for name, m in list(result.named_modules()):
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or isinstance(m, _SparseBase):
            continue
        if _layer_sparsity(m) < min_sparsity:
            skipped[name] = f"sparsity {_layer_sparsity(m):.3f} < min_sparsity"
            continue
        if isinstance(m, nn.Conv2d) and unsupported_conv(m):
            skipped[name] = unsupported_conv(m)
            continue
        new = SparseLinear(m) if isinstance(m, nn.Linear) else SparseConv2d(m)
        replace_module(result, name, new)
        converted.append(name)
    result.eval()
    return mark(result, "sparsify", "sparse_format", layers=converted, skipped=skipped, min_sparsity=min_sparsity)


def check_sparsity(value: Any, name: str = "sparsity", *, allow_zero: bool = True) -> float:
    """A sparsity in [0, 1) (or (0, 1)); NaN, negatives and values >= 1 raise ValueError."""
    return check_fraction(name, value, meaning=" (the fraction of zeros)", allow_zero=allow_zero)


# ----------------------------------------------------------------------------------------------------------
# Latency sweep
# ----------------------------------------------------------------------------------------------------------

SWEEP_COLUMNS = ("layer", "batch", "threads", "sparsity", "nnz", "dense_median_ms", "dense_iqr_ms",
                 "sparse_median_ms", "sparse_iqr_ms", "speedup", "runs", "kind")


def random_pruned(layer: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    """A copy of ``layer`` with a random ``sparsity`` fraction of its weights set to zero (unstructured)."""
    check_type("layer", layer, (nn.Linear, nn.Conv2d), "an nn.Linear or nn.Conv2d")
    check_sparsity(sparsity)
    check_seed(seed)
    new = copy.deepcopy(layer)
    w = new.weight.detach()
    g = torch.Generator().manual_seed(seed)
    n_zero = int(round(sparsity * w.numel()))
    order = torch.randperm(w.numel(), generator=g)[:n_zero]
    with torch.no_grad():
        new.weight.view(-1)[order] = 0.0
    return new


LAYER_SHAPES = {"linear": ("in", "out"), "conv": ("c_in", "c_out", "k", "hw")}


def make_layer(shape: dict[str, Any], seed: int = 0) -> tuple[nn.Module, Tensor, str]:
    """(layer, example input of batch 1, label) from ``{"linear": (in, out)}`` or ``{"conv": (c_in, c_out, k, hw)}``
    (a k x k conv with "same" padding on an hw x hw input); positive ints only."""
    accepted = "{'linear': (in, out)} or {'conv': (c_in, c_out, k, hw)} with positive ints"
    if not (isinstance(shape, dict) and len(shape) == 1 and next(iter(shape)) in LAYER_SHAPES):
        raise ValueError(f"shape must be {accepted}, got {shape!r}")
    kind, dims = next(iter(shape.items()))
    names = LAYER_SHAPES[kind]
    if not isinstance(dims, (tuple, list)) or len(dims) != len(names):
        raise ValueError(f"shape must be {accepted}, got {shape!r}")
    for name, d in zip(names, dims):
        check_int(f"shape[{kind!r}] {name}", d, min_value=1)
    check_seed(seed)
    torch.manual_seed(seed)
    if kind == "linear":
        i, o = dims
        return nn.Linear(i, o), torch.randn(1, i), f"linear {i}x{o}"
    ci, co, k, hw = dims
    return nn.Conv2d(ci, co, k, padding=k // 2), torch.randn(1, ci, hw, hw), f"conv {ci}->{co} {k}x{k} @{hw}x{hw}"


def sparsity_latency_sweep(
    shape: dict[str, Any] = {"linear": (1024, 1024)},  # noqa: B006 - read only
    sparsities: Sequence[float] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
    batch: Sequence[int] = (1, 32),
    threads: int = 1,
    runs: int = MIN_RUNS,
    warmup: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Measured eager latency of the dense kernel vs the CSR kernel on the same pruned layer.

    One row per (batch, sparsity): median and IQR of each (ms, interleaved in one process), and
    ``speedup`` = dense median / sparse median (> 1: sparse is faster).
    """
    for param, values in (("sparsities", sparsities), ("batch", batch)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"{param} must be a non-empty list or tuple, got {values!r}")
    for s in sparsities:
        check_sparsity(s)
    for b in batch:
        check_int("batch", b, min_value=1)
    layer, x, label = make_layer(shape, seed)
    rows = []
    for b in batch:
        for s in sparsities:
            dense = random_pruned(layer, s, seed).eval()
            sp = SparseLinear(dense) if isinstance(dense, nn.Linear) else SparseConv2d(dense)
            res = compare_latency({"dense": dense, "sparse": sp}, x, batch=b, threads=threads, runs=runs,
                                  warmup=warmup, seed=seed)
            d, q = res["dense"], res["sparse"]
            rows.append({"layer": label, "batch": b, "threads": threads, "sparsity": float(s), "nnz": sp.nnz,
                         "dense_median_ms": d.median_ms, "dense_iqr_ms": d.iqr_ms, "sparse_median_ms": q.median_ms,
                         "sparse_iqr_ms": q.iqr_ms, "speedup": d.median_ms / q.median_ms, "runs": runs,
                         "kind": "measured"})
    return pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))


GROUP_COLUMNS = ("layer", "batch", "threads")


def crossover_sparsity(df: pd.DataFrame) -> float | None:
    """The sparsity from which the sparse kernel beats the dense one, linearly interpolated.

    Uses ``speedup`` (dense / sparse time; or the two median columns) of one (layer, batch, threads)
    configuration, sorted by sparsity. Returns the first sparsity from which sparse stays faster at every
    measured point above it (so one noisy win below the real crossover does not count): the interpolated
    point where speedup crosses 1 between the last losing and the first winning point, the lowest
    sparsity if sparse wins everywhere, and None if it does not win at the highest sparsity measured.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    if df.empty:
        raise ValueError("df is empty")
    if "sparsity" not in df:
        raise ValueError(f"df needs a 'sparsity' column (a sparsity_latency_sweep table), got columns {list(df.columns)}")
    for col in GROUP_COLUMNS:
        if col in df and df[col].nunique() > 1:
            raise ValueError(f"df mixes several {col!r} values; pass one configuration (or use crossover_table)")
    if "speedup" in df:
        speed = df["speedup"].to_numpy(dtype=float)
    elif {"dense_median_ms", "sparse_median_ms"} <= set(df):
        speed = df["dense_median_ms"].to_numpy(dtype=float) / df["sparse_median_ms"].to_numpy(dtype=float)
    else:
        raise ValueError("df needs a 'speedup' column or 'dense_median_ms' and 'sparse_median_ms'")
    s = df["sparsity"].to_numpy(dtype=float)
    if not (np.isfinite(s).all() and np.isfinite(speed).all() and (speed > 0).all()):
        raise ValueError("df holds NaN, inf or non-positive sparsity/speedup values: a failed measurement?")
    order = np.argsort(s, kind="stable")
    s, speed = s[order], speed[order]
    wins = speed > 1.0
    if not wins[-1]:
        return None
    losing = np.flatnonzero(~wins)
    if losing.size == 0:
        return float(s[0])
    i = int(losing[-1])  # last losing point; i + 1 wins, and so does everything above
    s0, s1, v0, v1 = s[i], s[i + 1], speed[i], speed[i + 1]
    return float(s0 + (1.0 - v0) * (s1 - s0) / (v1 - v0))


def crossover_table(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`crossover_sparsity` per (layer, batch, threads) configuration of a sweep."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    if df.empty:
        raise ValueError("df is empty")
    keys = [c for c in GROUP_COLUMNS if c in df]
    if not keys:
        return pd.DataFrame([{"crossover_sparsity": crossover_sparsity(df), "kind": "measured"}])
    rows = []
    for key, group in df.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(keys, key)), "crossover_sparsity": crossover_sparsity(group),
                     "max_speedup": float(group["speedup"].max()) if "speedup" in group else float("nan"),
                     "kind": "measured"})
    return pd.DataFrame(rows)


__all__ = [
    "SparseLinear",
    "SparseConv2d",
    "to_sparse_linear",
    "to_sparse_conv2d",
    "unsupported_conv",
    "sparsify",
    "check_sparsity",
    "random_pruned",
    "make_layer",
    "sparsity_latency_sweep",
    "crossover_sparsity",
    "crossover_table",
]
