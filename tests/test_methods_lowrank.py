"""Tests for survey_lib.methods.lowrank: exact factors at full rank, kept geometry, counted cost, rank rules."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from survey_lib.cost import count, export_onnx, ort_session
from survey_lib.cost.latency import check_ort_matches
from survey_lib.data import load
from survey_lib.methods import Context, compression_info
from survey_lib.methods import lowrank as lr
from survey_lib.models import build_model
from survey_lib.tasks import get_task, task_for

SIZE = 16
TASKS = {"classification": 3, "regression": 1, "detection": 2, "segmentation": 3}

# Conv geometries users meet: plain, strided + dilated without bias, grouped, non-square kernels with
# reflect / circular padding, padding="same", a 1x1 conv.
CONVS = {
    "plain": lambda: nn.Conv2d(8, 12, 3, padding=1),
    "stride_dilation_nobias": lambda: nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, bias=False),
    "groups": lambda: nn.Conv2d(8, 12, 3, padding=1, groups=2),
    "reflect_3x5": lambda: nn.Conv2d(6, 10, (3, 5), padding=(1, 2), padding_mode="reflect"),
    "circular_stride21": lambda: nn.Conv2d(6, 10, 3, stride=(2, 1), padding=1, padding_mode="circular"),
    "same": lambda: nn.Conv2d(6, 10, 3, padding="same", bias=False),
    "pointwise": lambda: nn.Conv2d(8, 12, 1),
}

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny layers: see tests/conftest.py


def make_conv(kind: str, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return CONVS[kind]().eval()


def conv_input(conv: nn.Conv2d, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, conv.in_channels, 11, 13, generator=torch.Generator().manual_seed(1))


def io_shapes(layer: nn.Module, x: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    with torch.no_grad():
        return (1, *x.shape[1:]), (1, *layer(x).shape[1:])


def top_rank(layer: nn.Module, scheme: str):
    return lr.max_rank(layer, scheme)


def cp_layer(out: int, inp: int, k: int, rank: int, seed: int = 0) -> nn.Conv2d:
    """A conv whose kernel is an exact sum of ``rank`` rank-1 terms."""
    gen = torch.Generator().manual_seed(seed)
    a, b, c, d = (torch.randn(n, rank, generator=gen) for n in (out, inp, k, k))
    conv = nn.Conv2d(inp, out, k, padding=k // 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,cr,yr,xr->ocyx", a, b, c, d))
    return conv.eval()


def tucker_layer(out: int, inp: int, ranks: tuple[int, int], noise: float, seed: int = 0) -> nn.Conv2d:
    """A 3x3 conv whose kernel has channel ranks ``ranks`` (mode 0, mode 1) plus Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    core = torch.randn(*ranks, 3, 3, generator=gen) * 3
    u = torch.linalg.qr(torch.randn(out, ranks[0], generator=gen))[0]
    v = torch.linalg.qr(torch.randn(inp, ranks[1], generator=gen))[0]
    conv = nn.Conv2d(inp, out, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,rsyx,cs->ocyx", u, core, v) + noise * torch.randn(out, inp, 3, 3, generator=gen))
    return conv.eval()


# ----------------------------------------------------------------------------------------------------------
# one layer: exactness, geometry, counted cost
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("scheme", ["svd", "tucker2", "spatial"])
def test_full_rank_factors_reproduce_the_conv(kind, scheme):
    conv = make_conv(kind)
    x = conv_input(conv)
    f = lr.decompose_layer(conv, scheme, top_rank(conv, scheme), name=kind)
    with torch.no_grad():
        torch.testing.assert_close(f(x), conv(x), rtol=1e-4, atol=1e-5)
    assert lr.relative_error(conv, f) < 1e-6


def test_full_rank_svd_reproduces_a_linear():
    torch.manual_seed(0)
    layer = nn.Linear(20, 7).eval()
    x = torch.randn(3, 5, 20)
    f = lr.decompose_layer(layer, "tucker2", 7)          # a Linear is a matrix: SVD whatever the scheme
    assert f.scheme == "svd" and [type(m) for m in f] == [nn.Linear, nn.Linear]
    with torch.no_grad():
        torch.testing.assert_close(f(x), layer(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["plain", "stride_dilation_nobias", "groups", "circular_stride21"])
def test_cp_at_the_kernels_own_rank_reproduces_the_conv(kind):
    template = make_conv(kind)
    gen = torch.Generator().manual_seed(3)
    rank = 3
    og, ig = template.out_channels // template.groups, template.in_channels // template.groups
    kh, kw = template.kernel_size
    with torch.no_grad():     # every group's kernel an exact rank-3 CP tensor
        parts = [torch.einsum("or,cr,yr,xr->ocyx", *(torch.randn(n, rank, generator=gen) for n in (og, ig, kh, kw)))
                 for _ in range(template.groups)]
        template.weight.copy_(torch.cat(parts))
    x = conv_input(template)
    # ALS creeps towards an exact fit (its steps shrink near the optimum): 100 sweeps reach ~5e-4 here
    f = lr.decompose_layer(template, "cp", rank, name=kind, cp_iterations=2000)
    assert lr.relative_error(template, f) < 1e-4
    with torch.no_grad():
        y = template(x)
        torch.testing.assert_close(f(x), y, rtol=1e-3, atol=1e-3 * float(y.abs().max()))


@pytest.mark.parametrize("kind", [k for k in CONVS if k != "pointwise"])
@pytest.mark.parametrize("scheme", ["svd", "tucker2", "cp", "spatial"])
def test_factors_keep_stride_padding_dilation_groups(kind, scheme):
    conv = make_conv(kind)
    f = lr.decompose_layer(conv, scheme, 2 if scheme != "tucker2" else (2, 2), name=kind)
    x = conv_input(conv)
    with torch.no_grad():
        assert f(x).shape == conv(x).shape
    pad = lr._padding(kind, conv)
    convs = list(f)
    assert all(c.padding_mode == conv.padding_mode for c in convs if any(c.padding))
    assert all(c.groups % conv.groups == 0 for c in convs)
    # the product of the strides and the sum of the paddings over the chain equal the original's
    for axis in (0, 1):
        assert math.prod(c.stride[axis] for c in convs) == conv.stride[axis]
        assert sum(c.padding[axis] for c in convs) == pad[axis]
        spatial = [c for c in convs if c.kernel_size[axis] > 1]
        assert all(c.dilation[axis] == conv.dilation[axis] for c in spatial)
    assert (convs[-1].bias is None) == (conv.bias is None)


@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("scheme", ["svd", "tucker2", "cp", "spatial"])
def test_counted_cost_of_the_factors_matches_the_cost_report(kind, scheme):
    conv = make_conv(kind)
    x = conv_input(conv, 1)
    sch = "svd" if conv.kernel_size == (1, 1) else scheme
    rank = (3, 2) if sch == "tucker2" else 3
    f = lr.decompose_layer(conv, scheme, rank, name=kind)
    geom = lr._geom(kind, conv)
    macs, params = lr._cost(geom, sch, rank, io_shapes(conv, x))
    assert macs == int(count(f, x)["macs"].sum())
    assert params == sum(p.numel() for p in f.parameters())
    assert (int(count(conv, x)["macs"].sum()), sum(p.numel() for p in conv.parameters())) == lr._cost(geom, sch, None, io_shapes(conv, x))


@pytest.mark.parametrize("scheme", ["svd", "tucker2", "cp", "spatial"])
def test_factors_run_the_small_layers_not_a_rebuilt_kernel(scheme):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1, bias=False).eval()
    x = torch.randn(1, 32, 16, 16)
    f = lr.decompose_layer(conv, scheme, (4, 4) if scheme == "tucker2" else 4)
    assert max(p.numel() for p in f.parameters()) < conv.weight.numel() / 4
    table = count(f, x)
    assert int(table["macs"].sum()) < int(count(conv, x)["macs"].sum()) / 3     # executed, not just stored
    assert not any(isinstance(m, nn.Conv2d) and m.in_channels == 32 and m.out_channels == 32 and m.groups == 1
                   and m.kernel_size == (3, 3) for m in f.modules())


def test_decompose_layer_leaves_the_layer_untouched():
    conv = make_conv("plain")
    before = copy.deepcopy(conv.state_dict())
    for scheme in lr.SCHEMES:
        lr.decompose_layer(conv, scheme, 2)
    for k, v in conv.state_dict().items():
        assert torch.equal(v, before[k])


# ----------------------------------------------------------------------------------------------------------
# ranks: bounds and errors
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme, bad, pattern", [
    ("svd", 0, r"rank 0 of layer 'stem' \(svd\) is outside the allowed range 1\.\.12"),
    ("svd", 13, r"rank 13 of layer 'stem' \(svd\) is outside the allowed range 1\.\.12"),
    ("spatial", 25, r"rank 25 of layer 'stem' \(spatial\) is outside the allowed range 1\.\.24"),
    ("tucker2", (13, 2), r"r_out=13 of layer 'stem' \(tucker2\) is outside the allowed range 1\.\.12"),
    ("tucker2", (2, 9), r"r_in=9 of layer 'stem' \(tucker2\) is outside the allowed range 1\.\.8"),
    ("tucker2", 9, r"r_in=9 of layer 'stem' \(tucker2\) is outside the allowed range 1\.\.8"),
    ("cp", 0, r"rank 0 of layer 'stem' \(cp\) is outside the allowed range 1\.\.72"),
    ("cp", 73, r"rank 73 of layer 'stem' \(cp\) is outside the allowed range 1\.\.72"),
])
def test_ranks_outside_the_range_name_the_layer_and_the_range(scheme, bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        lr.decompose_layer(make_conv("plain"), scheme, bad, name="stem")


@pytest.mark.parametrize("bad", [2.0, "4", True, None, (1, 2, 3)])
def test_rank_types_are_checked(bad):
    with pytest.raises(TypeError, match="rank"):
        lr.decompose_layer(make_conv("plain"), "tucker2" if bad == (1, 2, 3) else "svd", bad, name="stem")


def test_bad_layers_and_schemes_are_rejected():
    with pytest.raises(ValueError, match="scheme='qr' is not supported; accepted values: 'svd', 'tucker2', 'cp', 'spatial'"):
        lr.decompose_layer(make_conv("plain"), "qr", 2)
    with pytest.raises(ValueError, match="depthwise"):
        lr.decompose_layer(nn.Conv2d(8, 8, 3, groups=8), "tucker2", 1, name="dw")
    with pytest.raises(ValueError, match="ConvTranspose2d is not an nn.Linear or nn.Conv2d"):
        lr.decompose_layer(nn.ConvTranspose2d(8, 8, 3), "svd", 2)
    with pytest.raises(ValueError, match="even kernel"):
        lr.decompose_layer(nn.Conv2d(8, 8, 4, padding="same"), "svd", 2, name="even")
    conv = make_conv("plain")
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 'nan'.*not finite"):
        lr.decompose_layer(conv, "cp", 2, name="nan")


# ----------------------------------------------------------------------------------------------------------
# the decompositions against the libraries and the theory
# ----------------------------------------------------------------------------------------------------------
def test_svd_error_is_the_eckart_young_optimum():
    conv = make_conv("plain", seed=2)
    w = conv.weight.detach().double().reshape(12, -1)
    s = torch.linalg.svdvals(w)
    for r in (1, 4, 9):
        optimum = float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())
        assert lr.relative_error(conv, lr.decompose_layer(conv, "svd", r)) == pytest.approx(optimum, rel=1e-6)


