"""A task is a head, a loss and a metric: classification, regression, detection, segmentation.

Every head maps a backbone feature map ``(B, C, h, w)`` to the task output, using only Conv2d, BatchNorm2d,
ReLU, AdaptiveAvgPool2d, Flatten, Linear (and, for segmentation, one bilinear Upsample), so pruning and
ONNX export treat every task alike. The same ``fit``/``evaluate`` code serves all four tasks.

* classification: global average pool + Linear; cross-entropy; ``accuracy``.
* regression: global average pool + Linear(1) predicting the target in its own units (the bias starts
  at ``target_mean``); the loss is the MSE of the *standardized* error ``(output - target) / target_std``,
  so the loss scale does not depend on the target's units. Pass ``target_mean``/``target_std`` from the
  training split (:func:`task_for` does this). Metrics: ``mae``, ``rmse``, ``r2`` (primary).
* detection: a one-stage, YOLO/CenterNet-style grid head on the stride-s feature map. Each cell predicts
  ``[objectness, tx, ty, tw, th, class logits...]`` (loss: objectness BCE over all cells; offset KL, log-size
  smooth-L1 and class cross-entropy over object cells); an object belongs to the cell holding its centre
  (the larger object wins a shared cell); the centre is ``(cell + sigmoid(t)) * stride`` and the size is
  ``exp(t) * stride``. Decoding keeps cells with score = sigmoid(obj) x max class probability above
  ``score_threshold``, then per-class NMS. Metric: ``map50`` = mean over classes (with ground truth) of
  VOC all-point-interpolated AP at IoU 0.5.
* segmentation: conv3x3-BN-ReLU + conv1x1 + bilinear upsample to the input size; per-pixel cross-entropy;
  ``miou`` = mean IoU over classes present in prediction or ground truth (background included), and
  ``pixel_accuracy``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validate import check_choice, check_finite, check_float, check_int, check_labels, check_tensor, check_type

TASK_NAMES = ("classification", "regression", "detection", "segmentation")


class MetricState:
    """Accumulates a metric over batches: ``update(output, target)`` then ``compute()``."""

    def update(self, output: Tensor, target: Tensor) -> None:
        """Add one batch."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """The metric values over everything seen so far."""
        raise NotImplementedError


class Task:
    """Base class: a task's name, head, loss and metrics."""

    name: str = ""
    primary_metric: str = ""
    higher_is_better: bool = True
    min_classes: int = 1

    def __init__(self, num_classes: int, image_size: int = 32) -> None:
        self.num_classes = check_int("num_classes", num_classes, min_value=self.min_classes)
        self.image_size = check_int("image_size", image_size, min_value=1)

    def head(self, in_channels: int) -> nn.Module:
        """A fresh head mapping a feature map with ``in_channels`` channels to the task output."""
        raise NotImplementedError

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Scalar training loss of one batch."""
        raise NotImplementedError

    def metric_state(self) -> MetricState:
        """A fresh metric accumulator."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The task's settings as plain JSON-able data (used in cache keys)."""
        return {"name": self.name, "num_classes": self.num_classes, "image_size": self.image_size}

    def better(self, a: float, b: float) -> bool:
        """True if primary-metric value ``a`` is better than ``b``."""
        check_float("a", a)
        check_float("b", b)
        return a > b if self.higher_is_better else a < b

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec().items() if k != "name")
        return f"{type(self).__name__}({args})"


def get_task(
    name: str,
    *,
    num_classes: int,
    image_size: int = 32,
    target_mean: float = 0.0,
    target_std: float = 1.0,
    score_threshold: float = 0.05,
    nms_iou: float = 0.5,
    iou_threshold: float = 0.5,
) -> Task:
    """Build task ``name``; regression uses ``target_mean/std``, detection the decoding thresholds."""
    check_choice("task", name, TASK_NAMES)
    check_int("image_size", image_size, min_value=1)
    if name == "classification":
        return ClassificationTask(check_int("num_classes", num_classes, min_value=2), image_size)
    if name == "regression":
        check_int("num_classes (regression outputs)", num_classes, min_value=1, max_value=1)
        return RegressionTask(image_size, target_mean=target_mean, target_std=target_std)
    if name == "detection":
        return DetectionTask(
            check_int("num_classes", num_classes, min_value=1), image_size,
            score_threshold=score_threshold, nms_iou=nms_iou, iou_threshold=iou_threshold,
        )
    return SegmentationTask(check_int("num_classes (incl. background)", num_classes, min_value=2), image_size)


