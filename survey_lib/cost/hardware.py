"""Hardware profiles: rooflines (peak MAC/s per precision, bytes/s per memory level) and energy tables.

``host`` is measured on this machine (peak fp32 GEMM MAC/s and copy bandwidth, cached as JSON).
The other targets are *estimated* from vendor figures; each derivation is written beside it and the
sources are listed in the profile.  Estimated latency = max(MACs / peak, bytes / bandwidth)
(a roofline); estimated energy = MACs x pJ/MAC + bytes x pJ/byte.

Energy per operation (Horowitz, ISSCC 2014, 45 nm), the same table for every profile: a MAC is one
multiply plus one add at that precision (int8: int8 multiply + int32 accumulate add).  Real chips in
newer processes spend less per op; the table is for comparing methods, not chips.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .._io import atomic_write_json
from ..host import describe_host, host_info  # re-exported: the host's CPU features beside its roofline
from .._validate import check_choice, check_float

PRECISIONS = ("fp32", "fp16", "int8")

# --- energy table (Horowitz ISSCC 2014, 45 nm) ------------------------------------------------
# MAC = mult + add: fp32 3.7 + 0.9 = 4.6 pJ; fp16 1.1 + 0.4 = 1.5 pJ; int8 0.2 + 0.1 (int32 add) = 0.3 pJ.
ENERGY_PJ_PER_MAC = {"fp32": 3.7 + 0.9, "fp16": 1.1 + 0.4, "int8": 0.2 + 0.1}
# 64-bit reads: SRAM 8 KB 10 pJ, 32 KB 20 pJ, 1 MB 100 pJ; DRAM 1.3-2.6 nJ (midpoint 1.95 nJ).
ENERGY_PJ_PER_BYTE = {
    "sram": 20.0 / 8,  # 32 KB SRAM: 2.5 pJ/byte
    "sram_1mb": 100.0 / 8,  # 1 MB SRAM: 12.5 pJ/byte
    "flash": 100.0 / 8,  # no Horowitz figure; assumed like a 1 MB SRAM read (estimate)
    "dram": 1950.0 / 8,  # 243.75 pJ/byte
}
HOROWITZ = "M. Horowitz, 'Computing's energy problem (and what we can do about it)', ISSCC 2014 (45 nm energy table)"


@dataclass
class HardwareProfile:
    """A roofline (peak MAC/s per precision, bytes/s per memory level) plus an energy table."""

    name: str
    description: str
    peak_macs_per_s: dict[str, float]
    bandwidth_bytes_per_s: dict[str, float]
    energy_pj_per_mac: dict[str, float] = field(default_factory=lambda: dict(ENERGY_PJ_PER_MAC))
    energy_pj_per_byte: dict[str, float] = field(default_factory=lambda: dict(ENERGY_PJ_PER_BYTE))
    kind: str = "estimated"  # "measured" for the host roofline, "estimated" for targets
    default_level: str = "dram"  # where a model's tensors live by default (an MCU has no DRAM: "sram")
    sources: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def peak(self, precision: str) -> float:
        """Peak MAC/s at ``precision``; ValueError if the hardware has no such precision."""
        return self.peak_macs_per_s[check_choice("precision", precision, self.peak_macs_per_s)]

    def bandwidth(self, level: str | None = None) -> float:
        """Bytes/s at memory ``level`` (default: ``default_level``); ValueError if there is no such level."""
        level = self.default_level if level is None else level
        return self.bandwidth_bytes_per_s[check_choice("level", level, self.bandwidth_bytes_per_s)]

    def energy_per_byte(self, level: str | None = None) -> float:
        """pJ per byte moved at memory ``level`` (default: ``default_level``)."""
        level = self.default_level if level is None else level
        return self.energy_pj_per_byte[check_choice("level", level, self.energy_pj_per_byte)]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)


# --- estimated targets -------------------------------------------------------------------------

# Arm Cortex-A76 class big core at 2.8 GHz (e.g. Snapdragon 855 prime core 2.84 GHz).
# Two 128-bit ASIMD FMA pipes (Cortex-A76 Software Optimization Guide, FMLA throughput 2/cycle):
#   fp32: 2 pipes x 4 lanes = 8 MAC/cycle -> 22.4 GMAC/s
#   fp16: 2 pipes x 8 lanes = 16 MAC/cycle -> 44.8 GMAC/s (Armv8.2 FP16 arithmetic)
#   int8: SDOT, 16 MACs per 128-bit instruction x 2 pipes = 32 MAC/cycle -> 89.6 GMAC/s
# DRAM: LPDDR4X-4266 on a 64-bit bus = 34.1 GB/s per SoC; one core sustains roughly half: 15 GB/s.
# SRAM (L1): 2 x 128-bit loads/cycle = 32 B/cycle x 2.8 GHz = 89.6 GB/s.
_A76_GHZ = 2.8e9
MOBILE_BIG_CORE = HardwareProfile(
    name="mobile_big_core",
    description="Arm Cortex-A76-class phone core at 2.8 GHz, NEON (2x128-bit FMA), LPDDR4X (estimated)",
    peak_macs_per_s={"fp32": 8 * _A76_GHZ, "fp16": 16 * _A76_GHZ, "int8": 32 * _A76_GHZ},
    bandwidth_bytes_per_s={"dram": 15e9, "sram": 32 * _A76_GHZ},
    sources=[
        "Arm Cortex-A76 Software Optimization Guide (Arm, 2018): ASIMD FMLA/SDOT throughput 2 per cycle",
        "JEDEC JESD209-4 LPDDR4/LPDDR4X: 4266 MT/s x 64-bit bus = 34.1 GB/s",
        HOROWITZ,
    ],
)

# STM32H743 (Cortex-M7 at 480 MHz).
#   fp32: FPv5 single-precision VFMA, at most 1 MAC/cycle -> 0.48 GMAC/s (loads compete in practice)
#   fp16: no fp16 arithmetic on FPv5 (conversion only): same as fp32
#   int8: SMLAD does 2 16-bit MACs/cycle after SXTB16 unpacking; CMSIS-NN reaches ~2 MAC/cycle -> 0.96 GMAC/s
# SRAM: DTCM 64-bit at 480 MHz = 3.84 GB/s.  Flash: 256-bit lines at 240 MHz with wait states, ~1 GB/s
# sustained (estimate).  DRAM: external SDRAM via FMC, 32-bit at 100 MHz = 0.4 GB/s.
_M7_HZ = 480e6
MCU_CORTEX_M7 = HardwareProfile(
    name="mcu_cortex_m7",
    description="STM32H7-class Cortex-M7 MCU at 480 MHz, CMSIS-NN int8, on-chip SRAM + flash (estimated)",
    peak_macs_per_s={"fp32": 1 * _M7_HZ, "fp16": 1 * _M7_HZ, "int8": 2 * _M7_HZ},
    bandwidth_bytes_per_s={"sram": 8 * _M7_HZ, "flash": 1.0e9, "dram": 0.4e9},
    default_level="sram",
    sources=[
        "STMicroelectronics STM32H742xI/743xI datasheet DS12110 (480 MHz Cortex-M7, TCM, AXI SRAM, flash, FMC)",
        "Arm Cortex-M7 Technical Reference Manual (FPv5, DSP SMLAD)",
        "L. Lai, N. Suda, V. Chandra, 'CMSIS-NN: Efficient Neural Network Kernels for Arm Cortex-M CPUs', arXiv:1801.06601, 2018",
        HOROWITZ,
    ],
)

# Arm Ethos-U55 micro-NPU, largest configuration: 256 int8 MACs/cycle at 500 MHz -> 128 GMAC/s
# (= 0.256 TOPS, counting a MAC as 2 ops).  int8 (and int16) only: no fp32/fp16 entry.
# SRAM: 64-bit AXI at 500 MHz = 4 GB/s.  Off-chip flash/DRAM via the second AXI port: ~1 GB/s (estimate).
ETHOS_U55 = HardwareProfile(
    name="int8_npu",
    description="Arm Ethos-U55-class micro-NPU, 256 int8 MACs/cycle at 500 MHz, int8 only (estimated)",
    peak_macs_per_s={"int8": 256 * 500e6},
    bandwidth_bytes_per_s={"sram": 8 * 500e6, "dram": 1.0e9},
    default_level="sram",
    sources=[
        "Arm Ethos-U55 product page and Technical Reference Manual: 32-256 MACs/cycle, int8/int16, 0.5 TOPS class",
        HOROWITZ,
    ],
)

_TARGETS = {p.name: p for p in (MOBILE_BIG_CORE, MCU_CORTEX_M7, ETHOS_U55)}
HARDWARE_NAMES = ("host",) + tuple(_TARGETS)


# --- host micro-benchmark -------------------------------------------------------------------------


def cache_path() -> Path:
    """Where the host profile is cached: $SURVEY_LIB_CACHE or ~/.cache/survey_lib, file host_profile.json."""
    root = os.environ.get("SURVEY_LIB_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "survey_lib"
    return base / "host_profile.json"


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


GEMM_SIZES = (512, 1024, 2048)


def measure_gemm_macs_per_s(threads: int, sizes: tuple[int, ...] = GEMM_SIZES, repeats: int = 3) -> float:
    """Best fp32 torch.mm MAC/s over square sizes (best of ``repeats`` each) at ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rates = []
        for n in sizes:
            a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
            rates.append(n**3 / _best_seconds(lambda: torch.mm(a, b, out=out), repeats))
        return max(rates)
    finally:
        torch.set_num_threads(before)


