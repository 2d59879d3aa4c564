"""Bad input fails early with a message naming the parameter (see DEVELOPERS guide)."""

import numpy as np
import pytest
import torch

from survey_lib._validate import check_float, check_int, check_seed
from survey_lib.cost import latency_grid, profile
from survey_lib.data import load
from survey_lib.models import build_model
from survey_lib.tasks import task_for
from survey_lib.train import evaluate, fit


def test_numbers_and_seeds():
    assert check_int("n", np.int64(3)) == 3 and isinstance(check_int("n", np.int64(3)), int)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        check_float("lr", float("nan"))
    with pytest.raises(ValueError, match="lr must be a finite number"):
        check_float("lr", float("inf"))
    with pytest.raises(ValueError, match=r"seed=.* out of range"):
        check_seed(2**70)
    with pytest.raises(TypeError, match="n must be an int"):
        check_int("n", 2.0)


def test_empty_splits_and_bad_training_arguments():
    with pytest.raises(ValueError, match="test split of 'digits' is empty"):
        load("digits", n=3)
    data = load("digits", n=100)
    task = task_for(data)
    model = build_model("mlp", task, in_channels=1, image_size=8)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fit("not a model", task, data.train, epochs=1)
    with pytest.raises(TypeError, match="task must be a survey_lib.tasks.Task"):
        fit(model, "classification", data.train, epochs=1)
    with pytest.raises(ValueError, match="data is empty"):
        evaluate(model, task, torch.utils.data.TensorDataset(torch.empty(0, 1, 8, 8), torch.empty(0)))


def test_cost_inputs():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    with pytest.raises(ValueError, match="batch >= 1"):
        profile(model, torch.randn(0, 3, 8, 8))
    with pytest.raises(ValueError, match="unsqueeze"):
        profile(model, torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="batches must name at least one value"):
        latency_grid(model, torch.randn(1, 3, 8, 8), batches=())
