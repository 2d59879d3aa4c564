"""Running a spec into a store: compress, evaluate, count and estimate each run, then time them all serially.

Phase 1 (``compress``) runs every run the store lacks: the method on the shared baseline with the spec's
fine-tuning budget, then the task metrics on the test split and the cost report's counted, measured (stored
bytes) and estimated (per hardware target) figures. Each run is written in one transaction, and its model is
saved beside the store, so an interrupted sweep resumes at the first missing run. Phase 2 (``time_runs``)
measures batch-1 latency of every stored model against its baseline, interleaved, one model at a time,
while nothing else runs: latency is never measured while other work shares the cores.
"""

from __future__ import annotations

import functools
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .._io import atomic_torch_save
from .registry import get_method
from .spec import Run, Spec, bench_code_fingerprint
from .store import ResultsStore

LATENCY_NAME = "latency_median_ms"
LATENCY_RUNTIME = "eager"
VERSION_KEYS = ("python", "torch", "numpy", "onnxruntime")
_BRACKET = re.compile(r"^(?P<name>[^\[]+)\[(?P<hw>[^\]]+)\]$")


def model_path(store: ResultsStore, key: str) -> Path:
    """Where the compressed model of run ``key`` is kept (a folder beside the store file)."""
    return store.path.with_name(store.path.name + ".models") / f"{key}.pt"


def _baseline(run: Run) -> Any:
    return _load_baseline(run.task, run.dataset, run.baseline_profile, run.seed, run.arch)


@functools.lru_cache(maxsize=16)
def _load_baseline(task: str, dataset: str, profile: str, seed: int, arch: str) -> Any:
    """A baseline, loaded (and evaluated) once per process: every method reads it and none changes it."""
    from ..baselines import baseline

    return baseline(task, dataset, profile=profile, seed=seed, arch=arch)


def _context(base: Any, run: Run) -> Any:
    from ..methods import Context

    return Context.from_baseline(base, budget=run.finetune_epochs, lr=base.config["lr"], batch_size=base.config["batch_size"])


def cost_rows(report: Any) -> list[dict[str, Any]]:
    """The cost report's figures as store rows: ``est_latency_s[int8_npu]`` becomes hardware int8_npu, name
    est_latency_s; figures that hold on any hardware get hardware "any"."""
    rows = []
    for _, r in report.totals().iterrows():
        m = _BRACKET.match(str(r["name"]))
        hw, name = (m["hw"], m["name"]) if m else ("any", str(r["name"]))
        rows.append({"hardware": hw, "name": name, "value": r["value"], "kind": r["kind"], "unit": r["unit"]})
    return rows


def execute(run: Run, hardware: Sequence[str], threads: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]], nn.Module]:
    """One run: the method on the shared baseline, its test metrics and its cost figures (no latency), at
    ``threads`` torch threads (default: every usable core)."""
    from ..cost import profile
    from ..host import host_info
    from ..profiles import seed_everything

    threads = usable_cores() if threads is None else threads
    method = get_method(run.method)
    base = _baseline(run)
    ctx = _context(base, run)
    seed_everything(run.seed, threads=threads)
    start = time.perf_counter()
    try:
        model = method.apply(base.model, ctx, run.point)
    except Exception as err:
        raise RunError(f"run {run.method} at point {run.point} on {run.task}/{run.dataset}/{run.arch}, seed {run.seed} "
                       f"failed: {err}") from err
    seconds = time.perf_counter() - start
    model.eval()
    metrics = {k: float(v) for k, v in ctx.evaluate(model, "test").items()}
    report = profile(model, ctx.example_input(1), hardware=tuple(hardware))
    info = host_info()
    row = {"key": run.key, "method": run.method, "family": method.family, "point": run.point, "task": run.task,
           "dataset": run.dataset, "arch": run.arch, "seed": run.seed,
           "config": {"baseline_profile": run.baseline_profile, "finetune_epochs": run.finetune_epochs, "threads": threads,
                      "hardware": list(run.hardware), "code": bench_code_fingerprint(),
                      "lr": base.config["lr"], "batch_size": base.config["batch_size"], "point_meaning": method.point},
           "metrics": metrics, "versions": {k: info[k] for k in VERSION_KEYS if k in info},
           "host": {k: v for k, v in info.items() if k not in VERSION_KEYS}, "seconds": seconds}
    return row, cost_rows(report), model


