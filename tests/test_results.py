import json

import numpy as np
import pytest

from survey_lib import results


@pytest.fixture
def rdir(tmp_path, monkeypatch):
    monkeypatch.setenv("SURVEY_LIB_RESULTS_DIR", str(tmp_path))
    results.use_notebook("99_test")
    return tmp_path


def test_record_writes_json_with_kind_unit_and_config(rdir):
    results.record("macs", 1234, kind="counted", unit="MAC", batch=1)
    results.record("speedup", np.float64(2.5), kind="measured", unit="x")
    data = json.loads((rdir / "99_test.json").read_text())
    assert data["results"]["macs"]["value"] == 1234
    assert data["results"]["macs"]["config"] == {"batch": 1}
    assert data["results"]["speedup"] == {**data["results"]["speedup"], "value": 2.5, "kind": "measured"}
    assert results.load("99_test")["results"].keys() == {"macs", "speedup"}


def test_use_notebook_resets_stale_results(rdir):
    results.record("old", 1, kind="counted", unit="")
    results.use_notebook("99_test")
    assert results.load("99_test")["results"] == {}


def test_no_temp_files_left_behind(rdir):
    for i in range(5):
        results.record(f"x{i}", i, kind="counted", unit="")
    assert [p.name for p in rdir.iterdir()] == ["99_test.json"]


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(name="a", value=1, kind="guessed", unit=""), ValueError),
        (dict(name="", value=1, kind="counted", unit=""), ValueError),
        (dict(name="a", value="1", kind="counted", unit=""), TypeError),
        (dict(name="a", value=float("nan"), kind="counted", unit=""), ValueError),
        (dict(name="a", value=1, kind="counted", unit=3), TypeError),
    ],
)
def test_record_rejects_bad_input(rdir, kwargs, exc):
    with pytest.raises(exc):
        results.record(**kwargs)


def test_kind_error_names_accepted_values(rdir):
    with pytest.raises(ValueError, match="counted.*measured.*estimated"):
        results.record("a", 1, kind="guessed", unit="")


def test_bad_notebook_name():
    with pytest.raises(ValueError, match="notebook"):
        results.use_notebook("a/b")
