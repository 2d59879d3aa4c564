"""Test-wide settings, shared by unit tests and nbval notebook runs (kernels inherit the env)."""

import os
import tempfile


def pytest_configure(config):
    """Quiet progress bars and send notebook results to a throw-away folder."""
    os.environ["SURVEY_LIB_PROGRESS"] = "0"
    os.environ.setdefault("SURVEY_LIB_RESULTS_DIR", tempfile.mkdtemp(prefix="survey_lib_results_"))
