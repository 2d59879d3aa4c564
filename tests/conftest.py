"""Fixtures shared by the method tests: a small digits context and a briefly trained tiny CNN."""

from __future__ import annotations

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