def test_tucker2_error_matches_tensorly_and_beats_plain_hosvd():
    import tensorly
    from tensorly.decomposition import partial_tucker

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1, bias=False)
    w = conv.weight.detach().double()
    ranks = (6, 5)
    (core, factors), _ = partial_tucker(w.numpy(), rank=list(ranks), modes=[0, 1], init="svd", n_iter_max=25, tol=1e-6)
    library = tensorly.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
    library_error = float(np.linalg.norm(w.numpy() - library) / np.linalg.norm(w.numpy()))
    ours = lr.relative_error(conv, lr.decompose_layer(conv, "tucker2", ranks))
    assert abs(ours - library_error) / library_error <= 1e-4
    u0 = torch.linalg.svd(w.reshape(24, -1), full_matrices=False)[0][:, :6]            # HOSVD by hand
    u1 = torch.linalg.svd(w.transpose(0, 1).reshape(16, -1), full_matrices=False)[0][:, :5]
    hosvd = torch.einsum("or,cs,pqyx,pr,qs->ocyx", u0, u1, w, u0, u1)
    hosvd_error = float((w - hosvd).norm() / w.norm())
    assert ours <= hosvd_error + 1e-9 and ours > 0.5 * hosvd_error


def test_tensorly_api_we_rely_on():
    """partial_tucker returns ((core, factors), errors) since TensorLy 0.8; we pin 0.9 in constraints.txt."""
    import tensorly
    from tensorly.decomposition import partial_tucker

    assert tuple(int(v) for v in tensorly.__version__.split(".")[:2]) >= (0, 8)
    out = partial_tucker(np.random.default_rng(0).normal(size=(5, 4, 3, 3)), rank=[2, 2], modes=[0, 1])
    (core, factors), errors = out
    assert core.shape == (2, 2, 3, 3) and [f.shape for f in factors] == [(5, 2), (4, 2)] and len(errors) >= 1


