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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pandas as pd
import torch
from torch import nn

from .registry import get_method
from .spec import Run, Spec, bench_code_fingerprint
from .store import ResultsStore

LATENCY_NAME = "latency_median_ms"
LATENCY_RUNTIME = "eager"
CONNECT_TIMEOUT_S = 20   # how long to wait for a Dask scheduler to answer
VERSION_KEYS = ("python", "torch", "numpy", "onnxruntime")
_BRACKET = re.compile(r"^(?P<name>[^\[]+)\[(?P<hw>[^\]]+)\]$")


def model_path(store: ResultsStore, key: str) -> Path:
    """Where the compressed model of run ``key`` is kept (a folder beside the store file)."""
    return store.path.with_name(store.path.name + ".models") / f"{key}.pt"


def _baseline(run: Run) -> Any:
    return load_baseline(run.task, run.dataset, run.baseline_profile, run.seed, run.arch, run.device)


def load_baseline(task: str, dataset: str, profile: str, seed: int, arch: str, device: str = "cpu") -> Any:
    """A baseline (on the CPU; trained on ``device``), loaded and evaluated once per process and shared by every
    caller: deep-copy its model before changing anything in it."""
    from .._validate import check_device, check_seed

    return _cached_baseline(str(task), str(dataset), str(profile), check_seed(seed), str(arch), check_device(device))


@functools.lru_cache(maxsize=32)   # the full spec's baselines, CIFAR-10 included, fit
def _cached_baseline(task: str, dataset: str, profile: str, seed: int, arch: str, device: str) -> Any:
    from ..baselines import baseline

    return baseline(task, dataset, profile=profile, seed=seed, arch=arch, device=device)


def prepare_baselines(spec: Spec, runs: Sequence[Run] | None = None) -> int:
    """Load, training where missing, every baseline the spec's runs (or ``runs``) start from; returns how many."""
    chosen = spec.runs() if runs is None else runs
    needed = sorted({(r.task, r.dataset, r.baseline_profile, r.seed, r.arch, r.device) for r in chosen})
    for args in needed:
        load_baseline(*args)
    return len(needed)


def _context(base: Any, run: Run) -> Any:
    from ..methods import Context

    return Context.from_baseline(base, budget=run.finetune_epochs, lr=base.config["lr"], batch_size=base.config["batch_size"],
                                 device=run.device)


def cost_rows(report: Any) -> list[dict[str, Any]]:
    """The cost report's figures as store rows: ``est_latency_s[int8_npu]`` becomes hardware int8_npu, name
    est_latency_s; figures that hold on any hardware get hardware "any"."""
    rows = []
    for _, r in report.totals().iterrows():
        m = _BRACKET.match(str(r["name"]))
        hw, name = (m["hw"], m["name"]) if m else ("any", str(r["name"]))
        rows.append({"hardware": hw, "name": name, "value": r["value"], "kind": r["kind"], "unit": r["unit"]})
    return rows


def execute(run: Run, hardware: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]], nn.Module]:
    """One run: the method on the shared baseline, its test metrics and its cost figures (no latency), at
    ``run.threads`` torch threads; the baseline's training, the method's fine-tuning and the test evaluation run
    on ``run.device``, the rest of the method and the cost report on the CPU."""
    from ..cost import profile
    from ..host import host_info
    from ..profiles import seed_everything

    threads = run.threads
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
                      "device": run.device,
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


def _job(run: Run, hardware: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]], bytes]:
    """:func:`execute`, with the model returned as bytes so that only the parent writes files, even when the
    worker is on another machine."""
    import io

    row, costs, model = execute(run, hardware)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return row, costs, buffer.getvalue()


def _in_worker(run: Run, hardware: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]], bytes]:
    """:func:`_job` in a worker process (joblib or Dask), whose OpenMP pools are sized to ``run.threads`` too."""
    import os

    os.environ["OMP_NUM_THREADS"] = str(run.threads)
    return _job(run, hardware)


def _keep(store: ResultsStore, run: Run, row: dict[str, Any], costs: list[dict[str, Any]], blob: bytes) -> None:
    """Store one run: its model file first (atomically), then its row, so a stored run always has its model.
    RunError if the worker ran another version of the code than this process (the key would not say so)."""
    from .._io import atomic_write_bytes

    if row["config"]["code"] != bench_code_fingerprint():
        raise RunError(f"run {run.method} at point {run.point} ({run.task}/{run.dataset}, seed {run.seed}) ran on a worker "
                       f"with other survey_lib code ({row['config']['code']}, here {bench_code_fingerprint()}): install "
                       "the same version on every worker")
    atomic_write_bytes(model_path(store, run.key), blob)
    store.add_run({**row, "key": run.key}, costs)   # under the parent's key


