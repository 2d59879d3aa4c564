"""``survey-lib`` command line: run notebooks headless, build the site, refresh committed outputs, lint notebooks."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ._openmp import set_openmp_wait

# Before torch is imported (through .profiles), so this process's own training, the notebook kernels and the
# sweep workers it starts all wait the short way (see survey_lib._openmp).
set_openmp_wait()

from . import notebooks as nbtools  # noqa: E402
from ._io import atomic_write, atomic_write_text  # noqa: E402
from .profiles import DEFAULT_THREADS, PROFILES  # noqa: E402
from .results import project_root, results_dir  # noqa: E402


@dataclass
class RunOutcome:
    """What running one notebook gave."""

    name: str
    ok: bool
    seconds: float
    error: str = ""


def run_notebook(path: Path, output: Path, profile: str, *, timeout: int = 900,
                 parameters: dict[str, Any] | None = None) -> RunOutcome:
    """Execute one notebook with papermill into ``output`` (``parameters`` override its parameters cell)."""
    import papermill as pm

    name = path.stem
    output.mkdir(parents=True, exist_ok=True)
    _set_kernel_env(output, name)
    params = {} if profile == "default" else {"profile": profile}
    params.update(parameters or {})
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(path), str(output / f"{name}.ipynb"), parameters=params, kernel_name="python3",
            cwd=str(path.parent), progress_bar=False, log_output=False, execution_timeout=timeout,
        )
        return RunOutcome(name, True, time.perf_counter() - start)
    except Exception as exc:  # papermill raises PapermillExecutionError with the cell's traceback
        return RunOutcome(name, False, time.perf_counter() - start, _first_lines(exc))


def _set_kernel_env(output: Path, name: str) -> None:
    os.environ["SURVEY_LIB_RESULTS_DIR"] = str((output / "results").resolve())
    os.environ["SURVEY_LIB_NOTEBOOK"] = name
    os.environ["SURVEY_LIB_PROGRESS"] = "0"


def _first_lines(exc: Exception, n: int = 12) -> str:
    return "\n".join(str(exc).strip().splitlines()[-n:])


def write_site(output: Path, outcomes: list[RunOutcome], profile: str) -> Path:
    """Build the site into ``output`` (survey_lib.site) from every executed notebook there, with this run's
    ``outcomes``, its results and the benchmark store of ``profile``; return its ``index.html``."""
    from .site import Status, build_site

    statuses = {o.name: Status(o.ok, o.seconds, o.error) for o in outcomes}
    spec = project_root() / "data" / "bench" / f"{profile}.toml"
    return build_site(nbtools.list_notebooks(output), output, statuses=statuses, results=output / "results",
                      store=bench_store(profile), spec=spec, profile=profile)


def bench_store(name: str) -> Path:
    """The store of benchmark spec ``name`` where notebooks 08, 09 and 10 keep it: ``<project>/build/bench/<name>.sqlite``."""
    return project_root() / "build" / "bench" / f"{name}.sqlite"


CELL_TIMEOUT_S = {"default": 900, "full": 7200}


def cell_timeout(timeout: int | None, profile: str) -> int:
    """Seconds allowed per cell: ``timeout`` when given, else the profile's default (CELL_TIMEOUT_S)."""
    return CELL_TIMEOUT_S[profile] if timeout is None else timeout


