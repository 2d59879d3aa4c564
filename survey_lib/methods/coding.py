"""Entropy coding and sparse storage, written from scratch (the Deep Compression lesson, Han et al. 2016).

* **Huffman coding**: :func:`huffman_code` builds a *canonical* prefix code from symbol counts (only the
  code lengths need to be stored: :func:`table_to_bytes`); :func:`huffman_encode` /
  :func:`huffman_decode` turn an integer array into a bit stream and back. :func:`entropy_bits` is the
  bound: no prefix code spends fewer than ``n * H`` bits on ``n`` symbols, and Huffman spends fewer
  than ``n * (H + 1)`` bits (it is exactly ``n * H`` when every probability is a power of 1/2).
* **Sparse storage**: :func:`encode_sparse` stores a tensor as its non-zero values plus *relative* indices
  (the gap of zeros before each value, in ``index_bits`` bits; a gap too long for ``index_bits`` bits is
  bridged by a *filler zero*, exactly as in Deep Compression's Fig. 2), or as a bitmask (one bit per
  position) plus the non-zero values. :func:`decode_sparse` gives the exact tensor back.

Bit order everywhere: most significant bit first (``numpy.packbits`` order), zero-padded to a byte.
"""

from __future__ import annotations

import heapq
import itertools
import math
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping

import numpy as np
import torch

from .._io import check_bytes, reading
from .._validate import check_choice, check_float, check_int, check_type

Table = dict[Any, tuple[int, int]]  # symbol -> (code, length); canonical
SPARSE_LAYOUTS = ("relative", "bitmask")
MAX_INDEX_BITS = 16
MAX_LUT_BITS = 24  # a decoding lookup table of 2**24 entries (128 MiB of int64) at most
_WIDTH_FMT = {1: "B", 2: "H", 4: "I"}

# ----------------------------------------------------------------------------------------------------------
# Bit packing
# ----------------------------------------------------------------------------------------------------------


