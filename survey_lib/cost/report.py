"""``profile(model, x)``: one cost report with counted, measured and estimated figures side by side.

Counted figures (params, MACs, BitOps, peak activation memory, memory traffic) are per inference
at **batch 1**, as DESIGN.md defines them: ``profile`` traces ``example_input[:1]`` (dim 0 is the
batch).  Latency (when asked for) is measured at batch 1 and at a larger batch (example_input's
batch, or 32 when that is 1), threads 1 and 2, in eager PyTorch and ONNX Runtime.
"""

from __future__ import annotations

import html
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import pandas as pd
import torch
from torch import nn

from .._validate import check_bool, check_int, check_mapping, check_type
from .counting import MAX_BITS, Bits, check_example_input, check_model, count_trace, total_params, trace
from .hardware import HardwareProfile, get_hardware
from .latency import latency_grid
from .memory import peak_trace, traffic_trace
from .storage import stored_bytes

KINDS = ("counted", "measured", "estimated")


@dataclass(frozen=True)
class Metric:
    """One figure of a cost report, with its unit and kind (counted | measured | estimated)."""

    name: str
    value: float
    unit: str
    kind: str
    note: str = ""

    def __post_init__(self) -> None:
        for param in ("name", "unit", "note"):
            check_type(param, getattr(self, param), str, "a str")
        if isinstance(self.value, bool) or not isinstance(self.value, numbers.Real):
            raise TypeError(f"value must be a number, got {type(self.value).__name__} ({self.value!r})")
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not supported; accepted values: {', '.join(map(repr, KINDS))}")


@dataclass
class CostReport:
    """Per-layer table (``layers``) plus labelled totals (``metrics``) of one model and input shape."""

    layers: pd.DataFrame
    metrics: list[Metric]
    input_shape: tuple[int, ...]
    hardware: list[str]
    latency: pd.DataFrame | None = None
    layer_kinds: dict[str, str] = field(default_factory=dict)

    def totals(self) -> pd.DataFrame:
        """Totals as a DataFrame with columns name, value, unit, kind."""
        return pd.DataFrame([(m.name, m.value, m.unit, m.kind) for m in self.metrics], columns=["name", "value", "unit", "kind"])

    def get(self, name: str) -> Metric:
        """The metric called ``name``; KeyError listing the names otherwise."""
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"no metric {name!r}; available: {[m.name for m in self.metrics]}")

    def __getitem__(self, name: str) -> float:
        return self.get(name).value

    def names(self) -> list[str]:
        """Names of all metrics, in report order."""
        return [m.name for m in self.metrics]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: input shape, hardware, metrics, per-layer rows, latency rows (NaN -> None)."""
        return {
            "input_shape": list(self.input_shape),
            "hardware": list(self.hardware),
            "metrics": [{k: _json(v) for k, v in asdict(m).items()} for m in self.metrics],
            "layers": _records(self.layers),
            "layer_kinds": dict(self.layer_kinds),
            "latency": _records(self.latency) if self.latency is not None else None,
        }

    def __repr__(self) -> str:
        lines = [f"CostReport(input {tuple(self.input_shape)}, {len(self.layers)} layers, hardware {self.hardware})"]
        for m in self.metrics:
            lines.append(f"  {m.name:<44} {_fmt(m.value):>14} {m.unit:<14} {m.kind}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(m.name)}</td><td style='text-align:right'>{_fmt(m.value)}</td><td>{html.escape(m.unit)}</td>"
            f"<td>{m.kind}</td><td>{html.escape(m.note)}</td></tr>"
            for m in self.metrics
        )
        head = "<tr><th>name</th><th>value</th><th>unit</th><th>kind</th><th>note</th></tr>"
        return (
            f"<p><b>CostReport</b> input {tuple(self.input_shape)}, counted at batch 1, hardware {html.escape(str(self.hardware))}</p>"
            f"<table>{head}{rows}</table><details><summary>per layer ({len(self.layers)})</summary>"
            f"{self.layers.to_html(index=False, float_format=lambda v: f'{v:.4g}')}</details>"
        )


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:.4g}"


def _json(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if v is pd.NA else _json(v)) for k, v in row.items()} for row in df.astype(object).to_dict("records")]


# --------------------------------------------------------------------------- helpers


def _hardware_list(hardware: Any) -> list[HardwareProfile]:
    if isinstance(hardware, (str, HardwareProfile)):
        hardware = (hardware,)
    if not isinstance(hardware, Iterable):
        raise TypeError(f"hardware must be a name, a HardwareProfile or a sequence of them, got {type(hardware).__name__}")
    return [get_hardware(h) for h in hardware]


def precision_of(weight_bits: Any, act_bits: Any) -> str:
    """Roofline precision for a layer's bits: <= 8 -> "int8", <= 16 -> "fp16", else "fp32" (None: unknown)."""
    known = [check_int(p, x, min_value=1, max_value=MAX_BITS) for p, x in (("weight_bits", weight_bits),
                                                                         ("act_bits", act_bits))
             if x is not None and x is not pd.NA]
    b = max(known + [0])
    return "int8" if 0 < b <= 8 else "fp16" if 0 < b <= 16 else "fp32"


