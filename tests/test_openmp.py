"""Tests for survey_lib._openmp: the short OpenMP spin reaches child processes without overriding the user."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from survey_lib._openmp import SPIN_ENV, set_openmp_wait


def test_set_openmp_wait_fills_only_what_is_unset():
    env = {"GOMP_SPINCOUNT": "50000", "OTHER": "x"}
    set_openmp_wait(env)
    assert env == {"GOMP_SPINCOUNT": "50000", "OTHER": "x"}   # the user's choice stays
    empty: dict[str, str] = {}
    set_openmp_wait(empty)
    assert empty == SPIN_ENV
    policy = {"OMP_WAIT_POLICY": "PASSIVE"}
    set_openmp_wait(policy)
    assert policy == {"OMP_WAIT_POLICY": "PASSIVE"}   # a spin count would override the user's policy


@pytest.mark.skipif("OMP_WAIT_POLICY" in os.environ, reason="the user chose a wait policy, which it leaves alone")
def test_the_test_session_and_its_children_have_it():
    """conftest sets it before torch is imported, so notebook kernels and subprocesses inherit it."""
    assert all(os.environ.get(k) for k in SPIN_ENV)
    code = "import os; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    print(f"GOMP_SPINCOUNT in a child process: {out}")
    assert out == os.environ["GOMP_SPINCOUNT"]


_AT_TORCH_IMPORT = """
import builtins, os
real, seen = builtins.__import__, []
def spy(name, *args, **kwargs):
    if name.split(".")[0] == "torch" and not seen:
        seen.append(os.environ.get("GOMP_SPINCOUNT"))
    return real(name, *args, **kwargs)
builtins.__import__ = spy
import survey_lib.cli
print(seen[0] if seen else "torch never imported")
"""


def test_the_cli_sets_it_before_torch_is_imported():
    """libgomp reads it when torch loads: the console script's own process (the sweep trains there) must have it."""
    env = {k: v for k, v in os.environ.items() if k not in SPIN_ENV and k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", _AT_TORCH_IMPORT], capture_output=True, text=True, check=True, env=env)
    print(f"GOMP_SPINCOUNT when survey_lib.cli first imports torch: {out.stdout.strip()}")
    assert out.stdout.strip() == SPIN_ENV["GOMP_SPINCOUNT"]
