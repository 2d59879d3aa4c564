"""Hardware profiles: roofline max(), energy sums, registry errors, host micro-benchmark, its cache and its bound."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from survey_lib.cost import HARDWARE_NAMES, HardwareProfile, estimate_energy, estimate_latency, get_hardware, host_profile
from survey_lib.cost import hardware as hwmod
from survey_lib.cost.hardware import ENERGY_PJ_PER_MAC, RooflineBoundError, check_roofline_bound, host_info, roofline_points

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


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One real host measurement (default timing windows) in a temporary cache: (profile, cached JSON)."""
    path = tmp_path_factory.mktemp("host_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SURVEY_LIB_CACHE", str(path))
        mp.setattr(hwmod, "_HOST", None)
        hw = host_profile()
    return hw, json.loads((path / "host_profile.json").read_text())


@pytest.fixture
def fake_measure(measured, tmp_path, monkeypatch):
    """Cache in tmp_path; a 'measurement' returns the module's real data under the current key, and is counted."""
    monkeypatch.setenv("SURVEY_LIB_CACHE", str(tmp_path))
    monkeypatch.setattr(hwmod, "_HOST", None)
    calls = []
    monkeypatch.setattr(hwmod, "_measure_host", lambda: calls.append(1) or {**measured[1], "key": hwmod._host_key()})
    return tmp_path, calls


def test_host_measured_cached_atomically_and_reused(fake_measure, monkeypatch):
    tmp_path, calls = fake_measure
    hw = host_profile()
    assert calls == [1] and hw.kind == "measured" and hw.name == "host"
    path = tmp_path / "host_profile.json"
    assert json.loads(path.read_text())["copy_bytes_per_s"] == hw.bandwidth_bytes_per_s["dram"]
    assert [p.name for p in tmp_path.iterdir()] == ["host_profile.json"]  # no temp leftovers
    monkeypatch.setattr(hwmod, "_HOST", None)  # forget the in-process copy: must read the file
    again = get_hardware("host")
    assert calls == [1] and again.peak_macs_per_s == hw.peak_macs_per_s and again.peak_by_threads == hw.peak_by_threads
    host_profile(cache=False)
    assert calls == [1, 1]


def test_cache_key_follows_kernel_caps(fake_measure, monkeypatch):
    """A cap on the kernels libraries may pick (e.g. ONEDNN_MAX_CPU_ISA) changes the peak: measure again."""
    _, calls = fake_measure
    host_profile()
    monkeypatch.setattr(hwmod, "_HOST", None)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    host_profile()
    assert calls == [1, 1]


def test_corrupt_cache_is_measured_again(fake_measure):
    tmp_path, calls = fake_measure
    (tmp_path / "host_profile.json").write_text('{"key": {"schema": 3}, "kernel')
    assert host_profile().peak("fp32") > 0 and calls == [1]
    assert json.loads((tmp_path / "host_profile.json").read_text())["key"]["schema"] == hwmod.HOST_SCHEMA


def test_host_figures_are_real_numbers(measured):
    hw, data = measured
    figures = [hw.peak_macs_per_s["fp32"], hw.peak_macs_per_s["int8"], hw.bandwidth_bytes_per_s["dram"],
               *[v for k, v in hw.extra.items() if k.endswith("threads")]]
    assert all(math.isfinite(v) and v > 0 for v in figures)
    assert {"fp32_macs_per_s_1threads", "fp32_macs_per_s_2threads", "int8_macs_per_s_1threads"} <= set(hw.extra)
    assert 0 < data["seconds"] < 60


def test_host_profile_stores_host_info_and_peak_kernel(measured):
    hw, data = measured
    info = host_info()
    assert data["host"]["cpu_model"] == hw.extra["host_info"]["cpu_model"] == info["cpu_model"]
    assert data["host"]["features"] == info["features"]
    for precision in ("fp32", "int8"):
        rates = hw.extra["kernel_macs_per_s"][precision][1]
        kernel = hw.extra[f"{precision}_peak_kernel"]
        assert kernel.split(",")[0] in rates and kernel in hw.description
        assert hw.peak(precision) == pytest.approx(max(rates.values()))
    kernels = hw.extra["kernel_macs_per_s"]["fp32"][1]
    for prefix in ("ort Conv", "ort MatMul", "torch conv2d", "torch mm"):
        assert any(k.startswith(prefix) for k in kernels), prefix


