"""Counted MACs against torch's FlopCounterMode (the oracle), per-layer attribution, params and bits."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from survey_lib.cost import count, trace
from survey_lib.cost.counting import TOP


def oracle_flops(model: nn.Module, x: torch.Tensor) -> int:
    """torch's reference counter; it reports FLOPs = 2 x MACs."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops()


def by_name(df):
    return df.set_index("name")


# --------------------------------------------------------------------------- nets


class ConvZoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 16, 3, groups=4, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, groups=16, padding=1, bias=False)
        self.strided = nn.Conv2d(16, 12, 3, stride=2)
        self.dilated = nn.Conv2d(12, 12, 3, dilation=2, padding=2)
        self.up = nn.ConvTranspose2d(12, 6, 2, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        for m in (self.plain, self.grouped, self.depthwise, self.strided, self.dilated, self.up):
            x = torch.relu(m(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class Conv1d3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 5, stride=2, groups=2)
        self.c3 = nn.Conv3d(1, 3, (2, 3, 3), padding=1)

    def forward(self, x):
        y = self.c1(x)  # (N, 6, L')
        return self.c3(y.unsqueeze(1).unsqueeze(-1))  # (N, 1, 6, L', 1)


class TinyAttention(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)  # Linear on a 3-D input
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.matmul(q, k.transpose(-1, -2)).softmax(-1)  # 4-D matmul
        y = torch.matmul(att, v).transpose(1, 2).reshape(n, t, d)
        y = torch.bmm(y, y.transpose(1, 2)).softmax(-1) @ y  # functional bmm at the top level
        return self.proj(y)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ImageNet-layout ResNet-18 from torch.nn only (no torchvision)."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for i, w in enumerate((64, 128, 256, 512)):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- oracle agreement


@pytest.mark.parametrize(
    "make, shape",
    [
        (ConvZoo, (2, 3, 16, 16)),
        (Conv1d3d, (3, 4, 21)),
        (TinyAttention, (2, 7, 16)),
        (lambda: nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)), (4, 10)),
    ],
    ids=["convzoo", "conv1d3d", "attention", "mlp"],
)
def test_total_macs_equal_flopcounter(make, shape):
    torch.manual_seed(0)
    model, x = make(), torch.randn(*shape)
    df = count(model, x)
    assert df["macs"].sum() * 2 == oracle_flops(model, x)
    assert df["macs"].sum() > 0


