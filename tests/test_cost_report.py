"""profile(): totals agree with the parts, kinds are labelled, bad input fails clearly, the model is untouched."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from survey_lib.cost import (
    CostReport,
    Metric,
    count,
    estimate_energy,
    get_hardware,
    memory_traffic,
    peak_activation_memory,
    profile,
    stored_bytes,
)
from survey_lib.cost import hardware as hwmod

HW = ("mobile_big_core", "mcu_cortex_m7", "int8_npu")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = y + self.dw(y)
        return self.fc(y.mean((2, 3)))


def net():
    torch.manual_seed(0)
    return Net()


X = torch.randn(3, 3, 8, 8)


def test_totals_agree_with_parts():
    model = net()
    with torch.no_grad():
        model.conv.weight[:4] = 0
    r = profile(model, X, hardware=HW)
    x1 = X[:1]
    parts = count(model, x1)
    assert r["macs"] == parts["macs"].sum() > 0
    assert r["flops"] == 2 * r["macs"]
    assert r["params"] == sum(p.numel() for p in model.parameters()) == parts["params"].sum()
    assert r["nonzero_params"] == parts["nonzero_params"].sum() < r["params"]
    assert r["sparsity"] == pytest.approx(1 - r["nonzero_params"] / r["params"])
    assert r["ideal_sparse_macs"] == pytest.approx(parts["ideal_sparse_macs"].sum())
    assert r["ideal_sparse_macs"] < r["macs"]
    assert r["bitops"] == r["macs"] * 32 * 32
    assert r["peak_activation_bytes"] == peak_activation_memory(model, x1.clone())
    assert r["memory_traffic_bytes"] == memory_traffic(model, x1).attrs["total_bytes"] == r.layers["traffic_bytes"].sum()
    s = stored_bytes(model)
    assert (r["stored_bytes"], r["stored_gzip_bytes"]) == (s.bytes, s.gzip_bytes)
    assert r[f"est_latency_s[{HW[0]}]"] == pytest.approx(r.layers["est_latency_s"].sum())
    hw = get_hardware(HW[0])
    assert r[f"est_energy_j[{HW[0]}]"] == pytest.approx(estimate_energy(r["macs"], r["memory_traffic_bytes"], hw))
    # roofline per layer is never faster than the whole-model roofline
    whole = max(r["macs"] / hw.peak("fp32"), r["memory_traffic_bytes"] / hw.bandwidth("dram"))
    assert r[f"est_latency_s[{HW[0]}]"] >= whole * (1 - 1e-9)


def test_counted_at_batch_one():
    model = net()
    assert profile(model, X, hardware=HW[0]).totals().equals(profile(model, X[:1], hardware=HW[0]).totals())


def test_kinds_and_shapes_of_output():
    r = profile(net(), X, hardware=HW)
    kinds = dict(zip(r.totals()["name"], r.totals()["kind"]))
    assert list(r.totals().columns) == ["name", "value", "unit", "kind"]
    for n in ("params", "nonzero_params", "sparsity", "macs", "flops", "bitops", "peak_activation_bytes", "memory_traffic_bytes"):
        assert kinds[n] == "counted", n
    assert kinds["stored_bytes"] == kinds["stored_gzip_bytes"] == "measured"
    assert kinds["ideal_sparse_macs"] == "estimated"
    for h in HW:
        assert kinds[f"est_latency_s[{h}]"] == kinds[f"est_energy_j[{h}]"] == "estimated"
    assert "2 x MACs" in r.get("flops").unit
    assert r.layer_kinds["macs"] == "counted" and r.layer_kinds["est_latency_s"] == "estimated"
    assert isinstance(r.get("macs"), Metric) and isinstance(r, CostReport)
    with pytest.raises(KeyError, match="macs"):
        r.get("nope")
    json.dumps(r.to_dict())  # JSON-ready, NaN -> None
    assert "macs" in repr(r) and "<table>" in r._repr_html_()


def test_int8_npu_needs_int8_bits():
    model = net()
    fp32 = profile(model, X, hardware="int8_npu")
    assert math.isnan(fp32["est_latency_s[int8_npu]"])  # no fp32 path on an int8 NPU
    names = [n for n, m in model.named_modules() if n]
    q = profile(model, X, hardware="int8_npu", bits={n: (8, 8) for n in names})
    assert math.isfinite(q["est_latency_s[int8_npu]"]) and q["bitops"] == q["macs"] * 64
    assert q["memory_traffic_bytes"] < fp32["memory_traffic_bytes"]


def test_host_hardware_and_measured_latency(tmp_path, monkeypatch):
    monkeypatch.setenv("SURVEY_LIB_CACHE", str(tmp_path))
    monkeypatch.setattr(hwmod, "_HOST", None)
    r = profile(net(), X, latency=True, latency_kwargs={"warmup": 1, "runs": 30})
    assert r.hardware == ["host"] and r["est_latency_s[host]"] > 0
    lat = {m.name: m for m in r.metrics if m.name.startswith("latency_")}
    for rt in ("eager", "ort"):
        for b in (1, 3):
            for t in (1, 2):
                m = lat[f"latency_median_ms[{rt},b{b},t{t}]"]
                assert m.kind == "measured" and m.unit == "ms" and m.value > 0
                assert lat[f"latency_iqr_ms[{rt},b{b},t{t}]"].value >= 0
    assert len(r.latency) == 8


def test_bad_input():
    with pytest.raises(TypeError, match="example_input"):
        profile(net(), X.numpy(), hardware=HW[0])
    with pytest.raises(ValueError, match=r"example_input of shape \(3, 4, 8, 8\).*does not fit model"):
        profile(net(), torch.randn(3, 4, 8, 8), hardware=HW[0])
    with pytest.raises(ValueError, match="hardware"):
        profile(net(), X, hardware="gpu9000")


def test_model_not_mutated():
    model = net().train()
    model.bn.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile(model, X, hardware=HW[:1])
    assert model.training and model.conv.training and not model.bn.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------- bad input
def test_negative_or_zero_bits_are_rejected_not_counted():
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 8, 8)
    for pair in ((-3, 8), (8, 0)):
        with pytest.raises(ValueError, match=r"bits\['0'\]=-?\d+ is out of range; accepted: 1 <= bits\['0'\] <= 64"):
            profile(model, x, bits={"0": pair})


def test_bad_report_arguments():
    from survey_lib.cost.report import layer_estimates, precision_of

    model, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 8, 8)
    with pytest.raises(TypeError, match="latency must be True or False"):
        profile(model, x, latency="yes")
    with pytest.raises(TypeError, match="latency_kwargs"):
        profile(model, x, latency=True, latency_kwargs=5)
    with pytest.raises(TypeError, match="name must be a str"):
        Metric(5, 1.0, "x", "counted")
    with pytest.raises(TypeError, match="value must be a number"):
        Metric("a", "x", "x", "counted")
    with pytest.raises(ValueError, match="weight_bits=-3"):
        precision_of(-3, 8)
    with pytest.raises(TypeError, match="act_bits must be an int"):
        precision_of(8, float("nan"))
    report = profile(model, x)
    with pytest.raises(TypeError, match="hw must be a HardwareProfile"):
        layer_estimates(report.layers, "host")
    with pytest.raises(ValueError, match="layers lacks the columns"):
        layer_estimates(report.layers.drop(columns=["macs"]), hwmod.get_hardware("host"))