def _on_joblib(runs: Sequence[Run], args: Callable[[Run], tuple], n_jobs: int) -> Iterator[tuple[Run, tuple]]:
    """Each run's outcome from ``n_jobs`` joblib processes on this machine, in spec order."""
    from joblib import Parallel, delayed

    outcomes = Parallel(n_jobs=n_jobs, return_as="generator")(delayed(_in_worker)(*args(r)) for r in runs)
    yield from zip(runs, outcomes)


def _dask_client(address: str) -> Any:
    """A client of the Dask scheduler at ``address`` with at least one worker, each running one task at a time."""
    try:
        from distributed import Client
    except ImportError:
        raise RuntimeError("scheduler: running on a Dask cluster needs dask.distributed; install it with "
                           "pip install 'survey_lib[dask]'") from None
    try:
        client = Client(address, timeout=f"{CONNECT_TIMEOUT_S}s")
    except (OSError, TimeoutError) as err:
        raise RuntimeError(f"scheduler={address!r}: no Dask scheduler answered there ({err})") from err
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        slots = {w: info["nthreads"] for w, info in client.scheduler_info(n_workers=-1)["workers"].items()}
    except (OSError, TimeoutError) as err:
        client.close()
        raise RuntimeError(f"scheduler={address!r}: no worker joined within {CONNECT_TIMEOUT_S} s ({err})") from err
    shared = sorted(w for w, n in slots.items() if n > 1)
    if shared:
        client.close()
        raise RuntimeError(f"scheduler={address!r}: workers {shared} run several tasks in one process, which would share "
                           "torch's seed and thread settings; start them with --nthreads 1")
    return client


def _on_dask(runs: Sequence[Run], args: Callable[[Run], tuple], address: str) -> Iterator[tuple[Run, tuple]]:
    """Each run's outcome from the Dask cluster at ``address``, as each finishes; the runs that failed are
    reported together (RunError) after every other run was handed over."""
    from distributed import as_completed

    client = _dask_client(address)
    try:
        futures = {client.submit(_in_worker, *args(r), pure=False, key=f"bench-{r.key}"): r for r in runs}
        failed = []
        for future in as_completed(futures):
            run = futures.pop(future)   # drop the reference: the cluster frees the model's bytes
            if future.status == "error":
                failed.append(f"{run.method} at point {run.point} ({run.task}/{run.dataset}, seed {run.seed}): {future.exception()}")
                continue
            yield run, future.result()
        if failed:
            raise RunError(f"{len(failed)} run(s) failed on the cluster: " + "; ".join(failed))
    finally:
        client.close()


def compress(spec: Spec, store: ResultsStore, *, n_jobs: int = 1, scheduler: str | None = None,
             progress: Callable[[int, int, Run], None] | None = None) -> int:
    """Phase 1: execute every run of ``spec`` that ``store`` lacks, sequentially, in ``n_jobs`` processes on this
    machine (joblib), or on the Dask cluster whose scheduler is at address ``scheduler`` (workers started with
    ``--nthreads 1``), each run at ``spec.threads`` torch threads (part of its key). On this machine the baselines
    are loaded, or trained, here first. Only this process writes: the store, one run per transaction, and the
    models beside it; returns how many ran."""
    import warnings

    from .._validate import check_int, check_type

    n_jobs = check_int("n_jobs", n_jobs, min_value=1, max_value=256)
    if scheduler is not None:
        check_type("scheduler", scheduler, str, "a Dask scheduler address such as 'tcp://10.0.0.5:8786'")
    todo = _missing(spec, store)
    if todo and scheduler is None and n_jobs > 1 and n_jobs * spec.threads > usable_cores():
        warnings.warn(f"n_jobs={n_jobs} processes x {spec.threads} torch threads exceed the {usable_cores()} usable cores "
                      "here: the workers will oversubscribe them and run far slower; lower n_jobs, or the threads per run "
                      "(Spec.with_threads, --threads; other run keys)", RuntimeWarning, stacklevel=2)
    if "host" in spec.hardware and todo:
        from ..cost.hardware import host_profile

        host_profile()   # measured (or read from its cache) here, before any worker trains beside it
    if scheduler is None:
        prepare_baselines(spec, todo)   # trained here, once, not by several workers at a time (a cluster's own)
    # methods that time candidates while they run go last, one at a time, in this process
    spread = scheduler is not None or n_jobs > 1
    parallel = [r for r in todo if spread and not get_method(r.method).measures_latency]
    serial = [r for r in todo if r not in parallel]
    streams: list[Iterator[tuple[Run, tuple]]] = []
    if parallel and scheduler is not None:
        streams.append(_on_dask(parallel, lambda r: (r, tuple(spec.hardware)), scheduler))
    elif parallel:
        streams.append(_on_joblib(parallel, lambda r: (r, tuple(spec.hardware)), n_jobs))
    streams.append((r, _job(r, tuple(spec.hardware))) for r in serial)
    done = 0
    try:
        for stream in streams:
            for run, (row, costs, blob) in stream:
                _keep(store, run, row, costs, blob)
                done += 1
                if progress is not None:
                    progress(done, len(todo), run)
    finally:
        for stream in streams:
            stream.close()   # a cluster client is closed even when a run or the store failed
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


