"""Fixtures shared by the method tests: a small digits context and a briefly trained tiny CNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from survey_lib.data import load
from survey_lib.methods import Context
from survey_lib.models import build_model
from survey_lib.tasks import task_for


def tiny_cnn(ctx: Context, seed: int = 0) -> torch.nn.Module:
    """An untrained VGG-style CNN at width 0.25 for 8x8 digits (8 -> 16 -> 32 channels)."""
    torch.manual_seed(seed)
    return build_model("vgg", ctx.task, in_channels=1, width=0.25, image_size=8)


@pytest.fixture(scope="module")
def ctx() -> Context:
    """240 digits, budget 1 epoch, batch 32, lr 1e-3."""
    data = load("digits", "classification", n=240)
    return Context(task=task_for(data), data=data, budget=1, batch_size=32, lr=1e-3)


@pytest.fixture(scope="module")
def trained(ctx: Context) -> torch.nn.Module:
    """tiny_cnn trained 4 epochs at lr 1e-2, in eval mode (tests that change it copy it first)."""
    model = tiny_cnn(ctx)
    ctx.finetune(model, epochs=4, lr=1e-2)
    return model.eval()


@pytest.fixture
def bad_files(tmp_path):
    """Writes a good file's bytes broken the usual ways (empty, random, truncated, wrong magic) plus another
    format's valid file; returns {case: path}, each path named after its case with the given suffix."""

    def write(good: bytes, other: bytes, suffix: str) -> dict:
        variants = {"empty": b"", "random": np.random.default_rng(0).bytes(300), "truncated": good[: len(good) // 2],
                    "wrong magic": b"NOTMAGIC" + good[8:], "another format": other}
        paths = {case: tmp_path / f"{case.replace(' ', '_')}{suffix}" for case in variants}
        for case, data in variants.items():
            paths[case].write_bytes(data)
        return paths

    return write


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convs and tiny nets trained by ``fit`` (which keeps the caller's thread count): one thread avoids
    OpenMP oversubscription on a shared 2-core host (10-100x faster here on busy days)."""
    from survey_lib.profiles import torch_threads

    with torch_threads(1):
        yield
