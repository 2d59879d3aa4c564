"""Measured stored bytes: write the model in its storage format, then ``os.path.getsize`` the file.

Formats live in a registry (``register_format(name, writer)``); compression methods add their own
(CSR, packed low-bit, codebook + indices, ...).  The built-in "dense" format is our own simple
container, no pickle::

    b"SLDENSE1" | uint64 little-endian header length | JSON header | padding to 64 | raw tensor bytes

The header lists every parameter and buffer: name, dtype, shape, offset (from the data start), nbytes.
A dense file with 90% zeros is exactly as large as without; only its gzip size shrinks.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .._io import as_path, atomic_write, check_magic, not_valid, read_file, reading, take
from .._validate import check_choice, check_int, check_model

Writer = Callable[[nn.Module, Path], None]
MAGIC = b"SLDENSE1"
ALIGN = 64
_FORMATS: dict[str, Writer] = {}


@dataclass(frozen=True)
class StoredSize:
    """Stored bytes of a model file (measured) and its gzip -9 size (measured)."""

    bytes: int
    gzip_bytes: int
    path: Path | None  # None when the file was written to a temporary directory and removed
    fmt: str
    kind: str = "measured"


def register_format(name: str, writer: Writer, *, overwrite: bool = False) -> None:
    """Register ``writer(model, path)`` that writes ``model`` in storage format ``name`` to ``path``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not callable(writer):
        raise TypeError(f"writer must be callable(model, path), got {type(writer).__name__}")
    if name in _FORMATS and not overwrite:
        raise ValueError(f"storage format {name!r} is already registered; pass overwrite=True to replace it")
    _FORMATS[name] = writer


def formats() -> tuple[str, ...]:
    """Names of the registered storage formats."""
    return tuple(_FORMATS)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``model`` (shared ones once), in state_dict order."""
    seen: set[int] = set()
    out = []
    for name, t in check_model(model).state_dict(keep_vars=True).items():
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        out.append((name, t.detach()))
    return out


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_dense_tensors(tensors: list[tuple[str, torch.Tensor]], path: Path) -> None:
    """Write named tensors as raw bytes at their own dtype with a JSON header (the "dense" container)."""
    path = as_path(path)
    tensors = _check_named_tensors(tensors)
    entries, offset = [], 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        entries.append(dict(name=name, dtype=_dtype_name(t.dtype), shape=list(t.shape), offset=offset, nbytes=n))
        offset += n
    header = json.dumps({"format": "dense", "version": 1, "tensors": entries}, separators=(",", ":")).encode()
    prefix = len(MAGIC) + 8 + len(header)
    pad = (-prefix) % ALIGN
    with open(path, "wb") as fh:
        fh.write(MAGIC)
        fh.write(struct.pack("<Q", len(header) + pad))
        fh.write(header + b" " * pad)
        for _, t in tensors:
            fh.write(_raw(t))


def _check_named_tensors(tensors: Any) -> list[tuple[str, torch.Tensor]]:
    """``tensors`` as a list of (unique non-empty str name, tensor) pairs; TypeError/ValueError otherwise."""
    if isinstance(tensors, (str, bytes, dict)) or not isinstance(tensors, Iterable):
        raise TypeError(f"tensors must be a list of (name, tensor) pairs, got {type(tensors).__name__}")
    out = list(tensors)
    for i, item in enumerate(out):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and item[0]
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"tensors[{i}] must be a (non-empty str name, torch.Tensor) pair, got {item!r:.80}")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"tensors repeats a name: {sorted({n for n in names if names.count(n) > 1})}")
    return out


def write_dense(model: nn.Module, path: Path) -> None:
    """Writer of the built-in "dense" format: every parameter and buffer at its own dtype."""
    write_dense_tensors(model_tensors(model), path)


def load_dense(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a "dense" file back into ``{name: tensor}``; ValueError naming the file if it is not one."""
    path, data = read_file(path)
    with reading(path, "dense file"):
        check_magic(data, MAGIC, path, "dense file")
        (hlen,) = struct.unpack_from("<Q", data, len(MAGIC))
        start = len(MAGIC) + 8
        header = json.loads(take(data, start, hlen, path, "dense file", "header").decode())
        if header["format"] != "dense":
            raise not_valid(path, "dense file", f"header says format {header['format']!r}")
        return {e["name"]: decode_raw_tensor(e, data, start + hlen, path) for e in header["tensors"]}


def tensor_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (as written by ``str(dtype)`` without "torch."); ValueError otherwise."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def entry_bytes(entry: dict, data: bytes, base: int, path: str | os.PathLike, fmt: str) -> bytes:
    """The bytes of one header ``entry`` (offset, nbytes) at ``base + offset``; FileFormatError if truncated."""
    return take(data, base + entry["offset"], entry["nbytes"], path, fmt, f"tensor {entry['name']!r}")


def decode_raw_tensor(entry: dict, data: bytes, base: int, path: str | os.PathLike, fmt: str = "dense file") -> torch.Tensor:
    """The tensor of one header ``entry`` (name, dtype, shape, offset, nbytes) stored raw at ``base + offset``."""
    raw = bytearray(entry_bytes(entry, data, base, path, fmt))
    t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return t.view(tensor_dtype(entry["dtype"])).reshape(entry["shape"]).clone()


def gzip_size(path: str | os.PathLike, level: int = 9, chunk: int = 1 << 22) -> int:
    """Bytes of ``path`` after gzip at ``level`` (streamed, mtime fixed, nothing written)."""
    path = as_path(path)
    check_int("level", level, min_value=0, max_value=9)
    check_int("chunk", chunk, min_value=1)
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31 = gzip container
    total = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            total += len(comp.compress(block))
    return total + len(comp.flush())


def resolve_format(model: nn.Module, fmt: str | None) -> str:
    """``fmt``, else the model's ``storage_format`` attribute, else "dense"; must be registered."""
    check_model(model)
    if fmt is None:
        fmt = getattr(model, "storage_format", None) or "dense"
    return check_choice("fmt", fmt, formats())


def stored_bytes(model: nn.Module, fmt: str | None = None, path: str | os.PathLike | None = None) -> StoredSize:
    """Write ``model`` in format ``fmt`` (default: model.storage_format or "dense") and measure the file."""
    check_model(model)
    fmt = resolve_format(model, fmt)
    writer = _FORMATS[fmt]
    if path is not None:
        written = atomic_write(as_path(path), lambda p: writer(model, p))
        return StoredSize(os.path.getsize(written), gzip_size(written), written, fmt)
    with tempfile.TemporaryDirectory(prefix="survey_lib_store_") as d:
        written = atomic_write(Path(d) / f"model.{fmt}", lambda p: writer(model, p))
        return StoredSize(os.path.getsize(written), gzip_size(written), None, fmt)


register_format("dense", write_dense)

__all__ = [
    "StoredSize",
    "register_format",
    "formats",
    "stored_bytes",
    "load_dense",
    "write_dense",
    "write_dense_tensors",
    "gzip_size",
    "model_tensors",
]
