"""Test-wide settings, shared by unit tests and nbval notebook runs (kernels inherit the env)."""

import os
import tempfile

from survey_lib._openmp import set_openmp_wait

set_openmp_wait()   # before any test imports torch; nbval's kernels inherit it (see survey_lib._openmp)


def pytest_configure(config):
    """Quiet progress bars and send notebook results to a throw-away folder."""
    os.environ["SURVEY_LIB_PROGRESS"] = "0"
    os.environ.setdefault("SURVEY_LIB_RESULTS_DIR", tempfile.mkdtemp(prefix="survey_lib_results_"))
