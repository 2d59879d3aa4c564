import math
import os
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from survey_lib.cost import stored_bytes
from survey_lib.cost.storage import formats, load_dense
from survey_lib.methods.packing import (
    QuantizedTensor,
    deploy_tensors,
    load_packed,
    low_bit_modules,
    pack_bits,
    packed_nbytes,
    read_packed,
    unpack_bits,
    write_packed,
)

# ---------------------------------------------------------------- test-local low-bit modules (the contract)


class _UniformQuant:
    """Mixin: a fixed per-channel (axis 0) asymmetric uniform quantizer of the float ``weight``.

    Carries quantizer internals a deployed file does not need: observer min/max buffers and a step size.
    """

    bits: int
    weight: nn.Parameter

    def _init_quant(self, bits: int) -> None:
        self.bits = bits
        dims = tuple(range(1, self.weight.dim()))
        self.register_buffer("obs_min", self.weight.detach().amin(dim=dims))
        self.register_buffer("obs_max", self.weight.detach().amax(dim=dims))
        self.step = nn.Parameter((self.obs_max - self.obs_min) / (2**bits - 1))

    def integer_weight(self) -> QuantizedTensor:
        w = self.weight.detach()
        dims = tuple(range(1, w.dim()))
        lo, hi = w.amin(dim=dims), w.amax(dim=dims)
        scale = ((hi - lo) / (2**self.bits - 1)).clamp_min(1e-8).float()
        zp = torch.round(-lo / scale).clamp(0, 2**self.bits - 1).float()
        view = (-1,) + (1,) * (w.dim() - 1)
        codes = torch.round(w / scale.view(view) + zp.view(view)).clamp(0, 2**self.bits - 1).to(torch.int64)
        return QuantizedTensor(codes, scale, zp, 0, self.bits)

    def qweight(self) -> torch.Tensor:
        """The dequantized weight, computed here by the contract's formula (not by QuantizedTensor)."""
        q = self.integer_weight()
        view = (-1,) + (1,) * (q.codes.dim() - 1)
        return (q.codes.to(torch.float32) - q.zero_point.view(view)) * q.scale.view(view)


class QLinear(_UniformQuant, nn.Linear):
    def __init__(self, i: int, o: int, bits: int = 4, bias: bool = True):
        super().__init__(i, o, bias=bias)
        self._init_quant(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight(), self.bias)


class QConv2d(_UniformQuant, nn.Conv2d):
    def __init__(self, i: int, o: int, k: int, bits: int = 4, **kw):
        super().__init__(i, o, k, **kw)
        self._init_quant(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.qweight(), self.bias)


class QLinearAct(QLinear):
    """Declares what it needs at inference: its bias and an activation scale (not the observer buffers)."""

    def __init__(self, i: int, o: int, bits: int = 4):
        super().__init__(i, o, bits)
        self.register_buffer("act_scale", torch.tensor(0.05))

    def deploy_tensors(self) -> dict[str, torch.Tensor]:
        return {"bias": self.bias, "act_scale": self.act_scale}


class BinaryLinear(nn.Linear):
    """Binary ±a weights (per tensor): codes {0, 1}, scale 2a, zero point 0.5; returns a plain namespace."""

    def integer_weight(self) -> SimpleNamespace:
        w = self.weight.detach()
        a = w.abs().mean().float()
        return SimpleNamespace(codes=(w >= 0).to(torch.int64), scale=2 * a, zero_point=torch.tensor(0.5),
                               axis=None, bits=1)

    def qweight(self) -> torch.Tensor:
        q = self.integer_weight()
        return (q.codes.to(torch.float32) - q.zero_point) * q.scale


INTERNALS = ("obs_min", "obs_max", "step")


