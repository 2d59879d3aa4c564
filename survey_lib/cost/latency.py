"""Measured latency: PyTorch eager and ONNX Runtime (CPU), median and IQR over >= 30 runs.

Every result states runtime, batch, threads, runs and warm-up.  The host is noisy: compare models
with ``compare_latency``, which interleaves them (each round runs every model once, in a seeded
shuffled order) in the same process, and quote ratios.  On a busy 2-core machine torch's OpenMP
threads oversubscribe: eager at 2 threads can be many times slower than at 1 thread.

ONNX export uses the dynamo exporter (``torch.onnx.export(..., dynamo=True)``), one file per
model and input shape (a batch-1 example would be specialised anyway), cached in a temp dir.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import random
import shutil
import tempfile
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils import _pytree as pytree

from .._io import as_path, atomic_write, reading
from ..profiles import torch_threads  # re-exported: latency helpers set threads for a block
from .._validate import check_bool, check_choice, check_float, check_int, check_seed, check_type
from .counting import check_example_input, check_model, eval_mode, is_onnx_model, run_forward

RUNTIMES = ("eager", "ort")
MIN_RUNS = 30


@dataclass
class LatencyResult:
    """Measured wall time per call: median, quartiles and IQR in ms, with the settings used."""

    runtime: str
    batch: int
    threads: int
    runs: int
    warmup: int
    median_ms: float
    q1_ms: float
    q3_ms: float
    iqr_ms: float
    min_ms: float
    samples_ms: list[float] = field(repr=False)
    kind: str = "measured"

    @property
    def per_item_ms(self) -> float:
        """Median ms per input item (median_ms / batch)."""
        return self.median_ms / self.batch

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the result, including per_item_ms."""
        return {**asdict(self), "per_item_ms": self.per_item_ms}


def summarize(samples_ms: Sequence[float], *, runtime: str, batch: int, threads: int, warmup: int) -> LatencyResult:
    """LatencyResult from raw samples (median, quartiles by linear interpolation)."""
    check_choice("runtime", runtime, RUNTIMES)
    a = np.asarray(samples_ms, dtype=float).reshape(-1)
    if a.size == 0 or not np.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"samples_ms must be a non-empty list of finite times >= 0 (ms), got {len(a)} values"
                         + ("" if a.size == 0 else f" from {a.min()} to {a.max()}"))
    q1, med, q3 = (float(v) for v in np.percentile(a, [25, 50, 75]))
    return LatencyResult(runtime, batch, threads, len(a), warmup, med, q1, q3, q3 - q1, float(a.min()), [float(v) for v in a])


# --------------------------------------------------------------------------- settings


def _check_settings(runtime: str, threads: int, runs: int, warmup: int) -> None:
    check_choice("runtime", runtime, RUNTIMES)
    check_int("threads", threads, min_value=1, max_value=256)
    check_int("runs", runs, min_value=MIN_RUNS)
    check_int("warmup", warmup, min_value=0)


def batch_input(example_input: torch.Tensor, batch: int | None) -> torch.Tensor:
    """``example_input`` resized along dim 0 to ``batch`` items (its items repeated cyclically)."""
    check_example_input(example_input)
    if batch is None or batch == example_input.shape[0]:
        return example_input.detach().contiguous()
    check_int("batch", batch, min_value=1)
    idx = torch.arange(batch) % example_input.shape[0]
    return example_input.detach()[idx].contiguous()


# --------------------------------------------------------------------------- ONNX


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's prints, warnings and log lines."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, *, dynamic_batch: bool = False) -> Path:
    """Export ``model`` (eval) to ONNX with the dynamo exporter; return the path.

    The graph is fixed to example_input's shape, or has a symbolic batch dimension with ``dynamic_batch``
    (traced at batch 2, since torch.export specializes a batch of 1)."""
    check_model(model)
    check_example_input(example_input)
    path = as_path(path)
    check_bool("dynamic_batch", dynamic_batch)
    x = batch_input(example_input, max(2, example_input.shape[0])) if dynamic_batch else example_input
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with eval_mode(model), torch.no_grad():
        run_forward(model, example_input)  # a clear ValueError for an input that does not fit

        def write(tmp: Path) -> None:
            with _quiet():
                prog = torch.onnx.export(model, (x,), dynamo=True, verbose=False, external_data=False,
                                         input_names=["input"], report=False, dynamic_shapes=dynamic)
                prog.save(str(tmp), external_data=False)

        atomic_write(path, write)
    return path


