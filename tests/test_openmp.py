"""Tests for survey_lib._openmp: the short OpenMP spin reaches child processes without overriding the user."""

from __future__ import annotations

import os
import subprocess
import sys

from survey_lib._openmp import SPIN_ENV, set_openmp_wait


def test_set_openmp_wait_fills_only_what_is_unset():
    env = {"GOMP_SPINCOUNT": "50000", "OTHER": "x"}
    set_openmp_wait(env)
    assert env == {"GOMP_SPINCOUNT": "50000", "OTHER": "x"}   # the user's choice stays
    empty: dict[str, str] = {}
    set_openmp_wait(empty)
    assert empty == SPIN_ENV


def test_the_test_session_and_its_children_have_it():
    """conftest sets it before torch is imported, so notebook kernels and subprocesses inherit it."""
    assert all(os.environ.get(k) for k in SPIN_ENV)
    code = "import os; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    print(f"GOMP_SPINCOUNT in a child process: {out}")
    assert out == os.environ["GOMP_SPINCOUNT"]


def test_the_cli_sets_it_for_the_kernels_and_workers_it_starts(monkeypatch, capsys):
    from survey_lib import cli

    for name in SPIN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["bench", "--dry-run"]) == 0
    print(capsys.readouterr().out.splitlines()[0])
    assert all(os.environ.get(k) == v for k, v in SPIN_ENV.items())
