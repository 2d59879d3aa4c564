"""Notebook housekeeping: find, normalize (strip volatile metadata) and lint the workbook's notebooks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import nbformat

from .results import project_root

SKELETON = ("Goals", "Setup", "Summary", "Exercises")
VOLATILE_CELL_METADATA = ("papermill", "execution", "collapsed", "scrolled", "ExecuteTime")
VOLATILE_NOTEBOOK_METADATA = ("papermill", "widgets", "toc", "varInspector")
PARAMETER_NAMES = ("profile", "seed", "dataset", "device")
# Test machinery stays out of the lesson: these phrases belong in an issue, not in a notebook.
MACHINERY_PHRASES = ("issue target", "(target", "target met", "target reached")
# Every Setup prints the machine it runs on (survey_lib.host), so timings are never read without it.
HOST_CALL = "describe_host("


def notebooks_dir() -> Path:
    """The project's ``notebooks/`` folder."""
    return project_root() / "notebooks"


def list_notebooks(folder: Path | None = None) -> list[Path]:
    """All workbook notebooks (``NN_name.ipynb``), in order."""
    folder = folder or notebooks_dir()
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb") if p.is_file())


def resolve_notebooks(names: list[str], folder: Path | None = None) -> list[Path]:
    """Map names (``01``, ``01_measuring_cost``, or a path) to notebook files; ValueError if unknown."""
    available = list_notebooks(folder)
    if not names:
        return available
    found = []
    for name in names:
        path = Path(name)
        if path.suffix == ".ipynb" and path.is_file():
            found.append(path.resolve())
            continue
        matches = [p for p in available if p.stem == name or p.stem.split("_", 1)[0] == name]
        if len(matches) != 1:
            accepted = ", ".join(p.stem for p in available)
            raise ValueError(f"notebook {name!r} is unknown or ambiguous; accepted values: {accepted}")
        found.append(matches[0])
    return found


def normalize(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Return a copy without volatile metadata or injected cells, with execution counts renumbered."""
    nb = copy.deepcopy(nb)
    for key in VOLATILE_NOTEBOOK_METADATA:
        nb.metadata.pop(key, None)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    count = 0
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type != "code" or cell.execution_count is None:
            continue
        count += 1
        cell.execution_count = count
        for out in cell.outputs:
            if "execution_count" in out:
                out["execution_count"] = count
    return nb


def lint(nb: nbformat.NotebookNode) -> list[str]:
    """Problems with a committed notebook: volatile metadata, missing skeleton, bad parameters cell, errors."""
    problems = []
    if nbformat.writes(normalize(nb)) != nbformat.writes(nb):
        problems.append("not normalized (volatile metadata or execution counts): run `survey-lib refresh`")
    problems += _lint_parameters(nb)
    headings = " ".join(c.source for c in nb.cells if c.cell_type == "markdown")
    problems += [f"missing skeleton section '## {s}'" for s in SKELETON if f"## {s}" not in headings]
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and any(o.get("output_type") == "error" for o in cell.outputs):
            problems.append(f"cell {i} carries an error output")
        found = [p for p in MACHINERY_PHRASES if p in cell.source.lower()]
        if found:
            problems.append(f"cell {i} mentions test machinery ({found[0]!r}): keep it out of the lesson")
    if not any(c.cell_type == "code" and HOST_CALL in c.source for c in nb.cells):
        problems.append("Setup does not print the host: call survey_lib.host.describe_host()")
    if not any(c.cell_type == "code" and c.outputs for c in nb.cells):
        problems.append("no outputs: committed notebooks carry the outputs of the default profile")
    return problems


def _lint_parameters(nb: nbformat.NotebookNode) -> list[str]:
    code = [c for c in nb.cells if c.cell_type == "code"]
    if not code or "parameters" not in code[0].metadata.get("tags", []):
        return ["the first code cell must be tagged 'parameters' (papermill)"]
    missing = [p for p in PARAMETER_NAMES if f"{p} =" not in code[0].source]
    return [f"parameters cell does not set {p!r}" for p in missing]


def parameter_names(nb: nbformat.NotebookNode) -> list[str]:
    """Names assigned in the notebook's ``parameters`` cell (what papermill may override)."""
    import re

    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    return re.findall(r"^([A-Za-z_]\w*)\s*=", cells[0].source, flags=re.M) if cells else []


def check_parameters(nb: nbformat.NotebookNode, parameters: dict[str, Any], name: str = "notebook") -> None:
    """ValueError unless every key of ``parameters`` is set in the notebook's parameters cell."""
    accepted = parameter_names(nb)
    unknown = [k for k in parameters if k not in accepted]
    if unknown:
        raise ValueError(f"{name} has no parameter {unknown[0]!r}; accepted values: {', '.join(accepted) or 'none'}")


def read(path: Path) -> nbformat.NotebookNode:
    """Read a notebook as nbformat v4."""
    return nbformat.read(str(path), as_version=4)


def key_results(data: dict[str, Any], limit: int = 8) -> list[tuple[str, Any, str, str]]:
    """The first ``limit`` results of a result file as (name, value, unit, kind) rows."""
    rows = [(k, v["value"], v["unit"], v["kind"]) for k, v in data.get("results", {}).items()]
    return rows[:limit]
