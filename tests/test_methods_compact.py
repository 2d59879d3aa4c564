"""Tests for survey_lib.methods.compact: compact blocks, swapping them into backbones, transferred filters
(equivariance, CReLU), circulant layers and their counted FFT cost, ONNX parity and argument checks."""

from __future__ import annotations

import copy
import math
from unittest import mock

import pytest
import torch
from torch import nn

from survey_lib.cost import count, export_onnx, ort_session
from survey_lib.cost.latency import check_ort_matches
from survey_lib.data import load
from survey_lib.methods import Context, compression_info
from survey_lib.methods import compact as cp
from survey_lib.models import BasicBlock, DepthwiseSeparable, build_model, conv_bn_relu
from survey_lib.tasks import get_task, task_for

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny layers: see tests/conftest.py

SAVING_KINDS = ("depthwise_separable", "fire", "shuffle")


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def macs(m: nn.Module, x: torch.Tensor) -> int:
    return int(count(m, x)["macs"].sum())


def tiny_cnn(ctx: Context) -> nn.Module:
    """An untrained VGG-style CNN for 8x8 digits (8 -> 16 -> 32 channels), as in tests/conftest.py."""
    torch.manual_seed(0)
    return build_model("vgg", ctx.task, in_channels=1, width=0.25, image_size=8)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so eval-mode outputs test the whole block."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 1.5), (m.weight, 0.5, 1.5),
                                  (m.bias, -0.2, 0.2)):
                    t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=gen))
    return model.eval()


def block(kind: str, cin: int, cout: int, stride: int = 1, **options) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(cp.compact_block(kind, cin, cout, stride, **options))


def rand(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# compact blocks
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", cp.KINDS)
@pytest.mark.parametrize("cin, cout, stride", [(16, 16, 1), (8, 16, 2), (16, 8, 1)])
def test_every_kind_maps_like_a_dense_conv_bn_relu(kind, cin, cout, stride):
    x = rand(2, cin, 9, 9)
    with torch.no_grad():
        expected = conv_bn_relu(cin, cout, 3, stride=stride).eval()(x).shape
        side = 5 if stride == 2 else 9
        assert block(kind, cin, cout, stride)(x).shape == expected == (2, cout, side, side)


def test_depthwise_separable_is_the_models_block():
    assert cp.DepthwiseSeparable is DepthwiseSeparable
    assert isinstance(cp.compact_block("depthwise_separable", 8, 16), DepthwiseSeparable)


@pytest.mark.parametrize("cin, cout", [(16, 16), (16, 32), (32, 16), (64, 64)])
@pytest.mark.parametrize("kind", SAVING_KINDS)
def test_compact_kinds_hold_fewer_params_and_macs_than_the_dense_block(kind, cin, cout):
    x = rand(1, cin, 8, 8)
    dense, small = block("dense", cin, cout), block(kind, cin, cout)
    assert params(small) < params(dense) / 3
    assert macs(small, x) < macs(dense, x) / 3


def test_counted_cost_of_each_kind_at_64_channels_on_16x16():
    """Weights and MACs in closed form (BatchNorm: 2 params per channel, no MACs)."""
    x, pixels = rand(1, 64, 16, 16), 16 * 16
    s, mid, hidden = 64 // 8, 64 // 4, 64 * 6            # Fire squeeze, Shuffle bottleneck, MobileNet v2 hidden
    weights = {
        "dense": 64 * 64 * 9,
        "depthwise_separable": 64 * 9 + 64 * 64,
        "fire": 64 * s + s * 32 + s * 32 * 9,
        "shuffle": 64 * mid // 4 + mid * 9 + mid * 64 // 4,
        "inverted_residual": 64 * hidden + hidden * 9 + hidden * 64,
    }
    bn_channels = {"dense": 64, "depthwise_separable": 128, "fire": s + 64, "shuffle": 2 * mid + 64,
                   "inverted_residual": 2 * hidden + 64}
    for kind, w in weights.items():
        b = block(kind, 64, 64)
        assert params(b) == w + 2 * bn_channels[kind], kind
        assert macs(b, x) == w * pixels, kind
    # MobileNet v2's block is *not* cheaper at equal width: the expansion costs more than the 3x3 it replaces
    assert params(block("inverted_residual", 64, 64)) > params(block("dense", 64, 64))


def test_fire_splits_cout_between_the_expands_and_strides_them():
    f = cp.Fire(16, 32, stride=2)
    assert f.squeeze[0].out_channels == cp.MIN_SQUEEZE and f.squeeze[0].stride == (1, 1)
    assert [m[0].out_channels for m in (f.expand1, f.expand3)] == [16, 16]
    assert [m[0].stride for m in (f.expand1, f.expand3)] == [(2, 2), (2, 2)]
    assert cp.Fire(64, 128).squeeze[0].out_channels == 16 and cp.Fire(8, 8, squeeze=2).squeeze[0].out_channels == 2


def test_channel_shuffle_interleaves_the_groups():
    x = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert cp.channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert cp.channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]
    assert torch.equal(cp.channel_shuffle(x, 1), x)


