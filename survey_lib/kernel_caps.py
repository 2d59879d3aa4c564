"""What a machine without this CPU's newest instructions would see: the same models timed under kernel caps.

PyTorch's eager CPU kernels pick their instruction set at run time: convolutions in oneDNN (capped by
``ONEDNN_MAX_CPU_ISA``), element-wise and pooling kernels in ATen (``ATEN_CPU_CAPABILITY``) and GEMMs in MKL
(``MKL_ENABLE_INSTRUCTIONS``). Each variable is read once, when the library loads, so a capped measurement
needs its own process. :func:`capped_latency` starts one worker process per level, each with its caps in
its environment, loads the same models into every worker, and then asks the workers in turn, round after
round, for one timing each: the levels are interleaved in time, so a slow spell of a shared machine lands
on all of them. Only levels below this CPU's own can be emulated (:func:`kernel_levels`); ONNX Runtime's
kernels have no such cap, so int8 gains can only be measured at the host's own level.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ._openmp import set_openmp_wait
from ._validate import check_int, check_model, check_type
from .host import KERNEL_CAPS, host_info, is_arm

HOST_LEVEL = "this CPU"
# Caps that make an AVX-512 CPU run as an AVX2-only one, and an AVX2 CPU as one with SSE4.1 only (no AVX).
_X86_LEVELS = {
    "AVX2 only": ("avx512", {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
    "SSE4 only (no AVX)": ("avx2", {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default",
                                    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}),
}
COLUMNS = ("level", "model", "round", "median_ms", "torch_capability", "onednn_isa", "kind")


def kernel_levels(info: dict[str, Any] | None = None) -> dict[str, dict[str, str]]:
    """{level name: environment caps}: this CPU uncapped, then each older x86 level it can emulate (none on Arm)."""
    info = info or host_info()
    levels: dict[str, dict[str, str]] = {HOST_LEVEL: {}}
    if is_arm(info.get("machine")):
        return levels
    for name, (needs, caps) in _X86_LEVELS.items():
        if info["features"].get(needs):
            levels[name] = dict(caps)
    return levels


def _check_levels(levels: Any) -> dict[str, dict[str, str]]:
    check_type("levels", levels, dict, "a dict {level name: {environment variable: value}}")
    if not levels:
        raise ValueError("levels must name at least one level, e.g. kernel_levels()")
    for name, caps in levels.items():
        check_type(f"levels[{name!r}]", caps, dict, "a dict {environment variable: value}")
        unknown = sorted(set(caps) - set(KERNEL_CAPS))
        if unknown:
            raise ValueError(f"levels[{name!r}] sets {unknown}; accepted variables: {', '.join(KERNEL_CAPS)}")
    return levels


def _check_models(models: Any) -> dict[str, nn.Module]:
    check_type("models", models, dict, "a non-empty dict {name: nn.Module}")
    if not models:
        raise ValueError("models must be a non-empty dict {name: nn.Module}, got an empty dict")
    for m in models.values():
        check_model(m)
    return models


class _Worker:
    """One process with its own kernel caps, holding the models, timing them when asked."""

    def __init__(self, payload: Path, caps: dict[str, str], threads: int, runs: int, warmup: int) -> None:
        env = {k: v for k, v in os.environ.items() if k not in KERNEL_CAPS or k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        env.update(caps)
        set_openmp_wait(env)
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(payload), str(threads), str(runs), str(warmup)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.ready = self._reply()

    def _reply(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()[-2000:]
            raise RuntimeError(f"a kernel-capped worker stopped (exit code {self.proc.wait()}): {err}")
        return json.loads(line)

    def time_once(self) -> dict[str, float]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._reply()["median_ms"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def capped_latency(models: dict[str, nn.Module], example_input: torch.Tensor, levels: dict[str, dict[str, str]] | None = None,
                   *, rounds: int = 5, runs: int = 20, warmup: int = 5, threads: int = 1) -> pd.DataFrame:
    """Measured eager latency of every model at every kernel level, levels interleaved round by round.

    One row per (level, model, round): the median of ``runs`` calls at batch ``example_input.shape[0]``, the
    kernel level ATen reports inside that worker (``torch_capability``) and the instruction sets of the oneDNN
    kernels its first model ran (``onednn_isa``, from oneDNN's verbose log; empty where oneDNN ran nothing)."""
    models = _check_models(models)
    levels = _check_levels(kernel_levels() if levels is None else levels)
    check_type("example_input", example_input, torch.Tensor, "a torch.Tensor batch")
    rounds, runs = check_int("rounds", rounds, min_value=1), check_int("runs", runs, min_value=1)
    warmup, threads = check_int("warmup", warmup, min_value=0), check_int("threads", threads, min_value=1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="survey_lib_caps_") as tmp:
        payload = Path(tmp) / "models.pt"
        torch.save({"models": {k: m.eval() for k, m in models.items()}, "x": example_input.detach().cpu()}, payload)
        workers: dict[str, _Worker] = {}
        try:
            for name, caps in levels.items():
                workers[name] = _Worker(payload, caps, threads, runs, warmup)
            for r in range(rounds):
                for name, worker in workers.items():
                    for model, ms in worker.time_once().items():
                        rows.append({"level": name, "model": model, "round": r, "median_ms": ms,
                                     "torch_capability": worker.ready["capability"],
                                     "onednn_isa": worker.ready["onednn_isa"], "kind": "measured"})
        finally:
            for worker in workers.values():
                worker.close()
    return pd.DataFrame(rows, columns=list(COLUMNS))


def summarize_levels(df: pd.DataFrame, reference: str = HOST_LEVEL) -> pd.DataFrame:
    """Per (level, model): median over rounds, its range, and the ratio to ``reference`` paired round by round."""
    check_type("df", df, pd.DataFrame, "a capped_latency table")
    missing = sorted({"level", "model", "round", "median_ms"} - set(df.columns))
    if missing:
        raise ValueError(f"df lacks the columns {missing}; pass a capped_latency table")
    if reference not in set(df["level"]):
        raise ValueError(f"reference must be one of the table's levels {sorted(set(df['level']))}, got {reference!r}")
    ref = df[df["level"] == reference].set_index(["model", "round"])["median_ms"]
    d = df.assign(ratio=df["median_ms"].to_numpy() / ref.reindex(pd.MultiIndex.from_frame(df[["model", "round"]])).to_numpy())
    g = d.groupby(["level", "model"], sort=False)
    return g.agg(median_ms=("median_ms", "median"), low_ms=("median_ms", "min"), high_ms=("median_ms", "max"),
                 ratio=("ratio", "median"), ratio_low=("ratio", "min"), ratio_high=("ratio", "max"),
                 rounds=("round", "nunique")).reset_index()


def onednn_isas(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The instruction sets (e.g. ``avx512_core``, ``avx2``, ``sse41``) of the oneDNN kernels one call of ``model`` runs,
    read from oneDNN's verbose log, which it writes to this process's standard output (file descriptor 1)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        try:
            with torch.inference_mode(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                model(x)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    kernels = [line for line in text.splitlines() if ",exec," in line and ("convolution" in line or "inner_product" in line)]
    return sorted({m.group(1) for line in kernels for m in re.finditer(r"(?:jit|brg\w*):(\w+)", line)})


def _serve(payload: str, threads: int, runs: int, warmup: int) -> None:
    """The worker's loop: load the models, say which kernels torch uses, then time every model on each "go"."""
    torch.set_num_threads(threads)
    data = torch.load(payload, weights_only=False)
    models, x = data["models"], data["x"]
    isa = onednn_isas(next(iter(models.values())).eval(), x)
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "onednn_isa": ",".join(isa)}), flush=True)
    with torch.inference_mode():
        for m in models.values():
            for _ in range(warmup):
                m(x)
        for line in sys.stdin:
            if line.strip() != "go":
                break
            times: dict[str, list[float]] = {k: [] for k in models}
            for _ in range(runs):
                for name, m in models.items():   # the models interleaved call by call
                    start = time.perf_counter()
                    m(x)
                    times[name].append((time.perf_counter() - start) * 1e3)
            print(json.dumps({"median_ms": {k: statistics.median(v) for k, v in times.items()}}), flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))


__all__ = ["kernel_levels", "capped_latency", "summarize_levels", "onednn_isas", "HOST_LEVEL"]