def test_cp_als_matches_tensorly_parafac_from_the_same_start():
    from tensorly.cp_tensor import CPTensor
    from tensorly.decomposition import parafac

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(6, 5, 3, 3, generator=gen, dtype=torch.float64)
    start = [torch.randn(n, 4, generator=gen, dtype=torch.float64) for n in t.shape]
    ours, ours_error = lr.cp_als(t, 4, init=start, n_iter=15, tol=0.0, ridge=0.0)
    weights, factors = parafac(t.numpy(), 4, init=CPTensor((np.ones(4), [f.numpy() for f in start])), n_iter_max=15,
                               tol=0.0, normalize_factors=False, linesearch=False)
    theirs = torch.einsum("z,az,bz,cz,dz->abcd", torch.from_numpy(weights), *(torch.from_numpy(f) for f in factors))
    theirs_error = float((t - theirs).norm() / t.norm())
    assert abs(ours_error - theirs_error) < 1e-6
    torch.testing.assert_close(lr._cp_full(ours), theirs, rtol=1e-5, atol=1e-6)


def test_cp_is_deterministic_and_finite_on_a_trained_like_kernel():
    conv = tucker_layer(32, 24, (12, 10), noise=0.05)
    a = lr.decompose_layer(conv, "cp", 40, seed=0)
    b = lr.decompose_layer(conv, "cp", 40, seed=0)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q) and torch.isfinite(p).all()
    assert a.fit_info["cp_degeneracy"] <= lr.CP_DEGENERACY
    assert a.fit_info["cp_error"] == pytest.approx(lr.relative_error(conv, a), rel=1e-3)