def task_for(splits: Any, **kwargs: Any) -> Task:
    """The task matching ``splits.info``; for regression the target statistics come from the train split."""
    info = getattr(splits, "info", None)
    if info is None:
        raise TypeError(f"splits must be a survey_lib.data.Splits (from load), got {type(splits).__name__}")
    if info.task == "regression":
        targets = splits.train.tensors[1].float()
        std = float(targets.std()) if len(targets) > 1 else 1.0
        kwargs.setdefault("target_mean", float(targets.mean()) if len(targets) else 0.0)
        kwargs.setdefault("target_std", std if std > 1e-6 else 1.0)
    return get_task(info.task, num_classes=info.num_classes, image_size=info.image_size, **kwargs)


def check_output(output: Any, shape: str, channels: int) -> Tensor:
    """``output`` as a tensor of ``shape`` (dim 0 the batch, at least one example) with ``channels`` in dim 1."""
    check_tensor("output", output, ndim=shape.count(",") + 1, shape=shape)
    if output.shape[0] == 0 or output.shape[1] != channels:
        raise ValueError(f"output must have shape {shape} with {channels} in dim 1 (the task's head) and at "
                         f"least one example, got {tuple(output.shape)}")
    return output


def _check_target_shape(target: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(target.shape) != tuple(shape):
        raise ValueError(f"target of shape {tuple(target.shape)} does not match output: expected {tuple(shape)} ({what})")


def _check_seen(n: int) -> None:
    if n == 0:
        raise ValueError("no examples seen: call update(output, target) before compute()")


# ----------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------
class ClassificationTask(Task):
    """Global average pool + Linear; cross-entropy; accuracy."""

    name = "classification"
    primary_metric = "accuracy"
    higher_is_better = True
    min_classes = 2

    def head(self, in_channels: int) -> nn.Module:
        """Pool, flatten, Linear to the class logits."""
        check_int("in_channels", in_channels, min_value=1)
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, self.num_classes))

    def check_batch(self, output: Tensor, target: Tensor) -> Tensor:
        """ValueError/TypeError unless ``output`` is (B, num_classes) logits and ``target`` (B,) class indices."""
        check_output(output, "(B, num_classes)", self.num_classes)
        check_labels("target", target, self.num_classes)
        _check_target_shape(target, output.shape[:1], "one class index per example")
        return target.long()

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy of the logits."""
        return F.cross_entropy(output, self.check_batch(output, target))

    def metric_state(self) -> MetricState:
        """Accuracy accumulator."""
        return _AccuracyState(self)


class _AccuracyState(MetricState):
    def __init__(self, task: ClassificationTask) -> None:
        self.task = task
        self.correct = 0
        self.total = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        target = self.task.check_batch(output, target)
        self.correct += int((output.argmax(dim=1) == target).sum())
        self.total += int(target.numel())

    def compute(self) -> dict[str, float]:
        _check_seen(self.total)
        return {"accuracy": self.correct / self.total}


# ----------------------------------------------------------------------------------------------------------
# Regression
# ----------------------------------------------------------------------------------------------------------
class RegressionTask(Task):
    """Global average pool + Linear(1); MSE of the standardized error; MAE, RMSE and R²."""

    name = "regression"
    primary_metric = "r2"
    higher_is_better = True

    def __init__(self, image_size: int = 32, *, target_mean: float = 0.0, target_std: float = 1.0) -> None:
        super().__init__(1, image_size)
        self.target_mean = check_float("target_mean", target_mean)
        self.target_std = check_float("target_std", target_std, min_value=1e-12)

    def head(self, in_channels: int) -> nn.Module:
        """Pool, flatten, Linear(1) whose bias starts at the target mean."""
        linear = nn.Linear(check_int("in_channels", in_channels, min_value=1), 1)
        with torch.no_grad():
            linear.bias.fill_(self.target_mean)
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)

    def check_batch(self, output: Tensor, target: Tensor) -> Tensor:
        """ValueError/TypeError unless ``output`` is (B, 1) and ``target`` holds B real numbers; the target as output's shape."""
        check_tensor("output", output, ndim=(1, 2), shape="(B, 1)")
        if output.shape[0] == 0 or output.numel() != output.shape[0]:
            raise ValueError(f"output must have shape (B, 1) (one prediction per example, B >= 1), got {tuple(output.shape)}")
        check_tensor("target", target)
        if target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target must hold real numbers, got {target.dtype}")
        if target.numel() != output.shape[0] or (target.dim() > 0 and target.shape[0] != output.shape[0]):
            raise ValueError(f"target of shape {tuple(target.shape)} does not match output {tuple(output.shape)}: "
                             "expected one value per example, (B,) or (B, 1)")
        return target.reshape(output.shape)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean squared standardized error."""
        target = self.check_batch(output, target)
        return F.mse_loss(output / self.target_std, target / self.target_std)

    def metric_state(self) -> MetricState:
        """MAE / RMSE / R² accumulator (R² is NaN when the targets seen have no variance)."""
        return _RegressionState(self)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "target_mean": self.target_mean, "target_std": self.target_std}


class _RegressionState(MetricState):
    def __init__(self, task: RegressionTask) -> None:
        self.task = task
        self.n = 0
        self.abs_err = 0.0
        self.sq_err = 0.0
        self.sum_t = 0.0
        self.sum_t2 = 0.0

    def update(self, output: Tensor, target: Tensor) -> None:
        target = self.task.check_batch(output, target)
        out = output.detach().double().reshape(-1)
        t = target.detach().double().reshape(-1)
        self.n += t.numel()
        self.abs_err += float((out - t).abs().sum())
        self.sq_err += float(((out - t) ** 2).sum())
        self.sum_t += float(t.sum())
        self.sum_t2 += float((t**2).sum())

    def compute(self) -> dict[str, float]:
        _check_seen(self.n)
        n = self.n
        total = self.sum_t2 - self.sum_t**2 / n
        r2 = 1.0 - self.sq_err / total if total > 0 else float("nan")
        return {"mae": self.abs_err / n, "rmse": math.sqrt(self.sq_err / n), "r2": r2}


# ----------------------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------------------
class SegmentationTask(Task):
    """Conv head + bilinear upsampling to the input size; per-pixel cross-entropy; mean IoU."""

    name = "segmentation"
    primary_metric = "miou"
    higher_is_better = True
    min_classes = 2

    def head(self, in_channels: int) -> nn.Module:
        """conv3x3-BN-ReLU, conv1x1 to class logits, bilinear upsample to ``image_size``."""
        check_int("in_channels", in_channels, min_value=1)
        return nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, self.num_classes, 1),
            nn.Upsample(size=(self.image_size, self.image_size), mode="bilinear", align_corners=False),
        )

    def check_batch(self, output: Tensor, target: Tensor) -> Tensor:
        """ValueError/TypeError unless ``output`` is (B, num_classes, H, W) and ``target`` (B, H, W) class indices."""
        check_output(output, "(B, num_classes, H, W)", self.num_classes)
        check_labels("target", target, self.num_classes)
        _check_target_shape(target, (output.shape[0], *output.shape[2:]), "one class index per pixel")
        return target.long()

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-pixel cross-entropy."""
        return F.cross_entropy(output, self.check_batch(output, target))

    def metric_state(self) -> MetricState:
        """Confusion-matrix accumulator for mIoU and pixel accuracy."""
        return _SegmentationState(self)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``num_classes x num_classes`` counts, rows = ground truth, columns = prediction."""
    check_int("num_classes", num_classes, min_value=1)
    check_labels("pred", pred, num_classes)
    check_labels("target", target, num_classes)
    if pred.numel() != target.numel():
        raise ValueError(f"pred ({pred.numel()} values) and target ({target.numel()} values) must have one "
                         "prediction per ground-truth value")
    return _confusion(pred, target, num_classes)


def _confusion(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    idx = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(confusion: Tensor) -> float:
    """Mean IoU over classes that occur in the ground truth or the prediction."""
    check_tensor("confusion", confusion, ndim=2, shape="(num_classes, num_classes)")
    if confusion.shape[0] != confusion.shape[1] or confusion.numel() == 0:
        raise ValueError(f"confusion must be a square (num_classes, num_classes) matrix, got {tuple(confusion.shape)}")
    check_finite("confusion", confusion)
    if bool((confusion < 0).any()) or not bool(confusion.any()):
        raise ValueError("confusion must hold non-negative counts, at least one of them non-zero")
    conf = confusion.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else float("nan")


class _SegmentationState(MetricState):
    def __init__(self, task: SegmentationTask) -> None:
        self.task = task
        self.num_classes = task.num_classes
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, output: Tensor, target: Tensor) -> None:
        target = self.task.check_batch(output, target)
        self.confusion += _confusion(output.argmax(dim=1), target, self.num_classes)

    def compute(self) -> dict[str, float]:
        total = int(self.confusion.sum())
        _check_seen(total)
        acc = float(self.confusion.diag().sum()) / total
        return {"miou": mean_iou(self.confusion), "pixel_accuracy": acc}


# ----------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Detections:
    """Decoded detections of one image: boxes (k,4) x1,y1,x2,y2 pixels, scores (k,), labels (k,)."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        _check_boxes("boxes", self.boxes)
        check_tensor("scores", self.scores, ndim=1, shape="(k,)")
        check_tensor("labels", self.labels, ndim=1, shape="(k,)")
        if not len(self.boxes) == len(self.scores) == len(self.labels):
            raise ValueError(f"boxes ({len(self.boxes)}), scores ({len(self.scores)}) and labels ({len(self.labels)}) "
                             "must describe the same k detections")


