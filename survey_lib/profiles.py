"""Run sizes ('profiles'): the default fits a 2-core laptop, 'full' is a bigger budget."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from ._validate import check_choice, check_int, check_seed

PROFILES = ("default", "full")
DEFAULT_THREADS = 2


def check_profile(profile: str) -> str:
    """Return ``profile`` if it is a known run size, else raise ValueError."""
    return check_choice("profile", profile, PROFILES)


def seed_everything(seed: int, threads: int | None = DEFAULT_THREADS) -> None:
    """Seed Python, NumPy and torch, and fix torch's intra-op thread count for determinism."""
    check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if threads is not None:
        check_int("threads", threads, min_value=1)
        torch.set_num_threads(threads)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
