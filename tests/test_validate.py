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


def test_tensor_label_and_forward_helpers():
    from torch import nn

    from survey_lib._validate import check_bool, check_finite, check_labels, check_mapping, check_tensor, run_forward

    with pytest.raises(TypeError, match="flag must be True or False"):
        check_bool("flag", 1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor of shape"):
        check_tensor("x", [1.0], ndim=2, shape="(n, 4)")
    with pytest.raises(ValueError, match=r"x must have shape \(n, 4\), got \(3,\)"):
        check_tensor("x", torch.zeros(3), ndim=2, shape="(n, 4)")
    with pytest.raises(ValueError, match="x must be finite"):
        check_finite("x", torch.tensor([0.0, float("inf")]))
    assert check_finite("codes", torch.tensor([1, 2])).dtype == torch.int64  # integers are always finite
    with pytest.raises(ValueError, match="target holds class 3; accepted classes: 0..2"):
        check_labels("target", torch.tensor([0, 3]), 3)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        check_labels("target", torch.tensor([0.0]), 3)
    with pytest.raises(TypeError, match="plan must be a dict"):
        check_mapping("plan", [1], "a dict")
    with pytest.raises(ValueError, match=r"batches of shape \(2, 5\) .* does not fit model"):
        run_forward(nn.Linear(3, 1), torch.zeros(2, 5), "batches")


def test_model_data_mismatch_is_one_mechanism():
    """fit, evaluate, calibrate and profile report a model/input mismatch through the same run_forward."""
    from survey_lib.methods import quantization as Q

    data = load("digits", n=100)
    task = task_for(data)
    model = build_model("vgg", task, in_channels=3, width=0.25, image_size=8)
    x = torch.randn(2, 1, 8, 8)
    calls = (lambda: fit(model, task, data.train, epochs=1), lambda: evaluate(model, task, data.test),
             lambda: Q.calibrate(Q.prepare(model), [x]), lambda: profile(model, x))
    for call in calls:
        with pytest.raises(ValueError, match=r"does not fit model.*: .*expected input.* to have 3 channels"):
            call()


def test_check_device_accepts_the_cpu_and_names_the_accepted_values_otherwise():
    import torch

    from survey_lib._validate import check_device

    assert check_device("cpu") == "cpu" and check_device(torch.device("cpu")) == "cpu"
    for bad in ("gpu", "cpu:1", "cuda:x", ""):
        with pytest.raises(ValueError, match=r"device=.*accepted values: 'cpu', 'cuda', 'cuda:N'"):
            check_device(bad)
    with pytest.raises(TypeError, match="device must be a str"):
        check_device(0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"sees 0 CUDA device\(s\); accepted values here: 'cpu'"):
            check_device("cuda")