def _int8_matmul_session(n: int, threads: int) -> Any:
    """ORT session of a u8 x s8 -> int32 MatMulInteger with a constant (prepacked) n x n weight."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .latency import ort_session

    weight = np.random.default_rng(0).integers(-127, 128, size=(n, n), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "int8_gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with tempfile.TemporaryDirectory(prefix="survey_lib_int8_") as d:
        path = Path(d) / "int8_gemm.onnx"
        onnx.save(model, str(path))
        return ort_session(path, threads)


def measure_int8_gemm_macs_per_s(threads: int, sizes: tuple[int, ...] = GEMM_SIZES, repeats: int = 3) -> float:
    """Best u8 x s8 GEMM MAC/s of ONNX Runtime (MatMulInteger, int32 accumulation) at ``threads`` threads."""
    import numpy as np

    rates = []
    for n in sizes:
        sess = _int8_matmul_session(n, threads)
        feed = {"a": np.random.default_rng(1).integers(0, 256, size=(n, n), dtype=np.uint8)}
        rates.append(n**3 / _best_seconds(lambda: sess.run(None, feed), repeats))
    return max(rates)


def measure_copy_bytes_per_s(mbytes: int = 64, repeats: int = 5) -> float:
    """Best-of-``repeats`` copy bandwidth of a ``mbytes`` MB tensor: (bytes read + written) / s."""
    src = torch.ones(mbytes * (1 << 20) // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), repeats)


HOST_SCHEMA = 2  # 2: adds the int8 GEMM peak


def _host_key() -> dict[str, Any]:
    return {"schema": HOST_SCHEMA, "machine": platform.machine(), "processor": platform.processor(), "node": platform.node(),
            "cpus": os.cpu_count(), "torch": torch.__version__}


def _measure_host() -> dict[str, Any]:
    t0 = time.perf_counter()
    nmax = max(1, min(2, os.cpu_count() or 1))
    gemm = {t: measure_gemm_macs_per_s(t) for t in sorted({1, nmax})}
    int8 = {t: measure_int8_gemm_macs_per_s(t) for t in sorted({1, nmax})}
    copy = measure_copy_bytes_per_s()
    return {"key": _host_key(), "gemm_fp32_macs_per_s": {str(k): v for k, v in gemm.items()},
            "gemm_int8_macs_per_s": {str(k): v for k, v in int8.items()}, "copy_bytes_per_s": copy, "seconds": time.perf_counter() - t0, "measured_at": time.time()}


def _host_from(data: dict[str, Any]) -> HardwareProfile:
    gemm = {int(k): float(v) for k, v in data["gemm_fp32_macs_per_s"].items()}
    int8 = {int(k): float(v) for k, v in data["gemm_int8_macs_per_s"].items()}
    return HardwareProfile(
        name="host",
        description=(f"this machine ({platform.processor() or platform.machine()}), fp32 torch.mm and int8 ONNX Runtime "
                     "MatMulInteger GEMM at 1 thread, copy bandwidth (measured)"),
        peak_macs_per_s={"fp32": gemm[1], "int8": int8[1]},
        bandwidth_bytes_per_s={"dram": float(data["copy_bytes_per_s"])},
        kind="measured",
        sources=["micro-benchmark: best torch.mm fp32 and ONNX Runtime MatMulInteger (u8 x s8 -> int32) over "
                 "512/1024/2048 square sizes; 64 MB tensor copy (read + write)", HOROWITZ + " (energy, estimated)"],
        extra={f"fp32_macs_per_s_{t}threads": v for t, v in gemm.items()}
        | {f"int8_macs_per_s_{t}threads": v for t, v in int8.items()} | {"measurement_s": data.get("seconds")},
    )


_HOST: HardwareProfile | None = None


def host_profile(cache: bool = True) -> HardwareProfile:
    """Measured host roofline (fp32 and int8 GEMM MAC/s at 1 and 2 threads, copy bytes/s), cached as JSON."""
    global _HOST
    path = cache_path()
    if cache:
        if _HOST is not None and _HOST.extra.get("cache") == str(path):
            return _HOST
        try:
            data = json.loads(path.read_text())
            if data.get("key") == _host_key():
                _HOST = _host_from(data)
                _HOST.extra["cache"] = str(path)
                return _HOST
        except (OSError, ValueError, KeyError, TypeError):
            pass
    data = _measure_host()
    prof = _host_from(data)
    if cache:
        atomic_write_json(path, data)
        prof.extra["cache"] = str(path)
        _HOST = prof
    return prof


def get_hardware(name: str | HardwareProfile) -> HardwareProfile:
    """The hardware profile called ``name`` (one of HARDWARE_NAMES); a profile passes through."""
    if isinstance(name, HardwareProfile):
        return name
    check_choice("hardware", name, HARDWARE_NAMES)
    return host_profile() if name == "host" else copy.deepcopy(_TARGETS[name])


# --- estimates ------------------------------------------------------------------------------------


def estimate_latency(macs: float, bytes: float, hardware: str | HardwareProfile, precision: str = "fp32", level: str | None = None) -> float:
    """Roofline seconds: max(MACs / peak MAC/s at precision, bytes / bandwidth at level) (estimated).

    ``level=None`` uses the hardware's ``default_level`` (DRAM for CPUs, SRAM for the MCU and the NPU)."""
    hw = get_hardware(hardware)
    check_float("macs", macs, min_value=0)
    check_float("bytes", bytes, min_value=0)
    return max(macs / hw.peak(precision), bytes / hw.bandwidth(level))