@pytest.mark.parametrize("kind, identity", [("shuffle", torch.relu), ("inverted_residual", lambda x: x)])
def test_residual_only_where_shapes_match(kind, identity):
    assert block(kind, 16, 16).residual and not block(kind, 16, 16, 2).residual and not block(kind, 8, 16).residual
    b = block(kind, 16, 16)
    last = b.expand[1] if kind == "shuffle" else b.project[1]
    with torch.no_grad():                 # a body that outputs zeros leaves only the shortcut
        last.weight.zero_()
        last.bias.zero_()
        x = rand(2, 16, 5, 5)
        torch.testing.assert_close(b(x), identity(x))


def test_shuffle_blocks_are_grouped_and_inverted_residuals_expand():
    s = cp.ShuffleBlock(16, 32, groups=4)
    assert (s.compress[0].groups, s.expand[0].groups, s.depthwise[0].groups) == (4, 4, 8)
    assert cp.ShuffleBlock(16, 32, groups=2, bottleneck=6).depthwise[0].in_channels == 6
    ir = cp.InvertedResidual(8, 8, expansion=6)
    assert ir.expand[0].out_channels == 48 and ir.depthwise[0].groups == 48 and isinstance(ir.project[-1], nn.BatchNorm2d)
    assert isinstance(cp.InvertedResidual(8, 8, expansion=1).expand, nn.Identity)


def test_blocks_run_in_onnx_runtime_like_torch(tmp_path):
    """One export of every compact kind, strided and residual, chained (an export costs ~1 s)."""
    chain = nn.Sequential(block("fire", 8, 16, 2), block("shuffle", 16, 16), block("inverted_residual", 16, 16),
                          block("depthwise_separable", 16, 8, 2), block("shuffle", 8, 16, 1, groups=2))
    x = rand(1, 8, 9, 9)
    check_ort_matches(chain, ort_session(export_onnx(chain, x, tmp_path / "b.onnx")), x)


# ----------------------------------------------------------------------------------------------------------
# swapping the blocks of a backbone
# ----------------------------------------------------------------------------------------------------------
def arch_model(arch: str, task: str = "classification", size: int = 16) -> nn.Module:
    torch.manual_seed(0)
    t = get_task(task, num_classes=3, image_size=size)
    return randomize_bn(build_model(arch, t, in_channels=3, width=0.25 if arch != "mobilenet" else 0.125, image_size=size))


def expected_blocks(model: nn.Module) -> list[str]:
    """The backbone's top-level blocks but the stem (every reference arch is a flat nn.Sequential)."""
    return [f"backbone.{i}" for i, m in enumerate(model.backbone)
            if isinstance(m, (nn.Sequential, DepthwiseSeparable, BasicBlock))][1:]


@pytest.mark.parametrize("arch", ["vgg", "resnet", "mobilenet"])
def test_replaceable_blocks_are_every_block_but_the_stem(arch):
    model = arch_model(arch)
    blocks = cp.replaceable_blocks(model)
    assert list(blocks) == expected_blocks(model) and len(blocks) >= 2
    assert any(b.stride == 2 for b in blocks.values()) == (arch != "vgg")     # vgg downsamples by max-pooling
    assert all(b.residual == (arch == "resnet") for b in blocks.values())
    assert cp.replaceable_blocks(build_model("mlp", get_task("classification", num_classes=3, image_size=8),
                                             in_channels=1, image_size=8)) == {}


@pytest.mark.parametrize("arch, kind", [("vgg", "fire"), ("vgg", "shuffle"), ("resnet", "depthwise_separable"),
                                        ("mobilenet", "inverted_residual"), ("mobilenet", "dense")])
