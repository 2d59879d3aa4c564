"""Committed notebooks are normalized, follow the skeleton and carry outputs; the tools behave."""

import copy

import nbformat
import pytest

from survey_lib import notebooks as nbtools

COMMITTED = nbtools.list_notebooks()


def test_workbook_has_notebooks():
    names = [p.stem for p in COMMITTED]
    assert "00_landscape" in names and "01_measuring_cost" in names


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_committed_notebook_is_clean(path):
    assert nbtools.lint(nbtools.read(path)) == []


def _tiny_notebook():
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("profile = 'default'\nseed = 0\ndataset = 'digits'\ndevice = 'cpu'")
    params.metadata["tags"] = ["parameters"]
    setup = nbformat.v4.new_code_cell("from survey_lib.host import describe_host\nprint(describe_host())")
    body = nbformat.v4.new_code_cell("1 + 1", execution_count=7)
    body.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=7)]
    body.metadata["papermill"] = {"duration": 0.1}
    body.metadata["execution"] = {"iopub.status.busy": "2026-01-01"}
    md = nbformat.v4.new_markdown_cell("## Goals\n## Setup\n## Summary\n## Exercises")
    nb.cells = [md, params, setup, body]
    nb.metadata["papermill"] = {"start_time": "now"}
    return nb


def test_normalize_strips_volatile_metadata_and_renumbers():
    nb = _tiny_notebook()
    clean = nbtools.normalize(nb)
    assert "papermill" not in clean.metadata
    assert clean.cells[3].metadata == {}
    assert clean.cells[3].execution_count == 1
    assert clean.cells[3].outputs[0]["execution_count"] == 1
    assert nb.cells[3].execution_count == 7  # input untouched
    assert nbtools.lint(clean) == []


def test_lint_flags_volatile_metadata_missing_sections_and_parameters():
    nb = _tiny_notebook()
    assert any("not normalized" in p for p in nbtools.lint(nb))
    broken = copy.deepcopy(nbtools.normalize(nb))
    broken.cells[0].source = "## Goals"
    broken.cells[1].metadata["tags"] = []
    problems = nbtools.lint(broken)
    assert "missing skeleton section '## Summary'" in problems
    assert any("parameters" in p for p in problems)


def test_lint_flags_error_outputs():
    nb = nbtools.normalize(_tiny_notebook())
    nb.cells[3].outputs.append(nbformat.v4.new_output("error", ename="AssertionError", evalue="", traceback=[]))
    assert any("error output" in p for p in nbtools.lint(nb))


def test_lint_keeps_test_machinery_out_and_asks_for_the_host():
    nb = nbtools.normalize(_tiny_notebook())
    nb.cells[3].source = "assert x > 1  # (issue target)"
    assert any("test machinery" in p for p in nbtools.lint(nb))
    nb.cells[2].source = "print('no host here')"
    assert any("describe_host" in p for p in nbtools.lint(nb))


def test_resolve_notebooks_by_prefix_and_unknown_name():
    assert [p.stem for p in nbtools.resolve_notebooks(["01"])] == ["01_measuring_cost"]
    with pytest.raises(ValueError, match="accepted values: 00_landscape"):
        nbtools.resolve_notebooks(["99_nope"])
