"""Tests for survey_lib.models: shapes for every arch x task, width/depth knobs, invalid combinations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from survey_lib.models import ARCHS, TaskModel, build_model, count_params, num_downsamplings, vgg_layout
from survey_lib.tasks import get_task

TASKS = {"classification": 5, "regression": 1, "detection": 5, "segmentation": 6}
ALLOWED = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear, nn.Flatten,
           nn.Unflatten, nn.Identity, nn.Upsample, nn.Sequential, TaskModel)


def expected_shape(task: str, batch: int, size: int, grid: int) -> tuple[int, ...]:
    return {"classification": (batch, 5), "regression": (batch, 1), "detection": (batch, 10, grid, grid),
            "segmentation": (batch, 6, size, size)}[task]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("task_name", list(TASKS))
@pytest.mark.parametrize("size, channels", [(32, 3), (8, 1)])
def test_output_shapes_for_every_arch_and_task(arch, task_name, size, channels):
    task = get_task(task_name, num_classes=TASKS[task_name], image_size=size)
    if arch == "mlp" and task_name in ("detection", "segmentation"):
        with pytest.raises(ValueError, match="mlp"):
            build_model(arch, task, in_channels=channels)
        return
    model = build_model(arch, task, in_channels=channels, width=0.25).eval()
    out = model(torch.randn(2, channels, size, size))
    grid = model.backbone(torch.randn(1, channels, size, size)).shape[-1]
    assert out.shape == expected_shape(task_name, 2, size, grid)
    if arch != "mlp":
        assert grid >= 4  # dense heads need a real grid, even at 8x8


@pytest.mark.parametrize("arch", ARCHS)
def test_width_and_depth_change_parameter_count(arch):
    task = get_task("classification", num_classes=10, image_size=16)
    base = count_params(build_model(arch, task, in_channels=3))
    wider = count_params(build_model(arch, task, in_channels=3, width=2.0))
    narrower = count_params(build_model(arch, task, in_channels=3, width=0.5))
    deeper = count_params(build_model(arch, task, in_channels=3, depth=3))
    assert narrower < base < wider
    assert deeper > base


def test_main_vgg_layout_and_macs():
    assert vgg_layout(1.0, 2, 32) == [32, 32, "M", 64, 64, "M", 128, 128, "M"]
    assert vgg_layout(1.0, 2, 8) == [32, 32, "M", 64, 64, 128, 128]
    assert [num_downsamplings(s) for s in (4, 8, 16, 32, 64)] == [0, 1, 2, 3, 3]
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model("vgg", get_task("classification", num_classes=5), in_channels=3).eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    macs = counter.get_total_flops() / 2
    assert 35e6 < macs < 42e6  # tens of MMACs: latency is compute-dominated


@pytest.mark.parametrize("arch", ARCHS)
def test_only_prunable_exportable_modules(arch):
    task = get_task("segmentation" if arch != "mlp" else "regression", num_classes=6 if arch != "mlp" else 1)
    model = build_model(arch, task, in_channels=3)
    for module in model.modules():
        if type(module).__module__.startswith("torch"):
            assert isinstance(module, ALLOWED), type(module)
    assert model.config["arch"] == arch and model.config["image_size"] == 32


def test_models_train_a_step_and_are_seeded():
    task = get_task("classification", num_classes=3, image_size=8)
    torch.manual_seed(0)
    a = build_model("resnet", task, in_channels=1)
    torch.manual_seed(0)
    b = build_model("resnet", task, in_channels=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    before = copy.deepcopy(a.state_dict())
    loss = task.loss(a(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    torch.optim.SGD(a.parameters(), lr=0.1).step()
    assert any(not torch.equal(before[k], v) for k, v in a.state_dict().items())


@pytest.mark.parametrize(
    "args, kwargs, error",
    [(("transformer",), {"in_channels": 3}, ValueError), (("vgg",), {"in_channels": 0}, ValueError),
     (("vgg",), {"in_channels": 3, "width": 0.0}, ValueError), (("vgg",), {"in_channels": 3, "depth": 0}, ValueError),
     (("vgg",), {"in_channels": 3, "image_size": 2}, ValueError), (("vgg",), {"in_channels": 3.0}, TypeError)],
)
def test_build_model_rejects_bad_arguments(args, kwargs, error):
    task = get_task("classification", num_classes=3)
    with pytest.raises(error):
        build_model(*args, task, **kwargs)


def test_build_model_needs_a_task_object():
    with pytest.raises(TypeError, match="Task"):
        build_model("vgg", "classification", in_channels=3)


def test_conv_block_dense_vs_depthwise_separable():
    import torch

    from survey_lib.models import conv_block

    x = torch.randn(1, 16, 8, 8)
    dense, separable = conv_block("dense", 16, 32), conv_block("depthwise_separable", 16, 32)
    assert dense(x).shape == separable(x).shape == (1, 32, 8, 8)
    assert sum(p.numel() for p in separable.parameters()) < sum(p.numel() for p in dense.parameters())
    with pytest.raises(ValueError, match="kind.*dense.*depthwise_separable"):
        conv_block("grouped", 16, 32)


# ---------------------------------------------------------------------------------------------- bad input
def test_width_below_the_channel_floor_is_rejected_with_the_smallest_accepted_width():
    from survey_lib.models import MIN_CHANNELS, min_width

    task = get_task("classification", num_classes=10, image_size=8)
    for arch in ARCHS:
        smallest = min_width(arch)
        with pytest.raises(ValueError, match=rf"width=0.001 .* accepted: {smallest!r} <= width"):
            build_model(arch, task, in_channels=1, width=0.001)
        model = build_model(arch, task, in_channels=1, width=smallest)
        widths = [m.out_channels for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
        widths += [m.out_features for m in model.backbone.modules() if isinstance(m, nn.Linear)]
        assert min(widths) == MIN_CHANNELS and model.config["width"] == smallest


BAD_MODEL_CALLS = [
    (lambda: vgg_layout(0.0, 2, 32), ValueError, "width"),
    (lambda: vgg_layout(1.0, 0, 32), ValueError, "depth"),
    (lambda: num_downsamplings(0), ValueError, "image_size"),
    (lambda: num_downsamplings(32, -1), ValueError, "max_down"),
    (lambda: count_params("model"), TypeError, "model"),
    (lambda: TaskModel("backbone", nn.Identity(), {}), TypeError, "backbone"),
    (lambda: TaskModel(nn.Identity(), nn.Identity(), None), TypeError, "config"),
    (lambda: build_model("vgg", get_task("segmentation", num_classes=3, image_size=32), in_channels=1, image_size=8),
     ValueError, "image_size=8 differs"),
]


@pytest.mark.parametrize("call,error,match", BAD_MODEL_CALLS)
def test_bad_model_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(cin=0, cout=4), ValueError, "cin"), (dict(cin=4, cout=4, stride=0), ValueError, "stride"),
    (dict(cin=4, cout=4, stride=1.5), TypeError, "stride"), (dict(cin=4, cout=4, kernel=0), ValueError, "kernel"),
    (dict(cin=4, cout=4, groups=3), ValueError, "groups"),
])
def test_bad_block_arguments(kwargs, error, match):
    from survey_lib.models import BasicBlock, DepthwiseSeparable, conv_block, conv_bn_relu

    with pytest.raises(error, match=match):
        conv_bn_relu(**kwargs)
    block_kwargs = {k: v for k, v in kwargs.items() if k in ("cin", "cout", "stride")}
    if len(block_kwargs) == len(kwargs):
        for make in (BasicBlock, DepthwiseSeparable, lambda **kw: conv_block("dense", **kw)):
            with pytest.raises(error, match=match):
                make(**block_kwargs)
