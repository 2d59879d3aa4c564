"""OpenMP waiting for the processes this project starts (kernels, test runs, sweep workers).

libgomp, the OpenMP runtime of torch's Linux wheels, lets a thread that reaches a barrier spin about 300,000
times before it sleeps. On a 2-core machine whose other core is busy (another program, or the kernel's own
threads), a 2-thread team then burns its core spinning while it waits for its descheduled partner. Measured
on the project's 2-core host (two 1-epoch fine-tunes on the shapes segmentation baseline, median of 2-3 runs):
with one core kept busy by another process, 24 s at the default spin count and 18.6 s at 1000 spins; on a
quiet machine no difference beyond the noise (9.3 s and 9.3 s). It never changes a trained weight or a metric,
only how threads wait (2-thread timings may move).
The variable is read when torch is imported, so it is set here, in the environment that child processes
inherit, and only where the user has set neither it nor OMP_WAIT_POLICY.
"""

from __future__ import annotations

import os
from typing import MutableMapping

SPIN_ENV = {"GOMP_SPINCOUNT": "1000"}


def set_openmp_wait(env: MutableMapping[str, str] | None = None) -> None:
    """Set the short OpenMP spin (``SPIN_ENV``) in ``env`` (default: this process's environment), unless the user
    chose a spin count or a wait policy (libgomp lets GOMP_SPINCOUNT override OMP_WAIT_POLICY)."""
    target = os.environ if env is None else env
    if "OMP_WAIT_POLICY" in target:
        return
    for name, value in SPIN_ENV.items():
        target.setdefault(name, value)
