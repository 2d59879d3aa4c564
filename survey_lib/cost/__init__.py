"""Cost of a model, every figure labelled counted | measured | estimated.

``profile(model, x)`` gives a per-layer table plus totals: params, MACs (batch 1; FLOPs = 2 x MACs),
BitOps, peak activation memory, memory traffic, stored bytes, estimated latency and energy per
hardware, and (optionally) measured eager / ONNX Runtime latency.
"""

from .counting import count, trace
from .hardware import (
    HARDWARE_NAMES,
    ROOFLINE_MARGIN,
    HardwareProfile,
    RooflineBoundError,
    check_roofline_bound,
    describe_host,
    estimate_energy,
    estimate_latency,
    get_hardware,
    host_info,
    host_profile,
    roofline_points,
)
from .latency import LatencyResult, compare_latency, export_onnx, latency_grid, measure_latency, ort_session
from .memory import memory_traffic, peak_activation_memory
from .report import CostReport, Metric, profile
from .storage import StoredSize, load_dense, register_format, stored_bytes

__all__ = [
    "profile",
    "CostReport",
    "Metric",
    "count",
    "trace",
    "peak_activation_memory",
    "memory_traffic",
    "stored_bytes",
    "StoredSize",
    "register_format",
    "load_dense",
    "measure_latency",
    "compare_latency",
    "latency_grid",
    "LatencyResult",
    "export_onnx",
    "ort_session",
    "HardwareProfile",
    "get_hardware",
    "host_profile",
    "host_info",
    "describe_host",
    "estimate_latency",
    "estimate_energy",
    "roofline_points",
    "check_roofline_bound",
    "RooflineBoundError",
    "ROOFLINE_MARGIN",
    "HARDWARE_NAMES",
]