def test_cp_rank_above_a_mode_size_needs_no_huge_svd():
    """TensorLy's init='svd' asks for a full SVD of a (3, 49152) unfolding here (18 GiB); ours is economy-size."""
    conv = cp_layer(128, 128, 3, rank=6)
    f = lr.decompose_layer(conv, "cp", 50)
    assert lr.relative_error(conv, f) < 1e-3


def test_degenerate_cp_fits_are_rejected_not_returned(monkeypatch):
    monkeypatch.setattr(lr, "CP_DEGENERACY", 0.5)          # every fit now counts as degenerate
    with pytest.raises(ValueError, match=r"CP of layer 'conv' at rank 4 failed from the SVD start and 2 random ones"):
        lr.decompose_layer(make_conv("plain"), "cp", 4, name="conv")


def test_degeneracy_measure_sees_cancelling_terms():
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(5, 1, generator=gen, dtype=torch.float64) for _ in range(4)]
    orthogonal = [torch.eye(4, dtype=torch.float64)[:, :2] for _ in range(4)]
    assert lr._cp_degeneracy(orthogonal) == pytest.approx(1.0)
    big = 1e3
    cancelling = [torch.cat([x[0] * big, -x[0] * big * (1 + 1e-6)], 1)] + [torch.cat([f, f], 1) for f in x[1:]]
    assert lr._cp_degeneracy(cancelling) > 1e5


def test_cp_never_returns_nan(monkeypatch):
    def nan_fit(tensor, rank, **kwargs):
        return [torch.full((n, rank), float("nan"), dtype=torch.float64) for n in tensor.shape], float("nan")

    monkeypatch.setattr(lr, "cp_als", nan_fit)
    with pytest.raises(ValueError, match="CP of layer 'conv' at rank 3 failed"):
        lr.decompose_layer(make_conv("plain"), "cp", 3, name="conv")


# ----------------------------------------------------------------------------------------------------------
# rank selection
# ----------------------------------------------------------------------------------------------------------
def test_energy_rank():
    s = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert lr.energy_rank(s, 9 / 14) == 1
    assert lr.energy_rank(s, 9 / 14 + 1e-6) == 2
    assert lr.energy_rank(s, 1.0) == 3
    assert lr.energy_rank(torch.tensor([[1.0, 1.0], [3.0, 0.0]]), 0.9) == 2     # the max over groups
    with pytest.raises(ValueError, match="energy"):
        lr.energy_rank(s, 1.5)