def ort_session(path: str | Path, threads: int = 1, *, profile_prefix: str | Path | None = None,
                optimized_path: str | Path | None = None) -> Any:
    """ONNX Runtime CPU session: intra-op ``threads``, 1 inter-op thread, sequential, all graph optimizations;
    optionally ORT's profiler (files at ``profile_prefix``) and the optimized graph saved to ``optimized_path``."""
    import onnxruntime as ort

    path = as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"ONNX file {str(path)!r} does not exist")
    check_int("threads", threads, min_value=1, max_value=256)
    so = ort.SessionOptions()
    if profile_prefix is not None:
        so.enable_profiling, so.profile_file_prefix = True, str(profile_prefix)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Idle ORT threads would otherwise spin and steal the core from an interleaved neighbour.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with reading(path, "ONNX file", errors=ort_errors()):
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exception classes ONNX Runtime raises for a model it cannot load or an input it cannot run."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("InvalidProtobuf", "InvalidArgument", "InvalidGraph", "Fail", "NotImplemented", "NoModel",
             "RuntimeException")
    return tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))


def ort_run(session: Any, x: torch.Tensor, param: str = "x") -> list[np.ndarray]:
    """``session.run`` on float32 ``x``; an input ONNX Runtime rejects becomes a ValueError naming ``param``."""
    check_type(param, x, torch.Tensor, "a torch.Tensor input batch")
    inp = session.get_inputs()[0]
    feed = {inp.name: x.detach().to("cpu", torch.float32).contiguous().numpy()}
    try:
        return session.run(None, feed)
    except ort_errors() as err:
        what = str(err).strip().splitlines()[0].rsplit(" : ", 1)[-1]
        raise ValueError(f"{param} of shape {tuple(x.shape)} does not fit the ONNX model's input {inp.name!r} "
                         f"of shape {inp.shape}: {what}") from err


def _flat_outputs(out: Any) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def check_ort_matches(model: nn.Module, session: Any, x: torch.Tensor, rtol: float = 1e-3, atol: float = 1e-4) -> None:
    """Raise RuntimeError unless the ORT session's outputs are allclose to the eager model's."""
    check_model(model)
    if not (callable(getattr(session, "run", None)) and callable(getattr(session, "get_inputs", None))):
        raise TypeError(f"session must be an onnxruntime.InferenceSession (see ort_session), got {type(session).__name__}")
    check_example_input(x)
    check_float("rtol", rtol, min_value=0.0)
    check_float("atol", atol, min_value=0.0)
    with eval_mode(model), torch.inference_mode():
        ref = _flat_outputs(run_forward(model, x))
    got = ort_run(session, x)
    if len(ref) != len(got):
        raise RuntimeError(f"ONNX model returns {len(got)} outputs, torch returns {len(ref)}")
    for i, (r, g) in enumerate(zip(ref, got)):
        scale = float(np.abs(r).max()) if r.size else 0.0
        if r.shape != g.shape or not np.allclose(r, g, rtol=rtol, atol=atol * max(1.0, scale)):
            err = float(np.abs(r - g).max()) if r.shape == g.shape else float("nan")
            raise RuntimeError(f"ONNX Runtime output {i} differs from torch (shape {g.shape} vs {r.shape}, max abs err {err:.3g})")


def _check_runtime_fits(models: dict[str, nn.Module], runtime: str) -> None:
    if runtime == "eager":
        for name, m in models.items():
            if is_onnx_model(m):
                raise ValueError(f"model {name!r} is an ONNX Runtime model ({Path(m.onnx_path).name}); use runtime='ort'")


_CACHE_DIR: Path | None = None
_EXPORTS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Export]]" = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module, x: torch.Tensor, batch: int | None) -> tuple:
    # in-place weight edits bump tensor._version, so a changed model is re-exported
    state = tuple((t.data_ptr(), t._version) for t in model.state_dict(keep_vars=True).values() if t is not None)
    return (batch, tuple(x.shape[1:]), str(x.dtype), state)


@dataclass
class _Export:
    path: Path
    checked_batches: set[int] = field(default_factory=set)


def cached_onnx(model: nn.Module, x: torch.Tensor) -> Path:
    """ONNX file of ``model`` for ``x``'s shape, exported once per model state and checked per batch size.

    One export with a symbolic batch serves every batch size; a model that cannot be exported that way
    is exported once per batch size.  A model that already is an ONNX file (an ``onnx_path``
    attribute, e.g. ``survey_lib.deploy.OnnxModel``) is returned as is: no export, no check."""
    global _CACHE_DIR
    check_model(model)
    if is_onnx_model(model):
        return Path(model.onnx_path)
    check_example_input(x)
    per_model = _EXPORTS.setdefault(model, {})
    for key in (_fingerprint(model, x, None), _fingerprint(model, x, x.shape[0])):
        entry = per_model.get(key)
        if entry is not None and entry.path.exists():
            if x.shape[0] not in entry.checked_batches:
                check_ort_matches(model, ort_session(entry.path, 1), x)
                entry.checked_batches.add(x.shape[0])
            return entry.path
    if _CACHE_DIR is None:
        _CACHE_DIR = Path(tempfile.mkdtemp(prefix="survey_lib_onnx_"))
        atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
    target = _CACHE_DIR / f"m{id(model)}_{len(per_model)}.onnx"
    try:
        path, key = export_onnx(model, x, target, dynamic_batch=True), _fingerprint(model, x, None)
        check_ort_matches(model, ort_session(path, 1), x)
    except Exception:  # a graph that fixes its batch size: fall back to one export per batch size
        path, key = export_onnx(model, x, target), _fingerprint(model, x, x.shape[0])
        check_ort_matches(model, ort_session(path, 1), x)
    per_model[key] = _Export(path, {x.shape[0]})
    return path