def _model(bits: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        QConv2d(3, 16, 3, bits=bits, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
        QLinearAct(16 * 8 * 8, 256, bits=bits), BinaryLinear(256, 64, bias=False), nn.Linear(64, 10),
    )
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.num_batches_tracked.fill_(7)
    return model.eval()


# ---------------------------------------------------------------- pack_bits / unpack_bits


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("n", [0, 1, 7, 9, 13, 1000, 4099])
def test_pack_round_trip_and_exact_size(bits, n):
    codes = np.random.default_rng(bits * 100 + n).integers(0, 2**bits, n)
    data = pack_bits(codes, bits)
    assert len(data) == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    out = unpack_bits(data, bits, n)
    assert out.dtype == (np.uint8 if bits <= 8 else np.uint16)
    np.testing.assert_array_equal(out, codes)
    # a little-endian bit stream: code i sits at bits i*bits .. (i+1)*bits - 1 of the stream
    assert int.from_bytes(data, "little") == sum(int(c) << (i * bits) for i, c in enumerate(codes))


def test_pack_large_stream_crosses_chunks():
    codes = np.random.default_rng(0).integers(0, 2**5, (1 << 18) * 2 + 3)
    np.testing.assert_array_equal(unpack_bits(pack_bits(codes, 5), 5, codes.size), codes)


def test_pack_natural_layout_hand_worked():
    assert pack_bits([1, 2, 3, 0], 2) == bytes([0b00111001])
    assert pack_bits([1, 0, 1, 1, 0, 0, 0, 0, 1], 1) == bytes([0b00001101, 0b00000001])
    assert pack_bits([0x3, 0xA, 0xF], 4) == bytes([0xA3, 0x0F])
    assert pack_bits([5, 3, 7], 3) == bytes([0xDD, 0x01])  # 5 | 3 << 3 | 7 << 6 = 0x1DD
    assert pack_bits([200, 7], 8) == bytes([200, 7])
    assert pack_bits([0x1234], 16) == bytes([0x34, 0x12])


def test_pack_accepts_tensors_and_unpack_ignores_trailing_bytes():
    codes = torch.tensor([[3, 1], [0, 2]])
    data = pack_bits(codes, 2)
    np.testing.assert_array_equal(unpack_bits(data + b"\xff", 2, 4), [3, 1, 0, 2])
    assert pack_bits([], 3) == b"" and unpack_bits(b"", 3, 0).size == 0


@pytest.mark.parametrize("bits", [0, 17, -1])
def test_pack_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"bits.*1 <= bits <= 16"):
        pack_bits([0], bits)
    with pytest.raises(ValueError, match=r"1 <= bits <= 16"):
        unpack_bits(b"\x00", bits, 1)


def test_pack_bad_codes_and_counts():
    with pytest.raises(TypeError, match="bits"):
        pack_bits([1], 2.0)
    with pytest.raises(ValueError, match="codes: value 4 is out of range for bits=2"):
        pack_bits([0, 4], 2)
    with pytest.raises(ValueError, match="codes: value -1"):
        pack_bits(np.array([-1, 0]), 3)
    with pytest.raises(TypeError, match="integer dtype"):
        pack_bits(np.array([0.0, 1.0]), 2)
    with pytest.raises(TypeError, match="integer dtype"):
        pack_bits(torch.tensor([True, False]), 1)
    with pytest.raises(ValueError, match="count=9 .* need 2 bytes"):
        unpack_bits(pack_bits([1] * 8, 1), 1, 9)
    with pytest.raises(ValueError, match="count"):
        unpack_bits(b"\x00", 1, -1)


# ---------------------------------------------------------------- QuantizedTensor


def _qt(**kw):
    args = dict(codes=torch.tensor([[0, 3], [2, 1]]), scale=torch.tensor([0.5, 2.0]),
                zero_point=torch.tensor([1.0, 1.5]), axis=0, bits=2)
    args.update(kw)
    return QuantizedTensor(**args)


def test_quantized_tensor_dequantize_per_channel_and_per_tensor():
    torch.testing.assert_close(_qt().dequantize(), torch.tensor([[-0.5, 1.0], [1.0, -1.0]]), rtol=0, atol=0)
    q = _qt(axis=1)
    torch.testing.assert_close(q.dequantize(), torch.tensor([[-0.5, 3.0], [0.5, -1.0]]), rtol=0, atol=0)
    binary = QuantizedTensor(torch.tensor([0, 1, 1]), torch.tensor(0.6), torch.tensor(0.5), None, 1)
    torch.testing.assert_close(binary.dequantize(), torch.tensor([-0.3, 0.3, 0.3]))
    assert binary.dequantize().dtype == torch.float32 and _qt().nbytes() == 1 + 16


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(codes=torch.tensor([[0.0, 1.0], [1.0, 0.0]])), TypeError, "integer dtype"),
        (dict(codes=[[0, 1], [1, 0]]), TypeError, "codes must be"),
        (dict(codes=torch.tensor([[0, 4], [1, 0]])), ValueError, "codes: value 4 is out of range"),
        (dict(scale=torch.tensor([0.5, 2.0], dtype=torch.float64)), TypeError, "scale must be float32"),
        (dict(scale=[0.5, 2.0]), TypeError, "scale must be"),
        (dict(scale=torch.tensor([0.5, 2.0, 1.0])), ValueError, r"scale has shape \[3\], expected \[2\]"),
        (dict(zero_point=torch.tensor(1.0)), ValueError, "zero_point has shape"),
        (dict(scale=torch.tensor([float("nan"), 1.0])), ValueError, "finite"),
        (dict(scale=torch.tensor([-1.0, 1.0])), ValueError, ">= 0"),
        (dict(axis=2), ValueError, "axis"),
        (dict(axis=None), ValueError, r"expected \[\]"),
        (dict(bits=0), ValueError, "bits"),
        (dict(bits=17), ValueError, "bits"),
    ],
)
def test_quantized_tensor_validation(kw, err, match):
    with pytest.raises(err, match=match):
        _qt(**kw)


