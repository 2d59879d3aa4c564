"""Small reference networks: a backbone (returns a feature map) plus the head of a task.

Archs: ``mlp`` (classification/regression only), ``vgg`` (conv-BN-ReLU stacks with max-pooling),
``resnet`` (BasicBlocks, CIFAR-style stem), ``mobilenet`` (MobileNet-v1 depthwise-separable blocks).
Knobs: ``width`` multiplies every channel count; ``depth`` is convs per stage (vgg), blocks per stage
(resnet, mobilenet) or hidden layers (mlp). The number of downsamplings follows from ``image_size`` so the
final feature map stays at least 4x4 (8x8 digits get one pooling, 32x32 scenes three).
Only Conv2d, BatchNorm2d, ReLU, MaxPool2d, AdaptiveAvgPool2d, Linear, Flatten/Unflatten, Identity and plain
additions are used, so structured pruning and ONNX export work on every model.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from ._validate import check_choice, check_float, check_int, check_mapping, check_model, check_type
from .tasks import Task

ARCHS = ("mlp", "vgg", "resnet", "mobilenet")
ARCH_TASKS = {
    "mlp": ("classification", "regression"),
    "vgg": ("classification", "regression", "detection", "segmentation"),
    "resnet": ("classification", "regression", "detection", "segmentation"),
    "mobilenet": ("classification", "regression", "detection", "segmentation"),
}
DEFAULT_DEPTH = {"mlp": 2, "vgg": 2, "resnet": 1, "mobilenet": 1}
STAGE_CHANNELS = {"vgg": (32, 64, 128), "resnet": (32, 64, 128), "mobilenet": (64, 128, 256)}
MLP_HIDDEN = 256
MIN_FEATURE = 4
MIN_IMAGE_SIZE = 4
MIN_CHANNELS = 4              # no layer is narrower: widths that would go below it are rejected
MAX_WIDTH = 64.0


class TaskModel(nn.Module):
    """``backbone`` (image -> feature map) followed by the task's ``head``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, config: dict[str, Any]) -> None:
        check_type("backbone", backbone, nn.Module, "a torch.nn.Module")
        check_type("head", head, nn.Module, "a torch.nn.Module")
        check_mapping("config", config, "a dict of the build settings")
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.config = dict(config)

    def forward(self, x: Tensor) -> Tensor:
        """``head(backbone(x))``."""
        return self.head(self.backbone(x))


def build_model(
    arch: str,
    task: Task,
    *,
    in_channels: int,
    width: float = 1.0,
    depth: int | None = None,
    image_size: int | None = None,
) -> TaskModel:
    """A fresh ``arch`` backbone with ``task``'s head; ``image_size=None`` takes the task's image size."""
    check_choice("arch", arch, ARCHS)
    if not isinstance(task, Task):
        raise TypeError(f"task must be a survey_lib.tasks.Task (see get_task), got {type(task).__name__}")
    check_choice(f"task (for arch {arch!r})", task.name, ARCH_TASKS[arch])
    check_int("in_channels", in_channels, min_value=1)
    _check_width(arch, width)
    depth = DEFAULT_DEPTH[arch] if depth is None else check_int("depth", depth, min_value=1, max_value=16)
    size = task.image_size if image_size is None else image_size
    check_int("image_size", size, min_value=MIN_IMAGE_SIZE)
    if task.name in ("detection", "segmentation") and size != task.image_size:
        raise ValueError(f"image_size={size} differs from the {task.name} task's image_size={task.image_size}: its head "
                         "maps to the task's pixel grid; pass image_size=None or build the task at this size")
    backbone, channels = _BACKBONES[arch](in_channels, width, depth, size)
    config = {
        "arch": arch, "task": task.name, "in_channels": in_channels, "width": float(width),
        "depth": depth, "image_size": size,
    }
    return TaskModel(backbone, task.head(channels), config)


def min_width(arch: str) -> float:
    """The smallest ``width`` at which every layer of ``arch`` keeps at least MIN_CHANNELS channels."""
    check_choice("arch", arch, ARCHS)
    narrowest = MLP_HIDDEN if arch == "mlp" else min(STAGE_CHANNELS[arch] + (32,) * (arch == "mobilenet"))
    return (MIN_CHANNELS - 0.5) / narrowest  # round() reaches MIN_CHANNELS from here on


def _check_width(arch: str, width: Any) -> float:
    """``width`` as a float in [min_width(arch), MAX_WIDTH]; ValueError naming the smallest accepted width otherwise.

    Below ``min_width`` layers would be floored at MIN_CHANNELS, so the network would no longer be ``arch``
    scaled by ``width``: such widths are rejected rather than recorded as something that was not built."""
    lo = min_width(arch)
    width = check_float("width", width)
    if not lo <= width <= MAX_WIDTH:
        raise ValueError(f"width={width!r} is out of range for arch {arch!r}; accepted: {lo!r} <= width <= {MAX_WIDTH!r} "
                         f"(below {lo!r} a layer would have fewer than {MIN_CHANNELS} channels)")
    return width


def num_downsamplings(image_size: int, max_down: int = 3) -> int:
    """How many 2x downsamplings keep the final feature map at least 4x4."""
    check_int("image_size", image_size, min_value=1)
    check_int("max_down", max_down, min_value=0)
    return max(0, min(max_down, int(math.floor(math.log2(image_size / MIN_FEATURE)))))