class DetectionTask(Task):
    """One-stage grid detector head; objectness BCE + box + class losses; mAP@0.5 (VOC all-point)."""

    name = "detection"
    primary_metric = "map50"
    higher_is_better = True

    def __init__(
        self,
        num_classes: int,
        image_size: int = 32,
        *,
        score_threshold: float = 0.05,
        nms_iou: float = 0.5,
        iou_threshold: float = 0.5,
    ) -> None:
        super().__init__(num_classes, image_size)
        self.score_threshold = check_float("score_threshold", score_threshold, min_value=0.0, max_value=1.0)
        self.nms_iou = check_float("nms_iou", nms_iou, min_value=0.0, max_value=1.0)
        self.iou_threshold = check_float("iou_threshold", iou_threshold, min_value=0.0, max_value=1.0)

    def head(self, in_channels: int) -> nn.Module:
        """conv3x3-BN-ReLU then conv1x1 to ``5 + num_classes`` maps per cell."""
        check_int("in_channels", in_channels, min_value=1)
        return nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, 5 + self.num_classes, 1),
        )

    def check_output(self, output: Tensor) -> Tensor:
        """ValueError/TypeError unless ``output`` is the head's (B, 5 + num_classes, gh, gw) grid, B >= 1."""
        return check_output(output, "(B, 5 + num_classes, gh, gw)", 5 + self.num_classes)

    def check_target(self, target: Tensor) -> Tensor:
        """ValueError/TypeError unless ``target`` is (B, M, 5) rows [label, x1, y1, x2, y2] (label < 0: no object)."""
        check_tensor("target", target, ndim=3, shape="(B, M, 5): [label, x1, y1, x2, y2] per object")
        if target.shape[2] != 5 or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"target must have shape (B, M, 5) of real numbers [label, x1, y1, x2, y2], got "
                             f"{tuple(target.shape)} ({target.dtype})")
        check_finite("target", target)
        labels = target[..., 0]
        bad = labels[(labels >= self.num_classes) | (labels != labels.floor())]
        if bad.numel():
            raise ValueError(f"target holds label {float(bad[0]):g}; accepted labels: integers 0..{self.num_classes - 1} "
                             "(the task's classes) or a negative value for an empty slot")
        return target

    def stride(self, output: Tensor) -> float:
        """Pixels per grid cell for this output."""
        check_tensor("output", output, ndim=4, shape="(B, 5 + num_classes, gh, gw)")
        return self.image_size / output.shape[-1]

    def encode(self, target: Tensor, grid: tuple[int, int]) -> dict[str, Tensor]:
        """Per-cell targets from ``(B, M, 5)`` boxes: objectness, offsets, log-sizes, classes."""
        self.check_target(target)
        if not (isinstance(grid, (tuple, list)) and len(grid) == 2):
            raise TypeError(f"grid must be a (gh, gw) pair of ints, got {grid!r}")
        gh, gw = (check_int("grid", g, min_value=1) for g in grid)
        b, m, _ = target.shape
        stride = self.image_size / gw
        obj = torch.zeros(b, gh, gw)
        box = torch.zeros(b, 4, gh, gw)
        cls = torch.zeros(b, gh, gw, dtype=torch.int64)
        rows = torch.arange(b)
        for j in reversed(range(m)):  # main (largest) object is slot 0, written last, so it wins a shared cell
            valid = target[:, j, 0] >= 0
            x1, y1, x2, y2 = target[:, j, 1:].unbind(dim=1)
            cx, cy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
            gx = cx.floor().long().clamp(0, gw - 1)
            gy = cy.floor().long().clamp(0, gh - 1)
            r, gy_v, gx_v = rows[valid], gy[valid], gx[valid]
            obj[r, gy_v, gx_v] = 1.0
            size = torch.stack([(x2 - x1), (y2 - y1)], dim=1).clamp_min(1e-3) / stride
            values = torch.stack([cx - gx, cy - gy, size[:, 0].log(), size[:, 1].log()], dim=1)
            box[r, :, gy_v, gx_v] = values[valid]
            cls[r, gy_v, gx_v] = target[valid, j, 0].long()
        return {"obj": obj, "box": box, "cls": cls}

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Objectness BCE over all cells + offset BCE, log-size L1 and class CE over object cells."""
        self.check_output(output)
        _check_same_batch(output, self.check_target(target))
        enc = self.encode(target.detach().cpu().float(), tuple(output.shape[-2:]))
        enc = {k: v.to(output.device) for k, v in enc.items()}
        obj_loss = F.binary_cross_entropy_with_logits(output[:, 0], enc["obj"])
        pos = enc["obj"] > 0
        if not pos.any():
            return obj_loss
        pred_box = output[:, 1:5].permute(0, 2, 3, 1)[pos]
        true_box = enc["box"].permute(0, 2, 3, 1)[pos]
        offset_loss = _soft_bce(pred_box[:, :2], true_box[:, :2])
        size_loss = F.smooth_l1_loss(pred_box[:, 2:], true_box[:, 2:])
        cls_loss = F.cross_entropy(output[:, 5:].permute(0, 2, 3, 1)[pos], enc["cls"][pos])
        return 2.0 * obj_loss + offset_loss + size_loss + cls_loss

    def decode(self, output: Tensor) -> list[Detections]:
        """Boxes, scores and labels per image after thresholding and per-class NMS."""
        out = self.check_output(output).detach().float().cpu()
        b, _, gh, gw = out.shape
        stride = self.image_size / gw
        gy, gx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        cx = (gx + torch.sigmoid(out[:, 1])) * stride
        cy = (gy + torch.sigmoid(out[:, 2])) * stride
        w = out[:, 3].clamp(max=10).exp() * stride
        h = out[:, 4].clamp(max=10).exp() * stride
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).reshape(b, -1, 4)
        probs = torch.softmax(out[:, 5:], dim=1).reshape(b, self.num_classes, -1)
        cls_prob, labels = probs.max(dim=1)
        scores = torch.sigmoid(out[:, 0]).reshape(b, -1) * cls_prob
        return [self._select(boxes[i], scores[i], labels[i]) for i in range(b)]

    def _select(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> Detections:
        keep = (scores > self.score_threshold) & torch.isfinite(boxes).all(dim=1)  # a diverged output finds nothing
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        kept = _batched_nms(boxes, scores, labels, self.nms_iou)
        return Detections(boxes[kept], scores[kept], labels[kept])

    def metric_state(self) -> MetricState:
        """Accumulates decoded detections and ground truth for mAP@``iou_threshold``."""
        return _DetectionState(self)

    def spec(self) -> dict[str, Any]:
        return {
            **super().spec(), "score_threshold": self.score_threshold, "nms_iou": self.nms_iou,
            "iou_threshold": self.iou_threshold,
        }


class _DetectionState(MetricState):
    def __init__(self, task: DetectionTask) -> None:
        self.task = task
        self.detections: list[Detections] = []
        self.ground_truth: list[tuple[Tensor, Tensor]] = []

    def update(self, output: Tensor, target: Tensor) -> None:
        _check_same_batch(self.task.check_output(output), self.task.check_target(target))
        self.detections.extend(self.task.decode(output))
        for t in target.detach().cpu().float():
            valid = t[:, 0] >= 0
            self.ground_truth.append((t[valid, 1:], t[valid, 0].long()))

    def compute(self) -> dict[str, float]:
        _check_seen(len(self.ground_truth))
        return {
            "map50": mean_average_precision(
                self.detections, self.ground_truth, self.task.num_classes, self.task.iou_threshold
            )
        }


def _soft_bce(logits: Tensor, target: Tensor) -> Tensor:
    """BCE with soft targets minus the targets' own entropy (a KL divergence: 0 for a perfect prediction)."""
    t = target.clamp(1e-6, 1 - 1e-6)
    entropy = -(t * t.log() + (1 - t) * (1 - t).log())
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") - entropy).mean()


