"""Deep Compression (Han et al., ICLR 2016): k-means weight sharing, and the files that make it real.

Pipeline: prune (zeros) -> share (each layer's non-zero weights snap to ``2**bits`` centroids; a layer
keeps a float ``codebook`` and an integer ``indices`` tensor, ``weight = codebook[indices]``) -> Huffman
code the index streams. Each stage has a storage format, registered with
:func:`survey_lib.cost.storage.register_format`, so ``stored_bytes(model)`` measures the real file:

* ``"sparse"``: every tensor as the smaller of raw bytes and relative-index sparse (fp32 values plus
  ``b``-bit gaps with filler zeros, :func:`survey_lib.methods.coding.encode_sparse`); a pruned weight
  becomes sparse, a BatchNorm vector stays raw.
* ``"shared"``: a shared layer as its fp32 codebook + ``bits``-bit packed codes of the non-zero weights
  + their relative positions (``b`` bits each); code 0 is the pruned zero. Other tensors as in "sparse".
* ``"deep_compression"``: as "shared", but the code stream and the gap stream are Huffman coded, each
  with its own canonical table (stored as code lengths).

File layout (all three): ``MAGIC (8 bytes) | uint32 header length | header | data streams``. The header is
DEFLATE-compressed JSON (names, dtypes, shapes, stream lengths: metadata only); every tensor byte is
in our own coding. :func:`load_stored` reads a file back into a model equal to the one written.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._io import as_path, not_valid, read_file, reading, take
from .._validate import check_finite, check_int, check_model, check_tensor, check_type
from ..cost.storage import model_tensors, register_format, stored_bytes, tensor_dtype
from ..train import Callback, TrainState
from .base import Context, check_ctx, mark, replace_module
from .coding import (
    best_index_bits,
    coded_bits,
    encode_sparse,
    decode_sparse,
    huffman_code,
    huffman_decode,
    huffman_encode,
    pack_bits,
    positions_from_relative,
    relative_index,
    table_from_bytes,
    table_to_bytes,
    unpack_bits,
    SparseTensor,
    numpy_dtype,
)

MAX_BITS = 16
MAGICS = {"sparse": b"SLSPARS1", "shared": b"SLSHARE1", "deep_compression": b"SLDEEPC1"}

# ----------------------------------------------------------------------------------------------------------
# 1-D k-means (Lloyd) with linear initialisation
# ----------------------------------------------------------------------------------------------------------


def _values(param: str, x: Any) -> np.ndarray:
    """``x`` as a flat float64 array; TypeError unless numeric, ValueError if empty or not finite."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"{param} must hold real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{param} must hold at least one value, got none")
    if not np.isfinite(a).all():
        raise ValueError(f"{param} holds NaN or inf")
    return a


def linear_init(x: np.ndarray, k: int) -> np.ndarray:
    """``k`` centroids evenly spaced over [min(x), max(x)] (Deep Compression's best initialisation)."""
    x = _values("x", x)
    return np.linspace(float(np.min(x)), float(np.max(x)), check_int("k", k, min_value=1))