def count_params(model: nn.Module) -> int:
    """Number of weights and biases."""
    return sum(p.numel() for p in check_model(model).parameters())


def _scaled(channels: int, width: float) -> int:
    return int(round(channels * width))


def _check_conv_args(cin: Any, cout: Any, stride: Any, groups: Any = 1) -> None:
    check_int("cin", cin, min_value=1)
    check_int("cout", cout, min_value=1)
    check_int("stride", stride, min_value=1)
    check_int("groups", groups, min_value=1)
    if cin % groups or cout % groups:
        raise ValueError(f"groups={groups} must divide cin={cin} and cout={cout}")


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> ReLU."""
    _check_conv_args(cin, cout, stride, groups)
    check_int("kernel", kernel, min_value=1)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


# ----------------------------------------------------------------------------------------------------------
# MLP
# ----------------------------------------------------------------------------------------------------------
def _mlp(in_channels: int, width: float, depth: int, size: int) -> tuple[nn.Module, int]:
    """Flatten, ``depth`` Linear-ReLU layers, reshape to a (B, hidden, 1, 1) feature map."""
    hidden = _scaled(MLP_HIDDEN, width)
    layers: list[nn.Module] = [nn.Flatten()]
    features = in_channels * size * size
    for _ in range(depth):
        layers += [nn.Linear(features, hidden), nn.ReLU()]
        features = hidden
    layers.append(nn.Unflatten(1, (hidden, 1, 1)))
    return nn.Sequential(*layers), hidden


# ----------------------------------------------------------------------------------------------------------
# VGG
# ----------------------------------------------------------------------------------------------------------
def vgg_layout(width: float, depth: int, image_size: int) -> list[int | str]:
    """The VGG config list, e.g. [32, 32, 'M', 64, 64, 'M', 128, 128, 'M'] at 32x32."""
    _check_width("vgg", width)
    check_int("depth", depth, min_value=1)
    pools = num_downsamplings(image_size)
    layout: list[int | str] = []
    for stage, channels in enumerate(STAGE_CHANNELS["vgg"]):
        layout += [_scaled(channels, width)] * depth
        if stage < pools:
            layout.append("M")
    return layout


def _vgg(in_channels: int, width: float, depth: int, size: int) -> tuple[nn.Module, int]:
    """conv-BN-ReLU stacks, max-pooling after the first stages."""
    layers: list[nn.Module] = []
    cin = in_channels
    for item in vgg_layout(width, depth, size):
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers.append(conv_bn_relu(cin, int(item)))
            cin = int(item)
    return nn.Sequential(*layers), cin


# ----------------------------------------------------------------------------------------------------------
# ResNet
# ----------------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        _check_conv_args(cin, cout, stride)
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def _resnet(in_channels: int, width: float, depth: int, size: int) -> tuple[nn.Module, int]:
    """CIFAR-style stem (3x3, stride 1) and three stages; stages 2 and 3 downsample when the size allows."""
    downs = num_downsamplings(size, max_down=2)
    channels = [_scaled(c, width) for c in STAGE_CHANNELS["resnet"]]
    layers: list[nn.Module] = [conv_bn_relu(in_channels, channels[0])]
    cin = channels[0]
    for stage, cout in enumerate(channels):
        for block in range(depth):
            stride = 2 if block == 0 and 1 <= stage <= downs else 1
            layers.append(BasicBlock(cin, cout, stride))
            cin = cout
    return nn.Sequential(*layers), cin


# ----------------------------------------------------------------------------------------------------------
# MobileNet (v1)
# ----------------------------------------------------------------------------------------------------------
class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv-BN-ReLU then pointwise 1x1 conv-BN-ReLU (MobileNet v1 block)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        _check_conv_args(cin, cout, stride)
        super().__init__()
        self.depthwise = conv_bn_relu(cin, cin, 3, stride=stride, groups=cin)
        self.pointwise = conv_bn_relu(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        """pointwise(depthwise(x))."""
        return self.pointwise(self.depthwise(x))


def _mobilenet(in_channels: int, width: float, depth: int, size: int) -> tuple[nn.Module, int]:
    """3x3 stem then three stages of depthwise-separable blocks, each stage downsampling when allowed."""
    downs = num_downsamplings(size)
    stem = _scaled(32, width)
    layers: list[nn.Module] = [conv_bn_relu(in_channels, stem)]
    cin = stem
    for stage, channels in enumerate(STAGE_CHANNELS["mobilenet"]):
        cout = _scaled(channels, width)
        for block in range(depth):
            stride = 2 if block == 0 and stage < downs else 1
            layers.append(DepthwiseSeparable(cin, cout, stride))
            cin = cout
    return nn.Sequential(*layers), cin


BLOCK_KINDS = ("dense", "depthwise_separable")


def conv_block(kind: str, cin: int, cout: int, stride: int = 1) -> nn.Module:
    """A single 3x3 conv-BN-ReLU ("dense") or its depthwise-separable counterpart, for cost demos."""
    check_choice("kind", kind, BLOCK_KINDS)
    _check_conv_args(cin, cout, stride)
    if kind == "dense":
        return conv_bn_relu(cin, cout, 3, stride=stride)
    return DepthwiseSeparable(cin, cout, stride)


_BACKBONES = {"mlp": _mlp, "vgg": _vgg, "resnet": _resnet, "mobilenet": _mobilenet}
