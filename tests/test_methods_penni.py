"""Tests for survey_lib.methods.penni: the PCA basis, alternating training, coefficient pruning and shrinking."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from survey_lib.cost import count, export_onnx, ort_session
from survey_lib.cost.latency import check_ort_matches
from survey_lib.data import load
from survey_lib.methods import Context, compression_info
from survey_lib.methods import penni as P
from survey_lib.models import build_model
from survey_lib.tasks import task_for
from survey_lib.train import Callback

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny layers: see tests/conftest.py

SIZE = 16
TASKS = ("classification", "regression", "detection", "segmentation")


def tiny(ctx: Context, arch: str = "vgg", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, ctx.task, in_channels=1, width=0.25, image_size=8).eval()


def randomized_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine terms, so shrinking is tested on a non-trivial network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


# ----------------------------------------------------------------------------------------------------------
# Step 1: the basis
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", [(3, 3), (3, 5), (5, 5)])
@pytest.mark.parametrize("include_mean", [True, False])
def test_full_basis_reconstructs_every_kernel(kernel, include_mean):
    torch.manual_seed(0)
    w = torch.randn(6, 4, *kernel) + torch.randn(*kernel)   # a shared offset: the mean matters
    basis, coefficients = P.kernel_basis(w, kernel[0] * kernel[1], include_mean=include_mean)
    rebuilt = P.reconstruct(basis, coefficients)
    if include_mean:
        torch.testing.assert_close(rebuilt, w, atol=1e-5, rtol=1e-5)
    else:   # the public code's omission: even the complete basis misses the mean kernel
        assert float((rebuilt - w).norm() / w.norm()) > 0.3


def test_basis_is_orthonormal_and_its_error_is_the_eckart_young_optimum():
    torch.manual_seed(1)
    w = torch.randn(8, 5, 3, 3) * 0.2 + torch.randn(3, 3)
    singular = torch.linalg.svdvals(w.reshape(-1, 9).double())
    for d in range(1, 10):
        basis, _ = P.kernel_basis(w, d)
        flat = basis.reshape(d, 9)
        torch.testing.assert_close(flat @ flat.T, torch.eye(d), atol=1e-5, rtol=0)
        optimum = float(singular[d:].square().sum().sqrt() / singular.square().sum().sqrt())
        assert P.basis_error(w, d) == pytest.approx(optimum, abs=1e-5)


def test_fewer_kernels_than_basis_size_still_gives_a_full_basis():
    w = torch.randn(2, 2, 3, 3)                      # 4 kernels, 9 basis kernels asked
    basis, coefficients = P.kernel_basis(w, 9)
    torch.testing.assert_close(P.reconstruct(basis, coefficients), w, atol=1e-5, rtol=1e-5)
    assert basis.shape == (9, 3, 3)


def test_mean_included_beats_the_centred_basis_on_offset_kernels():
    torch.manual_seed(2)
    w = torch.randn(16, 8, 3, 3) * 0.1 + torch.randn(3, 3)
    for d in range(1, 9):
        with_mean, without = P.basis_error(w, d), P.basis_error(w, d, include_mean=False)
        assert with_mean < 0.5 * without, (d, with_mean, without)
    errors = [P.basis_error(w, d) for d in range(1, 10)]
    assert all(a >= b - 1e-7 for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-6


@pytest.mark.parametrize("d, error", [(0, ValueError), (10, ValueError), (-1, ValueError), (2.5, TypeError), ("5", TypeError)])
def test_d_outside_1_to_k2_is_rejected(d, error):
    with pytest.raises(error, match="d"):
        P.kernel_basis(torch.randn(4, 3, 3, 3), d)
    with pytest.raises(error, match="d"):
        P.decompose(nn.Sequential(nn.Conv2d(3, 4, 3)), d=d)


def test_kernel_basis_rejects_bad_weights():
    with pytest.raises(TypeError, match="weight"):
        P.kernel_basis([[1.0]], 1)
    with pytest.raises(ValueError, match="weight"):
        P.kernel_basis(torch.randn(4, 9), 1)
    with pytest.raises(ValueError, match="share d"):
        P.reconstruct(torch.randn(3, 3, 3), torch.randn(4, 2, 5))


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------
def test_shared_basis_layer_is_the_conv_with_the_rebuilt_kernel_and_trains_both_parts():
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2)
    layer = P.SharedBasisConv2d.from_conv(conv, 4)
    x = torch.randn(2, 4, 9, 9)
    expected = F.conv2d(x, P.reconstruct(layer.basis, layer.coefficients), layer.bias, 2, 2, 2)
    torch.testing.assert_close(layer(x), expected)
    layer(x).square().sum().backward()
    assert layer.basis.grad.abs().sum() > 0 and layer.coefficients.grad.abs().sum() > 0
    full = P.SharedBasisConv2d.from_conv(conv, 9)
    torch.testing.assert_close(full(x), conv(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.to_conv()(x), conv(x), atol=1e-5, rtol=1e-5)


def test_decompose_keeps_outputs_at_full_basis_and_does_not_mutate(ctx):
    model = tiny(ctx)
    before = copy.deepcopy(model.state_dict())
    decomposed = P.decompose(model, d=9)
    x = ctx.example_input(4)
    torch.testing.assert_close(decomposed(x), model(x), atol=1e-4, rtol=1e-4)
    assert set(P.shared_layers(decomposed)) == set(P.candidate_convs(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_decompose_rejects_unsupported_layers():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="no conv PENNI can decompose"):
        P.decompose(model)
    with pytest.raises(ValueError, match="'0' has groups=2"):
        P.decompose(model, layers=["0"])
    with pytest.raises(ValueError, match="1x1"):
        P.decompose(model, layers=["1"])
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        P.decompose(model, layers=["2"])
    with pytest.raises(ValueError, match="'nope'"):
        P.decompose(model, layers=["nope"])
    with pytest.raises(TypeError, match="layers"):
        P.decompose(model, layers="0")


# ----------------------------------------------------------------------------------------------------------
# Step 2: alternating training
# ----------------------------------------------------------------------------------------------------------
class Snapshots(Callback):
    def __init__(self):
        self.states = []

    def on_train_begin(self, state):
        self.states.append(self.take(state.model))

    def on_epoch_end(self, state):
        self.states.append(self.take(state.model))

    @staticmethod
    def take(model):
        layer = next(iter(P.shared_layers(model).values()))
        return layer.basis.detach().clone(), layer.coefficients.detach().clone()


def test_alternation_trains_one_part_at_a_time(ctx):
    model = P.decompose(tiny(ctx), d=5)
    alternate, snaps = P.AlternateBasisCoefficients(switch_every=1), Snapshots()
    ctx.finetune(model, epochs=3, callbacks=[alternate, snaps], extra_loss=P.coefficient_l1(1e-4))
    assert alternate.phases == ["coefficients", "basis", "coefficients"]
    for phase, (b0, c0), (b1, c1) in zip(alternate.phases, snaps.states, snaps.states[1:]):
        assert torch.equal(b0, b1) == (phase == "coefficients")
        assert torch.equal(c0, c1) == (phase == "basis")
    layer = next(iter(P.shared_layers(model).values()))
    assert layer.basis.requires_grad and layer.coefficients.requires_grad


def test_coefficient_l1_is_the_sum_of_magnitudes(ctx):
    model = P.decompose(tiny(ctx), d=3)
    total = sum(float(m.coefficients.detach().abs().sum()) for m in P.shared_layers(model).values())
    value = P.coefficient_l1(2e-3)(model, None, torch.zeros(1), None).detach()
    assert float(value) == pytest.approx(2e-3 * total, rel=1e-6)
    with pytest.raises(ValueError, match="strength"):
        P.coefficient_l1(-1.0)


def test_pair_strength_adds_the_l2_norms_of_the_pair_columns(ctx):
    model = P.decompose(tiny(ctx), d=3)
    layers = P.shared_layers(model).values()
    l1 = sum(float(m.coefficients.detach().abs().sum()) for m in layers)
    columns = sum(float(m.coefficients.detach().reshape(m.coefficients.shape[0], -1).norm(dim=0).sum()) for m in layers)
    value = P.coefficient_l1(2e-3, pair_strength=5e-3)(model, None, torch.zeros(1), None).detach()
    assert float(value) == pytest.approx(2e-3 * l1 + 5e-3 * columns, rel=1e-6)
    with pytest.raises(ValueError, match="pair_strength"):
        P.coefficient_l1(1e-3, pair_strength=-1.0)
    with pytest.raises(ValueError, match="pair_l1"):
        P.train_alternating(model, ctx, epochs=1, pair_l1=-0.5)



def test_pair_l1_shrinks_the_pair_columns_in_training(ctx):
    model = P.decompose(tiny(ctx), d=5)

    def column_norms(m: nn.Module) -> float:
        return sum(float(layer.coefficients.detach().norm(dim=0).sum()) for layer in P.shared_layers(m).values())

    plain, _, _ = P.train_alternating(model, ctx, epochs=2, switch_every=2, l1=0.0, lr=0.02)
    grouped, _, _ = P.train_alternating(model, ctx, epochs=2, switch_every=2, l1=0.0, pair_l1=0.5, lr=0.02)
    assert column_norms(grouped) < 0.9 * column_norms(plain)


def test_train_alternating_returns_a_copy_and_the_phases(ctx):
    model = P.decompose(tiny(ctx), d=5)
    before = copy.deepcopy(model.state_dict())
    trained, history, phases = P.train_alternating(model, ctx, epochs=2, switch_every=1)
    assert phases == ["coefficients", "basis"] and len(history.train_loss) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="decompose"):
        P.train_alternating(tiny(ctx), ctx)
    with pytest.raises(ValueError, match="switch_every"):
        P.train_alternating(model, ctx, switch_every=0)


def test_coefficient_trace_records_the_prunable_fraction_per_epoch(ctx):
    model = P.decompose(tiny(ctx), d=5)
    trace = P.CoefficientTrace(threshold_std=1.0)
    trained, _, _ = P.train_alternating(model, ctx, epochs=2, l1=1e-2, callbacks=[trace])
    assert len(trace.below) == len(trace.l1) == 3
    masks = P.coefficient_masks(trained, threshold_std=1.0)
    pruned = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert trace.below[-1] == pytest.approx(pruned)
    assert trace.l1[-1] < trace.l1[0]          # a strong L1 weight shrinks the coefficients


# ----------------------------------------------------------------------------------------------------------
# Step 3: pruning
# ----------------------------------------------------------------------------------------------------------
def test_masks_by_threshold_and_by_sparsity(ctx):
    model = P.decompose(tiny(ctx), d=5)
    masks = P.coefficient_masks(model, threshold_std=1.0)
    for name, layer in P.shared_layers(model).items():
        c = layer.coefficients.detach()
        assert torch.equal(masks[f"{name}.coefficients"], c.abs() >= c.std())
    by_fraction = P.coefficient_masks(model, threshold_std=None, sparsity=0.75)
    for name, layer in P.shared_layers(model).items():
        keep = by_fraction[f"{name}.coefficients"]
        assert int((~keep).sum()) == round(0.75 * keep.numel())
        c = layer.coefficients.detach().abs()
        assert float(c[~keep].max()) <= float(c[keep].min())
    pruned, _ = P.prune_coefficients(model, threshold_std=None, sparsity=0.75)
    assert P.coefficient_sparsity(pruned) == pytest.approx(0.75, abs=0.01)
    assert P.coefficient_sparsity(model) == 0.0


def test_pair_sparsity_zeros_whole_columns_of_smallest_norm_and_cuts_counted_macs(ctx):
    model = P.decompose(tiny(ctx), d=5)
    masks = P.coefficient_masks(model, threshold_std=0.0, pair_sparsity=0.6)
    for name, layer in P.shared_layers(model).items():
        keep = masks[f"{name}.coefficients"]
        columns = keep.any(0)                                  # (Cin, d): pairs some output still reads
        assert torch.equal(keep, columns.unsqueeze(0).expand_as(keep))
        assert int((~columns).sum()) == min(round(0.6 * columns.numel()), columns.numel() - 1)
        norms = layer.coefficients.detach().norm(dim=0)
        assert float(norms[~columns].max()) <= float(norms[columns].min())
    both = P.coefficient_masks(model, threshold_std=1.0, pair_sparsity=0.6)
    alone = P.coefficient_masks(model, threshold_std=1.0)
    assert all(torch.equal(both[k], alone[k] & masks[k]) for k in both)
    x = ctx.example_input(1)
    macs = {}
    for pair in (0.0, 0.6):
        pruned, _ = P.prune_coefficients(model, threshold_std=1.0, pair_sparsity=pair)
        small = P.shrink(pruned, x)
        assert torch.allclose(small(x), P.dense_equivalent(pruned).eval()(x), atol=1e-5)
        macs[pair] = int(count(small, x)["macs"].sum())
    assert macs[0.6] < 0.75 * macs[0.0]


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold_std": 1.0, "pair_sparsity": 1.0}, "pair_sparsity"),
    ({"threshold_std": 1.0, "pair_sparsity": -0.1}, "pair_sparsity"),
    ({"threshold_std": 1.0, "pair_sparsity": "half"}, "pair_sparsity"),
    ({"threshold_std": 1.0, "sparsity": 0.5}, "exactly one"),
    ({"threshold_std": None}, "exactly one"),
    ({"threshold_std": -1.0}, "threshold_std"),
    ({"threshold_std": None, "sparsity": 1.0}, "sparsity"),
    ({"threshold_std": None, "sparsity": 1.5}, "sparsity"),
])
def test_bad_pruning_settings_are_rejected(ctx, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        P.coefficient_masks(P.decompose(tiny(ctx), d=5), **kwargs)


def test_finetune_pruned_keeps_the_pruned_coefficients_at_zero(ctx):
    pruned, masks = P.prune_coefficients(P.decompose(tiny(ctx), d=5), threshold_std=1.0)
    tuned, _ = P.finetune_pruned(pruned, ctx, masks, epochs=1)
    params = dict(tuned.named_parameters())
    for name, keep in masks.items():
        assert bool((params[name][~keep] == 0).all())
    assert not torch.equal(params[name][keep], dict(pruned.named_parameters())[name][keep])


# ----------------------------------------------------------------------------------------------------------
# Step 4: shrinking
# ----------------------------------------------------------------------------------------------------------
def pruned_model(ctx: Context, arch: str = "vgg", seed: int = 0) -> nn.Module:
    """A decomposed model, 70% of coefficients pruned, plus an unread input channel and a silenced output
    channel (zero coefficients and a BatchNorm shift that ReLU clips) in the second PENNI layer."""
    model, _ = P.prune_coefficients(P.decompose(randomized_bn(tiny(ctx, arch, seed), seed), d=5),
                                    threshold_std=None, sparsity=0.7)
    layers = list(P.shared_layers(model).items())
    name, second = layers[1]
    with torch.no_grad():
        second.coefficients[:, 0] = 0      # input channel 0 read by nobody in this layer
        second.coefficients[1] = 0         # output channel 1 silent...
        bn = model.get_submodule(name.rpartition(".")[0])[1] if arch == "vgg" else None
        if bn is not None:
            bn.bias[1] = -1.0              # ...and clipped to exactly zero by ReLU
    return model


@pytest.mark.parametrize("form", P.FORMS)
@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_shrunk_network_computes_the_pruned_unshrunk_outputs(ctx, arch, form):
    model = pruned_model(ctx, arch)
    x = ctx.example_input(16)
    small = P.shrink(model, x[:1], form=form)
    reference = P.dense_equivalent(model).eval()
    torch.testing.assert_close(small(x), reference(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reference(x), model(x), atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in reference.parameters())


def test_shrinking_removes_unread_and_silent_channels(ctx):
    model = pruned_model(ctx, "vgg")
    small = P.shrink(model, ctx.example_input(1))
    rows = {r["layer"]: r for r in P.layer_table(model, small)}
    first, second = list(P.shared_layers(model))[:2]
    assert rows[first]["out_after"] == rows[first]["out"] - 1          # channel 0 of the first layer's output
    assert rows[second]["in_after"] == rows[second]["in"] - 1
    assert rows[second]["out_after"] == rows[second]["out"] - 1        # the silenced channel
    for r in rows.values():
        assert r["pairs"] <= r["in_after"] * r["d"]


def test_a_silent_channel_carrying_a_constant_is_kept(ctx):
    model = pruned_model(ctx, "vgg")
    name = list(P.shared_layers(model))[1]
    with torch.no_grad():
        model.get_submodule(name.rpartition(".")[0])[1].bias[1] = 1.0   # ReLU passes the constant
    rows = {r["layer"]: r for r in P.layer_table(model, P.shrink(model, ctx.example_input(1)))}
    assert rows[name]["out_after"] == rows[name]["out"]


def test_two_stage_layer_params_and_counted_macs(ctx):
    model = pruned_model(ctx, "vgg")
    small = P.shrink(model, ctx.example_input(1))
    table = count(small, ctx.example_input(1)).set_index("name")
    for layer in (m for m in small.modules() if isinstance(m, P.PenniConv)):
        basis_conv, coef = layer[0], layer[1]
        assert sum(p.numel() for p in basis_conv.parameters()) == basis_conv.basis.numel() == 5 * 9
    name = next(n for n, m in small.named_modules() if isinstance(m, P.BasisConv))
    basis_conv = small.get_submodule(name)
    out = small.get_submodule(name.rpartition(".")[0])[1]
    hw = 8 * 8   # the first layers run at the 8x8 input resolution
    assert table.loc[name, "macs"] == basis_conv.pairs * 9 * hw
    assert table.loc[name.rpartition(".")[0] + ".1", "macs"] == out.out_channels * basis_conv.pairs * hw


def test_shrunk_model_exports_to_onnx_and_matches_in_ort(ctx, tmp_path):
    small = P.shrink(pruned_model(ctx, "resnet"), ctx.example_input(1))
    x = ctx.example_input(4)
    path = export_onnx(small, x[:1], tmp_path / "penni.onnx")
    check_ort_matches(small, ort_session(path), x[:1])


def test_shrink_rejects_bad_input(ctx):
    with pytest.raises(ValueError, match="decompose"):
        P.shrink(tiny(ctx), ctx.example_input(1))
    model = P.decompose(tiny(ctx))
    with pytest.raises(ValueError, match="form"):
        P.shrink(model, ctx.example_input(1), form="sparse")
    with pytest.raises(TypeError, match="example_input"):
        P.shrink(model, None)


# ----------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------
def test_penni_end_to_end_marks_and_does_not_mutate(ctx):
    model = tiny(ctx)
    before = copy.deepcopy(model.state_dict())
    out = P.penni(model, ctx, epochs=2, switch_every=1, finetune_epochs=1, threshold_std=1.0)
    info = compression_info(out)["last"]
    assert info["method"] == "penni" and info["changes"] == ("dense_shapes", "mask")
    assert info["phases"] == ["coefficients", "basis"] and info["finetune_epochs"] == 1
    assert info["nonzero_params_after"] < info["params_after"] < info["params_before"]
    assert info["macs_after"] < info["macs_before"]
    assert 0.5 < info["coefficient_sparsity"] < 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="Context"):
        P.penni(model, None)


def test_penni_with_pairs_records_its_operating_point_and_does_fewer_macs(ctx):
    model = tiny(ctx)
    kwargs = dict(epochs=1, finetune_epochs=0, threshold_std=1.0)
    plain = compression_info(P.penni(model, ctx, **kwargs))["last"]
    paired = compression_info(P.penni(model, ctx, pair_sparsity=0.6, pair_l1=1e-3, **kwargs))["last"]
    assert paired["pair_sparsity"] == 0.6 and paired["pair_l1"] == 1e-3 and plain["pair_sparsity"] == 0.0
    assert paired["macs_after"] < plain["macs_after"]


@pytest.mark.parametrize("task_name", TASKS)
def test_penni_works_for_every_task(task_name, tmp_path):
    data = load("shapes", task_name, n=48, image_size=SIZE)
    ctx = Context(task=task_for(data), data=data, budget=0, batch_size=16)
    torch.manual_seed(0)
    model = build_model("vgg", ctx.task, in_channels=data.info.in_channels, width=0.25).eval()
    out = P.penni(model, ctx, threshold_std=None, sparsity=0.5)
    x = ctx.example_input(2)
    assert out(x).shape == model(x).shape
    info = compression_info(out)["last"]
    assert info["macs_after"] < info["macs_before"]
    check_ort_matches(out, ort_session(export_onnx(out, x[:1], tmp_path / "m.onnx")), x[:1])