def cmd_run(args: argparse.Namespace) -> int:
    """Execute notebooks headless and write the build folder."""
    paths = nbtools.resolve_notebooks(args.notebooks)
    for path in paths:
        nbtools.check_parameters(nbtools.read(path), args.parameters, path.stem)
    output = Path(args.output).resolve()
    outcomes = []
    for i, path in enumerate(paths, 1):
        settings = ", ".join([args.profile] + [f"{k}={v!r}" for k, v in args.parameters.items()])
        print(f"[{i}/{len(paths)}] {path.stem} ({settings}) ...", flush=True)
        outcome = run_notebook(path, output, args.profile, timeout=cell_timeout(args.timeout, args.profile),
                               parameters=args.parameters)
        outcomes.append(outcome)
        state = "ok" if outcome.ok else "FAILED"
        print(f"[{i}/{len(paths)}] {path.stem}: {state} in {outcome.seconds:.1f} s", flush=True)
        if not outcome.ok:
            print(outcome.error, file=sys.stderr)
    index = write_site(output, outcomes, args.profile)
    failed = [o.name for o in outcomes if not o.ok]
    print(f"wrote {index}; {len(outcomes) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


def cmd_site(args: argparse.Namespace) -> int:
    """Build the static site from already-executed notebooks (nothing is executed or trained)."""
    from .site import build_site

    paths = nbtools.list_notebooks(Path(args.notebooks))
    if not paths:
        raise ValueError(f"--notebooks {args.notebooks}: no notebooks found (NN_name.ipynb)")
    index = build_site(paths, Path(args.output), results=args.results or results_dir(),
                       store=args.store or bench_store("default"), spec=args.spec)
    print(f"wrote {index} ({len(paths)} notebook pages, {Path(args.output) / 'leaderboard.html'})")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    """Re-execute notebooks in the default profile and store their normalized outputs in notebooks/."""
    output = Path(args.output).resolve()
    status = 0
    for path in nbtools.resolve_notebooks(args.notebooks):
        outcome = run_notebook(path, output, "default", timeout=args.timeout)
        if not outcome.ok:
            print(f"{path.stem}: FAILED\n{outcome.error}", file=sys.stderr)
            status = 1
            continue
        nb = nbtools.normalize(nbtools.read(output / f"{path.stem}.ipynb"))
        atomic_write(path, lambda p: nbtools.nbformat.write(nb, str(p)))
        print(f"{path.stem}: refreshed in {outcome.seconds:.1f} s")
    return status


def cmd_check(args: argparse.Namespace) -> int:
    """Lint committed notebooks: normalized, skeleton present, parameters cell first, no errors."""
    status = 0
    paths = nbtools.resolve_notebooks(args.notebooks)
    if not paths:
        print(f"no notebooks found (NN_name.ipynb) in {nbtools.notebooks_dir()}", file=sys.stderr)
        return 1
    for path in paths:
        problems = nbtools.lint(nbtools.read(path))
        for p in problems:
            print(f"{path.name}: {p}")
        status |= bool(problems)
    print("notebooks ok" if not status else "notebook check failed")
    return int(status)


def cmd_info(args: argparse.Namespace) -> int:
    """Print this machine's CPU, ISA features, kernel level and library versions (as stored with results)."""
    from .host import describe_host, host_info

    print(json.dumps(host_info(), indent=2, sort_keys=True) if args.json else describe_host())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark spec into a results store: missing runs first, then latency serially; resumable."""
    from .bench import ResultsStore, runner
    from .bench.spec import load_spec

    spec = load_spec(args.spec).with_device(args.device)
    if args.seed is not None:
        spec = spec.with_seeds(args.seed)
    if args.threads is not None:
        spec = spec.with_threads(args.threads)
    runs = spec.runs()
    if args.store is None:
        args.store = str(Path("build") / "bench" / f"{spec.name}.sqlite")
    if args.dry_run and not Path(args.store).exists():
        _print_plan(spec, f"{len(runs)} runs, no store yet at {args.store}")
        return 0
    with ResultsStore(args.store) as store:
        stored = runner.stored_runs(spec, store)
        _print_plan(spec, f"{len(runs)} runs, {stored} already in {store.path}, {len(runs) - stored} to run"
                    + (f"; expected about {spec.expected_minutes:g} min from scratch" if spec.expected_minutes else ""))
        if args.dry_run:
            return 0
        start = time.perf_counter()
        with _bench_bar(len(runs) - stored) as bar:
            runner.compress(spec, store, n_jobs=args.jobs, scheduler=args.scheduler,
                            progress=lambda done, total, run: bar.update(1))
        where = f"Dask cluster at {args.scheduler}" if args.scheduler else f"{args.jobs} process(es) here"
        print(f"phase 1 (compress, evaluate, count, estimate; {where}): {time.perf_counter() - start:.0f} s")
        start = time.perf_counter()
        timed = runner.time_runs(spec, store)
        print(f"phase 2 (latency, measured serially: nothing else ran on these cores): {timed} runs timed in "
              f"{time.perf_counter() - start:.0f} s")
        keys = [r.key for r in runs]   # this spec's runs only: a store may also hold other specs' runs
        for fmt in args.export:
            out = Path(args.store).with_suffix(f".{fmt}")
            if fmt == "md":
                from .site import leaderboard_markdown

                atomic_write_text(store.export_path(out), leaderboard_markdown(spec, store.table(keys)))
            else:
                (store.to_csv if fmt == "csv" else store.to_parquet)(out, keys)
            print(f"wrote {out}")
    return 0


def _print_plan(spec: Any, counts: str) -> None:
    """The spec's name and source, ``counts``, and why each skipped method x target pair is not run."""
    print(f"spec {spec.name!r} ({spec.source}): {counts}; seeds {list(spec.seeds)}"
          + (f"; training on {spec.device}" if spec.device != "cpu" else ""))
    for reason in spec.skipped():
        print(f"  not run: {reason}")


def _bench_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="runs", unit="run", disable=total == 0)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def parse_value(text: str) -> Any:
    """A parameter value as papermill's -p reads it: int, float, True/False/None, else the string itself."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


class _ParameterAction(argparse.Action):
    """Collect ``-p NAME VALUE`` pairs into a dict."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 - argparse signature
        name, value = values
        if not name.isidentifier():
            parser.error(f"-p NAME VALUE: NAME must be a Python identifier, got {name!r}")
        if name == "profile":
            parser.error("-p profile: use --profile (accepted values: " + ", ".join(PROFILES) + ")")
        params = dict(getattr(namespace, self.dest) or {})
        params[name] = parse_value(value)
        setattr(namespace, self.dest, params)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str):  # noqa: ANN201 - argparse signature
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``survey-lib``."""
    parser = _Parser(prog="survey-lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="execute notebooks headless (papermill) into a build folder")
    run.add_argument("notebooks", nargs="*", help="names like 01 or 01_measuring_cost (default: all)")
    run.add_argument("--profile", choices=PROFILES, default="default")
    run.add_argument("--output", default="build", help="folder for executed notebooks, HTML and results")
    run.add_argument("--timeout", type=positive_int, default=None,
                     help="seconds allowed per cell (default: 900 in the default profile, 7200 in full, "
                          "where one cell may train a baseline for many minutes on 2 cores)")
    run.add_argument("-p", "--parameter", nargs=2, metavar=("NAME", "VALUE"), action=_ParameterAction,
                     dest="parameters", default={},
                     help="override a parameters-cell value, as papermill's -p does (e.g. -p seed 1 -p dataset digits)")
    run.set_defaults(func=cmd_run)
    site = sub.add_parser("site", help="build the static site (pages, landing page, leaderboard) from executed notebooks")
    site.add_argument("--notebooks", default=str(nbtools.notebooks_dir()),
                      help="folder of executed NN_name.ipynb files (default: the committed notebooks/, which carry "
                           "the default profile's outputs; or a build folder)")
    site.add_argument("--output", default=str(Path("build") / "site"), help="folder for the site (default: build/site)")
    site.add_argument("--results", default=None,
                      help="folder of <notebook>.json results files for the key results (default: "
                           "$SURVEY_LIB_RESULTS_DIR or build/results)")
    site.add_argument("--store", default=None,
                      help="the benchmark store the leaderboard reads and never writes (default: build/bench/default.sqlite "
                           "of this project, where notebooks 08, 09 and 10 keep it)")
    site.add_argument("--spec", default=None, help="the benchmark spec of the leaderboard (default: data/bench/default.toml)")
    site.set_defaults(func=cmd_site)
    refresh = sub.add_parser("refresh", help="re-run notebooks (default profile) and commit-ready outputs")
    refresh.add_argument("notebooks", nargs="*")
    refresh.add_argument("--output", default="build/refresh")
    refresh.add_argument("--timeout", type=positive_int, default=900)
    refresh.set_defaults(func=cmd_refresh)
    check = sub.add_parser("check", help="lint committed notebooks")
    check.add_argument("notebooks", nargs="*")
    check.set_defaults(func=cmd_check)
    info = sub.add_parser("info", help="this machine: CPU, ISA features, kernels, library versions")
    info.add_argument("--json", action="store_true", help="print the JSON stored with every results file")
    info.set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="run a benchmark spec into a resumable results store")
    bench.add_argument("spec", nargs="?", default=str(Path("data") / "bench" / "default.toml"),
                       help="a TOML spec (default: data/bench/default.toml; data/bench/full.toml is the full sweep)")
    bench.add_argument("--store", default=None,
                       help="the SQLite results store (default: build/bench/<spec name>.sqlite; created if missing; an "
                            "interrupted sweep resumes from it)")
    bench.add_argument("--export", nargs="*", choices=("csv", "parquet", "md"), default=[],
                       help="also write, beside the store, the runs table (csv, parquet) or the Markdown leaderboard (md)")
    bench.add_argument("--jobs", type=positive_int, default=1,
                       help="processes for phase 1 on this machine (joblib); latency is always measured serially after it")
    bench.add_argument("--threads", type=positive_int, default=None,
                       help=f"torch threads per run (default {DEFAULT_THREADS}); part of each run's key, since fine-tuned "
                            "weights differ in their last bits between thread counts; keep --jobs x --threads within the cores")
    bench.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run phase 1 on the Dask cluster whose scheduler is at ADDRESS (e.g. tcp://10.0.0.5:8786; "
                            "start workers with --nthreads 1); latency is still measured here, serially")
    bench.add_argument("--device", default="cpu",
                       help="where baselines and fine-tuning train: cpu (default), cuda or cuda:N (runs get their own keys; "
                            "latency is still measured on this machine's CPU)")
    bench.add_argument("--seed", type=int, default=None, metavar="N",
                       help="shift the spec's seeds to N, N+1, ... (as many as it lists), as notebooks 08, 09 and 10's seed "
                            "parameter does")
    bench.add_argument("--dry-run", action="store_true", help="validate the spec and list what would run")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``survey-lib`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, sqlite3.Error) as exc:
        print(f"survey-lib: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