def test_swap_blocks_replaces_them_and_keeps_the_rest(arch, kind):
    model = arch_model(arch)
    before = copy.deepcopy(model.state_dict())
    out = cp.swap_blocks(model, kind, seed=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])                                         # input untouched
    names = expected_blocks(model)
    wanted = cp.CompactResidual if arch == "resnet" else type(cp.compact_block(kind, 8, 8))
    assert all(type(out.get_submodule(n)) is wanted for n in names)
    kept = [k for k in before if not any(k.startswith(n + ".") for n in names)]
    assert kept and all(torch.equal(out.state_dict()[k], before[k]) for k in kept)   # stem and head as they were
    x = rand(2, 3, 16, 16)
    with torch.no_grad():
        assert out.eval()(x).shape == model(x).shape
    again = cp.swap_blocks(model, kind, seed=3)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in out.state_dict().items())   # seeded


def test_resnet_blocks_become_two_compact_blocks_with_the_basic_blocks_shortcut():
    model = arch_model("resnet")
    out = cp.swap_blocks(model, "shuffle", groups=2)
    for name, b in cp.replaceable_blocks(model).items():
        new = out.get_submodule(name)
        assert [type(m) for m in new.body] == [cp.ShuffleBlock, cp.ShuffleBlock]
        assert new.body[0].depthwise[0].stride == (b.stride, b.stride)
        assert isinstance(new.shortcut, nn.Identity) == (b.stride == 1 and b.cin == b.cout)


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_swapped_models_of_other_tasks_run_in_onnx_runtime(task, tmp_path):
    model = arch_model("vgg", task)
    out = randomize_bn(cp.swap_blocks(model, "fire"))
    x = rand(1, 3, 16, 16)
    assert macs(out, x) < macs(model, x) / 2
    check_ort_matches(out, ort_session(export_onnx(out, x, tmp_path / "m.onnx")), x)


def test_replace_blocks_trains_a_marked_copy_through_the_context(ctx):
    model = tiny_cnn(ctx).eval()
    before = copy.deepcopy(model.state_dict())
    with mock.patch.object(Context, "finetune", autospec=True, side_effect=Context.finetune) as finetune:
        out = cp.replace_blocks(model, ctx, "depthwise_separable", budget=2)
    (call,) = finetune.call_args_list
    assert call.args == (ctx, out) and call.kwargs["epochs"] == 2
    assert [type(c).__name__ for c in call.kwargs["callbacks"]] == ["CosineLR"]          # the baselines' schedule
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())      # input untouched
    info = compression_info(out)["last"]
    assert info["method"] == "compact_depthwise_separable" and info["changes"] == ("architecture",)
    assert info["replaced"] == expected_blocks(model) and info["finetune_epochs"] == 2
    x = ctx.example_input(1)
    assert (info["params_before"], info["macs_before"]) == (params(model), macs(model, x))
    assert (info["params_after"], info["macs_after"]) == (params(out), macs(out, x))
    assert info["params_after"] < info["params_before"] and info["macs_after"] < info["macs_before"]
    assert len(info["train_loss"]) == 2 and info["train_loss"][-1] < info["train_loss"][0]      # it learns
    assert not out.training


def test_replace_blocks_on_segmentation():
    data = load("shapes", "segmentation", n=48, image_size=16)
    sctx = Context(task=task_for(data), data=data, budget=1, batch_size=16)
    torch.manual_seed(0)
    model = build_model("vgg", sctx.task, in_channels=3, width=0.25)
    out = cp.replace_blocks(model, sctx, "inverted_residual", expansion=2)
    info = compression_info(out)["last"]
    assert info["options"] == {"expansion": 2} and info["finetune_epochs"] == sctx.budget == len(info["train_loss"])
    assert all(math.isfinite(v) for v in info["train_loss"])
    with torch.no_grad():
        assert out(sctx.example_input(2)).shape == model.eval()(sctx.example_input(2)).shape


# ----------------------------------------------------------------------------------------------------------
# transferred filters
# ----------------------------------------------------------------------------------------------------------
def rot(t: torch.Tensor) -> torch.Tensor:
    return torch.rot90(t, 1, dims=(-2, -1))


def hflip(t: torch.Tensor) -> torch.Tensor:
    return torch.flip(t, dims=(-1,))


