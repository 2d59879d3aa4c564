"""The runner executes notebooks headless, writes HTML, an index and results, and fails loudly."""

import json

import nbformat
import pytest

from survey_lib import cli


def _write_notebook(path, body):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("profile = 'default'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


def test_run_writes_executed_html_results_and_index(tmp_path, capsys):
    good = _write_notebook(
        tmp_path / "98_good.ipynb",
        "from survey_lib import results\nresults.use_notebook('98_good')\n"
        "results.record('answer', 42, kind='counted', unit='', profile=profile)",
    )
    out = tmp_path / "build"
    assert cli.main(["run", str(good), "--output", str(out), "--profile", "full"]) == 0
    assert (out / "98_good.ipynb").exists() and (out / "98_good.html").exists()
    data = json.loads((out / "results" / "98_good.json").read_text())
    assert data["results"]["answer"]["config"] == {"profile": "full"}
    index = (out / "index.html").read_text()
    assert "98_good" in index and "answer" in index and "ok" in index
    assert "[1/1] 98_good: ok" in capsys.readouterr().out


def test_run_fails_with_nonzero_exit_on_a_failing_cell(tmp_path, capsys):
    bad = _write_notebook(tmp_path / "97_bad.ipynb", "assert 1 + 1 == 3, 'arithmetic is broken'")
    assert cli.main(["run", str(bad), "--output", str(tmp_path / "b")]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "arithmetic is broken" in captured.err
    assert "FAILED" in (tmp_path / "b" / "index.html").read_text()


def test_unknown_notebook_is_a_clear_error(capsys):
    assert cli.main(["run", "no_such_notebook"]) == 2
    assert "accepted values" in capsys.readouterr().err


def test_unknown_profile_is_rejected():
    with pytest.raises(SystemExit):
        cli.main(["run", "--profile", "huge"])


def test_refresh_stores_normalized_outputs_in_place(tmp_path):
    nb_path = _write_notebook(tmp_path / "96_fresh.ipynb", "print(6 * 7)")
    assert cli.main(["refresh", str(nb_path), "--output", str(tmp_path / "never_made" / "r")]) == 0
    nb = nbformat.read(str(nb_path), as_version=4)
    assert nb.cells[1].outputs[0]["text"] == "42\n"
    assert nb.cells[1].execution_count == 2
    assert "papermill" not in nb.metadata and "papermill" not in nb.cells[1].metadata
    assert "execution" not in nb.cells[1].metadata