def test_peak_bounds_every_kernel_of_the_same_run(measured):
    """The roofline's property: at t threads its peak is >= every kernel measured at t threads or fewer."""
    hw, _ = measured
    table = hw.extra["kernel_macs_per_s"]
    for precision, by_threads in table.items():
        assert set(by_threads) == {1, 2}
        for t in by_threads:
            at_most_t = {k: r for u, rates in by_threads.items() if u <= t for k, r in rates.items()}
            assert hw.peak(precision, t) >= max(at_most_t.values())
            assert hw.extra["peak_kernel"][precision][t].split(",")[0] in at_most_t
        assert hw.peak(precision, 2) >= hw.peak(precision, 1) == hw.peak(precision)
        for rates in by_threads.values():
            assert all(check_roofline_bound(r, hw, precision, threads=2, margin=0) <= 1 for r in rates.values())


def test_peaks_by_threads_by_hand():
    peaks = hwmod.peaks_by_threads({1: {"a": 3.0, "b": 5.0}, 2: {"a": 4.0, "b": 1.0}})
    assert peaks == {1: (5.0, "b, 1 thread"), 2: (5.0, "b, 1 thread")}
    assert hwmod.peaks_by_threads({1: {"a": 3.0}, 2: {"a": 7.0}})[2] == (7.0, "a, 2 threads")


def test_an_ort_conv_layer_does_not_beat_the_bound(measured):
    """A 3x3 conv like the baselines', exported and run by ONNX Runtime as the notebooks do, stays under the
    1-thread peak.  (Only 1 thread: a 2-thread peak measured while other processes hold a core is too low.)"""
    from survey_lib.cost import compare_latency

    hw, _ = measured
    conv = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1, bias=False), torch.nn.ReLU()).eval()
    x = torch.randn(1, 64, 16, 16)
    lat = compare_latency({"conv": conv}, x, runtime="ort", threads=1, runs=30)["conv"]
    ratio = check_roofline_bound(64 * 64 * 9 * 16 * 16 / (lat.median_ms * 1e-3), hw, threads=1)
    assert 0 < ratio <= 1 + hwmod.ROOFLINE_MARGIN


def test_check_roofline_bound():
    assert check_roofline_bound(0.5e9, TOY) == pytest.approx(0.5)
    assert check_roofline_bound(1.1e9, TOY, margin=0.2) == pytest.approx(1.1)  # within the noise margin
    with pytest.raises(RooflineBoundError, match="1.5 GMAC/s beats the toy fp32 peak"):
        check_roofline_bound(1.5e9, TOY)
    with pytest.raises(AssertionError):  # usable as an assert
        check_roofline_bound(1.01e9, TOY, margin=0)
    assert check_roofline_bound(4e9, TOY, "int8") == pytest.approx(1.0)


def test_check_roofline_bound_rejects_bad_input():
    with pytest.raises(ValueError, match="measured_macs_per_s"):
        check_roofline_bound(-1.0, TOY)
    with pytest.raises(ValueError, match="measured_macs_per_s"):
        check_roofline_bound(float("nan"), TOY)
    with pytest.raises(TypeError, match="measured_macs_per_s"):
        check_roofline_bound("fast", TOY)
    with pytest.raises(ValueError, match="margin"):
        check_roofline_bound(1.0, TOY, margin=-0.1)
    with pytest.raises(ValueError, match="precision"):
        check_roofline_bound(1.0, "int8_npu", "fp32")
    with pytest.raises(ValueError, match="threads=2 .* accepted values: 1"):
        check_roofline_bound(1.0, TOY, threads=2)
    with pytest.raises(ValueError, match="hardware"):
        check_roofline_bound(1.0, "gpu")


def test_peak_per_thread_count():
    two = HardwareProfile(name="two", description="", peak_macs_per_s={"fp32": 1e9}, bandwidth_bytes_per_s={"dram": 1e9},
                          peak_by_threads={"fp32": {1: 1e9, 2: 1.8e9}})
    assert two.peak("fp32") == two.peak("fp32", 1) == 1e9 and two.peak("fp32", 2) == 1.8e9
    with pytest.raises(ValueError, match="threads=4 .* accepted values: 1, 2"):
        two.peak("fp32", 4)
    with pytest.raises(TypeError, match="threads"):
        two.peak("fp32", 1.5)


def test_measure_kernels_rejects_bad_input():
    with pytest.raises(ValueError, match="precision"):
        hwmod.measure_kernels("fp16", 1)
    with pytest.raises(ValueError, match="threads"):
        hwmod.measure_kernels("fp32", 0)
    with pytest.raises(ValueError, match="rounds"):
        hwmod.measure_kernels("fp32", 1, rounds=0)


