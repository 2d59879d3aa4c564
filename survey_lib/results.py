"""Machine-readable results: ``record(name, value, kind, unit)`` -> ``build/results/<notebook>.json``."""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._io import atomic_write_json
from ._validate import check_choice
from .host import host_info

KINDS = ("counted", "measured", "estimated")
_state: dict[str, str | None] = {"notebook": None}


def project_root(start: Path | None = None) -> Path:
    """The nearest folder above ``start`` (default: cwd) holding this project's pyproject.toml, else cwd."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "survey_lib").is_dir():
            return folder
    return start


def results_dir() -> Path:
    """Folder for result files: ``$SURVEY_LIB_RESULTS_DIR`` or ``<project>/build/results``."""
    env = os.environ.get("SURVEY_LIB_RESULTS_DIR")
    return Path(env) if env else project_root() / "build" / "results"


def use_notebook(notebook: str, *, reset: bool = True) -> Path:
    """Send later ``record`` calls to ``<results_dir>/<notebook>.json``; ``reset`` drops stale results.

    The file also stores ``host``: the machine the figures were measured on (``survey_lib.host.host_info``)."""
    if not isinstance(notebook, str) or not notebook or "/" in notebook or "\\" in notebook:
        raise ValueError(f"notebook must be a non-empty file stem without slashes, got {notebook!r}")
    _state["notebook"] = notebook
    path = results_path(notebook)
    if reset:
        atomic_write_json(path, {"notebook": notebook, "host": host_info(), "results": {}})
    return path


def current_notebook() -> str:
    """The notebook results go to: set by ``use_notebook`` or ``$SURVEY_LIB_NOTEBOOK``."""
    name = _state["notebook"] or os.environ.get("SURVEY_LIB_NOTEBOOK")
    if not name:
        raise RuntimeError("no notebook selected: call survey_lib.results.use_notebook('<name>') first")
    return name


def results_path(notebook: str) -> Path:
    """Path of the result file for ``notebook``."""
    return results_dir() / f"{notebook}.json"


def record(name: str, value: Any, kind: str, unit: str, **config: Any) -> None:
    """Record one figure, labelled counted/measured/estimated, with its unit and settings."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    check_choice("kind", kind, KINDS)
    if not isinstance(unit, str):
        raise TypeError(f"unit must be a string (use '' for a pure number), got {type(unit).__name__}")
    value = _as_number(value)
    entry = {
        "value": value,
        "kind": kind,
        "unit": unit,
        "config": _jsonable(config),
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    notebook = current_notebook()
    data = load(notebook)
    data.setdefault("host", host_info())
    data["results"][name] = entry
    atomic_write_json(results_path(notebook), data)


def load(notebook: str, directory: str | Path | None = None) -> dict[str, Any]:
    """Read the result file of ``notebook`` (an empty record set if it does not exist yet)."""
    path = (Path(directory) if directory else results_dir()) / f"{notebook}.json"
    if not path.exists():
        return {"notebook": notebook, "results": {}}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _as_number(value: Any) -> float | int | bool:
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, bool) or isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"value must be finite, got {value!r}")
        return value
    raise TypeError(f"value must be a number (int, float, bool), got {type(value).__name__}")


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(config)
    except TypeError as exc:
        raise TypeError(f"config values must be JSON-serialisable: {exc}") from None
    return config
