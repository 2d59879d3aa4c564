"""The benchmark's declarative spec: a small TOML file of methods x operating points x tasks x
architectures x seeds x hardware targets, validated whole before any training starts.

Every method starts from the same baseline checkpoint (``baseline_profile``, per task and seed) and gets the
same fine-tuning budget (``finetune_epochs``); the spec states both, and both are in every run's key. So are the
device and the torch thread count a run trains at (``with_device``, ``with_threads``): fine-tuned weights differ
in their last bits between them, so a store never mixes them under one key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..profiles import DEFAULT_THREADS
from .registry import get_method

SPEC_KEYS = {"bench", "targets", "methods"}
BENCH_KEYS = {"name", "description", "baseline_profile", "finetune_epochs", "seeds", "hardware", "expected_minutes"}
TARGET_KEYS = {"task", "dataset", "arch", "when_present"}


@dataclass(frozen=True)
class Target:
    """A task on a dataset, with the architecture every method starts from."""

    task: str
    dataset: str
    arch: str
    when_present: bool = False   # join only where the dataset's local files are present (cifar10)

    def absent(self) -> str | None:
        """Why this target is left out on this machine (an optional dataset without its files), or None."""
        from ..data import missing_files

        return missing_files(self.dataset) if self.when_present else None


@dataclass(frozen=True)
class Run:
    """One run: a method at an operating point on a target and seed, with the spec's shared budget."""

    method: str
    point: float | None
    task: str
    dataset: str
    arch: str
    seed: int
    baseline_profile: str
    finetune_epochs: int
    hardware: tuple[str, ...] = ()
    device: str = "cpu"   # where the baseline and the method's fine-tuning train; latency is always the host's
    threads: int = DEFAULT_THREADS   # torch threads the method and its fine-tuning run at (baselines: DEFAULT_THREADS)

    @property
    def key(self) -> str:
        """A stable digest of everything that decides the run's result, the library code included."""
        text = json.dumps({**asdict(self), "code": bench_code_fingerprint()}, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@functools.lru_cache(maxsize=1)
def bench_code_fingerprint() -> str:
    """A hash of what decides a run's result: the baselines' code, every method, the cost report, the runner
    and the hardware data files. Editing any of it gives every run a new key."""
    from ..baselines import code_fingerprint

    package = Path(__file__).resolve().parents[1]
    from ..cost.hardware import hardware_dir

    files = sorted([*package.glob("methods/*.py"), *package.glob("cost/*.py"), package / "deploy.py", package / "stats.py",
                    package / "bench" / "registry.py", package / "bench" / "runner.py", *hardware_dir().glob("*.toml")])
    digest = hashlib.sha256(code_fingerprint().encode())
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Spec:
    """A validated benchmark spec (see :func:`load_spec`)."""

    name: str
    baseline_profile: str
    finetune_epochs: int
    seeds: tuple[int, ...]
    hardware: tuple[str, ...]
    targets: tuple[Target, ...]
    methods: dict[str, tuple[float | None, ...]] = field(hash=False)
    description: str = ""
    expected_minutes: float | None = None
    source: str = ""
    device: str = "cpu"
    threads: int = DEFAULT_THREADS

    def runs(self) -> list[Run]:
        """Every run the spec asks for, the unchanged baseline first, in a fixed order (target, method, point, seed)."""
        from .registry import REFERENCE

        out = []
        for t in self.targets:
            if t.absent() is not None:
                continue
            for name, points in {REFERENCE: (None,), **self.methods}.items():
                if get_method(name).supports(t.task, t.arch) is not None:
                    continue
                for point in points:
                    for seed in self.seeds:
                        out.append(Run(name, point, t.task, t.dataset, t.arch, seed, self.baseline_profile,
                                       self.finetune_epochs, self.hardware, self.device, self.threads))
        return out

    def with_seeds(self, first: int) -> "Spec":
        """The same spec with as many seeds, starting at ``first`` (first, first + 1, ...)."""
        from .._validate import check_seed

        check_seed(first)
        return replace(self, seeds=tuple(first + i for i in range(len(self.seeds))))

    def with_device(self, device: str) -> "Spec":
        """The same spec training on ``device`` ("cpu", "cuda" or "cuda:N"; ValueError where torch sees no such
        device): baselines and fine-tuning run there, so every run gets another key."""
        from .._validate import check_device

        return replace(self, device=check_device(device))

    def with_threads(self, threads: int) -> "Spec":
        """The same spec with each run at ``threads`` torch threads (default DEFAULT_THREADS): every run gets
        another key, since fine-tuned weights differ in their last bits between thread counts."""
        from .._validate import check_int

        return replace(self, threads=check_int("threads", threads, min_value=1, max_value=256))

    def skipped(self) -> list[str]:
        """Why each target or method x target pair the spec names is not run: an optional dataset whose files are
        absent here, or a method that does not support the target."""
        why = {t: t.absent() for t in self.targets}
        absent = [f"target {t.task}/{t.dataset}/{t.arch} (when_present): {w}" for t, w in why.items() if w is not None]
        return absent + [f"{reason} (target {t.task}/{t.dataset}/{t.arch})" for t in self.targets for name in self.methods
                         if why[t] is None and (reason := get_method(name).supports(t.task, t.arch)) is not None]


class SpecError(ValueError):
    """A spec that names something unknown or an operating point that does not apply."""


def load_spec(path: str | os.PathLike) -> Spec:
    """Read and validate the TOML spec at ``path``; SpecError names the file and the bad entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec {str(path)!r} does not exist (the shipped specs are data/bench/default.toml and full.toml)")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"spec {str(path)!r} is not valid TOML: {err}") from err
    return parse_spec(raw, source=str(path))


def parse_spec(raw: dict[str, Any], source: str = "<spec>") -> Spec:
    """Validate a spec already parsed from TOML (a dict); SpecError names the bad entry."""
    _keys(raw, SPEC_KEYS, source, "the spec")
    bench = raw.get("bench")
    if not isinstance(bench, dict):
        raise SpecError(f"{source}: a [bench] table is required (name, baseline_profile, finetune_epochs, seeds, hardware)")
    _keys(bench, BENCH_KEYS, source, "[bench]")
    name = _required(bench, "name", str, source, "[bench]")
    profile = _choice(_required(bench, "baseline_profile", str, source, "[bench]"), _profiles(), source, "[bench].baseline_profile")
    epochs = _required(bench, "finetune_epochs", int, source, "[bench]")
    if isinstance(epochs, bool) or epochs < 1:
        raise SpecError(f"{source}: [bench].finetune_epochs must be an integer >= 1, got {epochs!r}")
    seeds = _list(bench, "seeds", int, source, "[bench]")
    if any(isinstance(s, bool) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SpecError(f"{source}: [bench].seeds must be distinct integers >= 0, got {seeds!r}")
    hardware = _list(bench, "hardware", str, source, "[bench]")
    for hw in hardware:
        _choice(hw, _hardware_names(), source, "[bench].hardware")
    _distinct(hardware, source, "[bench].hardware")
    targets = tuple(_target(t, i, source) for i, t in enumerate(_table_list(raw, "targets", source)))
    _distinct([f"{t.task}/{t.dataset}/{t.arch}" for t in targets], source, "[[targets]]")
    from ..data import missing_files

    for i, t in enumerate(targets):
        if not t.when_present and (why := missing_files(t.dataset)) is not None:
            raise SpecError(f"{source}: [[targets]] #{i + 1} ({t.task}/{t.dataset}): {why}; or set when_present = true "
                            "to leave it out where its files are absent")
    methods = _methods(raw.get("methods"), source)
    expected = bench.get("expected_minutes")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, (int, float))
                                 or not math.isfinite(expected) or expected <= 0):
        raise SpecError(f"{source}: [bench].expected_minutes must be a positive number, got {expected!r}")
    if not name.strip() or not isinstance(bench.get("description", ""), str):
        raise SpecError(f"{source}: [bench].name must be a non-empty string and description a string")
    for t in targets:
        for method, points in methods.items():
            for point in points:
                problem = get_method(method).check_target(point, t.task, t.dataset, t.arch, profile)
                if problem:
                    raise SpecError(f"{source}: [methods].{method}: operating point {point!r} does not apply to "
                                    f"{t.task}/{t.dataset}/{t.arch}: {problem}")
    spec = Spec(name, profile, epochs, tuple(seeds), tuple(hardware), targets, methods,
                str(bench.get("description", "")), None if expected is None else float(expected), source)
    from .registry import REFERENCE

    if all(r.method == REFERENCE for r in spec.runs()):
        raise SpecError(f"{source}: no method supports any target; nothing to run ({'; '.join(spec.skipped())})")
    return spec


def _distinct(values: list[Any], source: str, where: str) -> None:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise SpecError(f"{source}: {where} lists {repeated} more than once")


def _keys(table: dict[str, Any], allowed: set[str], source: str, where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SpecError(f"{source}: unknown key(s) {unknown} in {where}; accepted: {sorted(allowed)}")


def _required(table: dict[str, Any], key: str, kind: type, source: str, where: str) -> Any:
    if key not in table:
        raise SpecError(f"{source}: {where}.{key} is required")
    value = table[key]
    if not isinstance(value, kind):
        raise SpecError(f"{source}: {where}.{key} must be a {kind.__name__}, got {value!r}")
    return value


def _list(table: dict[str, Any], key: str, kind: type, source: str, where: str) -> list[Any]:
    value = _required(table, key, list, source, where)
    if not value or not all(isinstance(v, kind) for v in value):
        raise SpecError(f"{source}: {where}.{key} must be a non-empty list of {kind.__name__}, got {value!r}")
    return value


def _choice(value: Any, accepted: tuple[str, ...], source: str, where: str) -> str:
    if value not in accepted:
        raise SpecError(f"{source}: {where} = {value!r} is unknown; accepted: {list(accepted)}")
    return value


def _table_list(raw: dict[str, Any], key: str, source: str) -> list[dict[str, Any]]:
    value = raw.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise SpecError(f"{source}: at least one [[{key}]] table is required (task, dataset, arch)")
    return value


def _target(t: dict[str, Any], i: int, source: str) -> Target:
    from ..data import DATASET_TASKS
    from ..models import ARCH_TASKS

    where = f"[[targets]] #{i + 1}"
    _keys(t, TARGET_KEYS, source, where)
    dataset = _choice(_required(t, "dataset", str, source, where), tuple(DATASET_TASKS), source, f"{where}.dataset")
    task = _choice(_required(t, "task", str, source, where), DATASET_TASKS[dataset], source, f"{where}.task (for dataset {dataset!r})")
    arch = _choice(t.get("arch", "vgg"), tuple(ARCH_TASKS), source, f"{where}.arch")
    _choice(task, ARCH_TASKS[arch], source, f"{where}.task (for arch {arch!r})")
    optional = t.get("when_present", False)
    if not isinstance(optional, bool):
        raise SpecError(f"{source}: {where}.when_present must be true or false, got {optional!r}")
    return Target(task, dataset, arch, optional)


def _methods(table: Any, source: str) -> dict[str, tuple[float | None, ...]]:
    from .registry import _REGISTRY

    if not isinstance(table, dict) or not table:
        raise SpecError(f"{source}: a [methods] table is required: method = [operating points] (an empty list for "
                        f"a method with one setting); registered methods: {list(_REGISTRY)}")
    out: dict[str, tuple[float | None, ...]] = {}
    for name, points in table.items():
        _choice(name, tuple(_REGISTRY), source, "[methods]")
        method = get_method(name)
        if not isinstance(points, list):
            raise SpecError(f"{source}: [methods].{name} must be a list of operating points, got {points!r}")
        if method.valid is None:
            if points:
                raise SpecError(f"{source}: [methods].{name} has a single setting; give an empty list, got {points!r}")
            out[name] = (None,)
            continue
        if not points:
            raise SpecError(f"{source}: [methods].{name} needs at least one operating point ({method.point}), "
                            f"e.g. {list(method.points)}")
        checked = []
        for p in points:
            try:
                checked.append(method.check_point(p))
            except (TypeError, ValueError) as err:
                raise SpecError(f"{source}: [methods].{name}: operating point {p!r} does not apply: {err}") from err
        _distinct(checked, source, f"[methods].{name}")
        out[name] = tuple(checked)
    return out


def _profiles() -> tuple[str, ...]:
    from ..profiles import PROFILES

    return tuple(PROFILES)


def _hardware_names() -> tuple[str, ...]:
    from ..cost.hardware import HARDWARE_NAMES

    return HARDWARE_NAMES
