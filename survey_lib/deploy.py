"""Real int8 deployment: ONNX Runtime static post-training quantization (PTQ).

"Real int8" here means the model that runs is an ONNX graph with int8 weights and 8-bit activations,
not a PyTorch model with fake-quant: ``quantize_int8`` exports the torch model to ONNX, calibrates the
activation ranges on training data and writes a QDQ graph (QuantizeLinear/DequantizeLinear pairs
around each Conv/Gemm/MatMul; weights stored as int8 with per-channel fp32 scales). When ONNX Runtime
loads it, its graph optimizer fuses each DQ -> Conv -> Q pattern into an integer kernel (QLinearConv,
QGemm, MatMulIntegerToFloat, ...): the MACs then really run in int8 with int32 accumulation.
``int8_ops`` shows which kernels ORT chose. The .onnx file is the storage format: ``stored_bytes``
measures it (int8 weights are ~4x smaller than fp32; graph structure and scales are not).

How much int8 gains depends on the CPU's int8 dot-product instructions (AMX, VNNI, Arm dot-product or
none: ``survey_lib.host.int8_instructions``), so notebooks measure it and print which the host has. A
first conv with 3 input channels gains least: its int8 kernel has too little depth to amortize the
quantize/requantize steps and can be slower than fp32 (``op_profile`` shows it per kernel), so
``keep_fp32="first"`` keeps it in fp32 by default.

Wrap any ONNX file in ``OnnxModel`` to evaluate it with ``ctx.evaluate`` and time it with
``compare_latency(..., runtime="ort")`` beside the fp32 ONNX reference from ``fp32_onnx``.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ._io import as_path, atomic_write
from ._validate import check_choice, check_int, check_model, check_type
from .cost.latency import _quiet, check_ort_matches, export_onnx, ort_run, ort_session
from .cost.storage import register_format
from .methods.base import Context, check_ctx, mark

CALIBRATORS = ("minmax", "percentile", "entropy", "distribution")
ACTIVATION_TYPES = ("uint8", "int8")
KEEP_FP32 = ("first", "none")
MAC_OPS = ("Conv", "Gemm", "MatMul")
CALIBRATION_BATCH = 32

_TMP_DIR: Path | None = None
_COUNTER = itertools.count()


# --------------------------------------------------------------------------- the wrapper


class OnnxModel(nn.Module):
    """An ONNX file run by ONNX Runtime (CPU) behind the nn.Module call interface; no parameters."""

    storage_format = "onnx"

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        super().__init__()
        self.onnx_path = as_path(path)
        self.threads = check_int("threads", threads, min_value=1, max_value=256)
        self._session: Any = ort_session(self.onnx_path, self.threads)  # a bad file fails here, naming itself

    @property
    def session(self) -> Any:
        """The ONNX Runtime session, created on first use and cached."""
        if self._session is None:
            self._session = ort_session(self.onnx_path, self.threads)
        return self._session

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Run the session on ``x`` (as float32); one output tensor, or a tuple of several."""
        outs = [torch.from_numpy(np.asarray(o)) for o in ort_run(self.session, x)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # ORT sessions cannot be copied or pickled: drop it, rebuild lazily
        state["_session"] = None
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> "OnnxModel":
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        return new

    def extra_repr(self) -> str:
        return f"onnx_path={str(self.onnx_path)!r}, threads={self.threads}"


def write_onnx(model: nn.Module, path: Path) -> None:
    """Writer of the "onnx" storage format: a byte copy of the model's ONNX file."""
    src = getattr(model, "onnx_path", None)
    if src is None:
        raise TypeError(f"storage format 'onnx' needs a model with an onnx_path (an OnnxModel), got {type(model).__name__}")
    shutil.copyfile(src, path)


register_format("onnx", write_onnx, overwrite=True)


# --------------------------------------------------------------------------- files


def _tmp_dir() -> Path:
    """A fresh folder inside a temp dir that lives as long as the process."""
    global _TMP_DIR
    if _TMP_DIR is None:
        _TMP_DIR = Path(tempfile.mkdtemp(prefix="survey_lib_deploy_"))
        atexit.register(shutil.rmtree, _TMP_DIR, ignore_errors=True)
    d = _TMP_DIR / f"m{next(_COUNTER)}"
    d.mkdir()
    return d


def _target_paths(path: str | os.PathLike | None) -> tuple[Path, Path]:
    """(int8 path, fp32 path): ``path`` and ``<stem>.fp32.onnx`` beside it, else a process temp dir."""
    if path is None:
        d = _tmp_dir()
        return d / "model.int8.onnx", d / "model.fp32.onnx"
    p = _check_path(path)
    return p, p.with_name(f"{p.stem}.fp32.onnx")


def _check_path(path: Any) -> Path:
    return as_path(path, "path")


def _example(ctx_or_example: Context | Tensor) -> Tensor:
    if isinstance(ctx_or_example, Context):
        return ctx_or_example.example_input(1, "train")
    return check_type("ctx_or_example", ctx_or_example, Tensor, "a survey_lib.methods.Context or an example input tensor")


def _export(model: nn.Module, example: Tensor, path: Path) -> Path:
    """Export a deep copy of ``model`` (eval) with a symbolic batch; check ORT agrees with torch."""
    eager = copy.deepcopy(model).eval()
    export_onnx(eager, example, path, dynamic_batch=True)
    check_ort_matches(eager, ort_session(path, 1), example)
    return path


def fp32_onnx(
    model: nn.Module, ctx_or_example: Context | Tensor, *, path: str | os.PathLike | None = None, threads: int = 1
) -> OnnxModel:
    """The fp32 ONNX export of ``model`` (symbolic batch) as an OnnxModel: the reference for int8."""
    check_model(model)
    check_int("threads", threads, min_value=1, max_value=256)
    example = _example(ctx_or_example)
    target = _tmp_dir() / "model.fp32.onnx" if path is None else _check_path(path)
    return OnnxModel(_export(model, example, target), threads)


# --------------------------------------------------------------------------- calibration and node choice


def calibration_batches(ctx: Context, n: int, batch: int = CALIBRATION_BATCH) -> list[np.ndarray]:
    """The first ``n`` training inputs (deterministic) as float32 arrays of ``min(n, batch)`` items each.

    The last batch is topped up with the first inputs again: ORT's histogram calibrators (percentile,
    entropy, distribution) stack all batches, so they must share one shape."""
    check_ctx(ctx)
    train = ctx.data.train
    if len(train) == 0:
        raise ValueError("calibration needs data: ctx.data.train is empty")
    n = min(check_int("n", n, min_value=1), len(train))
    b = min(check_int("batch", batch, min_value=1), n)
    xs = torch.stack([train[i][0] for i in range(n)]).to(torch.float32)
    xs = xs[torch.arange(-(-n // b) * b) % n]  # wrap around to fill the last batch
    return [xs[i : i + b].numpy() for i in range(0, len(xs), b)]


def _reader(input_name: str, batches: list[np.ndarray]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[np.ndarray] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {input_name: x}

        def rewind(self) -> None:
            self._it = iter(batches)

    return _Reader()


def _check_graph(graph: Any) -> Any:
    if not (hasattr(graph, "node") and hasattr(graph, "input")):
        raise TypeError(f"graph must be an ONNX GraphProto (onnx.load(path).graph), got {type(graph).__name__}")
    return graph


def mac_nodes(graph: Any) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes of an ONNX graph, in graph order."""
    return [n.name for n in _check_graph(graph).node if n.op_type in MAC_OPS]


def first_mac_nodes(graph: Any) -> list[str]:
    """The Conv/Gemm/MatMul nodes that read a graph input directly (a CNN's first conv).

    An MLP's first Gemm reads a flattened copy of the input and has a long reduction dimension, where
    int8 pays off, so it is not one of them."""
    inputs = {i.name for i in _check_graph(graph).input}
    return [n.name for n in graph.node if n.op_type in MAC_OPS and inputs.intersection(n.input)]


def _check_keep_fp32(keep_fp32: Any) -> str | list[str]:
    """``keep_fp32`` as "first", "none" or a list of node names (TypeError/ValueError otherwise)."""
    accepted = "'first', 'none' or a list/tuple of ONNX node names"
    if isinstance(keep_fp32, str):
        if keep_fp32 not in KEEP_FP32:
            raise ValueError(f"keep_fp32={keep_fp32!r} is not supported; accepted values: {accepted}")
        return keep_fp32
    check_type("keep_fp32", keep_fp32, (list, tuple), accepted)
    for name in keep_fp32:
        check_type("keep_fp32 entries", name, str, "ONNX node names (str)")
    return list(keep_fp32)


def _excluded(graph: Any, keep_fp32: str | list[str]) -> list[str]:
    """Node names to keep in fp32 for a checked ``keep_fp32`` ("first", "none" or node names)."""
    if isinstance(keep_fp32, str):
        return first_mac_nodes(graph) if keep_fp32 == "first" else []
    unknown = [n for n in keep_fp32 if n not in {m.name for m in graph.node}]
    if unknown:
        raise ValueError(f"keep_fp32 names unknown ONNX nodes {unknown}; available Conv/Gemm/MatMul nodes: {mac_nodes(graph)}")
    return list(keep_fp32)


def _check_quant_args(calibrator: str, per_channel: bool, n_calibration: int, activation_type: str, threads: int) -> None:
    check_choice("calibrator", calibrator, CALIBRATORS)
    check_type("per_channel", per_channel, bool, "a bool")
    check_int("n_calibration", n_calibration, min_value=1)
    check_choice("activation_type", activation_type, ACTIVATION_TYPES)
    check_int("threads", threads, min_value=1, max_value=256)


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """``_quiet`` plus ORT quantization's log lines (it logs on the root logger)."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with _quiet():
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# --------------------------------------------------------------------------- quantization


def _quantize_static(src: Path, dst: Path, batches: list[np.ndarray], excluded: list[str], calibrator: str,
                     per_channel: bool, activation_type: str) -> None:
    """ORT static quantization of ``src`` (pre-processed fp32) into a QDQ graph at ``dst``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = dict(zip(CALIBRATORS, (CalibrationMethod.MinMax, CalibrationMethod.Percentile,
                                     CalibrationMethod.Entropy, CalibrationMethod.Distribution)))
    act = QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8
    input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    with _quiet_ort():
        quantize_static(str(src), str(dst), _reader(input_name, batches), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=act, weight_type=QuantType.QInt8,
                        calibrate_method=methods[calibrator], nodes_to_exclude=excluded)


def quantize_int8(
    model: nn.Module,
    ctx: Context,
    *,
    calibrator: str = "minmax",
    per_channel: bool = True,
    n_calibration: int = 256,
    activation_type: str = "uint8",
    keep_fp32: str | Sequence[str] = "first",
    path: str | os.PathLike | None = None,
    threads: int = 1,
) -> OnnxModel:
    """Static int8 PTQ with ONNX Runtime: a QDQ .onnx calibrated on the first ``n_calibration`` training inputs."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    check_model(model)
    check_ctx(ctx)
    _check_quant_args(calibrator, per_channel, n_calibration, activation_type, threads)
    keep_fp32 = _check_keep_fp32(keep_fp32)
    int8_path, fp32_path = _target_paths(path)
    batches = calibration_batches(ctx, n_calibration)
    with tempfile.TemporaryDirectory(prefix="survey_lib_quant_") as work:
        fp32, pre, out = Path(work) / "fp32.onnx", Path(work) / "pre.onnx", Path(work) / "int8.onnx"
        _export(model, torch.from_numpy(batches[0][:1]), fp32)
        with _quiet_ort():
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre)).graph
        excluded = _excluded(graph, keep_fp32)  # a bad node name fails here, before anything is written
        _quantize_static(pre, out, batches, excluded, calibrator, per_channel, activation_type)
        atomic_write(fp32_path, lambda tmp: shutil.copyfile(fp32, tmp))
        atomic_write(int8_path, lambda tmp: shutil.copyfile(out, tmp))
    result = OnnxModel(int8_path, threads)
    result.fp32_path = fp32_path
    result.quantized_nodes = [n for n in mac_nodes(graph) if n not in excluded]
    result.excluded_nodes = excluded
    result.calibrator, result.per_channel, result.activation_type = calibrator, per_channel, activation_type
    result.compression_history = list(getattr(model, "compression_history", []))
    return mark(result, "int8_ptq_ort", ("int8_kernel", "low_bit_storage"), calibrator=calibrator,
                per_channel=per_channel, keep_fp32=keep_fp32)


def int8_ops(model: OnnxModel | str | os.PathLike) -> dict[str, int]:
    """Op types of the graph ORT actually runs after its optimizations (QLinearConv/QGemm = int8 kernels)."""
    import onnx

    src = model.onnx_path if isinstance(model, OnnxModel) else Path(check_type(
        "model", model, (str, os.PathLike), "an OnnxModel or the path of an .onnx file"))
    with tempfile.TemporaryDirectory(prefix="survey_lib_ops_") as d:
        optimized = Path(d) / "optimized.onnx"
        ort_session(src, optimized_path=optimized)
        counts = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    return dict(counts.most_common())


MAC_KERNELS = ("Conv", "FusedConv", "QLinearConv", "ConvInteger", "Gemm", "QGemm", "FusedGemm", "MatMul",
               "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "FusedMatMul")


def op_profile(model: OnnxModel, x: Tensor, *, runs: int = 50, threads: int = 1) -> pd.DataFrame:
    """Measured median µs per node over ``runs`` (ORT's profiler), in execution order; ``mac`` marks
    conv/GEMM kernels (fp32 or int8)."""
    check_type("model", model, OnnxModel, "an OnnxModel")
    check_type("x", x, Tensor, "a torch.Tensor input batch")
    check_int("runs", runs, min_value=1)
    with tempfile.TemporaryDirectory(prefix="survey_lib_prof_") as d:
        sess = ort_session(model.onnx_path, threads, profile_prefix=Path(d) / "prof")
        ort_run(sess, x)  # a clear ValueError for an input that does not fit
        feed = {sess.get_inputs()[0].name: x.detach().to("cpu", torch.float32).contiguous().numpy()}
        for _ in range(4 + runs):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    return _node_table(events, runs)


def _node_table(events: list[dict[str, Any]], runs: int) -> pd.DataFrame:
    times: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            times.setdefault(node, []).append(float(e["dur"]))
            ops[node] = e.get("args", {}).get("op_name", "")
    rows = [dict(node=n, op=ops[n], median_us=float(np.median(t[-runs:])), mac=ops[n] in MAC_KERNELS)
            for n, t in times.items()]
    df = pd.DataFrame(rows, columns=["node", "op", "median_us", "mac"])
    df.attrs["kind"] = "measured"
    return df


__all__ = [
    "op_profile",
    "OnnxModel",
    "quantize_int8",
    "fp32_onnx",
    "int8_ops",
    "calibration_batches",
    "first_mac_nodes",
    "mac_nodes",
    "write_onnx",
    "CALIBRATORS",
    "ACTIVATION_TYPES",
]