def layer_estimates(layers: pd.DataFrame, hw: HardwareProfile, level: str | None = None) -> tuple[list[float], list[float]]:
    """Per-layer roofline seconds and joules on ``hw`` (NaN where hw lacks the layer's precision)."""
    check_type("layers", layers, pd.DataFrame, "a per-layer DataFrame (CostReport.layers)")
    missing = sorted({"macs", "traffic_bytes", "weight_bits", "act_bits"} - set(layers.columns))
    if missing:
        raise ValueError(f"layers lacks the columns {missing}; pass CostReport.layers from profile")
    check_type("hw", hw, HardwareProfile, "a HardwareProfile (see get_hardware)")
    bw = hw.bandwidth(level)
    pj_byte = hw.energy_per_byte(level)
    secs, joules = [], []
    for macs, nbytes, wb, ab in zip(layers["macs"], layers["traffic_bytes"], layers["weight_bits"], layers["act_bits"]):
        prec = precision_of(None if pd.isna(wb) else wb, None if pd.isna(ab) else ab)
        if macs and prec not in hw.peak_macs_per_s:
            secs.append(math.nan)
            joules.append(math.nan)
            continue
        t_mac = macs / hw.peak_macs_per_s[prec] if macs else 0.0
        secs.append(max(t_mac, nbytes / bw))
        joules.append((macs * hw.energy_pj_per_mac.get(prec, math.nan) if macs else 0.0) * 1e-12 + nbytes * pj_byte * 1e-12)
    return secs, joules


def _latency_metrics(grid: pd.DataFrame) -> list[Metric]:
    out = []
    for r in grid.itertuples(index=False):
        tag = f"[{r.runtime},b{r.batch},t{r.threads}]"
        note = f"{r.runtime}, batch {r.batch}, {r.threads} thread(s), {r.runs} runs after {r.warmup} warm-up"
        out.append(Metric(f"latency_median_ms{tag}", float(r.median_ms), "ms", "measured", "median wall time per call; " + note))
        out.append(Metric(f"latency_iqr_ms{tag}", float(r.iqr_ms), "ms", "measured", "interquartile range; " + note))
    return out


# --------------------------------------------------------------------------- profile