class RunError(RuntimeError):
    """A run whose method failed; the message names the run (method, point, target, seed)."""


def usable_cores() -> int:
    """The CPU cores this process may use."""
    from ..host import host_info

    return int(host_info()["usable_cpus"])


def _execute_and_save(run: Run, hardware: Sequence[str], threads: int, path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`execute`, then save the model atomically (the parent writes the row, under its own key)."""
    row, costs, model = execute(run, hardware, threads)
    atomic_torch_save(path, model)
    return row, costs


def _in_worker(run: Run, hardware: Sequence[str], threads: int, path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`_execute_and_save` in a joblib worker, whose other thread pools are sized to its share."""
    import os

    os.environ["OMP_NUM_THREADS"] = str(threads)
    return _execute_and_save(run, hardware, threads, path)


def compress(spec: Spec, store: ResultsStore, *, n_jobs: int = 1, threads: int | None = None,
             progress: Callable[[int, int, Run], None] | None = None) -> int:
    """Phase 1: execute every run of ``spec`` that ``store`` lacks, in order, in ``n_jobs`` processes on this
    machine (joblib) at ``threads`` torch threads each (default: the usable cores shared out, at least 1).
    Only this process writes the store, one run per transaction, in spec order; returns how many ran."""
    from .._validate import check_int

    n_jobs = check_int("n_jobs", n_jobs, min_value=1, max_value=256)
    threads = max(1, usable_cores() // n_jobs) if threads is None else check_int("threads", threads, min_value=1, max_value=256)
    todo = [r for r in spec.runs() if not store.has(r.key) or not model_path(store, r.key).exists()]
    if "host" in spec.hardware:
        from ..cost.hardware import host_profile

        host_profile()   # measured (or read from its cache) here, before any worker trains beside it
    # methods that time candidates while they run go last, one at a time
    parallel = [r for r in todo if n_jobs > 1 and not get_method(r.method).measures_latency]
    serial = [r for r in todo if r not in parallel]
    job = lambda run: (run, tuple(spec.hardware), threads, model_path(store, run.key))  # noqa: E731
    results: list[Iterable[tuple[dict[str, Any], list[dict[str, Any]]]]] = []
    if parallel:
        from joblib import Parallel, delayed

        results.append(Parallel(n_jobs=n_jobs, return_as="generator")(delayed(_in_worker)(*job(r)) for r in parallel))
    results.append(_execute_and_save(*job(r)) for r in serial)
    done = 0
    for runs, outcomes in zip((parallel, serial) if parallel else (serial,), results):
        for run, (row, costs) in zip(runs, outcomes):
            store.add_run({**row, "key": run.key}, costs)   # after its model was saved: a stored run has its model
            done += 1
            if progress is not None:
                progress(done, len(todo), run)
    return len(todo)


def time_runs(spec: Spec, store: ResultsStore, *, runs: int = 30, threads: int = 1) -> int:
    """Phase 2, serial: batch-1 latency of every stored run of ``spec`` without it, interleaved with its
    baseline in one call; returns how many were timed."""
    from ..cost.latency import compare_latency

    timed = 0
    for run in spec.runs():
        if not store.has(run.key) or store.has_cost(run.key, "host", LATENCY_NAME):
            continue
        base = _baseline(run)
        model = torch.load(model_path(store, run.key), weights_only=False)
        x = _context(base, run).example_input(1)
        lat = compare_latency({"baseline": base.model, "model": model}, x, runtime=LATENCY_RUNTIME, threads=threads, runs=runs)
        store.add_costs(run.key, _latency_rows(lat, threads))
        timed += 1
    return timed


def _latency_rows(lat: dict[str, Any], threads: int) -> Iterable[dict[str, Any]]:
    note = f"{LATENCY_RUNTIME}, batch 1, {threads} thread(s)"
    model, base = lat["model"], lat["baseline"]
    return [{"hardware": "host", "name": LATENCY_NAME, "value": model.median_ms, "kind": "measured", "unit": f"ms ({note})"},
            {"hardware": "host", "name": "latency_iqr_ms", "value": model.iqr_ms, "kind": "measured", "unit": f"ms ({note})"},
            {"hardware": "host", "name": "latency_ratio", "value": model.median_ms / base.median_ms, "kind": "measured",
             "unit": f"x baseline, same call ({note})"}]
