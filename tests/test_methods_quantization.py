"""Tests for survey_lib.methods.quantization: grids vs PyTorch's fake-quant ops, calibrators, BN folding,
PTQ/QAT/binary/ternary layers, packed storage of the frozen models, and mixed precision."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from survey_lib.cost.counting import count
from survey_lib.cost.storage import stored_bytes
from survey_lib.data import load
from survey_lib.methods import Context
from survey_lib.methods import quantization as Q
from survey_lib.methods.packing import load_packed
from survey_lib.models import build_model
from survey_lib.tasks import task_for
from survey_lib.train import Callback


# ---------------------------------------------------------------------------------------------- fixtures
def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k


# ---------------------------------------------------------------------------------------------- grids
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 12, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_equals_torch_per_tensor(bits, symmetric):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(4096, generator=gen) * 3 + (0 if symmetric else 1.0)
    lo, hi = Q.calibrate_range(x, "minmax", bits, symmetric=symmetric)
    scale, zp = Q.qparams(lo, hi, bits, symmetric)
    qmin, qmax = Q.qrange(bits, symmetric)
    ours = Q.fake_quantize(x, scale, zp, qmin, qmax)
    theirs = torch.fake_quantize_per_tensor_affine(x, scale, zp.int(), qmin, qmax)
    assert torch.equal(ours, theirs)
    assert len(torch.unique(ours)) <= 2**bits


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [0, 1])
def test_fake_quantize_equals_torch_per_channel(bits, symmetric, axis):
    gen = torch.Generator().manual_seed(100 + bits)
    w = torch.randn(8, 6, 3, 3, generator=gen) * torch.linspace(0.1, 4, 6).reshape(1, 6, 1, 1)
    lo, hi = Q.calibrate_range(w, "minmax", bits, symmetric=symmetric, axis=axis)
    scale, zp = Q.qparams(lo, hi, bits, symmetric)
    qmin, qmax = Q.qrange(bits, symmetric)
    ours = Q.fake_quantize(w, scale, zp, qmin, qmax, axis)
    theirs = torch.fake_quantize_per_channel_affine(w, scale, zp.int(), axis, qmin, qmax)
    assert torch.equal(ours, theirs)


def test_grid_properties():
    assert Q.qrange(8, True) == (-127, 127) and Q.qrange(8, False) == (0, 255) and Q.qrange(2, True) == (-1, 1)
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0])
    scale, zp = Q.qparams(x.min(), x.max(), 8, symmetric=False)
    q = Q.quantize(x, scale, zp, 0, 255)
    assert q.min() == 0 and q.max() == 255 and Q.dequantize(q, scale, zp)[1] == 0.0  # zero is exact
    scale, zp = Q.qparams(torch.tensor(0.5), torch.tensor(2.0), 8, symmetric=False)  # range widened to hold 0
    assert Q.fake_quantize(torch.zeros(1), scale, zp, 0, 255).item() == 0.0
    errs = [Q.sqnr_db(x, Q.fake_quantize(x, *Q.qparams(x.min(), x.max(), b, True), *Q.qrange(b, True))) for b in (2, 4, 8)]
    assert errs[0] < errs[1] < errs[2]


def test_sqnr_grows_about_6db_per_bit():
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    s = [Q.sqnr_db(x, Q.fake_quantize(x, *Q.qparams(-1.0, 1.0, b, True), *Q.qrange(b, True))) for b in (4, 6, 8)]
    assert 5.5 < (s[2] - s[0]) / 4 < 6.5


@pytest.mark.parametrize("bad", [1, 17, 0, 2.5, "8", None])
def test_bits_out_of_range_raise(bad):
    with pytest.raises((ValueError, TypeError), match="bits"):
        Q.qrange(bad)


def test_calibrators_clip_outliers_and_validate():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50_000, generator=gen), torch.tensor([60.0])])
    full = Q.calibrate_range(x, "minmax", 4)[1].item()
    assert full == 60.0
    for method in ("percentile", "mse", "entropy"):
        hi = Q.calibrate_range(x, method, 4)[1].item()
        assert 1.0 < hi < 20.0, method
    lo, hi = Q.calibrate_range(x, "mse", 4)
    errs = {}
    for m in Q.CALIBRATORS:
        lo, hi = Q.calibrate_range(x, m, 4)
        errs[m] = ((Q.fake_quantize(x, *Q.qparams(lo, hi, 4), *Q.qrange(4)) - x) ** 2).mean().item()
    assert errs["mse"] <= min(errs.values()) + 1e-9 and errs["minmax"] > 5 * errs["mse"]
    with pytest.raises(ValueError, match="calibrator.*minmax"):
        Q.calibrate_range(x, "kl", 8)
    with pytest.raises(ValueError, match="calibration needs data"):
        Q.calibrate_range(torch.empty(0), "minmax", 8)
    with pytest.raises(ValueError, match="per tensor"):
        Q.calibrate_range(torch.randn(4, 4), "entropy", 8, axis=0)


def test_ste_gradients():
    x = torch.tensor([-2.0, -0.4, 0.3, 1.7], requires_grad=True)
    Q.round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(4))
    x.grad = None
    y = Q.sign_ste(x)
    y.sum().backward()
    assert torch.equal(y, torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))  # hard-tanh STE


def test_binary_and_ternary_weights():
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    b = Q.binary_weight(w)
    alpha = w.abs().flatten(1).mean(1)
    for c in range(4):
        assert set(b[c].unique().tolist()) <= {alpha[c].item(), -alpha[c].item()}
    t = Q.ternary_weight(w)
    assert all(len(t[c].unique()) <= 3 for c in range(4))
    assert ((t == 0) == (w.abs() <= 0.7 * w.abs().flatten(1).mean(1).reshape(-1, 1, 1, 1))).all()


def test_lsq_learns_step():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    step = nn.Parameter(torch.tensor(2.0))
    opt = torch.optim.Adam([step], lr=0.05)
    before = ((Q.lsq_quantize(x, step, -7, 7) - x) ** 2).mean().item()
    for _ in range(200):
        opt.zero_grad()
        ((Q.lsq_quantize(x, step, -7, 7) - x) ** 2).mean().backward()
        opt.step()
    assert ((Q.lsq_quantize(x, step, -7, 7) - x) ** 2).mean().item() < 0.7 * before


# ---------------------------------------------------------------------------------------------- folding
def test_fold_batchnorm_matches_and_keeps_input(trained, ctx):
    model = copy.deepcopy(trained)
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    snap = snapshot(model)
    folded = Q.fold_batchnorm(model)
    assert_unchanged(model, snap)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = ctx.example_input(16)
    with torch.no_grad():
        assert torch.allclose(folded(x), model.eval()(x), atol=1e-4, rtol=1e-4)


def test_fold_batchnorm_resnet_shortcut(ctx):
    torch.manual_seed(0)
    model = build_model("resnet", ctx.task, in_channels=1, width=0.25, image_size=8).eval()
    folded = Q.fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = ctx.example_input(4)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4)


# ---------------------------------------------------------------------------------------------- PTQ
def test_ptq_int8_close_and_frozen(trained, ctx):
    snap = snapshot(trained)
    q = Q.ptq(trained, ctx, bits=8)
    assert_unchanged(trained, snap)
    layers = Q.quant_layers(q)
    names = Q.quantizable_layers(trained)
    assert sorted(layers) == sorted(names)
    assert all(m.frozen and m.weight_bits == 8 and m.act_bits == 8 for m in layers.values())
    assert abs(ctx.score(q) - ctx.score(trained)) <= 0.02
    for m in layers.values():
        assert torch.equal(m.integer_weight().dequantize(), m.weight)
        assert len(torch.unique(m.weight[0])) <= 255
    assert q.compression["changes"] == ("low_bit_storage",)


def test_ptq_low_bits_keep_first_last_and_layer_bits(trained, ctx):
    q = Q.ptq(trained, ctx, bits=3, act_bits=3)
    layers = Q.quant_layers(q)
    names = Q.quantizable_layers(trained)
    assert layers[names[0]].weight_bits == 8 and layers[names[-1]].weight_bits == 8
    assert all(layers[n].weight_bits == 3 and layers[n].act_bits == 3 for n in names[1:-1])
    only = Q.ptq(trained, ctx, bits=None, act_bits=None, layer_bits={names[1]: 2})
    assert list(Q.quant_layers(only)) == [names[1]]
    with pytest.raises(ValueError, match="layer_bits names unknown"):
        Q.ptq(trained, ctx, layer_bits={"nope": 4})
    with pytest.raises(ValueError, match=r"layer_bits\['backbone"):
        Q.ptq(trained, ctx, layer_bits={names[1]: 1})


def test_ptq_errors(trained, ctx):
    with pytest.raises(ValueError, match="bits"):
        Q.ptq(trained, ctx, bits=1)
    with pytest.raises(ValueError, match="act_bits"):
        Q.ptq(trained, ctx, act_bits=17)
    with pytest.raises(ValueError, match="calibrator"):
        Q.ptq(trained, ctx, calibrator="max")
    with pytest.raises(ValueError, match="n_batches"):
        Q.ptq(trained, ctx, n_batches=0)
    with pytest.raises(TypeError, match="ctx"):
        Q.ptq(trained, None)
    with pytest.raises(ValueError, match="calibration needs data"):
        Q.calibrate(Q.prepare(trained), [])
    with pytest.raises(RuntimeError, match="calibrate"):
        Q.prepare(trained)(ctx.example_input(2))


def test_calibrators_on_model(trained, ctx):
    ref = ctx.score(trained)
    for cal in Q.CALIBRATORS:
        assert ctx.score(Q.ptq(trained, ctx, bits=8, calibrator=cal)) >= ref - 0.03, cal


def test_counted_bits_and_traffic(trained, ctx):
    x = ctx.example_input(1)
    q = Q.ptq(trained, ctx, bits=4, act_bits=4)
    fp, qc = count(Q.fold_batchnorm(trained), x).set_index("name"), count(q, x).set_index("name")
    name = Q.quantizable_layers(trained)[1]
    assert qc.loc[name, "weight_bits"] == 4 and qc.loc[name, "act_bits"] == 4
    assert qc.loc[name, "macs"] == fp.loc[name, "macs"]
    assert qc.loc[name, "bitops"] == fp.loc[name, "macs"] * 16
    assert qc["traffic_bytes"].sum() < fp["traffic_bytes"].sum() / 2  # fake-quant ops move no extra data


# ---------------------------------------------------------------------------------------------- storage
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_packed_file_round_trip(trained, ctx, bits, tmp_path):
    q = Q.ptq(trained, ctx, bits=bits, keep_first_last=False)
    size = stored_bytes(q, path=tmp_path / "m.packed")
    assert size.fmt == "packed"
    loaded = load_packed(tmp_path / "m.packed")
    for name, m in Q.quant_layers(q).items():
        assert torch.equal(loaded[f"{name}.weight"], m.weight)
    dense = stored_bytes(Q.fold_batchnorm(trained), "dense").bytes
    weights = sum(m.weight.numel() for m in Q.quant_layers(q).values())
    assert size.bytes < dense * (bits / 32) + 4 * weights / 8 + 4096
    assert dense / size.bytes > {8: 3.0, 4: 5.0, 2: 7.0}[bits]


# ---------------------------------------------------------------------------------------------- QAT
@pytest.mark.parametrize("quantizer,bits", [("uniform", 4), ("lsq", 4), ("binary", 1), ("ternary", 2)])
def test_qat_trains_and_freezes(trained, ctx, quantizer, bits, tmp_path):
    # 3 epochs at lr 1e-3: binary QAT needs them on every CPU (1 epoch at 1e-4 stayed at chance on some).
    snap = snapshot(trained)
    q = Q.qat(trained, ctx, bits=bits, quantizer=quantizer, epochs=3, lr=1e-3)
    assert_unchanged(trained, snap)
    names = Q.quantizable_layers(trained)
    inner = Q.quant_layers(q)[names[1]]
    assert inner.weight_bits == bits and inner.frozen
    assert len(torch.unique(inner.weight[0])) <= (3 if quantizer == "ternary" else 2**bits)
    for m in Q.quant_layers(q).values():
        assert torch.equal(m.integer_weight().dequantize(), m.weight)
    loaded = load_packed(stored_bytes(q, path=tmp_path / "q.packed").path)
    assert torch.equal(loaded[f"{names[1]}.weight"], inner.weight)
    score = ctx.score(q)
    assert np.isfinite(score) and score > 3 / ctx.task.num_classes, f"{quantizer}: {score} vs chance 0.1"
    assert "training" in q.compression["changes"]


def test_qat_recovers_low_bit_ptq(trained, ctx):
    """At 2 bits PTQ collapses; a short QAT recovers much of the accuracy."""
    ptq2 = ctx.score(Q.ptq(trained, ctx, bits=2))
    qat2 = ctx.score(Q.qat(trained, ctx, bits=2, epochs=3, lr=1e-3))
    assert qat2 > ptq2 + 0.1


def test_observer_freeze_callback(trained, ctx):
    q = Q.prepare(trained, bits=4)
    Q.calibrate(q, ctx.calibration_batches(1))
    layer = Q.quant_layers(q)[Q.quantizable_layers(trained)[1]]
    start = float(layer.a_hi)
    seen = []

    class Spy(Callback):
        def on_step_end(self, state):
            seen.append((state.step / state.total_steps, float(layer.a_hi)))

    ctx.finetune(q, epochs=2, callbacks=[Q.ObserverFreeze(0.5), Spy()])
    assert layer.observing is False
    before = [hi for f, hi in seen if f <= 0.5]
    after = [hi for f, hi in seen if f > 0.55]
    assert any(hi != start for hi in before)            # the EMA moved the range while observing
    assert len(set(after)) == 1                          # and it stayed fixed afterwards
    with pytest.raises(ValueError, match="freeze_observers_at"):
        Q.ObserverFreeze(1.5)


# ---------------------------------------------------------------------------------------------- mixed precision
def test_sensitivity_and_allocation(trained, ctx):
    sens = Q.bit_sensitivity(trained, ctx, bits_options=(8, 2))
    names = Q.quantizable_layers(trained)
    assert set(sens["layer"]) == set(names) and set(sens["bits"]) == {8, 2}
    assert sens[sens.bits == 2]["drop"].max() > sens[sens.bits == 8]["drop"].max()
    units = Q.layer_units(trained, ctx.example_input(1), "size")
    alloc = Q.allocate_bits(sens, units, 5.0)
    assert Q.average_bits(alloc, units) <= 5.0 + 1e-9 and set(alloc.values()) <= {8, 2}
    assert Q.allocate_bits(sens, units, 8.0) == {n: 8 for n in units}
    macs = Q.layer_units(trained, ctx.example_input(1), "bitops")
    assert set(macs) == set(units) and all(v > 0 for v in macs.values())
    with pytest.raises(ValueError, match="average_bits"):
        Q.allocate_bits(sens, units, 1.0)


def test_allocation_prefers_insensitive_big_layers():
    sens = pd.DataFrame([dict(layer=l, bits=b, drop=d) for l, b, d in
                         [("a", 8, 0.0), ("a", 4, 0.0), ("b", 8, 0.0), ("b", 4, 0.5)]])
    alloc = Q.allocate_bits(sens, {"a": 1000, "b": 1000}, 6.0)
    assert alloc == {"a": 4, "b": 8}


def test_allocation_spends_the_budget():
    rows = [dict(layer=l, bits=b, drop=d) for l, d4, d2 in [("a", 0.0, 0.1), ("b", 0.0, 0.2), ("c", 0.01, 0.3)]
            for b, d in ((8, 0.0), (4, d4), (2, d2))]
    units = {"a": 4000, "b": 1000, "c": 1000}
    alloc = Q.allocate_bits(pd.DataFrame(rows), units, 3.5)
    used = Q.average_bits(alloc, units)
    assert used <= 3.5
    options = (2, 4, 8)
    for n, b in alloc.items():  # no single layer can be raised one step within the budget
        if b < 8:
            higher = options[options.index(b) + 1]
            assert used + units[n] * (higher - b) / sum(units.values()) > 3.5


@pytest.mark.parametrize("task", ["classification", "regression", "detection", "segmentation"])
@pytest.mark.parametrize("arch", ["vgg", "resnet", "mobilenet"])
def test_every_task_and_arch(task, arch, tmp_path):
    data = load("shapes", task, n=48)
    tctx = Context(task=task_for(data), data=data, budget=1, batch_size=16)
    torch.manual_seed(0)
    model = build_model(arch, tctx.task, in_channels=3, width=0.125).eval()
    x = tctx.example_input(4)
    q8 = Q.ptq(model, tctx, bits=8, n_batches=1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q8.modules())
    with torch.no_grad():
        ref, out = model(x), q8(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max() + 1e-3   # 8 bits: close to fp32
    q4 = Q.qat(model, tctx, bits=4, epochs=1, n_batches=1)
    metrics = tctx.evaluate(q4)
    assert set(metrics) == set(tctx.evaluate(model)) and all(np.isfinite(v) for v in metrics.values())
    loaded = load_packed(stored_bytes(q4, path=tmp_path / "m.packed").path)
    for name, m in Q.quant_layers(q4).items():
        assert torch.equal(loaded[f"{name}.weight"], m.weight)


# ---------------------------------------------------------------------------------------------- edge cases
def test_qparams_and_grid_errors():
    with pytest.raises(ValueError, match="lo <= hi"):
        Q.qparams(1.0, -1.0, 8)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="axis=None"):
        Q.fake_quantize(x, torch.ones(4), torch.zeros(4, dtype=torch.int32), -127, 127)
    with pytest.raises(ValueError, match="axis 1 of x has 3"):
        Q.fake_quantize(x, torch.ones(4), torch.zeros(4, dtype=torch.int32), -127, 127, axis=1)
    with pytest.raises(ValueError, match="axis"):
        Q.quantize(x, torch.ones(4), torch.zeros(4), -127, 127, axis=2)
    with pytest.raises(ValueError, match="entropy.*bits <= 10"):
        Q.calibrate_range(torch.rand(100), "entropy", 12)


def test_zero_range_channel_quantizes_to_zero():
    w = torch.randn(3, 4)
    w[1] = 0.0
    lo, hi = Q.calibrate_range(w, "minmax", 4, axis=0)
    scale, zp = Q.qparams(lo, hi, 4)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    out = Q.fake_quantize(w, scale, zp, *Q.qrange(4), axis=0)
    assert torch.equal(out[1], torch.zeros(4))
    assert torch.equal(out, torch.fake_quantize_per_channel_affine(w, scale, zp.int(), 0, *Q.qrange(4)))


def test_lsq_step_gradient_matches_paper():
    """d x_hat / d s = round(x/s) - x/s inside the range, qmin or qmax when clipped, times the scale g."""
    x = torch.tensor([0.26, -0.61, 3.0, -5.0])
    step = nn.Parameter(torch.tensor(0.5))
    Q.lsq_quantize(x, step, -3, 3).sum().backward()
    v = x / 0.5
    expected = torch.where(v > 3, torch.tensor(3.0), torch.where(v < -3, torch.tensor(-3.0), torch.round(v) - v))
    g = 1.0 / np.sqrt(x.numel() * 3)
    assert step.grad.item() == pytest.approx(float(expected.sum()) * g, rel=1e-5)


@pytest.mark.parametrize("per_channel,symmetric", [(False, True), (True, False), (False, False)])
def test_weight_grids_round_trip_through_file(trained, per_channel, symmetric, tmp_path):
    q = Q.weight_quantize(trained, bits=4, per_channel=per_channel, symmetric=symmetric)
    assert all(m.frozen and m.act_bits is None for m in Q.quant_layers(q).values())
    for m in Q.quant_layers(q).values():
        it = m.integer_weight()
        assert (it.axis == 0) is per_channel and it.codes.max() <= 15
        assert torch.equal(it.dequantize(), m.weight)
    loaded = load_packed(stored_bytes(q, path=tmp_path / "w.packed").path)
    for name, m in Q.quant_layers(q).items():
        assert torch.equal(loaded[f"{name}.weight"], m.weight)


def test_fold_grouped_conv_with_bias_and_bn_without_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, affine=False), nn.Conv2d(8, 4, 1),
                          nn.BatchNorm2d(4, track_running_stats=False))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-1, 1)
    model.eval()
    folded = Q.fold_batchnorm(model)
    kinds = [type(m).__name__ for m in folded]
    assert kinds.count("BatchNorm2d") == 1 and kinds[-1] == "BatchNorm2d"  # no running stats: kept
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_prepare_errors(trained):
    q = Q.prepare(trained)
    with pytest.raises(ValueError, match="already quantized"):
        Q.prepare(q)
    with pytest.raises(ValueError, match="nothing to quantize"):
        Q.prepare(trained, bits=None)
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        Q.prepare(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="per_channel"):
        Q.prepare(trained, per_channel="yes")
    name = Q.quantizable_layers(trained)[1]
    with pytest.raises(ValueError, match="pair"):
        Q.prepare(trained, layer_bits={name: (4, 8, 8)})
    with pytest.raises(ValueError, match="quantizer"):
        Q.prepare(trained, quantizer="nf4")


def test_prepare_keeps_dtype():
    model = nn.Sequential(nn.Linear(4, 3)).double()
    q = Q.weight_quantize(model, bits=8)
    assert q[0].weight.dtype == torch.float64 and q[0].w_scale.device == q[0].weight.device


def test_allocate_bits_rejects_bad_input():
    good = pd.DataFrame([dict(layer="a", bits=8, drop=0.0), dict(layer="a", bits=2, drop=0.1)])
    with pytest.raises(ValueError, match="columns"):
        Q.allocate_bits(pd.DataFrame({"layer": ["a"]}), {"a": 10}, 4.0)
    with pytest.raises(ValueError, match="no row for layer 'b'"):
        Q.allocate_bits(pd.concat([good, pd.DataFrame([dict(layer="b", bits=8, drop=0.0)])]), {"a": 1, "b": 1}, 4.0)
    with pytest.raises(ValueError, match="NaN"):
        Q.allocate_bits(good.assign(drop=[0.0, float("nan")]), {"a": 10}, 4.0)
    with pytest.raises(ValueError, match="share no layer"):
        Q.allocate_bits(good, {"z": 10}, 4.0)
    with pytest.raises(ValueError, match=r"units\['a'\]"):
        Q.allocate_bits(good, {"a": 0}, 4.0)
    with pytest.raises(TypeError, match="sensitivity"):
        Q.allocate_bits([1, 2], {"a": 10}, 4.0)


def test_bias_correction_removes_mean_output_shift():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=False))
    x = torch.randn(256, 16) + 0.5  # a non-zero mean input, so rounding shifts the output mean
    q = Q.prepare(model, bits=2, act_bits=None, keep_first_last=False)
    with torch.no_grad():
        before = (q(x) - model(x)).mean(0).abs().max().item()
    Q.correct_bias(q, [(x, None)])
    Q.freeze(q)
    with torch.no_grad():
        after = (q(x) - model(x)).mean(0).abs().max().item()
    assert before > 0.05 and after < 1e-4 * max(1.0, before)
    assert q[0].bias is not None and torch.equal(q[0].integer_weight().dequantize(), q[0].weight)
    with pytest.raises(ValueError, match="calibration needs data"):
        Q.correct_bias(Q.prepare(model, bits=2, act_bits=None), [])


def test_ptq_bias_correction_flag(trained, ctx):
    plain = Q.ptq(trained, ctx, bits=2, act_bits=None)
    corrected = Q.ptq(trained, ctx, bits=2, act_bits=None, bias_correction=True)
    name = Q.quantizable_layers(trained)[1]
    assert not torch.equal(Q.quant_layers(corrected)[name].bias, Q.quant_layers(plain)[name].bias)
    assert corrected.compression["bias_correction"] is True
    with pytest.raises(TypeError, match="bias_correction"):
        Q.ptq(trained, ctx, bias_correction="yes")


# ---------------------------------------------------------------------------------------------- bad input
X = torch.linspace(-1.0, 1.0, 11)
S1, Z0 = torch.tensor(0.1), torch.tensor(0)
W = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
NAN = float("nan")

BAD_GRID_CALLS = [
    (lambda: Q.quantize(X, torch.tensor(0.0), Z0, -7, 7), ValueError, "scale must be finite and > 0"),
    (lambda: Q.quantize(X, torch.tensor(-0.1), Z0, -7, 7), ValueError, "scale"),
    (lambda: Q.quantize(X, torch.tensor(NAN), Z0, -7, 7), ValueError, "scale"),
    (lambda: Q.quantize(X, S1, Z0, 7, -7), ValueError, "qmin=7 must be below qmax=-7"),
    (lambda: Q.quantize(X, S1, Z0, -7.5, 7), TypeError, "qmin"),
    (lambda: Q.quantize(X, S1, torch.tensor(0.5), -7, 7), ValueError, "zero_point must hold integers"),
    (lambda: Q.quantize(X, S1, torch.tensor(100), -7, 7), ValueError, "zero_point must lie in"),
    (lambda: Q.quantize(torch.tensor([NAN]), S1, Z0, -7, 7), ValueError, "x must be finite"),
    (lambda: Q.quantize([1.0], S1, Z0, -7, 7), TypeError, "x must be a torch.Tensor"),
    (lambda: Q.fake_quantize(X, torch.tensor(0.0), Z0, -7, 7), ValueError, "scale"),
    (lambda: Q.fake_quantize(X, S1, Z0, 7, -7), ValueError, "qmin"),
    (lambda: Q.dequantize(torch.tensor([1, 2]), torch.tensor(0.0), Z0), ValueError, "scale"),
    (lambda: Q.dequantize(torch.tensor([0.5]), S1, Z0), TypeError, "q must hold integer codes"),
    (lambda: Q.qparams(NAN, 1.0, 8), ValueError, "lo must be finite"),
    (lambda: Q.qparams(-1.0, float("inf"), 8), ValueError, "hi must be finite"),
    (lambda: Q.qparams("a", 1.0, 8), TypeError, "lo"),
    (lambda: Q.qrange(4, "yes"), TypeError, "symmetric"),
    (lambda: Q.sqnr_db(torch.randn(3), torch.randn(4)), ValueError, "x and x_hat"),
    (lambda: Q.sqnr_db(torch.zeros(3), torch.ones(3)), ValueError, "x is all zeros"),
    (lambda: Q.calibrate_range(torch.tensor([NAN, 1.0])), ValueError, "x must be finite"),
    (lambda: Q.calibrate_range(torch.randn(3, 4), axis=3), ValueError, "axis"),
    (lambda: Q.calibrate_range([1.0, 2.0]), TypeError, "x"),
    (lambda: Q.lsq_quantize(X, torch.tensor(0.1), 7, -7), ValueError, "qmin"),
    (lambda: Q.lsq_quantize(X, torch.tensor(0.1), -7, 7, features=0), ValueError, "features"),
    (lambda: Q.lsq_quantize(X, 0.1, -7, 7), TypeError, "step"),
    (lambda: Q.lsq_quantize(X, torch.tensor(0.0), -7, 7), ValueError, "step must be finite and non-zero"),
    (lambda: Q.lsq_quantize(X, torch.tensor([0.1, NAN]), -7, 7, axis=0), ValueError, "step"),
    (lambda: Q.binary_weight(torch.randn(5)), ValueError, "w must have shape"),
    (lambda: Q.binary_weight(torch.zeros(0, 3)), ValueError, "w must not be empty"),
    (lambda: Q.ternary_weight(W, threshold=-1), ValueError, "threshold"),
    (lambda: Q.ternary_weight(W, threshold=NAN), ValueError, "threshold"),
    (lambda: Q.ternary_weight(W, threshold=100), ValueError, "threshold"),
    (lambda: Q.fold_conv_bn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5)), ValueError, "bn must be a BatchNorm2d"),
    (lambda: Q.fold_conv_bn(nn.Linear(3, 4), nn.BatchNorm2d(4)), TypeError, "conv"),
    (lambda: Q.quant_layers("model"), TypeError, "model"),
    (lambda: Q.quantizable_layers("model"), TypeError, "model"),
]


@pytest.mark.parametrize("call,error,match", BAD_GRID_CALLS)
def test_bad_grid_arguments_are_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_threshold_in_range_keeps_ternary_weights():
    for threshold in (0.0, 0.7, 0.99):
        values = torch.unique(Q.ternary_weight(W, threshold))
        assert len(values) <= 3 * W.shape[0] and bool((values != 0).any())


@pytest.mark.parametrize("quantizer,fixed", [("binary", 1), ("ternary", 2)])
def test_fixed_width_quantizers_reject_other_bits(trained, quantizer, fixed):
    for bits in (999, 0, 4):
        with pytest.raises(ValueError, match=rf"bits={bits} does not apply to quantizer='{quantizer}'.*bits={fixed}"):
            Q.weight_quantize(trained, quantizer, bits=bits)
        with pytest.raises(ValueError, match=rf"bits={bits} does not apply"):
            Q.prepare(trained, bits=bits, quantizer=quantizer)
    names = Q.quantizable_layers(trained)
    for bits in (fixed, "auto"):
        assert Q.quant_layers(Q.weight_quantize(trained, quantizer, bits=bits))[names[1]].weight_bits == fixed
    with pytest.raises(ValueError, match="bits='x'"):
        Q.weight_quantize(trained, quantizer, bits="x")


def test_calibration_inputs_that_do_not_fit_the_model(trained, ctx):
    q = Q.prepare(trained, bits=8)
    x = ctx.example_input(4)
    with pytest.raises(ValueError, match="batches of shape .* does not fit model"):
        Q.calibrate(q, [(torch.randn(4, 3, 8, 8), None)])
    with pytest.raises(ValueError, match="batches of shape .* does not fit model"):
        Q.observe_activations(q, [torch.randn(4, 1, 4)])
    with pytest.raises(ValueError, match="batches must be finite"):
        Q.calibrate(q, [torch.full_like(x, NAN)])
    with pytest.raises(TypeError, match="batches"):
        Q.calibrate(q, 5)
    with pytest.raises(TypeError, match="batches"):
        Q.calibrate(q, ["a"])
    with pytest.raises(ValueError, match="no quantized layers"):
        Q.calibrate(trained, [x])
    with pytest.raises(ValueError, match="no quantized layers"):
        Q.freeze(copy.deepcopy(trained))
    with pytest.raises(ValueError, match="nothing to calibrate"):
        Q.calibrate(Q.prepare(trained, bits=8, act_bits=None), [x])
    with pytest.raises(ValueError, match="not calibrated"):
        Q.correct_bias(Q.prepare(trained, bits=4), [x])
    with pytest.raises(ValueError, match="batches of shape"):
        Q.correct_bias(Q.prepare(trained, bits=4, act_bits=None), [torch.randn(4, 3, 8, 8)])
    with pytest.raises(TypeError, match="layer_bits must be"):
        Q.prepare(trained, bits=None, layer_bits="abc")
    with pytest.raises(TypeError, match="bits_options"):
        Q.bit_sensitivity(trained, ctx, bits_options=4)


def test_mixed_precision_bad_tables():
    good = pd.DataFrame([dict(layer="a", bits=8, drop=0.0), dict(layer="a", bits=2, drop=0.1)])
    both = pd.concat([good, good.assign(layer="b")])
    with pytest.raises(ValueError, match=r"units has no entry for the sensitivity layers \['b'\]"):
        Q.allocate_bits(both, {"a": 10}, 4.0)
    with pytest.raises(ValueError, match="drops must be finite"):
        Q.allocate_bits(good.assign(drop=[0.0, float("inf")]), {"a": 10}, 4.0)
    with pytest.raises(ValueError, match="bits must be integers"):
        Q.allocate_bits(good.assign(bits=[8.5, 2]), {"a": 10}, 4.0)
    with pytest.raises(ValueError, match="bits must be integers"):
        Q.allocate_bits(good.assign(bits=[8, 1]), {"a": 10}, 4.0)
    with pytest.raises(ValueError, match=r"units has no entry for the alloc layers \['b'\]"):
        Q.average_bits({"a": 4, "b": 2}, {"a": 1})
    with pytest.raises(ValueError, match="alloc is empty"):
        Q.average_bits({}, {"a": 1})
    with pytest.raises(ValueError, match=r"units\['a'\]"):
        Q.average_bits({"a": 4}, {"a": 0})
    with pytest.raises(TypeError, match="alloc"):
        Q.average_bits("a", {"a": 1})
