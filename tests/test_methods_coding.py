import math

import numpy as np
import pytest
import torch

from survey_lib.methods.coding import (
    coded_bits,
    decode_sparse,
    encode_sparse,
    entropy_bits,
    huffman_code,
    huffman_decode,
    huffman_encode,
    pack_bits,
    relative_index,
    table_from_bytes,
    table_to_bytes,
    unpack_bits,
)

RNG = np.random.default_rng(0)
INPUTS = {
    "uniform32": RNG.integers(0, 32, 5000),
    "skewed": RNG.geometric(0.2, 5000),
    "gaussian_codes": np.clip(np.round(RNG.normal(16, 4, 20000)), 0, 31).astype(np.int64),
    "one_symbol": np.full(17, 7),
    "single_value": np.array([3]),
    "empty": np.array([], dtype=np.int64),
    "wide_symbols": RNG.integers(0, 70000, 300),
}


@pytest.mark.parametrize("name", list(INPUTS))
def test_huffman_round_trip(name):
    x = INPUTS[name]
    data, table = huffman_encode(x)
    assert np.array_equal(huffman_decode(data, table, x.size), x)
    table2, used = table_from_bytes(table_to_bytes(table))
    assert table2 == table and used == len(table_to_bytes(table))


def test_huffman_textbook_example_and_prefix_free():
    code = huffman_code("abracadabra", as_strings=True)
    assert len(code["a"]) == 1 and all(len(code[s]) == 3 for s in "bcdr")
    words = list(code.values())
    assert not any(a != b and b.startswith(a) for a in words for b in words)
    assert sum(2.0 ** -len(w) for w in words) == 1.0  # a full binary tree (Kraft equality)
    assert huffman_code({}) == {}
    assert huffman_code({"x": 5}) == {"x": (0, 1)}


def test_huffman_is_within_one_bit_of_entropy_and_exact_for_dyadic():
    for x in INPUTS.values():
        if np.unique(x).size < 2:
            continue
        h = entropy_bits(x)
        bits = coded_bits(x, huffman_code(x))
        assert h - 1e-9 <= bits < h + x.size  # H <= L < H + 1 bits per symbol
    dyadic = np.repeat([0, 1, 2, 3], [8, 4, 2, 2])  # p = 1/2, 1/4, 1/8, 1/8
    assert coded_bits(dyadic, huffman_code(dyadic)) == entropy_bits(dyadic) == 28


@pytest.mark.parametrize("name", ["uniform32", "skewed"])
def test_coded_size_within_one_percent_of_entropy_plus_table(name):
    # holds where Huffman's per-symbol rounding is small against H (here); the general bound is H + 1 bit
    x = INPUTS[name]
    data, table = huffman_encode(x)
    table_bits = 8 * len(table_to_bytes(table))
    assert 8 * len(data) + table_bits <= 1.01 * entropy_bits(x) + table_bits + 8


def test_long_codes_fall_back_to_canonical_decoder():
    fib = [1, 1]
    while len(fib) < 22:
        fib.append(fib[-1] + fib[-2])
    x = np.repeat(np.arange(len(fib)), fib)
    np.random.default_rng(1).shuffle(x)
    data, table = huffman_encode(x)
    assert max(n for _, n in table.values()) == len(fib) - 1
    assert np.array_equal(huffman_decode(data, table, x.size, lut_bits=8), x)


def test_huffman_rejects_floats_negatives_and_short_streams():
    with pytest.raises(TypeError, match="integer"):
        huffman_encode(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        huffman_encode(np.array([-1, 2]))
    data, table = huffman_encode(INPUTS["uniform32"])
    with pytest.raises(ValueError):
        huffman_decode(data[:10], table, INPUTS["uniform32"].size)


def test_pack_bits_round_trip_and_overflow():
    v = RNG.integers(0, 2**5, 1001)
    packed = pack_bits(v, 5)
    assert len(packed) == math.ceil(1001 * 5 / 8)
    assert np.array_equal(unpack_bits(packed, 5, 1001), v)
    with pytest.raises(ValueError, match="bits=3"):
        pack_bits(np.array([8]), 3)


def test_relative_index_inserts_filler_zeros():
    # Deep Compression Fig. 2 style: 3-bit gaps; a gap of 9 zeros needs one filler (8 positions)
    gaps, filler = relative_index(np.array([1, 11, 12]), 3)
    assert gaps.tolist() == [1, 7, 1, 0] and filler.tolist() == [False, True, False, False]


@pytest.mark.parametrize("index_bits", [1, 2, 3, 4, 8, None])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.3, 1.0])
def test_encode_sparse_round_trip(index_bits, density):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 29, generator=g) * (torch.rand(37, 29, generator=g) < density)
    sp = encode_sparse(w, index_bits=index_bits)
    assert torch.equal(decode_sparse(sp), w)
    assert int((sp.values != 0).sum()) == int((w != 0).sum())
    bm = encode_sparse(w, layout="bitmask")
    assert torch.equal(decode_sparse(bm), w)


def test_encode_sparse_keeps_dtype_and_rejects_bad_layout():
    w = torch.tensor([[0, 3], [0, 0]], dtype=torch.int64)
    assert torch.equal(decode_sparse(encode_sparse(w, 2)), w)
    with pytest.raises(ValueError, match="layout"):
        encode_sparse(w, layout="coo")
