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


# ---------------------------------------------------------------- bad input


def test_pack_bits_rejects_floats_and_negatives_instead_of_truncating():
    with pytest.raises(TypeError, match="values must have an integer dtype, got float64"):
        pack_bits(np.array([1.7, 2.2]), 3)
    with pytest.raises(ValueError, match="values: value -1 is out of range for bits=3"):
        pack_bits(np.array([-1, 2]), 3)
    with pytest.raises(TypeError, match="data must be bytes"):
        unpack_bits([1, 2], 3, 2)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x00\x05", "truncated or corrupt binary field"),
        (b"\x00\x01\x03\x01\x00\x07", "symbol width 3"),
        (b"\x07\x01\x01\x01\x00\x07", "unknown layout 7"),
        (b"\x00\x02\x01\x05\x00\x00\x00", "truncated or corrupt binary field"),  # 5 symbols listed, none stored
        (b"\x00\x01\x01\x02\x00\x07\x07", "a symbol is listed twice"),
        (b"\x00\x01\x01\x03\x00\x01\x02\x03", "code lengths violate the Kraft inequality"),  # three 1-bit codes
        (b"\x01\x03\x01\xff\x00\x00\x00\x12", "truncated: 255 code lengths need 128 bytes"),
    ],
)
def test_table_from_bytes_names_what_is_wrong(data, match):
    with pytest.raises(ValueError, match=f"data: not a valid Huffman table: {match}"):
        table_from_bytes(data)


def test_table_from_bytes_survives_random_corruption():
    from survey_lib._io import FileFormatError

    good = table_to_bytes(huffman_code(RNG.integers(0, 300, 2000)))
    rng = np.random.default_rng(3)
    outcomes = {"decoded": 0, "rejected": 0}
    for _ in range(500):
        b = bytearray(good)
        b[int(rng.integers(len(b)))] = int(rng.integers(256))
        try:
            cut = len(b) if rng.random() < 0.5 else int(rng.integers(1, len(b)))
            table_from_bytes(bytes(b[:cut]))
            outcomes["decoded"] += 1
        except FileFormatError:
            outcomes["rejected"] += 1
    print(f"500 corrupted tables: {outcomes}")
    assert outcomes["rejected"] > 0 and sum(outcomes.values()) == 500  # nothing else escaped


def test_huffman_functions_reject_bad_tables_and_arguments():
    from survey_lib.methods.coding import canonical_code, huffman_lengths

    table = huffman_code(np.array([0, 0, 1, 2]))
    with pytest.raises(TypeError, match=r"table\[0\] must be a \(code, length\) pair of ints, got 5"):
        huffman_decode(b"\x00", {0: 5}, 1)
    with pytest.raises(ValueError, match="table is not a prefix code: the codes of 1 and 0 overlap"):
        huffman_decode(b"\x00", {0: (0, 1), 1: (0, 2)}, 3)
    with pytest.raises(ValueError, match=r"code 4 does not fit in 2 bits"):
        huffman_encode([0], {0: (4, 2)})
    with pytest.raises(ValueError, match="lut_bits=0 is out of range"):
        huffman_decode(b"\x00", table, 1, lut_bits=0)
    with pytest.raises(TypeError, match="data must be bytes"):
        huffman_decode("0101", table, 1)
    with pytest.raises(ValueError, match=r"symbols \[7\] are not in the table"):
        coded_bits([7], table)
    with pytest.raises(TypeError, match="symbols_or_counts must be a sequence of symbols"):
        huffman_lengths(5)
    with pytest.raises(ValueError, match="symbols must not be NaN"):
        huffman_code([float("nan"), 1.0, float("nan")])
    with pytest.raises(ValueError, match=r"count of symbol 'a'=-1 is out of range"):
        huffman_code({"a": -1, "b": 2})
    with pytest.raises(TypeError, match="lengths must be a {symbol: code length} dict, got list"):
        canonical_code([1, 2])
    with pytest.raises(TypeError, match="as_strings must be True or False"):
        huffman_code([1, 2], as_strings="yes")


def test_sparse_coding_rejects_bad_positions_and_objects():
    from survey_lib.methods.coding import SparseTensor, best_index_bits, numpy_dtype, positions_from_relative

    with pytest.raises(ValueError, match="positions must be strictly increasing"):
        relative_index(np.array([5, 2]), 3)
    with pytest.raises(TypeError, match="positions must have an integer dtype"):
        relative_index(np.array([1.5, 2.0]), 3)
    with pytest.raises(ValueError, match="gaps must be >= 0, got -3"):
        positions_from_relative(np.array([-3]))
    with pytest.raises(ValueError, match="candidates must name at least one index width"):
        best_index_bits(np.array([1, 5]), 32, [])
    with pytest.raises(ValueError, match="candidates=20 is out of range"):
        best_index_bits(np.array([1, 5]), 32, [20])
    with pytest.raises(TypeError, match="sparse must be a SparseTensor"):
        decode_sparse("x")
    with pytest.raises(TypeError, match="dtype=torch.bfloat16 has no NumPy equivalent"):
        numpy_dtype(torch.bfloat16)
    with pytest.raises(ValueError, match="layout='coo' is not supported"):
        SparseTensor((2,), torch.float32, "coo", np.zeros(0), np.zeros(0, dtype=np.int64), 1)
    bad_mask = SparseTensor((4,), torch.float32, "bitmask", np.ones(1, np.float32), np.array([1, 1, 0, 0]), 1)
    with pytest.raises(ValueError, match=r"bitmask of 4 flags \(2 set\) does not fit a tensor of 4 values with 1 non-zeros"):
        decode_sparse(bad_mask)
    with pytest.raises(ValueError, match="index_bits=0 is out of range"):
        encode_sparse(torch.tensor([0.0, 1.0]), index_bits=0)
