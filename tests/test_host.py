"""Host detection: host_info's fields, features of the right architecture family, describe_host, int8 labels."""

from __future__ import annotations

import json
import platform

import pytest
import torch

from survey_lib import host, results
from survey_lib.host import ARM_FEATURES, X86_FEATURES, describe_host, host_info, int8_instructions, is_arm

INT8_LABELS = ("AMX", "AVX-512 VNNI", "AVX-VNNI", "Arm i8mm", "Arm dot-product", "none")


def test_host_info_keys_and_types():
    info = host_info()
    for key in ("cpu_model", "machine", "system", "torch_cpu_capability", "python", "torch", "numpy", "onnxruntime",
                "int8_instructions"):
        assert isinstance(info[key], str) and info[key], key
    for key in ("logical_cpus", "usable_cpus", "torch_threads"):
        assert isinstance(info[key], int) and info[key] >= 1, key
    assert info["usable_cpus"] <= info["logical_cpus"]
    assert isinstance(info["features"], dict) and all(isinstance(v, bool) for v in info["features"].values())
    assert isinstance(info["kernel_caps"], dict)
    assert info["torch"] == torch.__version__ and info["machine"] == platform.machine()
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    json.dumps(info)  # stored in every results file: must be JSON-ready


def test_features_belong_to_this_architecture_family():
    features = host_info()["features"]
    expected = ARM_FEATURES if is_arm() else X86_FEATURES
    assert tuple(features) == expected
    assert not set(features) & set(ARM_FEATURES if not is_arm() else X86_FEATURES)


def test_torch_capability_agrees_with_the_features():
    """torch picks AVX-512 kernels only where the CPU has AVX-512, AVX2 ones only where it has AVX2."""
    info = host_info()
    capability = info["torch_cpu_capability"].upper()
    if capability.startswith("AVX512"):
        assert info["features"]["avx512"]
    if capability.startswith("AVX2"):
        assert info["features"]["avx2"]


def test_is_arm_by_machine_name():
    assert is_arm("aarch64") and is_arm("arm64") and is_arm("armv7l")
    assert not is_arm("x86_64") and not is_arm("AMD64")


def test_host_info_is_a_fresh_copy_and_follows_the_environment(monkeypatch):
    info = host_info()
    info["features"]["made_up"] = True
    assert "made_up" not in host_info()["features"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert host_info()["kernel_caps"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in describe_host()


def test_describe_host_names_the_cpu_and_versions():
    info = host_info()
    text = describe_host()
    assert info["cpu_model"] in text and info["int8_instructions"] in text
    assert f"torch {info['torch']}" in text and f"onnxruntime {info['onnxruntime']}" in text
    assert text == describe_host(info)


def test_describe_host_of_a_given_info_dict():
    fake = {**host_info(), "cpu_model": "Imaginary CPU 9000", "features": {"neon": True, "i8mm": False},
            "int8_instructions": "Arm dot-product", "kernel_caps": {}}
    text = describe_host(fake)
    assert "Imaginary CPU 9000" in text and "NEON yes" in text and "i8mm no" in text and "Arm dot-product" in text
    assert "kernel caps" not in text


def test_int8_instructions_of_this_host_is_a_known_label():
    assert int8_instructions() in INT8_LABELS
    assert host_info()["int8_instructions"] == int8_instructions(host_info())


@pytest.mark.parametrize("features, label", [
    ({"avx2": True, "avx512": True, "avx512_vnni": True, "amx_int8": True}, "AMX"),
    ({"avx2": True, "avx512": True, "avx512_vnni": True, "amx_int8": False}, "AVX-512 VNNI"),
    ({"avx2": True, "avx_vnni": True}, "AVX-VNNI"),
    ({"avx2": True, "avx512": True}, "none"),
    ({"neon": True, "dotprod": True, "i8mm": True}, "Arm i8mm"),
    ({"neon": True, "dotprod": True, "i8mm": False}, "Arm dot-product"),
    ({"neon": True}, "none"),
    ({}, "none"),
])
def test_int8_instructions_each_branch(features, label):
    assert int8_instructions({"features": features}) == label


def test_use_notebook_stores_the_host(tmp_path, monkeypatch):
    monkeypatch.setenv("SURVEY_LIB_RESULTS_DIR", str(tmp_path))
    path = results.use_notebook("99_host_test")
    results.record("x", 1, kind="counted", unit="")
    data = json.loads(path.read_text())
    info = host_info()
    assert data["host"]["cpu_model"] == info["cpu_model"] and data["host"]["features"] == info["features"]
    assert data["host"]["torch"] == info["torch"] and data["results"]["x"]["value"] == 1


def test_cpu_features_without_cpuinfo_flags(monkeypatch):
    """Where /proc/cpuinfo gives no flags (a container, another OS), x86 falls back to torch's own checks."""
    monkeypatch.setattr(host, "_linux_cpuinfo", lambda: ("", set()))
    monkeypatch.setattr(host.sys, "platform", "linux")
    model, features = host.cpu_features("x86_64")
    assert tuple(features) == X86_FEATURES and model
    assert all(features[k] == v for k, v in host._torch_features().items())
    model, features = host.cpu_features("aarch64")
    assert tuple(features) == ARM_FEATURES and not any(features.values())