def test_conv_layer_formulas():
    model, x = ConvZoo(), torch.randn(2, 3, 16, 16)
    d = by_name(count(model, x))
    n = 2
    assert d.loc["plain", "macs"] == n * 8 * 16 * 16 * 3 * 3 * 3
    assert d.loc["grouped", "macs"] == n * 16 * 16 * 16 * (8 // 4) * 3 * 3
    assert d.loc["depthwise", "macs"] == n * 16 * 16 * 16 * 1 * 3 * 3
    assert d.loc["strided", "macs"] == n * 12 * 7 * 7 * 16 * 3 * 3
    assert d.loc["dilated", "macs"] == n * 12 * 7 * 7 * 12 * 3 * 3
    assert d.loc["up", "macs"] == n * 12 * 7 * 7 * 6 * 2 * 2  # transposed: every input pixel scatters
    assert d.loc["fc", "macs"] == n * 6 * 5  # bias adds are not MACs
    assert d.loc["pool", "macs"] == 0


def test_attribution_leaf_innermost_and_top():
    model, x = TinyAttention(), torch.randn(2, 7, 16)
    d = by_name(count(model, x))
    n, t, dm, h = 2, 7, 16, 2
    assert d.loc["qkv", "macs"] == n * t * dm * 3 * dm
    assert d.loc["proj", "macs"] == n * t * dm * dm
    # functional matmuls run in the root module: "(top)"
    assert d.loc[TOP, "macs"] == 2 * (n * h * t * t * (dm // h)) + 2 * (n * t * t * dm)
    tr = trace(model, x)
    assert {o.module for o in tr.ops} == {"qkv", "proj", TOP}


def test_residual_add_goes_to_innermost_block():
    model = nn.Sequential(BasicBlock(4, 4, 1))
    tr = trace(model, torch.randn(1, 4, 5, 5))
    adds = [o for o in tr.ops if o.op.startswith("aten.add")]
    assert adds and all(o.module == "0" for o in adds)


# --------------------------------------------------------------------------- ResNet-18


def test_resnet18_macs_and_params():
    model, x = ResNet18(), torch.randn(1, 3, 224, 224)
    df = count(model, x)
    d = by_name(df)
    total = int(df["macs"].sum())
    assert total * 2 == oracle_flops(model, x)
    assert total == 1_814_073_344  # convs 1,813,561,344 + fc 512 x 1000
    assert abs(total - 1.814e9) / 1.814e9 < 0.005
    convs = int(df.loc[df["type"] == "Conv2d", "macs"].sum())
    assert convs == 1_813_561_344
    assert d.loc["fc", "macs"] == 512_000
    assert df["params"].sum() == 11_689_512 == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- params, sparsity, bits


def test_params_shared_once_and_nonzero():
    a = nn.Linear(4, 4, bias=False)
    b = nn.Linear(4, 4, bias=True)
    b.weight = a.weight  # tied
    model = nn.Sequential(a, b)
    with torch.no_grad():
        a.weight[:2] = 0  # 8 of 16 weights zero
        b.bias.fill_(1.0)
    df = count(model, torch.randn(3, 4))
    assert df["params"].sum() == 16 + 4
    assert df["nonzero_params"].sum() == 8 + 4
    d = by_name(df)
    assert d.loc["0", "macs"] == d.loc["1", "macs"] == 3 * 16
    assert d.loc["0", "ideal_sparse_macs"] == pytest.approx(3 * 16 * 0.5)
    assert df.attrs["kind"]["ideal_sparse_macs"] == "estimated"
    assert df.attrs["kind"]["macs"] == "counted"


def test_unused_layer_params_still_listed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 100)

        def forward(self, x):
            return self.used(x)

    df = count(Net(), torch.randn(1, 3))
    assert df["params"].sum() == 12 + 400
    assert by_name(df).loc["unused", "macs"] == 0


def test_bits_default_override_and_attribute():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(1, 8)
    d = by_name(count(model, x))
    assert d.loc["0", "weight_bits"] == 32 and d.loc["0", "act_bits"] == 32
    assert d.loc["0", "bitops"] == 32 * 32 * 32
    d = by_name(count(model, x, bits={"0": (4, 8)}))
    assert (d.loc["0", "weight_bits"], d.loc["0", "act_bits"]) == (4, 8)
    assert d.loc["0", "bitops"] == 32 * 4 * 8
    assert d.loc["2", "bitops"] == 8 * 32 * 32
    model[2].weight_bits, model[2].act_bits = 2, 8
    d = by_name(count(model, x))
    assert d.loc["2", "bitops"] == 8 * 2 * 8
    with pytest.raises(ValueError, match="bits"):
        count(model, x, bits={"nope": (8, 8)})


def test_bitops_of_activation_matmul_use_act_bits():
    model = TinyAttention()
    d = by_name(count(model, torch.randn(1, 3, 16), bits={TOP: (8, 8)}))
    assert d.loc[TOP, "bitops"] == d.loc[TOP, "macs"] * 8 * 8


# --------------------------------------------------------------------------- hygiene


def test_model_not_mutated_and_hooks_removed():
    model = ConvZoo().train()
    model.fc.eval()  # mixed flags must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count(model, torch.randn(1, 3, 16, 16))
    assert model.training and not model.fc.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_input_errors():
    model = ConvZoo()
    with pytest.raises(TypeError, match="example_input"):
        count(model, [1, 2, 3])
    with pytest.raises(ValueError, match=r"example_input of shape \(1, 5, 16, 16\)"):
        count(model, torch.randn(1, 5, 16, 16))
    with pytest.raises(TypeError, match="model"):
        count("not a model", torch.randn(1, 3))


# --------------------------------------------------------------------------- FFT convention


class Spectral(nn.Module):
    """A complex FFT, a 2-D real FFT pair, a complex product and a real product (not counted)."""

    def forward(self, x):                                   # x: (2, 3, 8, 6)
        z = torch.fft.fft(x.to(torch.complex64), dim=-2)    # c2c, length 8, over 2*3*8*6 values
        spec = torch.fft.rfft2(x)                           # r2c over dims (8, 6), (2, 3, 8, 4) complex
        y = torch.fft.irfft2(spec * spec, s=(8, 6))         # complex product, then c2r back to (2, 3, 8, 6)
        return y * 2.0 + z.real * x


def test_fft_and_complex_product_macs_follow_the_documented_convention():
    x = torch.randn(2, 3, 8, 6)
    ops = [(o.op, o.macs) for o in trace(Spectral(), x).ops if o.macs]
    n = 2 * 3 * 8 * 6
    assert ops == [
        ("aten._fft_c2c.default", 2 * n * 3),                 # 2·N·⌈log2 8⌉
        ("aten._fft_r2c.default", n * (3 + 3)),               # N·(⌈log2 8⌉ + ⌈log2 6⌉)
        ("aten.mul.Tensor", 4 * 2 * 3 * 8 * 4),               # 4 real MACs per complex product
        ("aten._fft_c2r.default", n * (3 + 3)),
    ]                                                          # the two real products count nothing
    assert int(count(Spectral(), x)["macs"].sum()) == sum(m for _, m in ops)


# ---------------------------------------------------------------------------------------------- bad input
def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


@pytest.mark.parametrize("pair,error,match", [
    ((-3, 8), ValueError, r"bits\['0'\]=-3 is out of range"), ((0, 8), ValueError, r"bits\['0'\]=0"),
    ((999, 8), ValueError, r"bits\['0'\]=999"), ((3.7, 8), TypeError, r"bits\['0'\] must be an int"),
    ((None, 8), TypeError, r"bits\['0'\] must be an int"), ([4, 8], TypeError, r"bits\['0'\] must be a"),
])
def test_bad_layer_bits(pair, error, match):
    with pytest.raises(error, match=match):
        count(_net(), torch.randn(1, 3, 8, 8), bits={"0": pair})


def test_bad_counting_arguments():
    from survey_lib.cost import counting as C

    model, x = _net(), torch.randn(1, 3, 8, 8)
    tr = trace(model, x)
    with pytest.raises(TypeError, match="bits must be a"):
        count(model, x, bits=[("0", (4, 8))])
    with pytest.raises(TypeError, match="tr must be an OpTrace"):
        C.count_trace(model, "trace")
    with pytest.raises(ValueError, match="tr was traced from another model"):
        C.count_trace(nn.Linear(2, 2), tr)
    with pytest.raises(ValueError, match="wbits=-3"):
        C.tensor_bits(tr.ops[0].inputs[0], -3, 8)
    with pytest.raises(TypeError, match="t must be a TensorInfo"):
        C.tensor_bits("t", 4, 8)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        C.dtype_bits("float32")
    with pytest.raises(TypeError, match="args do not hold the tensor operands"):
        C.op_macs("aten.mm.default", (1, 2), None)
    with pytest.raises(TypeError, match="op must be"):
        C.op_macs(5, (), None)
    with pytest.raises(TypeError, match="model"):
        C.total_params("model")
    with pytest.raises(TypeError, match="model"):
        with C.eval_mode("model"):
            pass
    with pytest.raises(TypeError, match="name"):
        C.module_name(5)