def test_vbmf_finds_the_channel_ranks_of_a_noisy_kernel():
    conv = tucker_layer(48, 40, (7, 5), noise=0.02)
    plans = lr.plan_ranks(nn.Sequential(conv), "tucker2", example_input=torch.randn(1, 40, 8, 8), vbmf=True, exclude=())
    assert plans[0].rank == (7, 5)
    # on the spatial modes (3 x 3) a rank says nothing about channels: the selector uses modes 0 and 1 only
    assert [tuple(s.shape) for s in lr.spectrum(conv, "tucker2")] == [(1, 48), (1, 40)]


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("vgg", get_task("classification", num_classes=3, image_size=SIZE), in_channels=3, width=0.5,
                       depth=1).eval()


def x_input(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def total_macs(model: nn.Module) -> int:
    return int(count(model, x_input())["macs"].sum())


@pytest.mark.parametrize("scheme", ["svd", "tucker2", "cp", "spatial"])
@pytest.mark.parametrize("allocation", ["energy", "uniform"])
@pytest.mark.parametrize("target", [1.5, 3.0])
def test_mac_target_is_reached_on_counted_macs(scheme, allocation, target):
    model = small_net()
    if scheme == "cp" and allocation == "energy" and target < 2.5:
        pytest.skip("CP ranks from channel energies alone start below 2.5x on this net")
    out = lr.decompose(model, None, scheme=scheme, target_mac_reduction=target, allocation=allocation, finetune=False,
                       example_input=x_input())
    reached = total_macs(model) / total_macs(out)
    assert target <= reached < target * 1.25, reached
    info = compression_info(out)["last"]
    assert info["layer_macs_before"] - info["layer_macs_after"] == total_macs(model) - total_macs(out)


def test_param_target_is_reached():
    model = small_net()
    out = lr.decompose(model, None, scheme="tucker2", target_param_reduction=2.0, finetune=False, example_input=x_input())
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, out))
    assert 2.0 <= before / after < 2.5


def test_unreachable_targets_and_ambiguous_rules_are_clear_errors():
    model = small_net()
    with pytest.raises(ValueError, match=r"target_mac_reduction=500.0 cannot be reached with scheme='tucker2': rank 1"):
        lr.decompose(model, None, target_mac_reduction=500.0, finetune=False, example_input=x_input())
    with pytest.raises(ValueError, match="exactly one way to choose ranks.*got rank, energy"):
        lr.decompose(model, None, rank=2, energy=0.9, finetune=False, example_input=x_input())
    with pytest.raises(ValueError, match="got none"):
        lr.decompose(model, None, finetune=False, example_input=x_input())
    with pytest.raises(ValueError, match="target_mac_reduction=0.5 is out of range"):
        lr.decompose(model, None, target_mac_reduction=0.5, finetune=False, example_input=x_input())
    with pytest.raises(ValueError, match="allocation='even' is not supported"):
        lr.decompose(model, None, target_mac_reduction=2.0, allocation="even", finetune=False, example_input=x_input())
    with pytest.raises(ValueError, match="finetune=True needs a Context"):
        lr.decompose(model, None, rank=2)
    with pytest.raises(ValueError, match="needs example_input"):
        lr.decompose(model, None, rank=2, finetune=False)
    with pytest.raises(ValueError, match="exclude='stem' names no Conv2d/Linear layer"):
        lr.decompose(model, None, rank=2, exclude="stem", finetune=False, example_input=x_input())
    with pytest.raises(ValueError, match="layers: no module named 'conv9'"):
        lr.decompose(model, None, rank=2, layers=["conv9"], finetune=False, example_input=x_input())


def test_explicit_ranks_name_the_layer_that_cannot_take_them():
    model = small_net()
    first = next(iter(lr.candidate_layers(model, exclude=())))
    with pytest.raises(ValueError, match=rf"r_in=8 of layer '{first}' \(tucker2\) is outside the allowed range 1\.\.3"):
        lr.decompose(model, None, rank=8, exclude=(), finetune=False, example_input=x_input())


def test_exclude_first_and_last_by_default():
    model = small_net()
    every = list(lr.candidate_layers(model))
    kept = list(lr.candidate_layers(model, exclude=("first", "last")))
    assert kept == every[1:-1]
    out = lr.decompose(model, None, energy=0.9, finetune=False, example_input=x_input())
    assert set(lr.factorized_layers(out)) <= set(kept)


def test_rule_ranks_skip_layers_that_would_cost_more():
    model = small_net()
    plans = lr.plan_ranks(model, "tucker2", example_input=x_input(), energy=1.0, exclude=())
    for p in plans:
        assert p.decompose == (p.macs_after < p.macs_before) or (not p.decompose and p.macs_after == p.macs_before)
    assert any(not p.decompose for p in plans)      # full energy: Tucker-2 of a full-rank kernel costs more
    table = lr.plan_table(plans)
    assert list(table["layer"]) == [p.name for p in plans] and "(kept)" in set(table["scheme"])


