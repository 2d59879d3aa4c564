"""Counted memory: peak activation memory by liveness, and memory traffic per layer.

Both come from the op trace of ``counting.trace``.  Activations are the storages that are not
parameters or buffers; views and in-place ops share a storage, so it counts once (its nbytes).
A storage is live from the op that creates it (the model input: from the start) through its last
use (the model output: through the end).  Peak = max over op steps of the live bytes.

Traffic per op = weights read (at weight_bits) + activations read and written (at act_bits).
View-like ops (view, reshape, transpose, expand, detach, ...) move no data and are skipped.
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn

from .._validate import check_int, check_type
from .counting import (
    MAX_BITS, Bits, OpRecord, OpTrace, TensorInfo, check_layer_bits, check_trace, layer_bits, tensor_bits, trace,
)

# aten ops that only make a new view (or an uninitialised buffer) and move no data
NO_DATA_OPS = frozenset(
    {
        "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "expand_as", "t", "t_",
        "transpose", "transpose_", "permute", "alias", "detach", "detach_", "squeeze", "squeeze_",
        "unsqueeze", "unsqueeze_", "flatten", "unflatten", "select", "slice", "as_strided",
        "numpy_T", "split", "split_with_sizes", "chunk", "unbind", "narrow", "view_as", "diagonal",
        "unfold", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "_local_scalar_dense",
    }
)


# Fake-quant ops stand for the requantization an integer kernel fuses into the layer's output: counted
# traffic is that of the deployed model, so they move no data of their own.
FUSED_QUANT_OPS = frozenset(
    {
        "fake_quantize_per_tensor_affine", "fake_quantize_per_channel_affine",
        "fake_quantize_per_tensor_affine_cachemask", "fake_quantize_per_channel_affine_cachemask",
        "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
    }
)


def aten_name(op: str) -> str:
    """The bare op name of "aten.view.default" -> "view"."""
    check_type("op", op, str, 'an aten op name such as "aten.view.default"')
    parts = op.split(".")
    return parts[1] if len(parts) > 1 else op


def moves_data(op: str) -> bool:
    """False for view-like ops and fused fake-quant ops, which move no data (skipped in traffic)."""
    name = aten_name(op)
    return name not in NO_DATA_OPS and name not in FUSED_QUANT_OPS


# --------------------------------------------------------------------------- liveness


def live_bytes_per_op(tr: OpTrace) -> list[int]:
    """Live activation bytes at each op step (parameters and buffers excluded)."""
    n = len(check_trace(tr).ops)
    if n == 0:
        return []
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    size: dict[int, int] = {}
    for s in tr.input_storages:
        first[s] = 0
    for o in tr.ops:
        for t in o.inputs:
            if not t.is_param:
                first.setdefault(t.storage, 0)  # made before the trace (input, plain attribute)
                last[t.storage] = o.index
                size[t.storage] = max(size.get(t.storage, 0), t.storage_nbytes)
        for t in o.outputs:
            if not t.is_param:
                first.setdefault(t.storage, o.index)
                last[t.storage] = max(last.get(t.storage, o.index), o.index)
                size[t.storage] = max(size.get(t.storage, 0), t.storage_nbytes)
    for s in tr.output_storages:
        if s in first:
            last[s] = n - 1
    delta = [0] * (n + 1)
    for s, b in size.items():
        delta[first[s]] += b
        delta[last.get(s, first[s]) + 1] -= b
    live, running = [], 0
    for i in range(n):
        running += delta[i]
        live.append(running)
    return live


def peak_trace(tr: OpTrace) -> int:
    """Peak live activation bytes of an existing trace."""
    return max(live_bytes_per_op(tr), default=0)


def peak_activation_memory(model: nn.Module, example_input: torch.Tensor) -> int:
    """Largest total of live activation bytes during one inference at example_input's batch (counted)."""
    return peak_trace(trace(model, example_input))


# --------------------------------------------------------------------------- traffic


def tensor_bytes(t: TensorInfo, bits: int) -> int:
    """Bytes one op touches in ``t`` at ``bits`` per element (a broadcast view counts its storage once)."""
    check_type("t", t, TensorInfo, "a TensorInfo from a trace")
    check_int("bits", bits, min_value=1, max_value=MAX_BITS)
    elems = t.numel
    elem_size = t.dtype_bits / 8
    if elem_size > 0:
        elems = min(elems, int(t.storage_nbytes / elem_size))
    return math.ceil(elems * bits / 8)


def op_traffic(o: OpRecord, wbits: int | None, abits: int | None) -> tuple[int, int, int]:
    """(weight_read, act_read, act_write) bytes of one op; zeros for view-like ops."""
    check_type("o", o, OpRecord, "an OpRecord from a trace")
    check_layer_bits(wbits, abits)
    if not moves_data(o.op):
        return 0, 0, 0
    w_read = a_read = a_write = 0
    seen: set[tuple] = set()
    for t in o.inputs:
        key = (t.storage, t.shape)
        if key in seen:  # x * x reads x once
            continue
        seen.add(key)
        b = tensor_bytes(t, tensor_bits(t, wbits, abits))
        if t.is_param:
            w_read += b
        else:
            a_read += b
    for t in o.outputs:
        a_write += tensor_bytes(t, tensor_bits(t, wbits, abits))
    return w_read, a_read, a_write


TRAFFIC_COLUMNS = ("name", "weight_read_bytes", "act_read_bytes", "act_write_bytes", "traffic_bytes")


def traffic_trace(model: nn.Module, tr: OpTrace, bits: Bits | None = None) -> pd.DataFrame:
    """Per-layer traffic of an existing trace (see ``memory_traffic``)."""
    lbits = layer_bits(model, tr, bits)
    per: dict[str, list[int]] = {}
    for o in tr.ops:
        wb, ab = lbits.get(o.module, (None, None))
        w, r, wr = op_traffic(o, wb, ab)
        acc = per.setdefault(o.module, [0, 0, 0])
        acc[0] += w
        acc[1] += r
        acc[2] += wr
    rows = [dict(name=k, weight_read_bytes=v[0], act_read_bytes=v[1], act_write_bytes=v[2], traffic_bytes=sum(v)) for k, v in per.items()]
    df = pd.DataFrame(rows, columns=list(TRAFFIC_COLUMNS))
    df.attrs["kind"] = {c: "counted" for c in TRAFFIC_COLUMNS[1:]}
    df.attrs["total_bytes"] = int(df["traffic_bytes"].sum()) if len(df) else 0
    return df


def memory_traffic(model: nn.Module, example_input: torch.Tensor, bits: Bits | None = None) -> pd.DataFrame:
    """Per-layer bytes of weights read + activations read and written (counted); total in ``.attrs["total_bytes"]``."""
    return traffic_trace(model, trace(model, example_input), bits)


__all__ = [
    "peak_activation_memory",
    "memory_traffic",
    "live_bytes_per_op",
    "peak_trace",
    "traffic_trace",
    "op_traffic",
    "moves_data",
    "NO_DATA_OPS",
    "FUSED_QUANT_OPS",
]