def profile(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    hardware: Any = ("host",),
    bits: Bits | None = None,
    storage_format: str | None = None,
    latency: bool = False,
    latency_kwargs: dict[str, Any] | None = None,
    level: str | None = None,
) -> CostReport:
    """Counted (batch 1), measured and estimated cost of ``model`` on ``example_input``'s shape.

    Estimates use memory ``level`` for every hardware, or each hardware's ``default_level`` when None."""
    check_model(model)
    check_example_input(example_input)
    check_bool("latency", latency)
    if latency_kwargs is not None:
        check_mapping("latency_kwargs", latency_kwargs, "a dict of latency_grid keyword arguments")
    hws = _hardware_list(hardware)
    x1 = example_input[:1].detach().clone()  # batch 1, own storage (peak memory counts storages)
    try:
        tr = trace(model, x1)
    except ValueError as err:
        cause = str(err.__cause__ or err).strip().splitlines()[0]
        raise ValueError(f"example_input of shape {tuple(example_input.shape)} does not fit model (traced at batch 1): {cause} "
                         "(dim 0 is the batch: pass x.unsqueeze(0) for a single example)") from err
    layers = count_trace(model, tr, bits).merge(traffic_trace(model, tr, bits), on="name", how="left")
    for c in ("weight_read_bytes", "act_read_bytes", "act_write_bytes", "traffic_bytes"):
        layers[c] = layers[c].fillna(0).astype("int64")
    if hws:
        secs, _ = layer_estimates(layers, hws[0], level)
        layers["est_latency_s"] = secs
    kinds = {c: "counted" for c in layers.columns if c not in ("name", "type")}
    kinds.update(ideal_sparse_macs="estimated", est_latency_s="estimated")
    kinds = {k: v for k, v in kinds.items() if k in layers.columns}

    params, nonzero = total_params(model)
    macs = int(layers["macs"].sum())
    traffic = int(layers["traffic_bytes"].sum())
    stored = stored_bytes(model, fmt=storage_format)
    metrics = [
        Metric("params", params, "count", "counted", "weights and biases, shared ones once"),
        Metric("nonzero_params", nonzero, "count", "counted", "parameters that are not zero"),
        Metric("sparsity", 1 - nonzero / params if params else 0.0, "fraction", "counted", "fraction of zero parameters (0.9 = 90% zeros)"),
        Metric("macs", macs, "MACs", "counted", "multiply-accumulates of conv/linear/matmul per inference, batch 1"),
        Metric("flops", 2 * macs, "FLOPs (= 2 x MACs)", "counted", "FLOPs = 2 x MACs, batch 1"),
        Metric("ideal_sparse_macs", float(layers["ideal_sparse_macs"].sum()), "MACs", "estimated", "MACs that touch a nonzero weight; dense kernels do not skip zeros"),
        Metric("bitops", int(layers["bitops"].sum()), "bit-ops", "counted", "sum over MACs of weight bits x activation bits, batch 1"),
        Metric("peak_activation_bytes", peak_trace(tr), "bytes", "counted", "largest total of live activation storages, batch 1"),
        Metric("memory_traffic_bytes", traffic, "bytes", "counted", "weights read + activations read and written, batch 1"),
        Metric("stored_bytes", stored.bytes, "bytes", "measured", f"os.path.getsize of the {stored.fmt!r} file"),
        Metric("stored_gzip_bytes", stored.gzip_bytes, "bytes", "measured", f"the {stored.fmt!r} file after gzip -9"),
    ]
    for hw in hws:
        secs, joules = layer_estimates(layers, hw, level)
        src = "measured roofline" if hw.kind == "measured" else "estimated roofline"
        lvl = level or hw.default_level
        metrics.append(Metric(f"est_latency_s[{hw.name}]", float(sum(secs)), "s", "estimated",
                              f"sum over layers of max(MACs/peak, bytes/{lvl} bandwidth), {src}, batch 1"))
        metrics.append(Metric(f"est_energy_j[{hw.name}]", float(sum(joules)), "J", "estimated",
                              f"MACs x pJ/MAC + bytes x pJ/byte ({lvl}), Horowitz 45 nm table, batch 1"))
    grid = None
    if latency:
        kw = dict(latency_kwargs or {})
        kw.setdefault("batches", (1, int(example_input.shape[0]) if example_input.shape[0] > 1 else 32))
        grid = latency_grid(model, example_input, **kw)
        metrics += _latency_metrics(grid)
    return CostReport(layers, metrics, tuple(example_input.shape), [h.name for h in hws], grid, kinds)


__all__ = ["profile", "CostReport", "Metric", "precision_of", "layer_estimates", "KINDS"]
