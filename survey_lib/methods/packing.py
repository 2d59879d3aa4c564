"""Packed low-bit storage: integer weight codes packed ``bits`` bits each, the file that makes quantization real.

* **Bit packing**: :func:`pack_bits` / :func:`unpack_bits` store unsigned codes in [0, 2**bits - 1]
  (``bits`` = 1..16) as one *little-endian* bit stream: code ``i`` occupies stream bits
  ``i*bits .. (i+1)*bits - 1``, least significant bit first, and stream bit ``k`` is bit ``k % 8`` of
  byte ``k // 8``. For 1/2/4/8 bits this is the natural layout (8/4/2/1 codes per byte, the first code
  in the low bits); for 16 bits it is little-endian uint16. ``n`` codes take exactly
  ``ceil(n * bits / 8)`` bytes. (The Huffman/sparse streams of :mod:`.coding` are MSB-first instead.)
* **The low-bit contract**: a module is *low-bit* when it has a method ``integer_weight()`` returning a
  :class:`QuantizedTensor` (or any object with its five fields): unsigned ``codes`` with the weight's
  shape, float32 ``scale`` and ``zero_point`` (shape ``[]`` per tensor, or ``[C]`` along ``axis``), and
  ``bits``. The weight is ``(codes - zero_point) * scale`` (:meth:`QuantizedTensor.dequantize`).
* **The "packed" storage format** (registered with :func:`survey_lib.cost.storage.register_format`)::

      b"SLPACK01" | uint64 little-endian header length | JSON header | padding to 64 | raw data

  A low-bit module's weight ``<name>.weight`` is stored as its packed codes followed by its scale and
  zero point as float32 (one value per tensor, or one per channel). Of everything else under a low-bit
  module only what it needs at inference is stored: ``module.deploy_tensors()`` (a ``{relative name:
  tensor}`` dict) when the module defines it, else its ``bias`` when it has one. Its other parameters
  and buffers (learned step sizes, observer min/max, ...) are quantizer internals and are skipped. Every
  tensor outside low-bit modules (biases and weights of other layers, BatchNorm buffers) is stored raw
  at its own dtype, as in the "dense" format. :func:`load_packed` reads the file back with the low-bit
  weights dequantized to float32, bit-exact with :meth:`QuantizedTensor.dequantize`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .._validate import check_int, check_model, check_type
from .._io import as_path, check_bytes, check_magic, not_valid, read_file, reading, take
from .coding import integer_codes
from ..cost.storage import decode_raw_tensor, entry_bytes, model_tensors, register_format

MIN_BITS, MAX_BITS = 1, 16
MAGIC = b"SLPACK01"
ALIGN = 64
VERSION = 1
_CHUNK = 1 << 18  # codes per vectorised step (a multiple of 8: every full chunk ends on a byte boundary)

# ----------------------------------------------------------------------------------------------------------
# Bit packing (little-endian bit stream)
# ----------------------------------------------------------------------------------------------------------


def _check_bits(bits: Any) -> int:
    return check_int("bits", bits, min_value=MIN_BITS, max_value=MAX_BITS)


def _code_array(codes: Any, bits: int) -> np.ndarray:
    """``codes`` as a flat uint32 array; TypeError unless integer, ValueError unless in [0, 2**bits - 1]."""
    return integer_codes("codes", codes, bits).astype(np.uint32)


def _chunks(n: int) -> Iterator[slice]:
    return (slice(s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK))


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` bits in the packed stream: ceil(count * bits / 8)."""
    return -(-check_int("count", count, min_value=0) * _check_bits(bits) // 8)


def pack_bits(codes: Any, bits: int) -> bytes:
    """Pack unsigned integer codes in [0, 2**bits - 1] (bits 1..16) into a little-endian bit stream."""
    bits = _check_bits(bits)
    v = _code_array(codes, bits)
    if bits in (8, 16):
        return v.astype("<u1" if bits == 8 else "<u2").tobytes()
    shifts = np.arange(bits, dtype=np.uint32)
    parts = []
    for sl in _chunks(v.size):  # each code's bits, LSB first, then 8 stream bits per byte, LSB first
        bitmat = ((v[sl, None] >> shifts) & np.uint32(1)).astype(np.uint8)
        parts.append(np.packbits(bitmat.reshape(-1), bitorder="little").tobytes())
    return b"".join(parts)


def unpack_bits(data: bytes | bytearray | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` codes (uint8 for bits <= 8, else uint16)."""
    check_bytes("data", data)
    bits = _check_bits(bits)
    need = packed_nbytes(count, bits)
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size < need:
        raise ValueError(f"count={count} codes of bits={bits} need {need} bytes, but the data holds {raw.size}")
    out_dtype = np.uint8 if bits <= 8 else np.uint16
    if bits in (8, 16):
        return raw[:need].view("<u1" if bits == 8 else "<u2").astype(out_dtype)
    padded = np.concatenate([raw[:need], np.zeros(2, dtype=np.uint8)]).astype(np.uint32)
    out = np.empty(count, dtype=out_dtype)
    mask = np.uint32((1 << bits) - 1)
    for sl in _chunks(count):  # a code spans at most 3 bytes (7 + 16 bits): read them as one word
        start = np.arange(sl.start, sl.stop, dtype=np.int64) * bits
        byte, shift = start >> 3, (start & 7).astype(np.uint32)
        word = padded[byte] | (padded[byte + 1] << 8) | (padded[byte + 2] << 16)
        out[sl] = (word >> shift) & mask
    return out


# ----------------------------------------------------------------------------------------------------------
# QuantizedTensor: unsigned codes + scale + zero point
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedTensor:
    """Unsigned integer ``codes`` with float32 ``scale``/``zero_point``; value = (codes - zero_point) * scale.

    ``axis=None``: one scale and zero point (shape ``[]``); ``axis=k``: one per index of dimension ``k``
    (shape ``[codes.shape[k]]``). ``zero_point`` may be non-integer (binary ±a: codes {0, 1}, scale 2a,
    zero point 0.5). ``scale`` must be finite and >= 0 (0 for an all-zero channel).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    axis: int | None
    bits: int

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        check_type("codes", self.codes, torch.Tensor, "a torch.Tensor of integer codes")
        if self.codes.dtype.is_floating_point or self.codes.dtype.is_complex or self.codes.dtype == torch.bool:
            raise TypeError(f"codes must have an integer dtype (int64), got {self.codes.dtype}")
        _code_array(self.codes, self.bits)  # range check
        shape = self._param_shape()
        for name in ("scale", "zero_point"):
            _check_param(name, getattr(self, name), shape)
        if bool((self.scale < 0).any()):
            raise ValueError("scale must be >= 0")

    def _param_shape(self) -> tuple[int, ...]:
        if self.axis is None:
            return ()
        axis = check_int("axis", self.axis, min_value=0, max_value=self.codes.dim() - 1)
        return (self.codes.shape[axis],)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the tensor (and of ``codes``)."""
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 tensor ``(codes - zero_point) * scale``, scale and zero point broadcast along ``axis``."""
        view = [1] * self.codes.dim()
        if self.axis is not None:
            view[self.axis] = -1
        zp, scale = self.zero_point.reshape(view), self.scale.reshape(view)
        return (self.codes.to(torch.float32) - zp) * scale

    def nbytes(self) -> int:
        """Bytes of its packed streams: ceil(numel * bits / 8) codes + float32 scale and zero point."""
        return packed_nbytes(self.codes.numel(), self.bits) + 8 * self.scale.numel()


def _check_param(name: str, t: Any, shape: tuple[int, ...]) -> None:
    check_type(name, t, torch.Tensor, "a float32 torch.Tensor")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(shape)} for this axis")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (got NaN or inf)")


def as_quantized(obj: Any) -> QuantizedTensor:
    """A validated :class:`QuantizedTensor` from any object with codes, scale, zero_point, axis, bits."""
    if isinstance(obj, QuantizedTensor):
        return obj
    missing = [f for f in ("codes", "scale", "zero_point", "axis", "bits") if not hasattr(obj, f)]
    if missing:
        raise TypeError(f"integer_weight() must return a QuantizedTensor; {type(obj).__name__} lacks {missing}")
    return QuantizedTensor(obj.codes, obj.scale, obj.zero_point, obj.axis, obj.bits)


# ----------------------------------------------------------------------------------------------------------
# The low-bit module contract
# ----------------------------------------------------------------------------------------------------------


def is_low_bit(module: nn.Module) -> bool:
    """True when ``module`` has an ``integer_weight()`` method (the low-bit contract)."""
    return callable(getattr(module, "integer_weight", None))


def low_bit_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The low-bit modules of ``model`` by name; ValueError when one is nested in another."""
    found = {n: m for n, m in check_model(model).named_modules() if is_low_bit(m)}
    for name in found:
        outer = [p for p in found if p != name and (p == "" or name.startswith(p + "."))]
        if outer:
            raise ValueError(f"low-bit module {name!r} is nested inside low-bit module {outer[0]!r}")
    return found


def quantized_weight(module: nn.Module) -> QuantizedTensor:
    """``module.integer_weight()``, validated, with the codes' shape checked against ``module.weight``."""
    if not is_low_bit(module):
        raise TypeError(f"module must be a low-bit module with an integer_weight() method, got {type(module).__name__}")
    q = as_quantized(module.integer_weight())
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and tuple(weight.shape) != q.shape:
        raise ValueError(f"integer_weight() codes have shape {list(q.shape)}, weight has {list(weight.shape)}")
    return q


def deploy_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a low-bit module needs at inference besides its weight: ``deploy_tensors()``, else its bias."""
    check_type("module", module, nn.Module, "a torch.nn.Module")
    if callable(getattr(module, "deploy_tensors", None)):
        out = dict(module.deploy_tensors())
    else:
        bias = getattr(module, "bias", None)
        out = {"bias": bias} if isinstance(bias, torch.Tensor) else {}
    for k, t in out.items():
        if not isinstance(k, str) or not k or k == "weight":
            raise ValueError(f"deploy_tensors() names must be non-empty str other than 'weight', got {k!r}")
        check_type(f"deploy_tensors()[{k!r}]", t, torch.Tensor, "a torch.Tensor")
    return {k: t.detach() for k, t in out.items()}


def packed_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor | QuantizedTensor]]:
    """What the "packed" file holds, in state_dict order: low-bit weights as QuantizedTensor, the rest dense."""
    low = low_bit_modules(model)
    out: list[tuple[str, torch.Tensor | QuantizedTensor]] = []
    done: set[str] = set()

    def emit(prefix: str) -> None:
        m = low[prefix]
        out.append((_join(prefix, "weight"), quantized_weight(m)))
        out.extend((_join(prefix, k), t) for k, t in deploy_tensors(m).items())
        done.add(prefix)

    for name, t in model_tensors(model):
        owner = next((p for p in low if p == "" or name.startswith(p + ".")), None)
        if owner is None:
            out.append((name, t))
        elif owner not in done:
            emit(owner)
    for prefix in low:  # low-bit modules whose tensors are all outside the state_dict
        if prefix not in done:
            emit(prefix)
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------------------------------------------
# The "packed" storage format
# ----------------------------------------------------------------------------------------------------------


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _encode(name: str, t: torch.Tensor | QuantizedTensor) -> tuple[dict[str, Any], bytes]:
    if isinstance(t, QuantizedTensor):
        head = dict(name=name, kind="packed", shape=list(t.shape), bits=t.bits, axis=t.axis)
        blob = pack_bits(t.codes, t.bits) + _raw(t.scale.reshape(-1)) + _raw(t.zero_point.reshape(-1))
        return head, blob
    dtype = str(t.dtype).removeprefix("torch.")
    return dict(name=name, kind="dense", dtype=dtype, shape=list(t.shape)), _raw(t)


def write_packed(model: nn.Module, path: Path) -> None:
    """Writer of the "packed" format: low-bit weights as packed codes + float32 scales, the rest raw."""
    path = as_path(path)
    entries, blobs, offset = [], [], 0
    for name, t in packed_tensors(model):
        head, blob = _encode(name, t)
        head.update(offset=offset, nbytes=len(blob))
        entries.append(head)
        blobs.append(blob)
        offset += len(blob)
    header = json.dumps({"format": "packed", "version": VERSION, "tensors": entries}, separators=(",", ":")).encode()
    pad = (-(len(MAGIC) + 8 + len(header))) % ALIGN
    with open(path, "wb") as fh:
        fh.write(MAGIC)
        fh.write(struct.pack("<Q", len(header) + pad))
        fh.write(header + b" " * pad)
        for blob in blobs:
            fh.write(blob)


def _decode_packed(e: dict[str, Any], raw: bytes) -> QuantizedTensor:
    shape, bits, axis = tuple(e["shape"]), e["bits"], e["axis"]
    n, c = math.prod(shape), (1 if axis is None else shape[axis])
    nb = packed_nbytes(n, bits)
    if len(raw) != nb + 8 * c:
        raise ValueError(f"packed tensor {e['name']!r} has {len(raw)} bytes, expected {nb + 8 * c}")
    codes = torch.from_numpy(unpack_bits(raw[:nb], bits, n).astype(np.int64)).reshape(shape)
    params = np.frombuffer(raw[nb:], dtype="<f4").astype(np.float32)
    scale, zp = (torch.from_numpy(p.copy()).reshape(() if axis is None else (c,)) for p in (params[:c], params[c:]))
    return QuantizedTensor(codes, scale, zp, axis, bits)


def read_packed(path: str | os.PathLike) -> dict[str, torch.Tensor | QuantizedTensor]:
    """Read a "packed" file into ``{name: tensor}`` in file order, low-bit weights as QuantizedTensor."""
    path, data = read_file(path)
    fmt = "packed file"
    with reading(path, fmt):
        check_magic(data, MAGIC, path, fmt)
        (hlen,) = struct.unpack_from("<Q", data, len(MAGIC))
        base = len(MAGIC) + 8 + hlen
        header = json.loads(take(data, len(MAGIC) + 8, hlen, path, fmt, "header").decode())
        if header["format"] != "packed" or header["version"] != VERSION:
            got = f"format {header['format']!r}, version {header['version']!r}"
            raise not_valid(path, fmt, f"unsupported header ({got}); expected format 'packed', version {VERSION}")
        out: dict[str, torch.Tensor | QuantizedTensor] = {}
        for e in header["tensors"]:
            if e["kind"] == "packed":
                out[e["name"]] = _decode_packed(e, entry_bytes(e, data, base, path, fmt))
            else:
                out[e["name"]] = decode_raw_tensor(e, data, base, path, fmt)
        return out


def load_packed(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a "packed" file into ``{name: tensor}`` with the low-bit weights dequantized to float32."""
    return {k: v.dequantize() if isinstance(v, QuantizedTensor) else v for k, v in read_packed(path).items()}


register_format("packed", write_packed, overwrite=True)

__all__ = [
    "pack_bits",
    "unpack_bits",
    "packed_nbytes",
    "QuantizedTensor",
    "as_quantized",
    "is_low_bit",
    "low_bit_modules",
    "quantized_weight",
    "deploy_tensors",
    "packed_tensors",
    "write_packed",
    "read_packed",
    "load_packed",
]