# ---------------------------------------------------------------- the "packed" format


def test_packed_round_trip_exact(tmp_path):
    model = _model()
    path = tmp_path / "m.packed"
    write_packed(model, path)
    loaded = load_packed(path)
    sd = model.state_dict()
    internals = {f"{p}.{i}" for p in ("0", "4") for i in INTERNALS}
    assert set(loaded) == set(sd) - internals  # act_scale is declared by deploy_tensors, so it is kept
    for name in ("0", "4", "5"):
        w = loaded[f"{name}.weight"]
        assert w.dtype == torch.float32 and torch.equal(w, model.get_submodule(name).qweight())
    for name in set(loaded) - {"0.weight", "4.weight", "5.weight"}:
        assert loaded[name].dtype == sd[name].dtype and torch.equal(loaded[name], sd[name]), name
    x = torch.randn(2, 3, 8, 8)
    assert model(x).shape == (2, 10)  # the test modules really run on their dequantized weights


def test_read_packed_gives_codes_in_file_order(tmp_path):
    model = _model(bits=3)
    path = tmp_path / "m.packed"
    write_packed(model, path)
    stored = read_packed(path)
    assert list(stored)[:3] == ["0.weight", "0.bias", "1.weight"]
    q = stored["4.weight"]
    ref = model[4].integer_weight()
    assert isinstance(q, QuantizedTensor) and q.bits == 3 and q.axis == 0
    assert all(torch.equal(getattr(q, f), getattr(ref, f)) for f in ("codes", "scale", "zero_point"))
    assert stored["5.weight"].axis is None and stored["5.weight"].scale.shape == ()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_packed_file_size_is_theoretical_plus_header(tmp_path, bits):
    model = _model(bits=bits)
    path = tmp_path / "m.packed"
    write_packed(model, path)
    payload = 0
    for name, m in model.named_modules():
        if hasattr(m, "integer_weight"):
            q = m.integer_weight()
            payload += math.ceil(m.weight.numel() * q.bits / 8) + 8 * q.scale.numel()
    dense_names = set(load_packed(path)) - {"0.weight", "4.weight", "5.weight"}
    sd = dict(model.state_dict(), **{"4.act_scale": model[4].act_scale})
    payload += sum(sd[n].numel() * sd[n].element_size() for n in dense_names)
    size = os.path.getsize(path)
    (hlen,) = struct.unpack_from("<Q", path.read_bytes(), 8)
    assert size == 16 + hlen + payload  # magic + length + header (padded to 64) + exact streams
    assert hlen < 2048 and size - payload < 0.04 * size


def test_stored_bytes_uses_packed_and_is_much_smaller_than_dense(tmp_path):
    assert "packed" in formats()
    model = _model(bits=4)
    model.storage_format = "packed"
    packed = stored_bytes(model, path=tmp_path / "m.packed")
    dense = stored_bytes(model, "dense")
    assert packed.fmt == "packed" and packed.bytes == os.path.getsize(tmp_path / "m.packed")
    assert dense.bytes / packed.bytes >= 6


