"""What machine is this?  CPU model, cores, ISA features and the kernels torch and ONNX Runtime select.

Timings and int8 gains depend on the CPU (AVX2, AVX-512, VNNI and AMX on x86; NEON, dot-product, i8mm and
SVE on Arm), so the workbook detects them and prints them instead of assuming them.  ``host_info()`` is
stored with every results file and printed in every notebook's Setup; prose that depends on the hardware
is generated from it (``int8_instructions``, ``describe_host``).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from typing import Any

# Linux /proc/cpuinfo flag -> our feature name.  x86 flags first, then Arm ("Features" line).
_X86_FLAGS = {
    "avx2": "avx2", "avx512f": "avx512", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16", "amx_tile": "amx_tile", "amx_int8": "amx_int8", "amx_bf16": "amx_bf16",
}
_ARM_FLAGS = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2", "sme": "sme"}
# macOS sysctl key -> our feature name.
_MAC_KEYS = {
    "hw.optional.avx2_0": "avx2", "hw.optional.avx512f": "avx512", "hw.optional.avx512vnni": "avx512_vnni",
    "hw.optional.neon": "neon", "hw.optional.arm.FEAT_DotProd": "dotprod", "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_SME": "sme",
}
X86_FEATURES = ("avx2", "avx512", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
ARM_FEATURES = ("neon", "dotprod", "i8mm", "sve", "sve2", "sme")
# Environment variables that cap the kernels a library may pick; stored so a result says under which cap it ran.
KERNEL_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
               "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def is_arm(machine: str | None = None) -> bool:
    """True on a 64- or 32-bit Arm CPU."""
    m = (machine or platform.machine()).lower()
    return m.startswith(("arm", "aarch64"))


def _linux_cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def _sysctl(key: str) -> str:
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _torch_features() -> dict[str, bool]:
    """Features as torch's own CPU checks see them (x86 only; absent on other builds)."""
    import torch

    checks = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported", "avx512_vnni": "_is_vnni_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
    found = {}
    for name, attr in checks.items():
        fn = getattr(torch.cpu, attr, None)
        if callable(fn):
            try:
                found[name] = bool(fn())
            except (RuntimeError, AttributeError):
                pass
    return found


def cpu_features(machine: str | None = None) -> tuple[str, dict[str, bool]]:
    """(CPU model name, {feature: present}) for this machine's architecture family (x86 or Arm)."""
    machine = machine or platform.machine()
    names = ARM_FEATURES if is_arm(machine) else X86_FEATURES
    table = _ARM_FLAGS if is_arm(machine) else _X86_FLAGS
    model, flags = _linux_cpuinfo() if sys.platform.startswith("linux") else ("", set())
    features = {name: False for name in names}
    if flags:
        for flag, name in table.items():
            features[name] = features[name] or flag in flags
    elif sys.platform == "darwin":
        model = _sysctl("machdep.cpu.brand_string")
        for key, name in _MAC_KEYS.items():
            if name in features:
                features[name] = _sysctl(key) == "1"
        if is_arm(machine):
            features["neon"] = True  # every Apple Silicon core has Advanced SIMD
    elif not is_arm(machine):
        features.update({k: v for k, v in _torch_features().items() if k in features})
    return model or platform.processor() or machine, features


def int8_instructions(info: dict[str, Any] | None = None) -> str:
    """The fastest int8 dot-product instruction class this CPU has: 'AMX', 'AVX-512 VNNI', 'AVX-VNNI',
    'Arm i8mm', 'Arm dot-product', or 'none' (int8 then runs on plain SIMD multiply-adds)."""
    f = (info or host_info())["features"]
    for key, label in (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                       ("i8mm", "Arm i8mm"), ("dotprod", "Arm dot-product")):
        if f.get(key):
            return label
    return "none"


def _versions() -> dict[str, str]:
    import numpy
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover - a project dependency, but info should still work without it
        versions["onnxruntime"] = "not installed"
    return versions


@functools.lru_cache(maxsize=1)
def _host_info_cached() -> dict[str, Any]:
    import torch

    model, features = cpu_features()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        usable = os.cpu_count() or 1
    info = {
        "cpu_model": model,
        "machine": platform.machine(),
        "system": platform.system(),
        "logical_cpus": os.cpu_count() or 1,
        "usable_cpus": usable,
        "features": features,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **_versions(),
    }
    info["int8_instructions"] = int8_instructions(info)
    return info


def host_info() -> dict[str, Any]:
    """This machine: CPU model, cores, ISA features, torch's kernel level, library versions (JSON-ready)."""
    import torch

    info = dict(_host_info_cached())
    info["features"] = dict(info["features"])
    info["torch_threads"] = torch.get_num_threads()
    info["kernel_caps"] = {k: os.environ[k] for k in KERNEL_CAPS if k in os.environ}
    return info


def _yes_no(features: dict[str, bool]) -> str:
    labels = {"avx2": "AVX2", "avx512": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
              "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX tiles", "amx_int8": "AMX int8", "amx_bf16": "AMX bf16",
              "neon": "NEON", "dotprod": "dot-product", "i8mm": "i8mm", "sve": "SVE", "sve2": "SVE2", "sme": "SME"}
    return ", ".join(f"{labels.get(k, k)} {'yes' if v else 'no'}" for k, v in features.items())


def describe_host(info: dict[str, Any] | None = None) -> str:
    """A few lines of plain text naming this CPU, its features and the library versions."""
    info = info or host_info()
    caps = ", ".join(f"{k}={v}" for k, v in info["kernel_caps"].items())
    lines = [
        f"CPU: {info['cpu_model']} ({info['machine']}, {info['system']}), {info['logical_cpus']} logical cores, "
        f"{info['usable_cpus']} usable",
        f"features: {_yes_no(info['features'])}",
        f"fastest int8 dot product: {info['int8_instructions']}; torch CPU kernels: {info['torch_cpu_capability']}",
        f"python {info['python']}, torch {info['torch']}, onnxruntime {info['onnxruntime']}, numpy {info['numpy']}",
    ]
    if caps:
        lines.append(f"kernel caps from the environment: {caps}")
    return "\n".join(lines)


__all__ = ["host_info", "describe_host", "int8_instructions", "cpu_features", "is_arm", "X86_FEATURES", "ARM_FEATURES"]