def estimate_energy(macs: float, bytes: float, hardware: str | HardwareProfile, precision: str = "fp32", level: str | None = None) -> float:
    """Joules: MACs x pJ per MAC at precision + bytes x pJ per byte at level (default: the hardware's)."""
    hw = get_hardware(hardware)
    check_float("macs", macs, min_value=0)
    check_float("bytes", bytes, min_value=0)
    pj_mac = hw.energy_pj_per_mac[check_choice("precision", precision, hw.energy_pj_per_mac)]
    return (macs * pj_mac + bytes * hw.energy_per_byte(level)) * 1e-12


def roofline_points(report: Any, hardware: str | HardwareProfile, precision: str = "fp32", level: str | None = None) -> pd.DataFrame:
    """Per layer: MACs, bytes, arithmetic intensity (MACs/byte), attainable MAC/s and estimated seconds."""
    hw = get_hardware(hardware)
    layers = report.layers if hasattr(report, "layers") else report
    if not isinstance(layers, pd.DataFrame) or not {"name", "macs", "traffic_bytes"} <= set(layers.columns):
        raise TypeError("report must be a CostReport or a DataFrame with columns name, macs, traffic_bytes")
    peak, bw = hw.peak(precision), hw.bandwidth(level)
    df = layers[["name", "macs", "traffic_bytes"]].copy()
    df["intensity_macs_per_byte"] = df["macs"] / df["traffic_bytes"].where(df["traffic_bytes"] > 0)
    df["attainable_macs_per_s"] = (df["intensity_macs_per_byte"] * bw).clip(upper=peak)
    df["est_latency_s"] = [max(m / peak, b / bw) for m, b in zip(df["macs"], df["traffic_bytes"])]
    df["bound"] = ["compute" if m / peak >= b / bw else "memory" for m, b in zip(df["macs"], df["traffic_bytes"])]
    df.attrs.update(hardware=hw.name, precision=precision, level=level or hw.default_level, peak_macs_per_s=peak, bandwidth_bytes_per_s=bw, kind="estimated")
    return df


__all__ = [
    "HardwareProfile",
    "HARDWARE_NAMES",
    "PRECISIONS",
    "ENERGY_PJ_PER_MAC",
    "ENERGY_PJ_PER_BYTE",
    "get_hardware",
    "host_profile",
    "estimate_latency",
    "estimate_energy",
    "roofline_points",
    "cache_path",
    "host_info",
    "describe_host",
]
