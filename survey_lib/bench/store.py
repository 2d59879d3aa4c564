"""The benchmark's results store: one SQLite file, one row per run, each run written in one transaction.

A run is one method at one operating point on one task, architecture and seed. Its row holds the config,
the task metrics, the versions and the host; its cost figures go to a second table, one per hardware target
and figure, each with its kind (counted, measured or estimated). Measured latency is added later, in a
serial phase, to the same run. A file that is not a store of this library (another SQLite database, a
corrupted file, another schema version) raises :class:`StoreError` and is left untouched.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

from .._io import atomic_write
from .._validate import check_choice, check_float, check_int, check_type

APPLICATION_ID = 0x53424E31   # "SBN1" in SQLite's header: a survey_lib benchmark store
SCHEMA_VERSION = 1
KINDS = ("counted", "measured", "estimated")
RUN_COLUMNS = ("key", "method", "family", "point", "task", "dataset", "arch", "seed", "config", "metrics",
               "versions", "host", "seconds", "created")
SQLITE_HEADER = b"SQLite format 3\x00"
_SCHEMA = (
    "CREATE TABLE runs (key TEXT PRIMARY KEY, method TEXT NOT NULL, family TEXT NOT NULL, point REAL, "
    "task TEXT NOT NULL, dataset TEXT NOT NULL, arch TEXT NOT NULL, seed INTEGER NOT NULL, config TEXT NOT NULL, "
    "metrics TEXT NOT NULL, versions TEXT NOT NULL, host TEXT NOT NULL, seconds REAL NOT NULL, created TEXT NOT NULL)",
    "CREATE TABLE costs (run TEXT NOT NULL REFERENCES runs(key), hardware TEXT NOT NULL, name TEXT NOT NULL, "
    "value REAL, kind TEXT NOT NULL CHECK (kind IN ('counted', 'measured', 'estimated')), unit TEXT NOT NULL, "
    "PRIMARY KEY (run, hardware, name))",
)


class StoreError(ValueError):
    """A store file that is corrupted, belongs to something else, or has another schema version."""


def _read_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(100)


def check_store_file(path: str | os.PathLike) -> None:
    """Raise :class:`StoreError` unless ``path`` is a benchmark store of this schema, intact."""
    path = Path(path)
    head = _read_header(path)
    if len(head) < 100 or not head.startswith(SQLITE_HEADER):
        raise StoreError(f"store {str(path)!r} is not an SQLite file (corrupted, truncated, or another kind of file); "
                         "it was left untouched: move it away or choose another store path")
    app_id = int.from_bytes(head[68:72], "big")
    if app_id != APPLICATION_ID:
        raise StoreError(f"store {str(path)!r} is an SQLite database of another application (application_id "
                         f"{app_id:#x}, a benchmark store has {APPLICATION_ID:#x}); it was left untouched: choose another path")
    version = int.from_bytes(head[60:64], "big")
    if version != SCHEMA_VERSION:
        raise StoreError(f"store {str(path)!r} has schema version {version}; this library reads version {SCHEMA_VERSION}. "
                         "It was left untouched: export it with the library that wrote it, or choose another path")
    conn = sqlite3.connect(path)   # read-write: a sweep killed mid-write left a journal, which SQLite rolls back here
    try:
        result = conn.execute("PRAGMA quick_check").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as err:
        raise StoreError(f"store {str(path)!r} is corrupted (SQLite: {err}); it was left untouched") from err
    finally:
        conn.close()
    if result != "ok" or not {"runs", "costs"} <= tables:
        raise StoreError(f"store {str(path)!r} is corrupted (integrity check: {result}; tables {sorted(tables)}); "
                         "it was left untouched")


def _create(path: Path) -> None:
    """Write an empty store to ``path`` atomically (a reader never sees a half-made store)."""

    def write(tmp: Path) -> None:
        tmp.unlink()
        conn = sqlite3.connect(tmp)
        try:
            with conn:
                for statement in _SCHEMA:
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        finally:
            conn.close()

    atomic_write(path, write)


class ResultsStore:
    """The benchmark's runs and their cost figures in the SQLite file ``path`` (created if missing)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(check_type("path", path, (str, os.PathLike), "a file path"))
        if self.path.is_dir():
            raise StoreError(f"store {str(self.path)!r} is a folder; give a file path such as results/bench.sqlite")
        if not self.path.exists():
            _create(self.path)
        check_store_file(self.path)
        self.conn = sqlite3.connect(self.path, timeout=30)
        self.conn.execute("PRAGMA foreign_keys = ON")

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the database."""
        self.conn.close()

    def has(self, key: str) -> bool:
        """Whether run ``key`` is stored."""
        return self.conn.execute("SELECT 1 FROM runs WHERE key=?", (key,)).fetchone() is not None

    def keys(self) -> set[str]:
        """The keys of every stored run."""
        return {r[0] for r in self.conn.execute("SELECT key FROM runs")}

    def add_run(self, run: dict[str, Any], costs: Iterable[dict[str, Any]] = ()) -> bool:
        """Store ``run`` and its ``costs`` in one transaction; False (and nothing written) if its key is stored."""
        row = _run_row(run)
        cost_rows = [_cost_row(row[0], c) for c in costs]
        with self.conn:   # the INSERT opens the transaction: check-and-insert is one atomic step
            cur = self.conn.execute(f"INSERT OR IGNORE INTO runs VALUES ({', '.join('?' * len(RUN_COLUMNS))})", row)
            if cur.rowcount == 0:
                return False
            self.conn.executemany("INSERT INTO costs VALUES (?, ?, ?, ?, ?, ?)", cost_rows)
        return True

    def has_cost(self, key: str, hardware: str, name: str) -> bool:
        """Whether figure ``name`` on ``hardware`` is stored for run ``key``."""
        return self.conn.execute("SELECT 1 FROM costs WHERE run=? AND hardware=? AND name=?",
                                 (key, hardware, name)).fetchone() is not None

    def add_costs(self, key: str, costs: Iterable[dict[str, Any]]) -> int:
        """Add figures to stored run ``key`` in one transaction (e.g. latency from the serial phase); figures
        already stored are kept as they were. Returns how many were added."""
        if not self.has(key):
            raise KeyError(f"run {key!r} is not in the store; add the run before its costs")
        rows = [_cost_row(key, c) for c in costs]
        with self.conn:
            before = self.conn.total_changes
            self.conn.executemany("INSERT OR IGNORE INTO costs VALUES (?, ?, ?, ?, ?, ?)", rows)
            return self.conn.total_changes - before

    def runs(self) -> pd.DataFrame:
        """One row per run: config, metrics, versions and host as columns (JSON decoded), sorted by key."""
        frame = pd.read_sql_query("SELECT * FROM runs ORDER BY key", self.conn)
        for col in ("config", "metrics", "versions", "host"):
            frame[col] = frame[col].map(json.loads)
        return frame

    def costs(self) -> pd.DataFrame:
        """Every cost figure, one row each: run, hardware, name, value, kind, unit."""
        return pd.read_sql_query("SELECT * FROM costs ORDER BY run, hardware, name", self.conn)

    def table(self, keys: Iterable[str] | None = None) -> pd.DataFrame:
        """Runs (those in ``keys``, if given) with their metrics flattened (``metric.NAME``) and one column per
        cost figure (``HARDWARE.NAME [kind]``): the wide table that exports and leaderboards read."""
        runs = self.runs()
        if keys is not None:
            runs = runs[runs["key"].isin(set(keys))].reset_index(drop=True)
        metrics = pd.json_normalize(runs["metrics"].tolist()).add_prefix("metric.")
        flat = pd.concat([runs.drop(columns=["metrics", "config", "versions", "host"]), metrics], axis=1)
        costs = self.costs()
        costs = costs[costs["run"].isin(set(runs["key"]))]
        if costs.empty:
            return flat
        costs["column"] = costs["hardware"] + "." + costs["name"] + " [" + costs["kind"] + "]"
        wide = costs.pivot(index="run", columns="column", values="value")
        return flat.merge(wide, left_on="key", right_index=True, how="left")

    def to_csv(self, path: str | os.PathLike, keys: Iterable[str] | None = None) -> Path:
        """Write :meth:`table` (of ``keys``) to ``path`` as CSV, atomically."""
        frame = self.table(keys)
        return atomic_write(self.export_path(path), lambda p: frame.to_csv(p, index=False))

    def to_parquet(self, path: str | os.PathLike, keys: Iterable[str] | None = None) -> Path:
        """Write :meth:`table` (of ``keys``) to ``path`` as Parquet, atomically."""
        frame = self.table(keys)
        return atomic_write(self.export_path(path), lambda p: frame.to_parquet(p, index=False))

    def export_path(self, path: str | os.PathLike) -> Path:
        """``path`` as a Path, refused (ValueError) if it is the store file itself."""
        path = Path(path)
        if path.resolve() == self.path.resolve():
            raise ValueError(f"export path {str(path)!r} is the store itself; choose another file name")
        return path

    def __len__(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.keys()))


def _run_row(run: dict[str, Any]) -> tuple[Any, ...]:
    check_type("run", run, dict, "a dict with the run's fields")
    missing = [c for c in RUN_COLUMNS if c not in run and c != "created"]
    if missing:
        raise ValueError(f"run is missing {missing}; a run has {list(RUN_COLUMNS)}")
    values = {**run, "created": run.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for col in ("config", "metrics", "versions", "host"):
        values[col] = json.dumps(check_type(col, run[col], dict, "a dict"), sort_keys=True, default=_json_scalar)
    point = run["point"]
    values["point"] = None if point is None else check_float("point", point, min_value=0.0)
    values["seed"] = check_int("seed", run["seed"], min_value=0)
    values["seconds"] = check_float("seconds", run["seconds"], min_value=0.0)
    for col in ("key", "method", "family", "task", "dataset", "arch"):
        values[col] = check_type(col, run[col], str, "a string")
    return tuple(values[c] for c in RUN_COLUMNS)


def _json_scalar(value: Any) -> Any:
    """numpy scalars in a run's JSON columns as plain numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable; give numbers, strings, lists or dicts")


def _cost_row(key: str, cost: dict[str, Any]) -> tuple[Any, ...]:
    check_type("cost", cost, dict, "a dict with hardware, name, value, kind and unit")
    missing = [k for k in ("hardware", "name", "value", "kind") if k not in cost]
    if missing:
        raise ValueError(f"cost {cost!r} is missing {missing}; a cost has hardware, name, value, kind and unit")
    kind = check_choice("kind", cost["kind"], KINDS)
    value = cost["value"]
    if isinstance(value, float) and math.isnan(value):
        value = None   # a figure that does not apply (e.g. fp32 layers on an int8-only target)
    value = None if value is None else check_float(f"value of cost {cost['hardware']}.{cost['name']}", value)
    return (key, str(cost["hardware"]), str(cost["name"]), value, kind, str(cost.get("unit", "")))