def integer_codes(param: str, values: Any, bits: int | None) -> np.ndarray:
    """``values`` (array, tensor or list) as a flat int64 array; TypeError unless integer, ValueError unless
    every value lies in [0, 2**bits - 1] (``bits=None``: any value >= 0). Floats are rejected, never truncated."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    a = np.asarray(values)
    if a.size == 0 and a.dtype == np.float64 and not isinstance(values, np.ndarray):
        a = a.astype(np.int64)  # an empty Python list
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{param} must have an integer dtype, got {a.dtype} (round floats to codes first)")
    a = a.reshape(-1)
    if bits is None:
        if a.size and int(a.min()) < 0:
            raise ValueError(f"{param} must be >= 0, got {int(a.min())}")
        return a.astype(np.int64, copy=False)
    top = (1 << bits) - 1
    if a.size and (int(a.min()) < 0 or int(a.max()) > top):
        bad = int(a.min()) if int(a.min()) < 0 else int(a.max())
        raise ValueError(f"{param}: value {bad} is out of range for bits={bits}; accepted: 0 <= value <= {top}")
    return a.astype(np.int64, copy=False)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers < 2**bits into a big-endian bit stream, ``bits`` bits each."""
    check_int("bits", bits, min_value=1, max_value=32)
    v = integer_codes("values", values, bits).astype(np.uint64)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    out = bytearray()
    for start in range(0, v.size, 1 << 18):  # chunks bound the (n x bits) temporary
        chunk = v[start:start + (1 << 18)]
        bitmat = ((chunk[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
        out += bitmat.reshape(-1).tobytes()
    return np.packbits(np.frombuffer(bytes(out), dtype=np.uint8)).tobytes()


def unpack_bits(data: bytes, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` integers (int64) of ``bits`` bits each."""
    check_bytes("data", data)
    check_int("bits", bits, min_value=1, max_value=32)
    check_int("n", n, min_value=0)
    if len(data) * 8 < n * bits:
        raise ValueError(f"stream of {len(data)} bytes is too short for {n} values of {bits} bits")
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: n * bits].reshape(n, bits).astype(np.int64)
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    return flat @ weights if n else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------
# Huffman coding
# ----------------------------------------------------------------------------------------------------------


def _counts(symbols_or_counts: Any) -> dict[Hashable, int]:
    """{symbol: count} from a Mapping of counts, a numpy array / tensor, or any iterable of symbols."""
    if isinstance(symbols_or_counts, Mapping):
        counts = {}
        for s, c in symbols_or_counts.items():
            _check_symbol(s)
            check_int(f"count of symbol {s!r}", c, min_value=0)
            if c:
                counts[s] = int(c)
        return counts
    if isinstance(symbols_or_counts, torch.Tensor):
        symbols_or_counts = symbols_or_counts.detach().cpu().numpy()
    if isinstance(symbols_or_counts, np.ndarray):
        uniq, cnt = np.unique(symbols_or_counts.reshape(-1), return_counts=True)
        counts = {u.item(): int(c) for u, c in zip(uniq, cnt)}
    elif isinstance(symbols_or_counts, Iterable):
        counts = dict(Counter(symbols_or_counts))
    else:
        raise TypeError("symbols_or_counts must be a sequence of symbols (list, array, tensor, str) or a "
                        f"{{symbol: count}} dict, got {type(symbols_or_counts).__name__}")
    for s in counts:
        _check_symbol(s)
    return counts


def _check_symbol(s: Any) -> None:
    """NaN has no order and no equality, so it cannot be a symbol of a deterministic code."""
    if isinstance(s, (float, np.floating)) and math.isnan(s):
        raise ValueError("symbols must not be NaN (NaN != NaN, so it cannot be coded)")


def huffman_lengths(symbols_or_counts: Any) -> dict[Hashable, int]:
    """Huffman code length of every symbol: repeatedly merge the two least frequent subtrees.

    Ties are broken deterministically (by count, then by the order of first insertion in sorted-symbol
    order), so the same counts always give the same code. A single distinct symbol gets length 1.
    """
    counts = _counts(symbols_or_counts)
    if not counts:
        return {}
    symbols = sorted(counts, key=_sort_key)
    if len(symbols) == 1:
        return {symbols[0]: 1}
    tie = itertools.count()
    heap = [(counts[s], next(tie), [s]) for s in symbols]
    heapq.heapify(heap)
    depth = {s: 0 for s in symbols}
    while len(heap) > 1:
        c1, _, g1 = heapq.heappop(heap)
        c2, _, g2 = heapq.heappop(heap)
        for s in itertools.chain(g1, g2):  # every leaf under the merged node moves one level deeper
            depth[s] += 1
        heapq.heappush(heap, (c1 + c2, next(tie), g1 + g2))
    return depth


def _sort_key(s: Any) -> tuple:
    return (0, s, "") if isinstance(s, (int, float, np.integer, np.floating)) else (1, 0, repr(s))


def canonical_code(lengths: Mapping[Hashable, int]) -> Table:
    """Canonical prefix code from code lengths: symbols sorted by (length, symbol) get consecutive codes.

    Only the lengths need to be stored; the codes follow from them (DEFLATE does the same).
    """
    check_type("lengths", lengths, Mapping, "a {symbol: code length} dict")
    table: Table = {}
    code, prev_len = 0, 0
    for s in lengths:
        check_int(f"length of symbol {s!r}", lengths[s], min_value=1, max_value=64)
    for s in sorted(lengths, key=lambda s: (lengths[s], _sort_key(s))):
        length = lengths[s]
        check_int(f"length of symbol {s!r}", length, min_value=1, max_value=64)
        code <<= length - prev_len
        table[s] = (code, length)
        code += 1
        prev_len = length
    if code > (1 << prev_len) and table:
        raise ValueError("code lengths violate the Kraft inequality; not a prefix code")
    return table


def huffman_code(symbols_or_counts: Any, *, as_strings: bool = False) -> Table | dict[Any, str]:
    """Canonical Huffman code of a symbol sequence (or a ``{symbol: count}`` mapping).

    Returns ``{symbol: (code, length)}``, or ``{symbol: "0101"}`` with ``as_strings=True``.
    """
    check_type("as_strings", as_strings, bool, "True or False")
    table = canonical_code(huffman_lengths(symbols_or_counts))
    if as_strings:
        return {s: format(c, f"0{n}b") for s, (c, n) in table.items()}
    return table


def check_table(table: Any) -> Table:
    """Return ``table`` if it is a prefix code ``{symbol: (code, length)}`` with 1 <= length <= 64 and
    0 <= code < 2**length, and no code is a prefix of another; TypeError or ValueError otherwise."""
    check_type("table", table, Mapping, "a Huffman table {symbol: (code, length)} (see huffman_code)")
    spans = []
    for s, entry in table.items():
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise TypeError(f"table[{s!r}] must be a (code, length) pair of ints, got {entry!r}")
        code = check_int(f"code of table[{s!r}]", entry[0], min_value=0)
        length = check_int(f"length of table[{s!r}]", entry[1], min_value=1, max_value=64)
        if code >> length:
            raise ValueError(f"table[{s!r}] = {entry!r}: code {code} does not fit in {length} bits")
        spans.append((code << (64 - length), (code + 1) << (64 - length), s))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"table is not a prefix code: the codes of {a!r} and {b!r} overlap")
    return table


def _int_symbols(symbols: Any) -> np.ndarray:
    a = symbols.detach().cpu().numpy() if isinstance(symbols, torch.Tensor) else np.asarray(symbols)
    a = a.reshape(-1)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"huffman_encode codes integer symbols; got dtype {a.dtype} (map values to codes first)")
    if a.size and int(a.min()) < 0:
        raise ValueError("huffman_encode codes non-negative integer symbols; got a negative value")
    return a.astype(np.int64)


def huffman_encode(symbols: Any, table: Table | None = None) -> tuple[bytes, Table]:
    """Huffman-code non-negative integer ``symbols``; returns (bit stream, canonical table).

    ``table`` defaults to the Huffman code of ``symbols`` themselves. The stream is MSB-first, zero-padded.
    """
    a = _int_symbols(symbols)
    table = huffman_code(a) if table is None else check_table(table)
    if a.size == 0:
        return b"", table
    uniq, inverse = np.unique(a, return_inverse=True)
    missing = [int(u) for u in uniq if int(u) not in table]
    if missing:
        raise ValueError(f"symbols {missing[:5]} are not in the table")
    codes = np.array([table[int(u)][0] for u in uniq], dtype=np.uint64)[inverse]
    lengths = np.array([table[int(u)][1] for u in uniq], dtype=np.int64)[inverse]
    max_len = int(lengths.max())
    if max_len > 63:
        raise ValueError(f"code length {max_len} > 63 bits is not supported")
    bits = np.empty(int(lengths.sum()), dtype=np.uint8)
    pos = 0
    for start in range(0, a.size, 1 << 16):  # chunks bound the (n x max_len) temporary
        c, n = codes[start:start + (1 << 16)], lengths[start:start + (1 << 16)]
        col = np.arange(max_len, dtype=np.int64)
        shift = (n[:, None] - 1 - col[None, :]).clip(min=0).astype(np.uint64)
        bitmat = ((c[:, None] >> shift) & np.uint64(1)).astype(np.uint8)
        chunk = bitmat[col[None, :] < n[:, None]]  # row-major: each code's bits in order
        bits[pos:pos + chunk.size] = chunk
        pos += chunk.size
    return np.packbits(bits).tobytes(), table


def huffman_decode(data: bytes, table: Table, n: int, *, lut_bits: int = 20) -> np.ndarray:
    """Decode ``n`` symbols from a :func:`huffman_encode` stream with its (canonical) ``table``.

    Codes up to ``lut_bits`` long are decoded with a lookup table indexed by the next ``max_len`` bits;
    longer codes fall back to the canonical bit-by-bit decoder.
    """
    check_bytes("data", data)
    check_table(table)
    check_int("n", n, min_value=0)
    check_int("lut_bits", lut_bits, min_value=1, max_value=MAX_LUT_BITS)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if not table:
        raise ValueError("cannot decode symbols with an empty table")
    max_len = max(length for _, length in table.values())
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if max_len <= lut_bits:
        return _decode_lut(bits, table, n, max_len)
    return _decode_canonical(bits, table, n)


def _decode_lut(bits: np.ndarray, table: Table, n: int, max_len: int) -> np.ndarray:
    sym_lut = np.full(1 << max_len, -1, dtype=np.int64)
    len_lut = np.zeros(1 << max_len, dtype=np.int64)
    for s, (code, length) in table.items():
        lo = code << (max_len - length)
        sym_lut[lo:lo + (1 << (max_len - length))] = s
        len_lut[lo:lo + (1 << (max_len - length))] = length
    padded = np.concatenate([bits.astype(np.int64), np.zeros(max_len, dtype=np.int64)])
    windows = np.zeros(bits.size, dtype=np.int64)  # windows[i] = the max_len bits starting at bit i
    for j in range(max_len):
        windows = (windows << 1) | padded[j:j + bits.size]
    win, syms, lens = windows.tolist(), sym_lut.tolist(), len_lut.tolist()
    out = [0] * n
    pos = 0
    try:
        for i in range(n):
            w = win[pos]
            out[i] = syms[w]
            pos += lens[w]
    except IndexError:
        raise ValueError(f"stream ends after {i} of {n} symbols") from None
    if pos > bits.size or min(out) < 0:
        raise ValueError("stream is too short or does not match the table")
    return np.asarray(out, dtype=np.int64)


def _decode_canonical(bits: np.ndarray, table: Table, n: int) -> np.ndarray:
    by_len: dict[int, dict[int, Any]] = {}
    for s, (code, length) in table.items():
        by_len.setdefault(length, {})[code] = s
    out, code, length = [], 0, 0
    for b in bits.tolist():
        code, length = (code << 1) | b, length + 1
        s = by_len.get(length, {}).get(code)
        if s is not None:
            out.append(s)
            code, length = 0, 0
            if len(out) == n:
                return np.asarray(out, dtype=np.int64)
    raise ValueError(f"stream ends after {len(out)} of {n} symbols")


def coded_bits(symbols: Any, table: Table) -> int:
    """Bits the payload of ``symbols`` takes under ``table`` (before padding to a byte)."""
    counts = _counts(_int_symbols(symbols))
    missing = [s for s in counts if s not in check_table(table)]
    if missing:
        raise ValueError(f"symbols {missing[:5]} are not in the table")
    return sum(c * table[s][1] for s, c in counts.items())


def entropy_bits(symbols_or_counts: Any) -> float:
    """The entropy bound in bits for the whole message: ``n * H`` with ``H = -sum p log2 p``.

    No lossless symbol-by-symbol code spends fewer bits; Huffman spends fewer than ``n * (H + 1)``.
    """
    counts = np.array(list(_counts(symbols_or_counts).values()), dtype=np.float64)
    n = counts.sum()
    if n == 0:
        return 0.0
    p = counts / n
    return float(-(counts * np.log2(p)).sum())


# -- table serialization: canonical codes need only the lengths -------------------------------------------

_TAB_LIST, _TAB_ALPHABET = 0, 1


def table_to_bytes(table: Table) -> bytes:
    """Compact bytes of a canonical table over non-negative int symbols (the smaller of two layouts).

    * list:     mode, max_len, width | count per length (uint16 x max_len) | symbols in canonical order
    * alphabet: mode, max_len, width | uint32 alphabet size | one code length per symbol 0..size-1
      (4 bits each when max_len <= 15, else 8)
    """
    if not check_table(table):
        return struct.pack("<BBB", _TAB_LIST, 0, 1)
    symbols = list(table)
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in symbols):
        raise TypeError("table_to_bytes stores tables over non-negative int symbols only")
    max_len = max(length for _, length in table.values())
    if max_len > 255:
        raise ValueError("code length > 255 cannot be stored")
    max_sym = max(int(s) for s in symbols)
    if max_sym >= 1 << 32:
        raise ValueError(f"symbol {max_sym} does not fit the table's 4-byte symbols (max {2**32 - 1})")
    width = 1 if max_sym < 1 << 8 else 2 if max_sym < 1 << 16 else 4
    fmt = _WIDTH_FMT[width]
    per_len = Counter(length for _, length in table.values())
    ordered = sorted(symbols, key=lambda s: (table[s][1], s))
    as_list = (struct.pack("<BBB", _TAB_LIST, max_len, width)
               + struct.pack(f"<{max_len}H", *(per_len.get(i, 0) for i in range(1, max_len + 1)))
               + struct.pack(f"<{len(ordered)}{fmt}", *map(int, ordered)))
    lengths = np.zeros(max_sym + 1, dtype=np.int64)
    for s, (_, length) in table.items():
        lengths[int(s)] = length
    nib = max_len <= 15
    as_alpha = (struct.pack("<BBBI", _TAB_ALPHABET, max_len, width, max_sym + 1)
                + (pack_bits(lengths, 4) if nib else lengths.astype(np.uint8).tobytes()))
    return as_list if len(as_list) <= len(as_alpha) else as_alpha


def table_from_bytes(data: bytes) -> tuple[Table, int]:
    """Inverse of :func:`table_to_bytes`; returns (table, bytes consumed). ValueError if ``data`` is not a table."""
    check_bytes("data", data)
    with reading("data", "Huffman table"):
        mode, max_len, width = struct.unpack_from("<BBB", data, 0)
        if max_len == 0:
            return {}, 3
        if width not in _WIDTH_FMT:
            raise ValueError(f"symbol width {width} (expected 1, 2 or 4 bytes)")
        if mode == _TAB_LIST:
            return _table_from_list(data, max_len, width)
        if mode == _TAB_ALPHABET:
            return _table_from_alphabet(data, max_len)
        raise ValueError(f"unknown layout {mode} (expected {_TAB_LIST} or {_TAB_ALPHABET})")


def _table_from_list(data: bytes, max_len: int, width: int) -> tuple[Table, int]:
    per_len = struct.unpack_from(f"<{max_len}H", data, 3)
    total = sum(per_len)
    off = 3 + 2 * max_len
    ordered = struct.unpack_from(f"<{total}{_WIDTH_FMT[width]}", data, off)
    lengths, it = {}, iter(ordered)
    for length, cnt in enumerate(per_len, start=1):
        for _ in range(cnt):
            lengths[int(next(it))] = length
    if len(lengths) != total:
        raise ValueError("a symbol is listed twice")
    return canonical_code(lengths), off + total * width


def _table_from_alphabet(data: bytes, max_len: int) -> tuple[Table, int]:
    (size,) = struct.unpack_from("<I", data, 3)
    nbytes = math.ceil(size * 4 / 8) if max_len <= 15 else size
    raw = data[7:7 + nbytes]
    if len(raw) < nbytes:
        raise ValueError(f"truncated: {size} code lengths need {nbytes} bytes, {len(raw)} left")
    lens = unpack_bits(raw, 4, size) if max_len <= 15 else np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
    return canonical_code({s: int(v) for s, v in enumerate(lens) if v}), 7 + nbytes


def huffman_size(symbols: Any) -> dict[str, float]:
    """Measured sizes of Huffman-coding ``symbols``: payload bytes, table bytes, and the entropy bound."""
    data, table = huffman_encode(symbols)
    return {"n": int(np.asarray(symbols).size), "payload_bytes": len(data), "payload_bits": coded_bits(symbols, table),
            "table_bytes": len(table_to_bytes(table)), "entropy_bits": entropy_bits(_int_symbols(symbols))}


# ----------------------------------------------------------------------------------------------------------
# Sparse storage: relative index (Deep Compression) and bitmask
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SparseTensor:
    """A tensor stored as non-zero ``values`` plus positions.

    ``layout="relative"``: ``index`` holds, per stored value, the number of zeros skipped before it
    (0 .. 2**index_bits - 1); a stored value of 0 is a *filler* that only bridges a longer gap.
    ``layout="bitmask"``: ``index`` holds one 0/1 flag per position (packed 8 per byte when written).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str
    values: np.ndarray
    index: np.ndarray
    index_bits: int

    def __post_init__(self) -> None:
        check_choice("layout", self.layout, SPARSE_LAYOUTS)
        check_type("dtype", self.dtype, torch.dtype, "a torch.dtype")
        check_type("shape", self.shape, (tuple, list, torch.Size), "a tuple of non-negative ints")
        for d in self.shape:
            check_int("shape entries", d, min_value=0)
        check_type("values", self.values, np.ndarray, "a numpy array")
        check_type("index", self.index, np.ndarray, "a numpy array of integers")
        check_int("index_bits", self.index_bits, min_value=1, max_value=MAX_INDEX_BITS)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n_fillers(self) -> int:
        """Filler zeros stored to bridge gaps longer than 2**index_bits - 1 (relative layout)."""
        return int((self.values == 0).sum()) if self.layout == "relative" else 0

    def index_bytes(self) -> bytes:
        """The packed position stream."""
        return pack_bits(self.index, self.index_bits) if self.index.size else b""

    def value_bytes(self) -> bytes:
        """The raw value stream at the tensor's dtype."""
        return self.values.tobytes()

    def nbytes(self) -> int:
        """Bytes of the two streams (no header)."""
        return math.ceil(self.index.size * self.index_bits / 8) + self.values.nbytes


def relative_index(positions: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Deep Compression relative indices of sorted flat ``positions``.

    Returns (gaps, is_filler): one entry per stored value; each gap is the number of skipped positions
    (< 2**index_bits). A gap that does not fit is split with filler entries of gap 2**index_bits - 1.
    """
    check_int("index_bits", index_bits, min_value=1, max_value=MAX_INDEX_BITS)
    span = 1 << index_bits  # one entry advances the position by at most `span`
    pos = sorted_positions(positions)
    gaps = np.diff(pos, prepend=-1) - 1  # zeros skipped before each non-zero
    fillers = gaps // span  # each filler consumes span positions (span - 1 zeros + the filler zero itself)
    rest = gaps - fillers * span
    total = int(fillers.sum()) + pos.size
    out_gap = np.full(total, span - 1, dtype=np.int64)
    is_filler = np.ones(total, dtype=bool)
    where = np.cumsum(fillers + 1) - 1  # where each real entry lands
    out_gap[where] = rest
    is_filler[where] = False
    return out_gap, is_filler


def sorted_positions(positions: Any, param: str = "positions") -> np.ndarray:
    """``positions`` as a flat int64 array; TypeError unless integer, ValueError unless >= 0 and strictly increasing."""
    pos = integer_codes(param, positions, None)
    if pos.size > 1 and not bool((np.diff(pos) > 0).all()):
        raise ValueError(f"{param} must be strictly increasing flat indices (sorted, no repeats)")
    return pos


def positions_from_relative(gaps: np.ndarray) -> np.ndarray:
    """Flat positions of every stored entry (fillers included) from relative ``gaps`` (non-negative ints)."""
    return np.cumsum(integer_codes("gaps", gaps, None) + 1) - 1


def _flat_numpy(tensor: torch.Tensor) -> np.ndarray:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    t = tensor.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        raise TypeError("bfloat16 tensors are not supported (numpy has no bfloat16)")
    return t.numpy()


def encode_sparse(tensor: torch.Tensor, index_bits: int | None = 4, layout: str = "relative") -> SparseTensor:
    """Store ``tensor`` as non-zeros plus relative indices (``index_bits`` each; None picks the smallest
    encoding over 1..12 bits) or, with ``layout="bitmask"``, a one-bit-per-position mask."""
    check_choice("layout", layout, SPARSE_LAYOUTS)
    if index_bits is not None:
        check_int("index_bits", index_bits, min_value=1, max_value=MAX_INDEX_BITS)
    flat = _flat_numpy(tensor)
    nz = np.flatnonzero(flat)
    shape = tuple(tensor.shape)
    if layout == "bitmask":
        return SparseTensor(shape, tensor.dtype, "bitmask", flat[nz].copy(), (flat != 0).astype(np.int64), 1)
    if index_bits is None:
        index_bits = best_index_bits(nz, flat.dtype.itemsize * 8)
    gaps, is_filler = relative_index(nz, index_bits)
    values = np.zeros(gaps.size, dtype=flat.dtype)
    values[~is_filler] = flat[nz]
    return SparseTensor(shape, tensor.dtype, "relative", values, gaps, index_bits)


def best_index_bits(positions: np.ndarray, value_bits: float, candidates: Iterable[int] = range(1, 13)) -> int:
    """The index width that minimises (index_bits + value_bits) x (entries incl. fillers)."""
    pos = sorted_positions(positions)
    check_float("value_bits", value_bits, min_value=0.0)
    candidates = list(candidates)
    if not candidates:
        raise ValueError(f"candidates must name at least one index width in 1..{MAX_INDEX_BITS}")
    gaps = np.diff(pos, prepend=-1) - 1
    best, best_bits = None, None
    for b in candidates:
        check_int("candidates", b, min_value=1, max_value=MAX_INDEX_BITS)
        entries = pos.size + int((gaps >> b).sum())
        total = entries * (b + value_bits)
        if best is None or total < best:
            best, best_bits = total, b
    return int(best_bits)


def decode_sparse(sparse: SparseTensor) -> torch.Tensor:
    """The exact dense tensor of an :func:`encode_sparse` result."""
    check_type("sparse", sparse, SparseTensor, "a SparseTensor (see encode_sparse)")
    flat = np.zeros(sparse.numel, dtype=sparse.values.dtype if sparse.values.size else numpy_dtype(sparse.dtype))
    if sparse.layout == "bitmask":
        mask = integer_codes("index", sparse.index, 1).astype(bool)
        if mask.size != sparse.numel or int(mask.sum()) != sparse.values.size:
            raise ValueError(f"bitmask of {mask.size} flags ({int(mask.sum())} set) does not fit a tensor of "
                             f"{sparse.numel} values with {sparse.values.size} non-zeros")
        flat[mask] = sparse.values
    else:
        pos = positions_from_relative(sparse.index)
        if pos.size and pos[-1] >= sparse.numel:
            raise ValueError("relative indices run past the end of the tensor")
        if pos.size != sparse.values.size:
            raise ValueError(f"{pos.size} relative indices but {sparse.values.size} values")
        flat[pos] = sparse.values  # fillers write 0 over 0
    return torch.from_numpy(flat.copy()).to(sparse.dtype).reshape(sparse.shape)


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype matching a torch dtype (TypeError for one NumPy lacks, e.g. bfloat16)."""
    check_type("dtype", dtype, torch.dtype, "a torch.dtype")
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError as err:
        raise TypeError(f"dtype={dtype} has no NumPy equivalent ({err})") from None


__all__ = [
    "pack_bits",
    "unpack_bits",
    "huffman_lengths",
    "canonical_code",
    "huffman_code",
    "huffman_encode",
    "huffman_decode",
    "coded_bits",
    "entropy_bits",
    "huffman_size",
    "table_to_bytes",
    "table_from_bytes",
    "SparseTensor",
    "relative_index",
    "positions_from_relative",
    "encode_sparse",
    "decode_sparse",
    "best_index_bits",
    "integer_codes",
    "sorted_positions",
    "check_table",
    "numpy_dtype",
]