def assign_1d(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of each value (``centroids`` sorted ascending; ties go up)."""
    x, centroids = _values("x", x), _values("centroids", centroids)
    if centroids.size > 1 and not bool((np.diff(centroids) >= 0).all()):
        raise ValueError("centroids must be sorted ascending")
    mid = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(mid, x, side="right")


def kmeans_1d(x: Any, k: int, *, init: np.ndarray | None = None, max_iter: int = 300) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means on scalars: returns (sorted centroids, labels, inertia).

    Starts from ``init`` (default :func:`linear_init`), alternates nearest-centroid assignment and
    mean update until the labels stop changing. An empty cluster is re-seeded at the value farthest from
    its centroid, so with ``k`` = number of distinct values every value ends up its own centroid
    (inertia 0): distinct values never share a cluster when no cluster is empty.
    """
    x = _values("x", x)
    check_int("k", k, min_value=1)
    check_int("max_iter", max_iter, min_value=1)
    distinct = np.unique(x).size
    if k > distinct:
        raise ValueError(f"k={k} is more clusters than x has distinct values ({distinct}); accepted: 1 <= k <= {distinct}")
    c = np.sort(linear_init(x, k) if init is None else _values("init", init))
    if c.size != k:
        raise ValueError(f"init has {c.size} centroids, expected k={k}")
    labels = None
    for _ in range(max_iter):
        new = assign_1d(x, c)
        counts = np.bincount(new, minlength=k)
        sums = np.bincount(new, weights=x, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            # re-seed each empty cluster at the currently worst-served value, then reassign
            err = (x - c[new]) ** 2
            far = np.argsort(-err, kind="stable")
            c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
            for e, i in zip(empty, far):
                c[e] = x[i]
            c = np.sort(c)
            labels = None
            continue
        c = sums / counts
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        c = np.sort(c)  # means of contiguous intervals stay sorted; sort guards float ties
    labels = assign_1d(x, c)
    # a cluster of equal values gets that value exactly (sum / count can be off by one ulp)
    lo = np.full(k, np.inf)
    hi = np.full(k, -np.inf)
    np.minimum.at(lo, labels, x)
    np.maximum.at(hi, labels, x)
    c = np.where(lo == hi, lo, c)
    inertia = float(((x - c[labels]) ** 2).sum())
    return c, labels, inertia


# ----------------------------------------------------------------------------------------------------------
# Shared layers: weight = codebook[indices]
# ----------------------------------------------------------------------------------------------------------


class _CodebookLookup(torch.autograd.Function):
    """``codebook[indices]`` whose backward sums each cluster's gradients in a fixed (serial) order.

    The autograd of plain indexing accumulates with parallel atomic adds on the CPU once a layer has
    32768 weights or more and torch runs 2+ threads, so the codebook gradient, and every fine-tuned
    codebook after it, changes in the last bits from run to run. ``torch.bincount`` sums serially in
    index order: the same inputs give the same bits at any thread count.
    """

    @staticmethod
    def forward(ctx: Any, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(indices)
        ctx.k = codebook.numel()
        return codebook[indices]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (indices,) = ctx.saved_tensors
        flat = grad.contiguous().reshape(-1)
        summed = torch.bincount(indices.reshape(-1), weights=flat, minlength=ctx.k)
        return summed.to(grad.dtype), None


def codebook_lookup(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``codebook[indices]`` with a deterministic codebook gradient (the sum of each cluster's gradients)."""
    return _CodebookLookup.apply(codebook, indices)


class _Shared:
    """Mixin: ``weight`` is computed from a fine-tunable ``codebook`` and an int ``indices`` buffer.

    With ``zero_code`` the codebook's entry 0 is the pruned zero: it is forced to 0 in the forward pass,
    so it never moves, and every other entry gets the sum of the gradients of the weights in its
    cluster (:func:`codebook_lookup`, summed in a fixed order so fine-tuning is bit-reproducible).
    """

    codebook: nn.Parameter
    indices: torch.Tensor
    zero_code: bool
    bits: int

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        cb = self.codebook
        if self.zero_code:
            cb = torch.cat([cb.new_zeros(1), cb[1:]])
        return codebook_lookup(cb, self.indices)

    @property
    def weight_bits(self) -> int:
        """Bits per stored weight (read by the cost counter)."""
        return self.bits

    def extra_repr(self) -> str:  # type: ignore[override]
        return f"{super().extra_repr()}, bits={self.bits}, codebook={self.codebook.numel()}, zero_code={self.zero_code}"


class SharedConv2d(_Shared, nn.Conv2d):
    """A Conv2d whose weight is ``codebook[indices]`` (build with :func:`make_shared`)."""


class SharedLinear(_Shared, nn.Linear):
    """A Linear whose weight is ``codebook[indices]`` (build with :func:`make_shared`)."""


def _fresh_like(layer: nn.Module) -> nn.Module:
    """A plain Conv2d/Linear with ``layer``'s configuration and bias (weights are replaced later)."""
    if isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode)
        new.__class__ = SharedConv2d
    elif isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
        new.__class__ = SharedLinear
    else:
        raise TypeError(f"only Conv2d and Linear layers can be shared, got {type(layer).__name__}")
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
    return new


def make_shared(layer: nn.Module, codebook: torch.Tensor, indices: torch.Tensor, bits: int, zero_code: bool) -> nn.Module:
    """A SharedConv2d/SharedLinear copy of ``layer`` (same config and bias) with the given codebook."""
    _check_codebook(codebook, indices, bits, zero_code)
    new = _fresh_like(layer)
    del new._parameters["weight"]
    new.codebook = nn.Parameter(codebook.detach().to(torch.float32).clone())
    new.register_buffer("indices", indices.detach().to(torch.int64).clone())
    new.zero_code = bool(zero_code)
    new.bits = int(bits)
    if tuple(new.indices.shape) != tuple(layer.weight.shape):
        raise ValueError(f"indices shape {tuple(new.indices.shape)} != weight shape {tuple(layer.weight.shape)}")
    return new


def _check_codebook(codebook: Any, indices: Any, bits: Any, zero_code: Any) -> None:
    """TypeError/ValueError unless codebook is a finite 1-D float tensor of <= 2**bits entries and every index
    points into it."""
    check_int("bits", bits, min_value=1, max_value=MAX_BITS)
    check_type("zero_code", zero_code, bool, "True or False")
    check_tensor("codebook", codebook, ndim=1, shape="(k,)")
    if not codebook.is_floating_point():
        raise TypeError(f"codebook must be a float tensor, got {codebook.dtype}")
    check_finite("codebook", codebook)
    if not 1 <= codebook.numel() <= 1 << bits:
        raise ValueError(f"codebook has {codebook.numel()} entries; bits={bits} allows 1..{1 << bits}")
    check_tensor("indices", indices)
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook.numel()):
        raise ValueError(f"indices must lie in 0..{codebook.numel() - 1} (the codebook's entries), "
                         f"got {int(indices.min())}..{int(indices.max())}")


def share_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(codebook, indices, zero_code) of one weight: k-means over its non-zero values.

    Exact zeros (a pruned weight) keep code 0 = 0.0 and the non-zeros get ``2**bits - 1`` clusters;
    without zeros all ``2**bits`` codes are clusters. Never more clusters than distinct values.
    """
    check_int("bits", bits, min_value=1, max_value=MAX_BITS)
    check_tensor("weight", weight)
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a float tensor, got {weight.dtype}")
    check_finite("weight", weight)
    w = weight.detach().cpu().to(torch.float64).reshape(-1).numpy()
    nz = np.flatnonzero(w)
    zero_code = nz.size < w.size
    k = (1 << bits) - int(zero_code)
    idx = np.zeros(w.size, dtype=np.int64)
    if nz.size == 0:
        return torch.zeros(1), torch.from_numpy(idx).reshape(weight.shape), True
    k = min(k, np.unique(w[nz]).size)
    if k == 0:  # bits=1 with zeros: the only code is the zero
        return torch.zeros(1), torch.from_numpy(idx).reshape(weight.shape), True
    centroids, labels, _ = kmeans_1d(w[nz], k)
    idx[nz] = labels + int(zero_code)
    cb = np.concatenate([[0.0], centroids]) if zero_code else centroids
    return torch.tensor(cb, dtype=torch.float32), torch.from_numpy(idx).reshape(weight.shape), zero_code


def shareable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear layers of ``model`` by name (already shared layers excluded)."""
    return {n: m for n, m in check_model(model).named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, _Shared)}


def _resolve_bits(model: nn.Module, bits: int | Mapping[str, int]) -> dict[str, int]:
    layers = shareable_layers(model)
    if not layers:
        raise ValueError("model has no Conv2d or Linear layer left to share (already shared ones are skipped)")
    if isinstance(bits, Mapping):
        unknown = [n for n in bits if n not in layers]
        if unknown:
            raise ValueError(f"bits names layers that are not shareable Conv2d/Linear layers: {unknown}; "
                             f"shareable: {list(layers)}")
        chosen = {n: check_int(f"bits[{n!r}]", b, min_value=1, max_value=MAX_BITS) for n, b in bits.items() if b is not None}
        if not chosen:
            raise ValueError(f"bits={dict(bits)!r} shares no layer; name at least one of {list(layers)}")
        return chosen
    check_int("bits", bits, min_value=1, max_value=MAX_BITS)
    return {n: bits for n in layers}


class KeepZeros(Callback):
    """Re-zero given weights after every optimizer step (pruned layers that are not shared)."""

    def __init__(self, params: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.params = dict(params)  # name -> (parameter, keep mask)

    def on_step_end(self, state: TrainState) -> None:
        """Apply the masks."""
        with torch.no_grad():
            for p, keep in self.params.values():
                p.mul_(keep.to(p.device))


def kmeans_share(
    model: nn.Module,
    ctx: Context | None = None,
    *,
    bits: int | Mapping[str, int] = 5,
    finetune: bool = True,
) -> nn.Module:
    """Deep Compression weight sharing: each Conv2d/Linear weight becomes ``codebook[indices]``.

    ``bits``: code width for every layer, or ``{layer name: bits}`` (unnamed layers stay as they are).
    Zeros of a pruned model stay exact zeros (code 0). With ``finetune`` and ``ctx.budget > 0`` the
    codebooks (and the remaining float parameters) are fine-tuned for ``ctx.budget`` epochs; pruned
    layers that are not shared keep their zeros. Returns a new model (storage format "shared").
    """
    check_model(model)
    check_ctx(ctx, optional=True)
    check_type("finetune", finetune, bool, "True or False")
    if finetune and ctx is None:
        raise ValueError("finetune=True needs a Context (ctx); pass finetune=False to share without training")
    result = copy.deepcopy(model)
    per_layer = _resolve_bits(result, bits)
    layers = shareable_layers(result)
    for name, b in per_layer.items():
        layer = layers[name]
        codebook, indices, zero_code = share_weight(layer.weight, b)
        shared = make_shared(layer, codebook, indices, b, zero_code)
        shared.train(layer.training)
        replace_module(result, name, shared)
    keep = {n + ".weight": (m.weight, (m.weight != 0).to(m.weight.dtype)) for n, m in layers.items()
            if n not in per_layer and bool((m.weight == 0).any())}
    if finetune and ctx.budget > 0:
        ctx.finetune(result, callbacks=[KeepZeros(keep)])
    result.eval()
    zeros = any(isinstance(m, _Shared) and m.zero_code for m in result.modules())
    mark(result, "kmeans_share", ("low_bit_storage", "sparse_format") if zeros else "low_bit_storage",
         bits=bits if isinstance(bits, int) else dict(per_layer), layers=list(per_layer),
         finetune_epochs=ctx.budget if (finetune and ctx is not None) else 0)
    result.storage_format = "shared"
    return result


def sparse_storage(model: nn.Module, ctx: Context | None = None) -> nn.Module:
    """A copy of a pruned ``model`` that is stored in the "sparse" format (relative-index CSR)."""
    check_ctx(ctx, optional=True)
    result = copy.deepcopy(check_model(model))
    mark(result, "sparse_storage", "sparse_format")
    result.storage_format = "sparse"
    return result


def huffman_coding(model: nn.Module, ctx: Context | None = None) -> nn.Module:
    """A copy of ``model`` stored in the "deep_compression" format (shared codes and gaps Huffman coded)."""
    check_ctx(ctx, optional=True)
    if not _shared_prefixes(check_model(model)):
        raise ValueError("huffman_coding codes the indices of shared layers: run kmeans_share first")
    result = copy.deepcopy(model)
    mark(result, "huffman_coding", "low_bit_storage")
    result.storage_format = "deep_compression"
    return result


# ----------------------------------------------------------------------------------------------------------
# Storage formats
# ----------------------------------------------------------------------------------------------------------


def _shared_prefixes(model: nn.Module) -> dict[str, _Shared]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _Shared)}


def _encode_generic(t: torch.Tensor) -> tuple[dict[str, Any], list[bytes]]:
    """A tensor as raw bytes or relative-index sparse, whichever is smaller."""
    raw = t.detach().cpu().contiguous()
    raw_bytes = raw.numel() * raw.element_size()
    if raw.numel() > 1 and raw.dtype not in (torch.bool, torch.bfloat16) and not raw.dtype.is_complex:
        nz = int(torch.count_nonzero(raw))
        if nz < raw.numel():
            sp = encode_sparse(raw, index_bits=None)
            if sp.nbytes() < raw_bytes:
                return {"e": "rel", "b": sp.index_bits, "m": int(sp.values.size)}, [sp.index_bytes(), sp.value_bytes()]
    return {"e": "raw"}, [raw.reshape(-1).view(torch.uint8).numpy().tobytes() if raw.numel() else b""]


def _decode_generic(entry: dict[str, Any], streams: list[bytes]) -> torch.Tensor:
    dtype, shape = tensor_dtype(entry["d"]), tuple(entry["s"])
    if entry["e"] == "raw":
        raw = bytearray(streams[0])
        t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return t.view(dtype).reshape(shape).clone()
    gaps = unpack_bits(streams[0], entry["b"], entry["m"])
    values = np.frombuffer(streams[1], dtype=numpy_dtype(dtype)).copy()
    return decode_sparse(SparseTensor(shape, dtype, "relative", values, gaps, entry["b"]))


def _code_stream(layer: _Shared) -> tuple[np.ndarray, np.ndarray | None]:
    """(flat codes, flat positions of non-zero codes or None when stored densely)."""
    idx = layer.indices.detach().cpu().reshape(-1).numpy().astype(np.int64)
    if not layer.zero_code:
        return idx, None
    return idx, np.flatnonzero(idx)


def _encode_shared(layer: _Shared, huffman: bool) -> tuple[dict[str, Any], list[bytes]]:
    """A shared layer: fp32 codebook | [gaps] | codes, packed (shared) or Huffman coded (deep_compression).

    With ``huffman`` the packed layout is kept when it is smaller (a tiny layer, where the code tables
    cost more than Huffman saves), so "deep_compression" never stores a layer larger than "shared".
    """
    packed = _encode_shared_once(layer, False)
    if not huffman:
        return packed
    coded = _encode_shared_once(layer, True)
    return coded if sum(map(len, coded[1])) < sum(map(len, packed[1])) else packed


def _encode_shared_once(layer: _Shared, huffman: bool) -> tuple[dict[str, Any], list[bytes]]:
    codebook = layer.codebook.detach().cpu().to(torch.float32).numpy()
    if layer.zero_code:
        codebook = codebook.copy()
        codebook[0] = 0.0
    idx, pos = _code_stream(layer)
    head: dict[str, Any] = {"e": "cbh" if huffman else "cb", "k": int(codebook.size), "bits": layer.bits,
                            "z": layer.zero_code}
    streams = [codebook.tobytes()]
    if pos is None:
        codes, gaps = idx, None
    else:
        b = _best_gap_bits(idx, pos, layer.bits, huffman)
        gaps, is_filler = relative_index(pos, b)
        codes = np.zeros(gaps.size, dtype=np.int64)
        codes[~is_filler] = idx[pos]
        head["b"] = b
    head["m"] = int(codes.size)
    coded = []
    for values, width in ((gaps, head.get("b")), (codes, layer.bits)):
        if values is None:
            continue
        packed = [pack_bits(values, width) if values.size else b""]
        if huffman:  # Huffman, unless its table costs more than it saves: then packed
            data, table = huffman_encode(values)
            hc = [table_to_bytes(table), data]
            use = sum(map(len, hc)) < len(packed[0])
            coded.append(use)
            streams += hc if use else packed
        else:
            streams += packed
    if huffman:
        head["h"] = coded
        if not any(coded):
            head["e"] = "cb"
            del head["h"]
    return head, streams


def _best_gap_bits(idx: np.ndarray, pos: np.ndarray, bits: int, huffman: bool) -> int:
    """Relative-index width with the fewest bits: packed (gap + code bits per entry) or Huffman coded."""
    if not huffman:
        return best_index_bits(pos, bits)
    best, best_b = None, 1
    for b in range(1, 13):
        gaps, is_filler = relative_index(pos, b)
        codes = np.zeros(gaps.size, dtype=np.int64)
        codes[~is_filler] = idx[pos]
        total = 0
        for s in (gaps, codes):
            if s.size:
                table = huffman_code(s)
                total += coded_bits(s, table) + 8 * len(table_to_bytes(table))
        if best is None or total < best:
            best, best_b = total, b
        if (np.diff(pos, prepend=-1) - 1).max(initial=0) < (1 << b):  # no fillers left: wider only costs
            break
    return best_b


def _decode_shared(entry: dict[str, Any], streams: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    shape, m = tuple(entry["s"]), entry["m"]
    codebook = torch.from_numpy(np.frombuffer(streams[0], dtype=np.float32).copy())
    rest = streams[1:]
    widths = ([entry["b"]] if entry["z"] else []) + [entry["bits"]]
    huff = entry.get("h", [False] * len(widths))
    decoded = []
    for width, use in zip(widths, huff):
        if use:
            table, _ = table_from_bytes(rest[0])
            decoded.append(huffman_decode(rest[1], table, m))
            rest = rest[2:]
        else:
            decoded.append(unpack_bits(rest[0], width, m))
            rest = rest[1:]
    gaps, codes = (decoded[0], decoded[1]) if entry["z"] else (None, decoded[0])
    if codes.size and int(codes.max()) >= codebook.numel():
        raise ValueError(f"layer {entry['n']!r} has code {int(codes.max())} but a codebook of {codebook.numel()} entries")
    numel = math.prod(shape)
    idx = np.zeros(numel, dtype=np.int64)
    if gaps is None:
        idx[:] = codes
    else:
        idx[positions_from_relative(gaps)] = codes
    return codebook, torch.from_numpy(idx).reshape(shape)


def _write(model: nn.Module, path: Path, fmt: str) -> None:
    check_model(model)
    path = as_path(path)
    shared = _shared_prefixes(model) if fmt != "sparse" else {}
    owned = {f"{p}.codebook": p for p in shared}
    skip = {f"{p}.indices" for p in shared}
    entries, blobs = [], []
    for name, t in model_tensors(model):
        if name in skip:
            continue
        if name in owned:
            prefix = owned[name]
            head, streams = _encode_shared(shared[prefix], huffman=fmt == "deep_compression")
            head.update(n=prefix, s=list(shared[prefix].indices.shape), d="float32")
        else:
            head, streams = _encode_generic(t)
            head.update(n=name, s=list(t.shape), d=str(t.dtype).removeprefix("torch."))
        head["l"] = [len(s) for s in streams]
        entries.append(head)
        blobs += streams
    header = zlib.compress(json.dumps({"f": fmt, "v": 1, "t": entries}, separators=(",", ":")).encode(), 9)
    with open(path, "wb") as fh:
        fh.write(MAGICS[fmt])
        fh.write(struct.pack("<I", len(header)))
        fh.write(header)
        for b in blobs:
            fh.write(b)


def write_sparse(model: nn.Module, path: Path) -> None:
    """Writer of the "sparse" format (raw or relative-index sparse per tensor)."""
    _write(model, path, "sparse")


def write_shared(model: nn.Module, path: Path) -> None:
    """Writer of the "shared" format (codebook + packed codes + relative positions per shared layer)."""
    _write(model, path, "shared")


def write_deep_compression(model: nn.Module, path: Path) -> None:
    """Writer of the "deep_compression" format (as "shared", with Huffman-coded codes and gaps)."""
    _write(model, path, "deep_compression")


STORED_FORMATS = "sparse/shared/deep_compression file"


def read_stored(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Read a sparse/shared/deep_compression file: (format, {state_dict name: tensor}, {shared layer: info})."""
    path, data = read_file(path)
    with reading(path, STORED_FORMATS):
        fmt = next((f for f, m in MAGICS.items() if data[:8] == m), None)
        if fmt is None:
            what = f"bad magic {data[:8]!r}; expected one of {list(MAGICS.values())}" if data else "the file is empty"
            raise not_valid(path, STORED_FORMATS, what)
        (hlen,) = struct.unpack_from("<I", data, 8)
        header = json.loads(zlib.decompress(take(data, 12, hlen, path, STORED_FORMATS, "header")).decode())
        off = 12 + hlen
        tensors: dict[str, torch.Tensor] = {}
        shared: dict[str, dict[str, Any]] = {}
        for e in header["t"]:
            streams = []
            for n in e["l"]:
                streams.append(take(data, off, n, path, STORED_FORMATS, f"tensor {e['n']!r}"))
                off += n
            if e["e"] in ("cb", "cbh"):
                codebook, indices = _decode_shared(e, streams)
                tensors[f"{e['n']}.codebook"] = codebook
                tensors[f"{e['n']}.indices"] = indices
                shared[e["n"]] = {"bits": e["bits"], "zero_code": e["z"]}
            else:
                tensors[e["n"]] = _decode_generic(e, streams)
        if off != len(data):
            raise not_valid(path, STORED_FORMATS, f"{len(data) - off} trailing bytes after the last tensor")
    return fmt, tensors, shared


def load_stored(path: str | os.PathLike, template: nn.Module) -> nn.Module:
    """A copy of ``template`` holding the tensors of the file at ``path`` (shared layers rebuilt).

    ValueError naming the file when it is not a valid file, or when its tensors do not fit ``template``."""
    check_model(template)
    fmt, tensors, shared = read_stored(path)
    model = copy.deepcopy(template)
    try:
        for name, info in shared.items():
            layer = model.get_submodule(name)
            new = make_shared(layer, tensors[f"{name}.codebook"], tensors[f"{name}.indices"], info["bits"], info["zero_code"])
            new.train(layer.training)
            replace_module(model, name, new)
        with torch.no_grad():
            model.load_state_dict(tensors, strict=True)
    except (AttributeError, TypeError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"{path}: the stored tensors do not fit template ({type(template).__name__}): {first}") from err
    model.storage_format = fmt
    return model


register_format("sparse", write_sparse, overwrite=True)
register_format("shared", write_shared, overwrite=True)
register_format("deep_compression", write_deep_compression, overwrite=True)


# ----------------------------------------------------------------------------------------------------------
# The stage table
# ----------------------------------------------------------------------------------------------------------

STAGES = (("dense", "dense"), ("pruned", "sparse"), ("shared", "shared"), ("huffman", "deep_compression"))


def deep_compression_stages(model_pruned: nn.Module, model_shared: nn.Module, ctx: Context | None = None) -> pd.DataFrame:
    """Stored bytes (measured file size), gzip bytes and compression ratio vs the dense fp32 file per stage.

    Stages: dense (``model_pruned`` in the "dense" format, as large as the unpruned model) -> pruned
    ("sparse") -> shared ("shared", ``model_shared``) -> Huffman ("deep_compression"). With ``ctx`` a
    column holds the test metric of the model at each stage.
    """
    check_type("model_pruned", model_pruned, nn.Module, "a torch.nn.Module")
    check_type("model_shared", model_shared, nn.Module, "a torch.nn.Module (from kmeans_share)")
    check_ctx(ctx, optional=True)
    if not _shared_prefixes(model_shared):
        raise ValueError("model_shared has no shared layer: pass the result of kmeans_share")
    rows = []
    dense_bytes = None
    with tempfile.TemporaryDirectory(prefix="survey_lib_dc_") as d:
        for stage, fmt in STAGES:
            model = model_pruned if stage in ("dense", "pruned") else model_shared
            path = Path(d) / f"{stage}.{fmt}"
            size = stored_bytes(model, fmt=fmt, path=path)
            dense_bytes = size.bytes if dense_bytes is None else dense_bytes
            row = {"stage": stage, "format": fmt, "stored_bytes": size.bytes, "gzip_bytes": size.gzip_bytes,
                   "compression_ratio": dense_bytes / size.bytes, "gzip_ratio": dense_bytes / size.gzip_bytes,
                   "bits_per_weight": 8 * size.bytes / _n_weights(model_pruned), "kind": "measured"}
            if ctx is not None:
                row[ctx.task.primary_metric] = ctx.score(model)
            rows.append(row)
    return pd.DataFrame(rows)


def _n_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


__all__ = [
    "linear_init",
    "assign_1d",
    "kmeans_1d",
    "SharedConv2d",
    "SharedLinear",
    "codebook_lookup",
    "make_shared",
    "share_weight",
    "shareable_layers",
    "kmeans_share",
    "sparse_storage",
    "huffman_coding",
    "KeepZeros",
    "write_sparse",
    "write_shared",
    "write_deep_compression",
    "read_stored",
    "load_stored",
    "deep_compression_stages",
]