@pytest.mark.parametrize("kernel", [3, 5])
def test_p4_conv_is_rotation_equivariant(kernel):
    torch.manual_seed(0)
    layer = cp.EquivariantConv2d(3, 2, kernel, group="p4").eval()
    x = rand(2, 3, 9, 9, seed=kernel)
    with torch.no_grad():
        y = layer(x).unflatten(1, (4, 2))                    # (B, rotation r, learned filter, H, W)
        y_rot = layer(rot(x)).unflatten(1, (4, 2))
    # rotating the input rotates every map and moves rotation block r - 1 to block r
    torch.testing.assert_close(y_rot, rot(y[:, [3, 0, 1, 2]]), rtol=1e-5, atol=1e-5)


def test_p4m_conv_is_rotation_and_flip_equivariant():
    torch.manual_seed(0)
    layer = cp.EquivariantConv2d(3, 2, 3, group="p4m").eval()
    x = rand(2, 3, 8, 8)                                         # even size: the symmetry holds as well
    with torch.no_grad():
        y = layer(x).unflatten(1, (2, 4, 2))                 # (B, flip m, rotation r, learned filter, H, W)
        y_rot, y_flip = (layer(t).unflatten(1, (2, 4, 2)) for t in (rot(x), hflip(x)))
    torch.testing.assert_close(y_rot, rot(y[:, :, [3, 0, 1, 2]]), rtol=1e-5, atol=1e-5)
    # flipping the input: block (m, r) takes block (1 - m, -r mod 4), flipped (flip · rot^r = rot^-r · flip)
    torch.testing.assert_close(y_flip, hflip(y[:, [1, 0]][:, :, [0, 3, 2, 1]]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", ["p4", "p4m"])
def test_group_conv_is_a_plain_conv_with_transformed_filters(group, tmp_path):
    torch.manual_seed(0)
    layer = cp.EquivariantConv2d(3, 2, 3, group=group, stride=2).eval()
    w = layer.expanded_weight()
    order = cp.GROUPS[group]
    assert w.shape == (2 * order, 3, 3, 3) and layer.out_channels == 2 * order
    torch.testing.assert_close(w[2:4], rot(layer.weight))                  # block 1: a quarter turn
    if group == "p4m":
        torch.testing.assert_close(w[10:12], rot(hflip(layer.weight)))     # block 5: flipped, then a quarter turn
    x = rand(1, 3, 9, 9)
    conv = layer.to_conv()
    with torch.no_grad():
        torch.testing.assert_close(conv(x), layer(x))
    assert cp.equal_width_params(layer) == (2 * 27 + 2, order * (2 * 27 + 2))
    assert macs(layer, x) == macs(conv, x)                                  # params shared, MACs not
    if group == "p4m":                                                      # rot90 and flip export to ONNX
        check_ort_matches(layer, ort_session(export_onnx(layer, x, tmp_path / "g.onnx")), x)


def test_crelu_conv_equals_a_dense_conv_with_negated_filters(tmp_path):
    torch.manual_seed(0)
    layer = cp.CReLUConv2d(3, 8, 3, stride=2).eval()
    dense = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    with torch.no_grad():
        dense.weight.copy_(torch.cat([layer.conv.weight, -layer.conv.weight]))
        dense.bias.copy_(torch.cat([layer.conv.bias, -layer.conv.bias]))
    x = rand(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.relu(dense(x)))
        torch.testing.assert_close(layer(x), torch.relu(layer.to_conv()(x)))
    assert cp.equal_width_params(layer) == (4 * 27 + 4, 8 * 27 + 8)
    assert 2 * macs(layer, x[:1]) == macs(dense, x[:1])
    check_ort_matches(layer, ort_session(export_onnx(layer, x[:1], tmp_path / "c.onnx")), x[:1])


# ----------------------------------------------------------------------------------------------------------
# structural matrices
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_in, n_out", [(5, None), (16, None), (6, 4), (4, 7)])
def test_circulant_linear_is_its_dense_matrix(n_in, n_out):
    torch.manual_seed(0)
    layer = cp.CirculantLinear(n_in, n_out)
    n = max(n_in, n_out or n_in)
    c = layer.c.detach()
    explicit = torch.tensor([[float(c[(i - j) % n]) for j in range(n)] for i in range(n)])[: n_out or n_in, :n_in]
    torch.testing.assert_close(layer.dense_matrix(), explicit)
    x = rand(3, 2, n_in)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.dense_matrix().T + layer.bias, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.to_linear()(x), layer(x), rtol=1e-5, atol=1e-5)
    assert cp.equal_width_params(layer) == (n + (n_out or n_in), n_in * (n_out or n_in) + (n_out or n_in))


@pytest.mark.parametrize("n", [64, 48])
@pytest.mark.parametrize("batch", [1, 3])
def test_circulant_macs_follow_the_fft_convention(n, batch):
    layer = cp.CirculantLinear(n)
    log_n = math.ceil(math.log2(n))
    rfft_c, rfft_x, product, irfft = n * log_n, batch * n * log_n, 4 * batch * (n // 2 + 1), batch * n * log_n
    assert macs(layer, rand(batch, n)) == rfft_c + rfft_x + product + irfft


def test_circulant_counts_far_fewer_macs_than_a_dense_linear(tmp_path):
    layer = cp.CirculantLinear(256)
    x = rand(1, 256)
    assert macs(layer, x) == 3 * 256 * 8 + 4 * 129 and macs(layer, x) < 256 * 256 / 9
    assert macs(layer.to_linear(), x) == 256 * 256
    check_ort_matches(layer, ort_session(export_onnx(layer, x, tmp_path / "f.onnx")), x)


# ----------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, error, pattern", [
    (lambda: cp.compact_block("mobile", 8, 8), ValueError,
     "kind='mobile' is not supported; accepted values: 'dense', 'depthwise_separable', 'fire', 'shuffle', "
     "'inverted_residual'"),
    (lambda: cp.compact_block("fire", 8, 8, groups=2), TypeError,
     "'groups' do not apply to kind='fire'; accepted options: 'squeeze'"),
    (lambda: cp.compact_block("dense", 8, 8, 0), ValueError, "stride=0 is out of range"),
    (lambda: cp.compact_block("shuffle", 8, 8.0), TypeError, "cout must be an int"),
    (lambda: cp.Fire(8, 9), ValueError, "cout=9 must be even"),
    (lambda: cp.Fire(8, 8, squeeze=0), ValueError, "squeeze=0 is out of range"),
    (lambda: cp.ShuffleBlock(6, 8, groups=4), ValueError, "groups=4 must divide cin=6, cout=8"),
    (lambda: cp.ShuffleBlock(8, 8, groups=2, bottleneck=3), ValueError, "bottleneck=3"),
    (lambda: cp.InvertedResidual(8, 8, expansion=0), ValueError, "expansion=0 is out of range"),
    (lambda: cp.channel_shuffle(torch.zeros(1, 6, 2, 2), 4), ValueError, "groups=4 must divide the channel count"),
    (lambda: cp.EquivariantConv2d(3, 2, group="p6"), ValueError, "group='p6' is not supported; accepted values: 'p4', 'p4m'"),
    (lambda: cp.EquivariantConv2d(3, 2, kernel=4), ValueError, "kernel=4 must be odd"),
    (lambda: cp.CReLUConv2d(3, 7), ValueError, "cout=7 must be even"),
    (lambda: cp.CReLUConv2d(3, 8, bias=1), TypeError, "bias must be True or False"),
    (lambda: cp.CirculantLinear(0), ValueError, "in_features=0 is out of range"),
    (lambda: cp.CirculantLinear(4)(torch.zeros(2, 5)), ValueError, "in_features=4"),
    (lambda: cp.equal_width_params(nn.Conv2d(3, 4, 3)), TypeError,
     "layer must be an EquivariantConv2d, CReLUConv2d or CirculantLinear"),
    (lambda: cp.swap_blocks(nn.Linear(3, 3), "fire"), ValueError, "no block to replace besides the stem"),
    (lambda: cp.swap_blocks(arch_model("vgg"), "fire", seed=-1), ValueError, "seed=-1 is out of range"),
    (lambda: cp.replace_blocks(arch_model("vgg"), None, "fire"), TypeError, "ctx must be a survey_lib.methods.Context"),
])
def test_bad_arguments_name_the_parameter(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_shuffle_groups_that_do_not_fit_a_backbone_name_them():
    with pytest.raises(ValueError, match="groups=3 must divide"):
        cp.swap_blocks(arch_model("vgg"), "shuffle", groups=3)
