"""Run sizes ('profiles'): the default fits a 2-core laptop, 'full' is a bigger budget."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator

import numpy as np
import torch

from ._validate import check_bool, check_choice, check_int, check_seed

PROFILES = ("default", "full")
DEFAULT_THREADS = 2


def check_profile(profile: str) -> str:
    """Return ``profile`` if it is a known run size, else raise ValueError."""
    return check_choice("profile", profile, PROFILES)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Set torch's intra-op thread count for the block, then restore the previous value."""
    check_int("threads", threads, min_value=1, max_value=256)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int, threads: int | None = DEFAULT_THREADS, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch, fix torch's intra-op thread count and turn on deterministic kernels.

    What it guarantees: with the same ``seed``, thread count, CPU model and library versions, repeating a
    run in one process gives bit-identical weights and stored files on the CPU (tests check ``fit`` and
    ``kmeans_share`` at 2 threads, run twice). Across processes the results agree to within 1e-6, and
    usually bit for bit: at 2 threads about 1 fresh process in 20 fine-tuned ``kmeans_share`` to other
    last bits (7 of ~140 measured), a cause not yet found. It does not promise equal bits across thread
    counts, CPU models (AVX2, AVX-512, AMX and NEON kernels round differently) or torch/NumPy/ONNX Runtime
    versions, nor equal timings.
    ``deterministic=True`` calls ``torch.use_deterministic_algorithms(True, warn_only=True)``: on the CPU
    accumulating index writes become serial (cheap at this workbook's sizes), an op with no deterministic
    kernel warns instead of failing, and uninitialized memory is not filled (no cost per allocation);
    ``deterministic=False`` leaves torch's setting as it is. ``PYTHONHASHSEED`` is set for child processes
    only: ``hash()`` of a str in this process stays randomized.
    """
    check_seed(seed)
    check_bool("deterministic", deterministic)
    if threads is not None:
        check_int("threads", threads, min_value=1)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
