"""Hardware profiles: rooflines (peak MAC/s per precision, bytes/s per memory level) and energy tables.

``host`` is measured on this machine and cached as JSON: its peak MAC/s is the fastest of the kernels the
workbook itself runs (ONNX Runtime and torch convs and GEMMs, at 1 and 2 threads), so that no layer the
workbook measures beats it (``check_roofline_bound`` checks that), plus a copy bandwidth.
The other targets are *estimated* from vendor figures; each derivation is written beside it and the
sources are listed in the profile.  Estimated latency = max(MACs / peak, bytes / bandwidth)
(a roofline); estimated energy = MACs x pJ/MAC + bytes x pJ/byte.

Energy per operation (Horowitz, ISSCC 2014, 45 nm), the same table for every profile: a MAC is one
multiply plus one add at that precision (int8: int8 multiply + int32 accumulate add).  Real chips in
newer processes spend less per op; the table is for comparing methods, not chips.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from .._io import atomic_write_json
from ..host import describe_host, host_info  # re-exported: the host's CPU features beside its roofline
from .._validate import check_choice, check_float, check_int
from ..profiles import torch_threads

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
    peak_by_threads: dict[str, dict[int, float]] = field(default_factory=dict)  # measured: {precision: {threads: MAC/s}}
    extra: dict[str, Any] = field(default_factory=dict)

    def peak(self, precision: str, threads: int | None = None) -> float:
        """Peak MAC/s at ``precision`` (at ``threads`` threads where measured per thread count; None: the roofline's).

        ValueError if the hardware has no such precision, or no peak for that many threads."""
        check_choice("precision", precision, self.peak_macs_per_s)
        if threads is None:
            return self.peak_macs_per_s[precision]
        check_int("threads", threads, min_value=1)
        table = self.peak_by_threads.get(precision) or {1: self.peak_macs_per_s[precision]}
        if threads not in table:
            raise ValueError(f"threads={threads} has no measured {self.name} {precision} peak; accepted values: "
                             f"{', '.join(map(str, sorted(table)))}")
        return table[threads]

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


# --- estimated targets ---------------------------------------------------------------------------
# Each target is a data file, data/hardware/<name>.toml: every peak and bandwidth figure with the public
# document it is derived from (its `source`). The energy table above (Horowitz) applies to all of them.
TARGET_FILES = ("mobile_big_core", "mcu_cortex_m7", "int8_npu", "gpu_t4")
TARGET_KEYS = {"name", "description", "kind", "default_level", "peak_macs_per_s", "bandwidth_bytes_per_s"}


def hardware_dir() -> Path:
    """The folder of the hardware data files: $SURVEY_LIB_HARDWARE_DIR or <project>/data/hardware."""
    env = os.environ.get("SURVEY_LIB_HARDWARE_DIR")
    if env:
        return Path(env)
    from ..results import project_root

    for root in (project_root(Path(__file__).parent), project_root()):
        if (root / "data" / "hardware").is_dir():
            return root / "data" / "hardware"
    raise FileNotFoundError("survey_lib's hardware data files are missing: expected data/hardware beside the project's "
                            "pyproject.toml (install the project with pip install -e .), or set SURVEY_LIB_HARDWARE_DIR")


def load_target(path: str | os.PathLike) -> HardwareProfile:
    """An estimated hardware profile from its TOML data file (ValueError naming the file and the bad entry)."""
    import tomllib

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"hardware file {str(path)!r} is not valid TOML: {err}") from err
    unknown = sorted(set(raw) - TARGET_KEYS)
    if unknown:
        raise ValueError(f"hardware file {str(path)!r}: unknown key(s) {unknown}; accepted: {sorted(TARGET_KEYS)}")
    for key in ("name", "description"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ValueError(f"hardware file {str(path)!r}: {key} must be a non-empty string")
    if raw["name"] != path.stem:
        raise ValueError(f"hardware file {str(path)!r}: name {raw['name']!r} must match the file name {path.stem!r}")
    if raw.get("kind", "estimated") != "estimated":
        raise ValueError(f"hardware file {str(path)!r}: kind must be 'estimated' (only the host is measured), got {raw['kind']!r}")
    figures: dict[str, dict[str, float]] = {}
    sources: list[str] = []
    for group in ("peak_macs_per_s", "bandwidth_bytes_per_s"):
        table = raw.get(group)
        if not isinstance(table, dict) or not table:
            raise ValueError(f"hardware file {str(path)!r}: a [{group}.<name>] table with value and source is required")
        figures[group] = {}
        for key, entry in table.items():
            if not isinstance(entry, dict) or set(entry) != {"value", "source"} or not entry["source"]:
                raise ValueError(f"hardware file {str(path)!r}: {group}.{key} needs exactly a value and a source")
            figures[group][key] = check_float(f"{path.name}: {group}.{key}", entry["value"], min_value=1.0)
            sources.append(f"{group}.{key}: {entry['source']}")
    unknown = set(figures["peak_macs_per_s"]) - set(PRECISIONS)
    if unknown:
        raise ValueError(f"hardware file {str(path)!r}: precisions {sorted(unknown)} are unknown; accepted: {list(PRECISIONS)}")
    levels = sorted(set(figures["bandwidth_bytes_per_s"]) - set(ENERGY_PJ_PER_BYTE))
    if levels:
        raise ValueError(f"hardware file {str(path)!r}: memory levels {levels} have no energy figure; accepted: "
                         f"{list(ENERGY_PJ_PER_BYTE)}")
    level = raw.get("default_level", "dram")
    if level not in figures["bandwidth_bytes_per_s"]:
        raise ValueError(f"hardware file {str(path)!r}: default_level {level!r} has no bandwidth entry")
    return HardwareProfile(name=raw["name"], description=raw["description"], kind="estimated",
                           peak_macs_per_s=figures["peak_macs_per_s"], bandwidth_bytes_per_s=figures["bandwidth_bytes_per_s"],
                           default_level=level, sources=sources + [HOROWITZ], extra={"file": str(path)})


@functools.lru_cache(maxsize=None)
def _target(name: str) -> HardwareProfile:
    """The estimated target ``name``, read from its data file the first time it is used."""
    return load_target(hardware_dir() / f"{name}.toml")
HARDWARE_NAMES = ("host",) + TARGET_FILES


# --- host micro-benchmark -------------------------------------------------------------------------
#
# The host roofline must be a *bound*: no layer the workbook measures may run faster than its "peak".
# One library's GEMM is not enough for that: libraries pick different code paths per CPU, and on one
# AMD EPYC ONNX Runtime ran the shapes baseline's convs at twice the best torch.mm rate.  So the peak is
# the fastest of the kernels the workbook itself runs: ONNX Runtime Conv and MatMul, torch conv2d and
# mm, at the shapes of the baselines' 3x3 convs and of notebook 01's 128-channel 32x32 block, at 1 and
# 2 threads.  A busy machine under-measures it, so every kernel is timed over short windows in two
# rounds and its best run kept.


def cache_path() -> Path:
    """Where the host profile is cached: $SURVEY_LIB_CACHE or ~/.cache/survey_lib, file host_profile.json."""
    root = os.environ.get("SURVEY_LIB_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "survey_lib"
    return base / "host_profile.json"


# 3x3 convs (C_in = C_out, padding 1) as (channels, size, batch): the shapes baseline's layers at batch 1
# and 8, and notebook 01's dense block.  GEMMs are square.
CONV_SHAPES = ((32, 32, 1), (64, 16, 1), (128, 8, 1), (128, 32, 1), (64, 16, 8))
FP32_GEMM_SIZES = (512, 1024)
INT8_GEMM_SIZES = (512, 1024, 2048)
KERNEL_WINDOW_S = 0.1  # each kernel is timed for this long per round (at least 2 runs), best run kept
KERNEL_ROUNDS = 2  # rounds over all kernels, so that a burst of load from other processes spoils few


def _onnx_model(nodes: list, inputs: list, outputs: list, weights: dict[str, Any]) -> Any:
    from onnx import helper, numpy_helper

    graph = helper.make_graph(nodes, "kernel", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _conv_onnx(channels: int, size: int, batch: int) -> Any:
    """ONNX graph of one 3x3 conv (+ bias + ReLU, which ORT fuses as in the baselines) with constant weights."""
    import numpy as np
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.1,
               "b": np.zeros(channels, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    shape = [batch, channels, size, size]
    return _onnx_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], weights)


def _matmul_onnx(n: int, precision: str) -> Any:
    """ONNX graph of an n x n x n MatMul (fp32) or MatMulInteger (u8 x s8 -> int32) with a constant weight."""
    import numpy as np
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    if precision == "int8":
        weight, op, in_type, out_type = rng.integers(-127, 128, (n, n), dtype=np.int8), "MatMulInteger", TensorProto.UINT8, TensorProto.INT32
    else:
        weight, op, in_type, out_type = rng.standard_normal((n, n)).astype(np.float32), "MatMul", TensorProto.FLOAT, TensorProto.FLOAT
    return _onnx_model([helper.make_node(op, ["a", "w"], ["y"])], [helper.make_tensor_value_info("a", in_type, [n, n])],
                       [helper.make_tensor_value_info("y", out_type, [n, n])], {"w": weight})


def _ort_runner(model: Any, feed: dict[str, Any], threads: int, folder: Path) -> Callable[[], Any]:
    import onnx

    from .latency import ort_session

    path = folder / f"k{len(list(folder.iterdir()))}.onnx"
    onnx.save(model, str(path))
    sess = ort_session(path, threads)
    return lambda: sess.run(None, feed)


def _kernels(precision: str, threads: int, folder: Path) -> dict[str, tuple[int, Callable[[], Any]]]:
    """{kernel name: (MACs per run, callable running it once)} for ``precision`` at ``threads`` threads."""
    import numpy as np

    rng = np.random.default_rng(1)
    kernels: dict[str, tuple[int, Callable[[], Any]]] = {}
    if precision == "int8":
        for n in INT8_GEMM_SIZES:
            feed = {"a": rng.integers(0, 256, (n, n), dtype=np.uint8)}
            kernels[f"ort MatMulInteger {n}x{n}x{n}"] = (n**3, _ort_runner(_matmul_onnx(n, "int8"), feed, threads, folder))
        return kernels
    for c, size, batch in CONV_SHAPES:
        x = rng.standard_normal((batch, c, size, size)).astype(np.float32)
        w, macs, shape = torch.randn(c, c, 3, 3), batch * c * c * 9 * size * size, f"3x3 {c}->{c} ch {size}x{size} batch {batch}"
        kernels[f"ort Conv {shape}"] = (macs, _ort_runner(_conv_onnx(c, size, batch), {"x": x}, threads, folder))
        kernels[f"torch conv2d {shape}"] = (macs, lambda xt=torch.from_numpy(x), w=w: torch.nn.functional.conv2d(xt, w, padding=1))
    for n in FP32_GEMM_SIZES:
        a, b = rng.standard_normal((n, n)).astype(np.float32), torch.randn(n, n)
        kernels[f"ort MatMul {n}x{n}x{n}"] = (n**3, _ort_runner(_matmul_onnx(n, "fp32"), {"a": a}, threads, folder))
        kernels[f"torch mm {n}x{n}x{n}"] = (n**3, lambda at=torch.from_numpy(a), b=b, out=torch.empty(n, n): torch.mm(at, b, out=out))
    return kernels


def _best_seconds(fn: Callable[[], Any], window_s: float, min_runs: int = 2) -> float:
    """Fastest of the runs of ``fn`` made within ``window_s`` seconds (at least ``min_runs``), after a warm-up."""
    fn()
    best, start, runs = math.inf, time.perf_counter(), 0
    while runs < min_runs or time.perf_counter() - start < window_s:
        t0 = time.perf_counter()
        fn()
        best, runs = min(best, time.perf_counter() - t0), runs + 1
    return best


def measure_kernels(precision: str, threads: int, window_s: float | None = None, rounds: int | None = None) -> dict[str, float]:
    """MAC/s of each micro-benchmark kernel at ``precision`` ('fp32' or 'int8') and ``threads`` threads (best run).

    Each kernel is timed for ``window_s`` seconds in each of ``rounds`` rounds (defaults: KERNEL_WINDOW_S, KERNEL_ROUNDS)."""
    check_choice("precision", precision, ("fp32", "int8"))
    check_int("threads", threads, min_value=1, max_value=256)
    window_s = check_float("window_s", KERNEL_WINDOW_S if window_s is None else window_s, min_value=0)
    rounds = check_int("rounds", KERNEL_ROUNDS if rounds is None else rounds, min_value=1)
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="survey_lib_kernels_") as d, torch.inference_mode():
        kernels = _kernels(precision, threads, Path(d))
        best = {name: math.inf for name in kernels}
        for _ in range(rounds):
            for name, (_, fn) in kernels.items():
                best[name] = min(best[name], _best_seconds(fn, window_s))
    return {name: macs / best[name] for name, (macs, _) in kernels.items()}


def measure_copy_bytes_per_s(mbytes: int = 64, repeats: int = 5, window_s: float = 0.3) -> float:
    """Copy bandwidth of a ``mbytes`` MB tensor, (bytes read + written) / s, best run of ``window_s`` s (>= ``repeats`` runs)."""
    src = torch.ones(mbytes * (1 << 20) // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), window_s, min_runs=repeats)


def peaks_by_threads(kernel_rates: dict[int, dict[str, float]]) -> dict[int, tuple[float, str]]:
    """{threads: (peak MAC/s, kernel name)}: the fastest kernel run at that many threads or fewer."""
    peaks, best = {}, (0.0, "")
    for t in sorted(kernel_rates):
        name = max(kernel_rates[t], key=kernel_rates[t].get)
        best = max(best, (kernel_rates[t][name], f"{name}, {t} thread{'s' if t > 1 else ''}"))
        peaks[t] = best
    return peaks


HOST_SCHEMA = 3  # 2: adds the int8 GEMM peak; 3: fp32 peak = fastest of ORT and torch conv/GEMM kernels, host_info stored


def _thread_counts() -> list[int]:
    return [1, 2]  # 2 threads even on a 1-core machine: oversubscribed, but a bound for 2-thread runs


def _host_key() -> dict[str, Any]:
    info = host_info()
    return {"schema": HOST_SCHEMA, "machine": platform.machine(), "processor": platform.processor(), "node": platform.node(),
            "cpus": os.cpu_count(), "cpu_model": info["cpu_model"], "torch": torch.__version__,
            "onnxruntime": info["onnxruntime"], "torch_cpu_capability": info["torch_cpu_capability"],
            "kernel_caps": info["kernel_caps"]}


def _measure_host() -> dict[str, Any]:
    t0 = time.perf_counter()
    rates = {p: {str(t): measure_kernels(p, t) for t in _thread_counts()} for p in ("fp32", "int8")}
    return {"key": _host_key(), "host": host_info(), "kernel_macs_per_s": rates, "copy_bytes_per_s": measure_copy_bytes_per_s(),
            "seconds": time.perf_counter() - t0, "measured_at": time.time(), "load_average": _load_average()}


def _load_average() -> float | None:
    """1-minute load average while measuring (a busy machine under-measures its peak), None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _host_from(data: dict[str, Any]) -> HardwareProfile:
    rates = {p: {int(t): {k: float(v) for k, v in r.items()} for t, r in by_t.items()} for p, by_t in data["kernel_macs_per_s"].items()}
    peaks = {p: peaks_by_threads(by_t) for p, by_t in rates.items()}
    info = data["host"]
    extra: dict[str, Any] = {f"{p}_macs_per_s_{t}threads": v for p, by_t in peaks.items() for t, (v, _) in by_t.items()}
    extra |= {f"{p}_peak_kernel": by_t[1][1] for p, by_t in peaks.items()}
    extra |= {"peak_kernel": {p: {t: k for t, (_, k) in by_t.items()} for p, by_t in peaks.items()},
              "kernel_macs_per_s": rates, "host_info": info, "measurement_s": data.get("seconds"),
              "load_average": data.get("load_average")}
    return HardwareProfile(
        name="host",
        description=(f"this machine ({info['cpu_model']}): peak = fastest measured kernel at 1 thread, fp32 "
                     f"{extra['fp32_peak_kernel']}, int8 {extra['int8_peak_kernel']}; copy bandwidth (measured)"),
        peak_macs_per_s={p: by_t[1][0] for p, by_t in peaks.items()},
        bandwidth_bytes_per_s={"dram": float(data["copy_bytes_per_s"])},
        kind="measured",
        sources=["micro-benchmark, best run of each kernel: fp32 ONNX Runtime Conv and MatMul, torch conv2d and mm "
                 f"(3x3 convs {', '.join(f'{c}ch {s}x{s} batch {b}' for c, s, b in CONV_SHAPES)}; "
                 f"GEMM {'/'.join(map(str, FP32_GEMM_SIZES))}), int8 ONNX Runtime MatMulInteger (u8 x s8 -> int32, "
                 f"{'/'.join(map(str, INT8_GEMM_SIZES))}); 64 MB tensor copy (read + write)", HOROWITZ + " (energy, estimated)"],
        peak_by_threads={p: {t: v for t, (v, _) in by_t.items()} for p, by_t in peaks.items()},
        extra=extra,
    )


_HOST: HardwareProfile | None = None


def host_profile(cache: bool = True) -> HardwareProfile:
    """Measured host roofline (fastest fp32/int8 kernel at 1 and 2 threads, copy bytes/s), cached as JSON."""
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
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
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
    return host_profile() if name == "host" else copy.deepcopy(_target(name))


# --- estimates ------------------------------------------------------------------------------------

ROOFLINE_MARGIN = 0.2  # a measured rate may exceed its bound by this fraction (timer noise, clock boost) before it fails


class RooflineBoundError(AssertionError):
    """A measured MAC rate beats the roofline's peak: the 'bound' is no bound on this machine."""


def check_roofline_bound(measured_macs_per_s: float, hardware: str | HardwareProfile = "host", precision: str = "fp32", *,
                         threads: int = 1, margin: float = ROOFLINE_MARGIN, label: str = "measured rate") -> float:
    """``measured / peak`` at ``threads`` threads; RooflineBoundError if it exceeds 1 + ``margin``."""
    hw = get_hardware(hardware)
    rate = check_float("measured_macs_per_s", measured_macs_per_s, min_value=0)
    check_float("margin", margin, min_value=0, max_value=1)
    bound = hw.peak(precision, threads)
    ratio = rate / bound
    if not math.isfinite(ratio) or ratio > 1 + margin:
        kernel = hw.extra.get("peak_kernel", {}).get(precision, {}).get(threads, "no kernel recorded")
        load = hw.extra.get("load_average")
        when = f" (measured at a load average of {load:.1f})" if isinstance(load, (int, float)) else ""
        raise RooflineBoundError(
            f"{label}: {rate / 1e9:.3g} GMAC/s beats the {hw.name} {precision} peak at {threads} thread(s), "
            f"{bound / 1e9:.3g} GMAC/s (set by {kernel}){when}, by {ratio - 1:.0%} > the {margin:.0%} noise margin. "
            "Re-measure the peak on an idle machine with host_profile(cache=False); if this persists, the "
            "micro-benchmark misses a faster kernel that this workload uses.")
    return ratio



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
    "check_roofline_bound",
    "RooflineBoundError",
    "ROOFLINE_MARGIN",
    "measure_kernels",
    "cache_path",
    "host_info",
    "describe_host",
]