def _missing(spec: Spec, store: ResultsStore) -> list[Run]:
    return [r for r in spec.runs() if not store.has(r.key) or not model_path(store, r.key).exists()]


def stored_runs(spec: Spec, store: ResultsStore) -> int:
    """How many of ``spec``'s runs ``store`` holds with their model (those :func:`compress` will not run again)."""
    return len(spec.runs()) - len(_missing(spec, store))


@dataclass(frozen=True)
class Sweep:
    """What :func:`sweep` found and did, and the store's rows of the spec's runs."""

    table: pd.DataFrame
    n_runs: int           # runs in the spec
    stored_before: int    # of them already in the store, with their model
    baselines: int        # baselines loaded (or trained) here for the missing runs
    ran: int              # runs executed in phase 1
    timed: int            # runs timed in phase 2
    seconds: dict[str, float]   # wall time of "baselines", "phase 1" and "phase 2"

    def describe(self) -> str:
        """One line: what was stored, what ran and timed, and how long each step took."""
        s = self.seconds
        return (f"{self.stored_before} of {self.n_runs} runs were already stored; {self.baselines} baselines ready in "
                f"{s['baselines']:.0f} s; phase 1 ran {self.ran} in {s['phase 1']:.0f} s; phase 2 timed {self.timed} "
                f"serially in {s['phase 2']:.0f} s")


def build_command(spec: Spec, path: str | Path) -> str:
    """The ``survey-lib bench`` command that fills a store at ``path`` with ``spec``'s runs (same keys)."""
    from ..profiles import DEFAULT_THREADS
    from .spec import load_spec

    source = Path(spec.source)
    if not source.is_file():
        return f"survey-lib bench SPEC.toml --store {path} (with this spec written as SPEC.toml)"
    parts = [f"survey-lib bench {source} --store {path}"]
    if load_spec(source).seeds != spec.seeds:
        parts.append(f"--seed {spec.seeds[0]}")   # with_seeds: consecutive seeds from the first
    if spec.device != "cpu":
        parts.append(f"--device {spec.device}")
    if spec.threads != DEFAULT_THREADS:
        parts.append(f"--threads {spec.threads}")
    return " ".join(parts)


def sweep(spec: Spec, path: str | Path, *, n_jobs: int = 1, run_missing: bool = True) -> Sweep:
    """The results store at ``path`` completed for ``spec`` and read back: the runs it lacks are executed (phase 1,
    :func:`compress`) and any run without a latency is timed (phase 2, :func:`time_runs`) first. With
    ``run_missing=False`` a store that lacks runs (or does not exist) raises RuntimeError naming the command that
    builds it, for sweeps too long for a notebook, and no file is created."""
    from .._validate import check_int, check_type

    n_jobs = check_int("n_jobs", n_jobs, min_value=1, max_value=256)
    check_type("run_missing", run_missing, bool, "True or False")
    path, runs = Path(path), spec.runs()
    if not run_missing:
        held = 0
        if path.exists():
            with ResultsStore(path) as store:
                held = stored_runs(spec, store)
        if held < len(runs):
            raise RuntimeError(f"the {spec.name!r} store at {path} holds {held} of {len(runs)} runs: build it first with "
                               f"`{build_command(spec, path)}`"
                               + (f" (expected about {spec.expected_minutes:g} min)" if spec.expected_minutes else ""))
    with ResultsStore(path) as store:
        todo = _missing(spec, store)
        t0 = time.perf_counter()
        baselines = prepare_baselines(spec, todo) if todo else 0
        t1 = time.perf_counter()
        ran = compress(spec, store, n_jobs=n_jobs)
        t2 = time.perf_counter()
        timed = time_runs(spec, store)
        t3 = time.perf_counter()
        table = store.table([r.key for r in runs])
    return Sweep(table, len(runs), len(runs) - len(todo), baselines, ran, timed,
                 {"baselines": t1 - t0, "phase 1": t2 - t1, "phase 2": t3 - t2})