def _check_same_batch(output: Tensor, target: Tensor) -> None:
    if target.shape[0] != output.shape[0]:
        raise ValueError(f"target holds {target.shape[0]} examples but output {output.shape[0]}: one target per example")


def _check_boxes(param: str, boxes: Any) -> Tensor:
    check_tensor(param, boxes, ndim=2, shape="(n, 4): x1, y1, x2, y2 per box")
    if boxes.shape[1] != 4 or not boxes.is_floating_point():
        raise ValueError(f"{param} must have shape (n, 4) of floats (x1, y1, x2, y2 per box), got "
                         f"{tuple(boxes.shape)} ({boxes.dtype})")
    return check_finite(param, boxes)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of boxes ``a`` (n,4) and ``b`` (m,4), x1,y1,x2,y2."""
    return _box_iou(_check_boxes("a", a), _check_boxes("b", b))


def _box_iou(a: Tensor, b: Tensor) -> Tensor:
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=2)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def _check_nms_args(boxes: Tensor, scores: Tensor, iou: float) -> float:
    _check_boxes("boxes", boxes)
    check_tensor("scores", scores, ndim=1, shape="(n,)")
    if len(scores) != len(boxes):
        raise ValueError(f"scores ({len(scores)}) must hold one score per box ({len(boxes)})")
    check_finite("scores", scores)
    return check_float("iou", iou, min_value=0.0, max_value=1.0)


def nms(boxes: Tensor, scores: Tensor, iou: float) -> Tensor:
    """Indices of boxes kept by greedy non-maximum suppression, highest score first."""
    return _nms(boxes, scores, _check_nms_args(boxes, scores, iou))


def _nms(boxes: Tensor, scores: Tensor, iou: float) -> Tensor:
    order = torch.argsort(scores, descending=True, stable=True)
    ious = _box_iou(boxes[order], boxes[order])
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(int(order[i]))
        suppressed |= ious[i] > iou
    return torch.tensor(keep, dtype=torch.int64)


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou: float) -> Tensor:
    """NMS within each class; indices sorted by descending score."""
    iou = _check_nms_args(boxes, scores, iou)
    check_tensor("labels", labels, ndim=1, shape="(n,)")
    if len(labels) != len(boxes) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold one integer class per box ({len(boxes)}), got {len(labels)} ({labels.dtype})")
    return _batched_nms(boxes, scores, labels, iou)


def _batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou: float) -> Tensor:
    kept = [torch.nonzero(labels == c).flatten()[_nms(boxes[labels == c], scores[labels == c], iou)]
            for c in labels.unique()]
    if not kept:
        return torch.zeros(0, dtype=torch.int64)
    idx = torch.cat(kept)
    return idx[torch.argsort(scores[idx], descending=True, stable=True)]


def voc_average_precision(recall: Sequence[float], precision: Sequence[float]) -> float:
    """VOC all-point interpolated AP: area under the monotone upper envelope of the PR curve."""
    recall, precision = _curve("recall", recall), _curve("precision", precision)
    if len(recall) != len(precision):
        raise ValueError(f"recall ({len(recall)} points) and precision ({len(precision)} points) must have the same length")
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    change = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[change + 1] - mrec[change]) * mpre[change + 1]))


def _curve(param: str, values: Sequence[float]) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{param} must be a sequence of numbers in [0, 1], got {type(values).__name__}") from err
    if arr.ndim != 1 or not np.all(np.isfinite(arr)) or np.any((arr < 0) | (arr > 1)):
        raise ValueError(f"{param} must be a 1-D sequence of numbers in [0, 1], got {values!r}"[:200])
    return arr


def _check_matching(detections: Any, ground_truth: Any, iou: float) -> float:
    """Validate per-image detections and (boxes, labels) ground truth; return ``iou``."""
    if isinstance(detections, (str, bytes)) or not isinstance(detections, Sequence):
        raise TypeError(f"detections must be a sequence of Detections (one per image), got {type(detections).__name__}")
    if isinstance(ground_truth, (str, bytes)) or not isinstance(ground_truth, Sequence):
        raise TypeError(f"ground_truth must be a sequence of (boxes, labels) pairs, got {type(ground_truth).__name__}")
    if len(detections) != len(ground_truth):
        raise ValueError(f"detections ({len(detections)}) and ground_truth ({len(ground_truth)}) differ in length")
    for d in detections:
        check_type("detections[i]", d, Detections, "a Detections (see DetectionTask.decode)")
    for g in ground_truth:
        if not (isinstance(g, (tuple, list)) and len(g) == 2):
            raise TypeError(f"ground_truth items must be (boxes (k, 4), labels (k,)) pairs, got {type(g).__name__}")
        _check_boxes("ground_truth boxes", g[0])
        check_tensor("ground_truth labels", g[1], ndim=1, shape="(k,)")
        if len(g[1]) != len(g[0]):
            raise ValueError(f"ground_truth labels ({len(g[1])}) must hold one label per box ({len(g[0])})")
    return check_float("iou", iou, min_value=0.0, max_value=1.0)


def class_average_precision(
    detections: Sequence[Detections], ground_truth: Sequence[tuple[Tensor, Tensor]], cls: int, iou: float = 0.5
) -> float | None:
    """AP of class ``cls`` over a set of images (VOC matching); None if the class has no ground truth."""
    iou = _check_matching(detections, ground_truth, iou)
    return _class_ap(detections, ground_truth, check_int("cls", cls, min_value=0), iou)


def _class_ap(detections: Sequence[Detections], ground_truth: Sequence[tuple[Tensor, Tensor]], cls: int,
              iou: float) -> float | None:
    gts = [boxes[labels == cls] for boxes, labels in ground_truth]
    n_gt = sum(len(g) for g in gts)
    if n_gt == 0:
        return None
    found = [torch.zeros(len(g), dtype=torch.bool) for g in gts]
    records = [(float(s), i, b) for i, d in enumerate(detections)
               for b, s, lab in zip(d.boxes, d.scores, d.labels) if int(lab) == cls]
    records.sort(key=lambda r: -r[0])
    tp = np.zeros(len(records))
    for k, (_, i, box) in enumerate(records):
        if len(gts[i]) == 0:
            continue
        overlaps = _box_iou(box[None], gts[i])[0]
        best = int(overlaps.argmax())
        if overlaps[best] >= iou and not found[i][best]:
            found[i][best] = True
            tp[k] = 1.0
    cum_tp = np.cumsum(tp)
    recall = cum_tp / n_gt
    precision = cum_tp / np.arange(1, len(records) + 1)
    return voc_average_precision(recall, precision)


def mean_average_precision(
    detections: Sequence[Detections],
    ground_truth: Sequence[tuple[Tensor, Tensor]],
    num_classes: int,
    iou: float = 0.5,
) -> float:
    """mAP: mean over classes with ground truth of VOC all-point AP at IoU ``iou`` (0.0 without any)."""
    iou = _check_matching(detections, ground_truth, iou)
    check_int("num_classes", num_classes, min_value=1)
    aps = [_class_ap(detections, ground_truth, c, iou) for c in range(num_classes)]
    aps = [a for a in aps if a is not None]
    return float(np.mean(aps)) if aps else 0.0