# --------------------------------------------------------------------------- runners


def _eager_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    return lambda: model(x)


def _ort_runner(model: nn.Module, x: torch.Tensor, threads: int) -> Callable[[], Any]:
    sess = ort_session(cached_onnx(model, x), threads)
    ort_run(sess, x, "example_input")  # fail early, with a clear message
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: sess.run(None, feed)


@contextlib.contextmanager
def _runners(models: dict[str, nn.Module], x: torch.Tensor, runtime: str, threads: int) -> Iterator[dict[str, Callable[[], Any]]]:
    """Callables running one inference per model, with eval/inference_mode/threads set for the block."""
    with contextlib.ExitStack() as stack:
        for m in models.values():
            stack.enter_context(eval_mode(m))
        if runtime == "eager":
            with torch.inference_mode():
                for m in models.values():
                    run_forward(m, x)  # fail early, with a clear message
            stack.enter_context(torch_threads(threads))
            stack.enter_context(torch.inference_mode())
            yield {k: _eager_runner(m, x) for k, m in models.items()}
        else:
            yield {k: _ort_runner(m, x, threads) for k, m in models.items()}


def _time_ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


def compare_latency(
    models: dict[str, nn.Module],
    example_input: torch.Tensor,
    *,
    runtime: str = "eager",
    batch: int | None = None,
    threads: int = 1,
    runs: int = MIN_RUNS,
    warmup: int = 10,
    seed: int = 0,
) -> dict[str, LatencyResult]:
    """Measure several models interleaved: each round runs every model once in a seeded shuffled order."""
    if not isinstance(models, dict):
        raise TypeError(f"models must be a non-empty dict {{name: nn.Module}}, got {type(models).__name__}")
    if not models:
        raise ValueError("models must be a non-empty dict {name: nn.Module}, got an empty dict")
    check_seed(seed)
    for m in models.values():
        check_model(m)
    _check_settings(runtime, threads, runs, warmup)
    _check_runtime_fits(models, runtime)
    x = batch_input(example_input, batch)
    rng = random.Random(seed)
    names = list(models)
    samples: dict[str, list[float]] = {k: [] for k in names}
    with _runners(models, x, runtime, threads) as run:
        for r in range(warmup + runs):
            order = names[:]
            rng.shuffle(order)
            for k in order:
                ms = _time_ms(run[k])
                if r >= warmup:
                    samples[k].append(ms)
    return {k: summarize(samples[k], runtime=runtime, batch=int(x.shape[0]), threads=threads, warmup=warmup) for k in names}


def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    runtime: str = "eager",
    batch: int | None = None,
    threads: int = 1,
    warmup: int = 10,
    runs: int = MIN_RUNS,
) -> LatencyResult:
    """Median/IQR wall time of one call at ``batch`` (default: example_input's), ``threads`` and ``runtime``."""
    return compare_latency({"model": model}, example_input, runtime=runtime, batch=batch, threads=threads, runs=runs, warmup=warmup)["model"]


GRID_COLUMNS = ("runtime", "batch", "threads", "median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "per_item_ms", "runs", "warmup", "kind")


def latency_grid(
    model: nn.Module,
    example_input: torch.Tensor,
    batches: Sequence[int] = (1, 32),
    threads: Sequence[int] = (1, 2),
    runtimes: Sequence[str] = RUNTIMES,
    *,
    runs: int = MIN_RUNS,
    warmup: int = 10,
) -> pd.DataFrame:
    """One measured row per (runtime, batch, threads): median, quartiles, IQR and per-item ms."""
    for param, values in (("batches", batches), ("threads", threads), ("runtimes", runtimes)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"{param} must be a list or tuple of values, got {type(values).__name__} ({values!r})")
        if len(values) == 0:
            raise ValueError(f"{param} must name at least one value, got an empty sequence")
    for r in runtimes:
        check_choice("runtimes", r, RUNTIMES)
    rows = []
    for rt in runtimes:
        for b in batches:
            for t in threads:
                res = measure_latency(model, example_input, runtime=rt, batch=b, threads=t, runs=runs, warmup=warmup)
                rows.append({c: v for c, v in res.to_dict().items() if c in GRID_COLUMNS})
    return pd.DataFrame(rows, columns=list(GRID_COLUMNS))


__all__ = [
    "LatencyResult",
    "measure_latency",
    "compare_latency",
    "latency_grid",
    "export_onnx",
    "ort_session",
    "ort_run",
    "ort_errors",
    "cached_onnx",
    "is_onnx_model",
    "check_ort_matches",
    "batch_input",
    "torch_threads",
    "RUNTIMES",
]
