"""Hardware profiles: roofline max(), energy sums, registry errors, host micro-benchmark and its cache."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from survey_lib.cost import HARDWARE_NAMES, HardwareProfile, estimate_energy, estimate_latency, get_hardware, host_profile
from survey_lib.cost import hardware as hwmod
from survey_lib.cost.hardware import ENERGY_PJ_PER_MAC, roofline_points

TOY = HardwareProfile(
    name="toy",
    description="hand numbers",
    peak_macs_per_s={"fp32": 1e9, "int8": 4e9},
    bandwidth_bytes_per_s={"dram": 1e8, "sram": 1e10},
    energy_pj_per_mac={"fp32": 4.6, "int8": 0.3},
    energy_pj_per_byte={"dram": 250.0, "sram": 2.5},
)


def test_roofline_is_max_of_compute_and_memory():
    assert estimate_latency(1e9, 1e6, TOY) == pytest.approx(1.0)  # compute-bound: 1 s vs 0.01 s
    assert estimate_latency(1e6, 1e8, TOY) == pytest.approx(1.0)  # memory-bound: 0.001 s vs 1 s
    assert estimate_latency(4e9, 0, TOY, precision="int8") == pytest.approx(1.0)
    assert estimate_latency(1e6, 1e8, TOY, level="sram") == pytest.approx(0.01)


def test_energy_by_hand():
    assert estimate_energy(1e9, 0, TOY) == pytest.approx(1e9 * 4.6e-12)
    assert estimate_energy(0, 1e6, TOY) == pytest.approx(1e6 * 250e-12)
    assert estimate_energy(2e6, 1e3, TOY, precision="int8", level="sram") == pytest.approx(2e6 * 0.3e-12 + 1e3 * 2.5e-12)


def test_horowitz_table():
    assert ENERGY_PJ_PER_MAC["fp32"] == pytest.approx(4.6)
    assert ENERGY_PJ_PER_MAC["fp16"] == pytest.approx(1.5)
    assert ENERGY_PJ_PER_MAC["int8"] == pytest.approx(0.3)


def test_targets_are_estimated_and_cited():
    targets = [n for n in HARDWARE_NAMES if n != "host"]
    assert len(targets) >= 3
    for n in targets:
        hw = get_hardware(n)
        assert hw.kind == "estimated" and hw.description and len(hw.sources) >= 2
        assert all(v > 0 and math.isfinite(v) for v in {**hw.peak_macs_per_s, **hw.bandwidth_bytes_per_s}.values())
    a76 = get_hardware("mobile_big_core")
    assert a76.peak_macs_per_s["int8"] == pytest.approx(4 * a76.peak_macs_per_s["fp32"])
    get_hardware("mobile_big_core").peak_macs_per_s["fp32"] = 1.0  # a copy: the registry is unchanged
    assert get_hardware("mobile_big_core").peak_macs_per_s["fp32"] > 1e9


def test_unknown_names_and_precisions():
    with pytest.raises(ValueError, match="mobile_big_core"):
        get_hardware("tpu_v9")
    with pytest.raises(ValueError, match="precision"):
        estimate_latency(1, 1, "int8_npu", precision="fp32")
    with pytest.raises(ValueError, match="level"):
        estimate_energy(1, 1, TOY, level="l7")
    with pytest.raises(ValueError, match="macs"):
        estimate_latency(-1, 1, TOY)


def test_roofline_points():
    layers = pd.DataFrame({"name": ["conv", "relu"], "macs": [1e9, 0], "traffic_bytes": [1e6, 1e7]})
    df = roofline_points(layers, TOY)
    assert df["intensity_macs_per_byte"].tolist()[0] == pytest.approx(1000.0)
    assert df["attainable_macs_per_s"].tolist()[0] == pytest.approx(1e9)  # capped at peak
    assert df["bound"].tolist() == ["compute", "memory"]
    assert df["est_latency_s"].tolist() == pytest.approx([1.0, 0.1])


def test_host_measured_cached_atomically_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SURVEY_LIB_CACHE", str(tmp_path))
    monkeypatch.setattr(hwmod, "_HOST", None)
    calls = []
    real = hwmod._measure_host
    monkeypatch.setattr(hwmod, "_measure_host", lambda: calls.append(1) or real())
    hw = host_profile()
    assert calls == [1] and hw.kind == "measured" and hw.name == "host"
    figures = [hw.peak_macs_per_s["fp32"], hw.peak_macs_per_s["int8"], hw.bandwidth_bytes_per_s["dram"],
               *[v for k, v in hw.extra.items() if "macs" in k]]
    assert all(math.isfinite(v) and v > 0 for v in figures)
    assert {"fp32_macs_per_s_1threads", "int8_macs_per_s_1threads"} <= set(hw.extra)
    path = tmp_path / "host_profile.json"
    assert json.loads(path.read_text())["copy_bytes_per_s"] == hw.bandwidth_bytes_per_s["dram"]
    assert [p.name for p in tmp_path.iterdir()] == ["host_profile.json"]  # no temp leftovers
    monkeypatch.setattr(hwmod, "_HOST", None)  # forget the in-process copy: must read the file
    again = get_hardware("host")
    assert calls == [1] and again.peak_macs_per_s == hw.peak_macs_per_s
    host_profile(cache=False)
    assert calls == [1, 1]


def test_default_memory_level_per_target():
    from survey_lib.cost import estimate_energy, estimate_latency, get_hardware

    mcu, phone = get_hardware("mcu_cortex_m7"), get_hardware("mobile_big_core")
    assert mcu.default_level == "sram" and phone.default_level == "dram"
    # Same work, same energy table: on-chip SRAM (the MCU's default) costs far less than DRAM.
    assert estimate_energy(1e6, 1e6, mcu) < estimate_energy(1e6, 1e6, mcu, level="dram") / 10
    assert estimate_latency(0, 8e6, mcu) == pytest.approx(8e6 / mcu.bandwidth_bytes_per_s["sram"])