def test_model_without_low_bit_modules_stores_everything_raw(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    write_packed(model, tmp_path / "m.packed")
    model.storage_format = "dense"
    dense = load_dense(stored_bytes(model, path=tmp_path / "m.dense").path)
    loaded = load_packed(tmp_path / "m.packed")
    assert loaded.keys() == dense.keys() and all(torch.equal(loaded[k], dense[k]) for k in dense)


def test_deploy_tensors_rule():
    assert set(deploy_tensors(QLinear(4, 3))) == {"bias"}
    assert deploy_tensors(QLinear(4, 3, bias=False)) == {}
    assert set(deploy_tensors(QLinearAct(4, 3))) == {"bias", "act_scale"}

    class Bad(QLinear):
        def deploy_tensors(self):
            return {"weight": self.weight}

    with pytest.raises(ValueError, match="other than 'weight'"):
        deploy_tensors(Bad(4, 3))


def test_packed_errors(tmp_path):
    class WrongShape(QLinear):
        def integer_weight(self):
            q = super().integer_weight()
            return QuantizedTensor(q.codes[:, :2], q.scale, q.zero_point, 0, q.bits)

    class Incomplete(nn.Linear):
        def integer_weight(self):
            return SimpleNamespace(codes=torch.zeros(3, 4, dtype=torch.int64), bits=2)

    with pytest.raises(ValueError, match="codes have shape"):
        write_packed(nn.Sequential(WrongShape(4, 3)), tmp_path / "a")
    with pytest.raises(TypeError, match="lacks"):
        write_packed(nn.Sequential(Incomplete(4, 3)), tmp_path / "b")
    outer = QLinear(4, 3)
    outer.inner = QLinear(4, 3)
    with pytest.raises(ValueError, match="nested"):
        low_bit_modules(nn.Sequential(outer))
    stored_bytes(nn.Linear(2, 2), "dense", path=tmp_path / "d")
    with pytest.raises(ValueError, match="bad magic"):
        load_packed(tmp_path / "d")
    write_packed(_model(), tmp_path / "m")
    (tmp_path / "t").write_bytes((tmp_path / "m").read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_packed(tmp_path / "t")
    (tmp_path / "h").write_bytes((tmp_path / "m").read_bytes()[:30])  # cut inside the JSON header
    with pytest.raises(ValueError, match=r"h: not a valid packed file: truncated: the header"):
        load_packed(tmp_path / "h")


# ---------------------------------------------------------------- bad files and bad arguments


def test_read_packed_names_the_file_and_what_is_wrong(tmp_path, bad_files):
    write_packed(_model(), tmp_path / "good.packed")
    stored_bytes(nn.Linear(2, 2), "dense", path=tmp_path / "other.dense")
    good, other = (tmp_path / "good.packed").read_bytes(), (tmp_path / "other.dense").read_bytes()
    expected = {"empty": "the file is empty", "random": "bad magic", "truncated": "truncated",
                "wrong magic": "bad magic", "another format": "bad magic: expected b'SLPACK01', got b'SLDENSE1'"}
    for case, path in bad_files(good, other, ".packed").items():
        with pytest.raises(ValueError, match=f"{path.name}: not a valid packed file: {expected[case]}"):
            load_packed(path)
    with pytest.raises(FileNotFoundError, match="missing.packed"):
        read_packed(tmp_path / "missing.packed")


def test_read_packed_rejects_corrupt_entries(tmp_path):
    write_packed(_model(), tmp_path / "m")
    good = (tmp_path / "m").read_bytes()
    (tmp_path / "version").write_bytes(good.replace(b'"version":1', b'"version":7', 1))
    with pytest.raises(ValueError, match=r"version: not a valid packed file: unsupported header \(format 'packed', version 7\)"):
        read_packed(tmp_path / "version")
    (tmp_path / "bits").write_bytes(good.replace(b'"bits":4', b'"bits":40', 1))
    with pytest.raises(ValueError, match="bits: not a valid packed file: bits=40 is out of range"):
        read_packed(tmp_path / "bits")
    (tmp_path / "kind").write_bytes(good.replace(b'"kind":"packed"', b'"kind":"dense!"', 1))
    with pytest.raises(ValueError, match="kind: not a valid packed file: entry 'dtype' is missing"):
        read_packed(tmp_path / "kind")


def test_packing_functions_check_their_arguments():
    from survey_lib.methods.packing import quantized_weight

    with pytest.raises(TypeError, match="data must be bytes"):
        unpack_bits([1, 2], 2, 1)
    with pytest.raises(TypeError, match="module must be a low-bit module with an integer_weight"):
        quantized_weight(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        deploy_tensors("layer")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        write_packed(_model(), 3)


def test_both_pack_bits_reject_floats_instead_of_truncating():
    from survey_lib.methods import coding

    for pack in (pack_bits, coding.pack_bits):
        with pytest.raises(TypeError, match="must have an integer dtype, got float64"):
            pack(np.array([1.7, 2.2]), 3)
        with pytest.raises(ValueError, match="value -1 is out of range for bits=3"):
            pack(np.array([-1, 2]), 3)
