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
    assert (out / "leaderboard.html").exists() and 'href="index.html"' in (out / "98_good.html").read_text()  # the site
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


def test_run_passes_parameters_to_papermill(tmp_path):
    nb = _write_notebook(tmp_path / "95_params.ipynb",
                         "from survey_lib import results\nresults.use_notebook('95_params')\n"
                         "results.record('seed_seen', seed, kind='counted', unit='', dataset=dataset)")
    cell = nbformat.read(str(nb), as_version=4)
    cell.cells[0].source = "profile = 'default'\nseed = 0\ndataset = 'shapes'"
    nbformat.write(cell, str(nb))
    out = tmp_path / "b"
    assert cli.main(["run", str(nb), "--output", str(out), "-p", "seed", "3", "-p", "dataset", "digits"]) == 0
    data = json.loads((out / "results" / "95_params.json").read_text())
    assert data["results"]["seed_seen"]["value"] == 3
    assert data["results"]["seed_seen"]["config"] == {"dataset": "digits"}
    assert data["host"]["cpu_model"] and "features" in data["host"]  # every results file says where it ran


def test_parse_value_reads_like_papermill():
    assert cli.parse_value("3") == 3 and cli.parse_value("0.5") == 0.5
    assert cli.parse_value("True") is True and cli.parse_value("None") is None
    assert cli.parse_value("digits") == "digits"


@pytest.mark.parametrize("argv,message", [
    (["run", "00", "--timeout", "-5"], "--timeout"),
    (["run", "00", "--timeout", "abc"], "--timeout"),
    (["run", "00", "-p", "1x", "2"], "identifier"),
    (["run", "00", "-p", "profile", "full"], "--profile"),
    (["bogus"], "invalid choice"),
])
def test_bad_arguments_give_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_unknown_notebook_parameter_names_the_accepted_ones(capsys):
    assert cli.main(["run", "00", "-p", "sed", "1"]) == 2
    err = capsys.readouterr().err
    assert "'sed'" in err and "accepted values" in err and "seed" in err


def test_check_fails_without_notebooks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.nbtools, "notebooks_dir", lambda: tmp_path)
    monkeypatch.setattr(cli.nbtools, "list_notebooks", lambda folder=None: [])
    assert cli.main(["check"]) == 1
    assert "no notebooks found" in capsys.readouterr().err


def test_info_prints_the_host(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CPU:" in out and "torch" in out
    assert cli.main(["info", "--json"]) == 0
    assert "features" in json.loads(capsys.readouterr().out)


def test_cell_timeout_follows_the_profile_unless_given():
    assert cli.cell_timeout(None, "default") == 900
    assert cli.cell_timeout(None, "full") > cli.cell_timeout(None, "default")
    assert cli.cell_timeout(60, "full") == 60
    args = cli.build_parser().parse_args(["run", "05", "--profile", "full"])
    assert args.timeout is None and cli.cell_timeout(args.timeout, args.profile) == cli.CELL_TIMEOUT_S["full"]