def test_default_memory_level_per_target():
    from survey_lib.cost import estimate_energy, estimate_latency, get_hardware

    mcu, phone = get_hardware("mcu_cortex_m7"), get_hardware("mobile_big_core")
    assert mcu.default_level == "sram" and phone.default_level == "dram"
    # Same work, same energy table: on-chip SRAM (the MCU's default) costs far less than DRAM.
    assert estimate_energy(1e6, 1e6, mcu) < estimate_energy(1e6, 1e6, mcu, level="dram") / 10
    assert estimate_latency(0, 8e6, mcu) == pytest.approx(8e6 / mcu.bandwidth_bytes_per_s["sram"])


def test_estimated_targets_come_from_data_files_with_a_source_for_every_figure():
    from survey_lib.cost import hardware as H

    for name in H.TARGET_FILES:
        path = H.hardware_dir() / f"{name}.toml"
        hw = H.load_target(path)
        assert hw.name == name and hw.extra["file"] == str(path)
        figures = [(g, k) for g, table in (("peak_macs_per_s", hw.peak_macs_per_s), ("bandwidth_bytes_per_s", hw.bandwidth_bytes_per_s))
                   for k in table]
        assert len(hw.sources) == len(figures) + 1   # one source per figure, plus the energy table's
        assert all(any(src.startswith(f"{g}.{k}: ") for src in hw.sources) for g, k in figures)
    expected = {  # the figures as the code derived them before they moved to the data files
        "mobile_big_core": ({"fp32": 8 * 2.8e9, "fp16": 16 * 2.8e9, "int8": 32 * 2.8e9}, {"dram": 15e9, "sram": 32 * 2.8e9}),
        "mcu_cortex_m7": ({"fp32": 1 * 480e6, "fp16": 1 * 480e6, "int8": 2 * 480e6}, {"sram": 8 * 480e6, "flash": 1.0e9, "dram": 0.4e9}),
        "int8_npu": ({"int8": 256 * 500e6}, {"sram": 8 * 500e6, "dram": 1.0e9}),
    }
    for name, (peaks, bandwidths) in expected.items():
        hw = H.get_hardware(name)
        assert hw.peak_macs_per_s == peaks and hw.bandwidth_bytes_per_s == bandwidths, name


@pytest.mark.parametrize("text, message", [
    ('name = "x"\ndescription = "d"\n[peak_macs_per_s.fp32]\nvalue = 1e9\n[bandwidth_bytes_per_s.dram]\nvalue = 1e9\nsource = "s"\n',
     "peak_macs_per_s.fp32 needs exactly a value and a source"),
    ('name = "x"\ndescription = "d"\n[peak_macs_per_s.fp8]\nvalue = 1e9\nsource = "s"\n[bandwidth_bytes_per_s.dram]\nvalue = 1e9\nsource = "s"\n',
     "precisions \\['fp8'\\] are unknown"),
    ('name = "x"\ndescription = "d"\ndefault_level = "sram"\n[peak_macs_per_s.fp32]\nvalue = 1e9\nsource = "s"\n'
     '[bandwidth_bytes_per_s.dram]\nvalue = 1e9\nsource = "s"\n', "default_level 'sram' has no bandwidth entry"),
    ('name = "x"\n[peak', "not valid TOML"),
    ('name = "x"\ndescription = "d"\ndefault_levle = "sram"\n', r"unknown key\(s\) \['default_levle'\]"),
    ('name = "y"\ndescription = "d"\n', "name 'y' must match the file name 'x'"),
    ('name = "x"\ndescription = "d"\nkind = "measured"\n', "kind must be 'estimated'"),
    ('description = "d"\n', "name must be a non-empty string"),
    ('name = "x"\ndescription = "d"\n[peak_macs_per_s.fp32]\nvalue = 0\nsource = "s"\n[bandwidth_bytes_per_s.dram]\nvalue = 1e9\nsource = "s"\n',
     "out of range"),
    ('name = "x"\ndescription = "d"\ndefault_level = "l2"\n[peak_macs_per_s.fp32]\nvalue = 1e9\nsource = "s"\n'
     '[bandwidth_bytes_per_s.l2]\nvalue = 1e9\nsource = "s"\n', r"memory levels \['l2'\] have no energy figure"),
])
def test_a_bad_hardware_file_is_rejected_naming_the_entry(tmp_path, text, message):
    from survey_lib.cost import hardware as H

    path = tmp_path / "x.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        H.load_target(path)