# ----------------------------------------------------------------------------------------------------------
# whole models: every task, ONNX, fine-tuning, the input untouched
# ----------------------------------------------------------------------------------------------------------
def task_model(arch: str, task: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, get_task(task, num_classes=TASKS[task], image_size=SIZE), in_channels=3, width=0.5, depth=1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("arch, scheme", [("vgg", "tucker2"), ("resnet", "cp"), ("mobilenet", "svd"), ("vgg", "spatial")])
def test_every_task_gets_a_smaller_dense_model_that_runs_in_ort(task, arch, scheme, tmp_path):
    model = task_model(arch, task)
    before = copy.deepcopy(model.state_dict())
    x = x_input(2)
    out = lr.decompose(model, None, scheme=scheme, target_mac_reduction=1.5, finetune=False, example_input=x[:1])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])                                     # input untouched
    assert total_macs(out) < total_macs(model) / 1.45
    info = compression_info(out)["last"]
    assert info["changes"] == ("dense_shapes",) and info["scheme"] == scheme and info["ranks"]
    assert all(e == e and 0 <= e < 1 for e in info["reconstruction_errors"].values())
    session = ort_session(export_onnx(out, x[:1], tmp_path / "m.onnx"))
    check_ort_matches(out, session, x[:1])
    with torch.no_grad():
        assert out(x).shape == model(x).shape


@pytest.mark.parametrize("arch", ["mlp"])
def test_mlp_linears_are_factored_by_svd(arch):
    torch.manual_seed(0)
    model = build_model(arch, get_task("classification", num_classes=3, image_size=SIZE), in_channels=3).eval()
    out = lr.decompose(model, None, scheme="cp", target_mac_reduction=2.0, finetune=False, example_input=x_input(),
                       exclude=())
    assert all(f.scheme == "svd" for f in lr.factorized_layers(out).values())
    assert total_macs(model) / total_macs(out) >= 2.0


@pytest.fixture(scope="module")
def digits_ctx():
    data = load("digits", "classification", n=240)
    return Context(task=task_for(data), data=data, budget=1, batch_size=32)


def test_finetuning_goes_through_the_context(digits_ctx, monkeypatch):
    torch.manual_seed(0)
    model = build_model("vgg", digits_ctx.task, in_channels=1, width=0.5, depth=1, image_size=8).eval()
    calls = []
    original = Context.finetune

    def spy(self, m, **kwargs):
        calls.append(kwargs)
        return original(self, m, **kwargs)

    monkeypatch.setattr(Context, "finetune", spy)
    plain = lr.decompose(model, digits_ctx, scheme="tucker2", target_mac_reduction=1.5, finetune=False)
    tuned = lr.decompose(model, digits_ctx, scheme="tucker2", target_mac_reduction=1.5)
    assert len(calls) == 1 and compression_info(tuned)["last"]["finetune_epochs"] == 1
    changed = [not torch.equal(p, q) for p, q in zip(plain.parameters(), tuned.parameters())]
    assert any(changed) and not tuned.training


def test_finetune_factorized_returns_a_trained_copy(digits_ctx):
    torch.manual_seed(0)
    model = build_model("vgg", digits_ctx.task, in_channels=1, width=0.5, depth=1, image_size=8).eval()
    plain = lr.decompose(model, digits_ctx, scheme="cp", target_mac_reduction=1.5, finetune=False)
    before = copy.deepcopy(plain.state_dict())
    tuned = lr.finetune_factorized(plain, digits_ctx)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in before.items())        # input untouched
    assert compression_info(tuned)["last"]["finetune_epochs"] == 1 and compression_info(plain)["last"]["finetune_epochs"] == 0
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), tuned.parameters()))


@pytest.mark.parametrize("scheme", ["svd", "tucker2", "cp", "spatial"])
def test_rank_for_a_param_reduction(scheme):
    conv = nn.Conv2d(32, 48, 3, padding=1)
    rank = lr.rank_for(conv, scheme, 4.0)
    params = sum(p.numel() for p in lr.decompose_layer(conv, scheme, rank).parameters())
    assert params <= sum(p.numel() for p in conv.parameters()) / 4
    bigger = (rank[0] + 5, rank[1] + 4) if scheme == "tucker2" else rank + 1
    assert sum(p.numel() for p in lr.decompose_layer(conv, scheme, bigger).parameters()) > params
