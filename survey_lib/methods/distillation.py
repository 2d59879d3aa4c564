"""Knowledge distillation: a trained ``teacher`` guides the training of a ``student``, as an extra loss of ``fit``.

There is no second training loop. ``fit`` computes ``task.loss(output, target)`` itself and adds
``extra_loss(student, x, output, target)``; :class:`DistillationLoss` is that extra loss. It runs a frozen
copy of the teacher on ``x`` (eval mode, ``torch.no_grad()``), reads the student's intermediate features
that forward hooks stored during fit's own forward pass (:func:`capture_features`), and returns
``alpha * (D - task.loss) + beta * F``, so that the objective ``fit`` minimizes is exactly::

    loss = (1 - alpha) * task.loss(s, y) + alpha * D(s, t) + beta * F(student features, teacher features)

``D`` is the output term of the task (:func:`output_distill_loss`, which carries the T² factor) and ``F``
the feature term of the method (none for ``"kd"``):

* ``"kd"`` (Hinton et al. 2015): softened class probabilities, :func:`kd_loss`. With the classification
  task the objective is exactly ``kd_loss(s, t, y, temperature=T, alpha=alpha)``.
* ``"hint"`` (FitNets, Romero et al. 2015): a learned 1x1-conv regressor maps a student feature map to the
  teacher's channel count; MSE to the teacher's feature map (:func:`hint_loss`). The regressors live on the
  student copy as ``student.distill_regressors`` while it trains, so fit's optimizer (which takes
  ``model.parameters()``) trains them; :func:`strip_regressors` removes them afterwards.
* ``"attention"`` (Zagoruyko & Komodakis 2017): normalised spatial attention maps (:func:`attention_transfer_loss`).
* ``"rkd"`` (Park et al. 2019): distances and angles between the embeddings of a batch (:func:`rkd_loss`).

**One teacher pass for many students.** The teacher is frozen, so its outputs on the training split never
change: :class:`TeacherCache` computes them (and the feature targets a method needs) once and serves every
later batch by looking up each input's bytes, so a distillation run costs about what training the student
alone costs. :func:`compare_students` trains the same thin student from scratch and by each method over
seeds at one budget, the comparison notebook 06 reports.

Defaults follow the RepDistiller benchmark (DESIGN.md section 6): T = 4 (T = 1 for segmentation's per-pixel
term, :data:`TASK_TEMPERATURE`), and ``alpha = 0.9`` for ``"kd"``;
the feature methods run, as there, without the KD term (``alpha = 0``) and with ``beta`` = 100 (hint),
1000 (attention) or 1 (rkd, whose distance and angle terms carry weights 25 and 50).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_choice, check_float, check_int, check_tensor, check_type, run_forward
from ..tasks import TASK_NAMES, Task
from ..train import Callback
from .base import Context, check_ctx, mark

__all__ = [
    "METHODS", "DEFAULT_TEMPERATURE", "TASK_TEMPERATURE", "DEFAULT_ALPHA", "DEFAULT_BETA", "REGRESSORS", "check_temperature",
    "softened_kl", "kd_loss", "detection_distill_loss", "output_distill_loss", "hint_regressor", "hint_loss",
    "attention_map", "attention_transfer_loss", "rkd_distance_loss", "rkd_angle_loss", "rkd_loss",
    "capture_features", "probe", "stage_pairs", "layer_pairs", "attach_regressors", "strip_regressors",
    "input_fingerprints", "TeacherCache", "DistillationLoss", "thin_student", "distillation_loss", "distill", "STUDY_METHODS", "compare_students",
]

METHODS = ("kd", "hint", "attention", "rkd")
DEFAULT_TEMPERATURE = 4.0                                         # the usual KD temperature
# distill's default T per task: per-pixel distillation runs at T = 1 (Liu et al. 2019's pixel-wise term has
# no temperature; notebook 06 measures a thin segmentation student collapsing at T = 4).
TASK_TEMPERATURE = {"classification": DEFAULT_TEMPERATURE, "regression": DEFAULT_TEMPERATURE,
                    "detection": DEFAULT_TEMPERATURE, "segmentation": 1.0}
DEFAULT_ALPHA = {"kd": 0.9, "hint": 0.0, "attention": 0.0, "rkd": 0.0}
DEFAULT_BETA = {"kd": 0.0, "hint": 100.0, "attention": 1000.0, "rkd": 1.0}
RKD_DISTANCE_WEIGHT = 25.0                                        # Park et al. 2019
RKD_ANGLE_WEIGHT = 50.0
REGRESSORS = "distill_regressors"                                 # attribute holding the hint regressors
_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------
# Output terms
# ----------------------------------------------------------------------------------------------------------
def check_temperature(temperature: Any) -> float:
    """``temperature`` as a float > 0; TypeError/ValueError naming ``temperature`` otherwise."""
    value = check_float("temperature", temperature)
    if value <= 0:
        raise ValueError(f"temperature={temperature!r} is out of range; accepted: temperature > 0 (T = 4 is usual)")
    return value


def _check_pair(student: Any, teacher: Any, s_name: str, t_name: str, ndim: int | tuple[int, ...] | None = None) -> None:
    check_tensor(s_name, student, ndim=ndim)
    check_tensor(t_name, teacher, ndim=ndim)
    if student.shape != teacher.shape:
        raise ValueError(f"{t_name} of shape {tuple(teacher.shape)} does not match {s_name} of shape {tuple(student.shape)}")


def softened_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """T² · KL(softmax(t/T) || softmax(s/T)) over the class dim 1, summed over classes and averaged over
    every other position (the batch, and pixels or cells if any): "batchmean" for (B, C) logits."""
    _check_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits must have the classes in dim 1, got shape {tuple(student_logits.shape)}")
    t = check_temperature(temperature)
    log_s = F.log_softmax(student_logits / t, dim=1)
    log_t = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return t * t * F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(1).mean()


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *,
    temperature: float = DEFAULT_TEMPERATURE, alpha: float = 0.9,
) -> Tensor:
    """Hinton KD: ``alpha * T² * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * cross_entropy(s, target)``.

    The KL is summed over classes and averaged over the batch ("batchmean"); T² keeps its gradient on the
    scale of the cross-entropy's as T changes. ``alpha`` weights the teacher, ``1 - alpha`` the labels."""
    alpha = check_float("alpha", alpha, min_value=0.0, max_value=1.0)
    soft = softened_kl(student_logits, teacher_logits, temperature)
    check_tensor("target", target)
    if tuple(target.shape) != (student_logits.shape[0], *student_logits.shape[2:]):
        raise ValueError(f"target of shape {tuple(target.shape)} does not match student_logits of shape "
                         f"{tuple(student_logits.shape)}: expected one class index per example")
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, target.long())


def _bernoulli_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Elementwise KL(Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(s))); exactly 0 where s == t."""
    p = torch.sigmoid(teacher_logits)
    return (p * (F.logsigmoid(teacher_logits) - F.logsigmoid(student_logits))
            + (1 - p) * (F.logsigmoid(-teacher_logits) - F.logsigmoid(-student_logits)))


def detection_distill_loss(student_out: Tensor, teacher_out: Tensor, *, temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """Distillation of the grid detector's (B, 5 + C, gh, gw) output (channels: objectness, tx, ty, tw, th,
    class logits), mirroring the task's loss with the teacher's predictions as soft targets:

    T² · Bernoulli KL of the objectness at temperature T, averaged over all cells, plus, averaged over cells
    with weight sigmoid(teacher objectness) (the teacher's confidence that the cell holds an object): the
    Bernoulli KL of the offsets (sigmoid(tx), sigmoid(ty)), smooth-L1 of the log-sizes (tw, th) and
    T² · KL of the class probabilities at temperature T."""
    _check_pair(student_out, teacher_out, "student_out", "teacher_out", ndim=4)
    if student_out.shape[1] < 6:
        raise ValueError(f"student_out must be a detection grid (B, 5 + num_classes, gh, gw), got {tuple(student_out.shape)}")
    t = check_temperature(temperature)
    s, te = student_out, teacher_out.detach()
    objectness = t * t * _bernoulli_kl(s[:, 0] / t, te[:, 0] / t).mean()
    offset = _bernoulli_kl(s[:, 1:3], te[:, 1:3]).mean(1)
    size = F.smooth_l1_loss(s[:, 3:5], te[:, 3:5], reduction="none").mean(1)
    classes = t * t * F.kl_div(F.log_softmax(s[:, 5:] / t, dim=1), F.log_softmax(te[:, 5:] / t, dim=1),
                               reduction="none", log_target=True).sum(1)
    weight = torch.sigmoid(te[:, 0])
    return objectness + (weight * (offset + size + classes)).sum() / weight.sum().clamp_min(_EPS)


def output_distill_loss(
    task: Task | str, student_out: Tensor, teacher_out: Tensor, *, temperature: float = DEFAULT_TEMPERATURE,
) -> Tensor:
    """The output term D(s, t) of ``task`` (a Task or its name); 0 when the outputs agree.

    classification: :func:`softened_kl` (T² · KL, batchmean). segmentation: the same per pixel (KL over the
    class dim, averaged over pixels). regression: MSE to the teacher's predictions, standardized like the
    task's loss (divided by the task's ``target_std``; 1 when only the name is given). detection:
    :func:`detection_distill_loss`."""
    name = task.name if isinstance(task, Task) else task
    if not isinstance(name, str):
        raise TypeError(f"task must be a survey_lib.tasks.Task or a task name, got {type(task).__name__}")
    check_choice("task", name, TASK_NAMES)
    if name == "classification":
        _check_pair(student_out, teacher_out, "student_out", "teacher_out", ndim=2)
        return softened_kl(student_out, teacher_out, temperature)
    if name == "segmentation":
        _check_pair(student_out, teacher_out, "student_out", "teacher_out", ndim=4)
        return softened_kl(student_out, teacher_out, temperature)
    if name == "detection":
        return detection_distill_loss(student_out, teacher_out, temperature=temperature)
    check_temperature(temperature)   # unused by regression, but checked alike
    _check_pair(student_out, teacher_out, "student_out", "teacher_out", ndim=(1, 2))
    std = float(getattr(task, "target_std", 1.0))
    return F.mse_loss(student_out / std, teacher_out.detach() / std)


# ----------------------------------------------------------------------------------------------------------
# Feature terms
# ----------------------------------------------------------------------------------------------------------
def _as_map(feature: Tensor, param: str) -> Tensor:
    """A (B, C, H, W) view of a (B, C) or (B, C, H, W) feature."""
    check_tensor(param, feature, ndim=(2, 4), shape="(B, C) or (B, C, H, W)")
    return feature[:, :, None, None] if feature.dim() == 2 else feature


def _common_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two (B, C, H, W) maps to the other's spatial size (each dim to the smaller)."""
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    pool = lambda f: f if tuple(f.shape[2:]) == size else F.adaptive_avg_pool2d(f, size)  # noqa: E731
    return pool(a), pool(b)


def hint_regressor(student_channels: int, teacher_channels: int) -> nn.Module:
    """The FitNets regressor: a 1x1 conv (with bias) from the student's channels to the teacher's."""
    return nn.Conv2d(check_int("student_channels", student_channels, min_value=1),
                     check_int("teacher_channels", teacher_channels, min_value=1), 1)


def hint_loss(student_feat: Tensor, teacher_feat: Tensor, regressor: nn.Module | None = None) -> Tensor:
    """MSE between ``regressor(student_feat)`` and ``teacher_feat`` (averaged over every element), after
    average-pooling the larger map to the smaller one's spatial size; (B, C) features count as 1x1 maps."""
    s = _as_map(student_feat, "student_feat")
    t = _as_map(teacher_feat, "teacher_feat").detach()
    if regressor is not None:
        s = check_type("regressor", regressor, nn.Module, "a torch.nn.Module or None")(s)
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(f"student_feat (after the regressor) has shape {tuple(s.shape)} but teacher_feat "
                         f"{tuple(t.shape)}: batch and channels must agree (use hint_regressor)")
    s, t = _common_size(s, t)
    return F.mse_loss(s, t)


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """(B, H·W): the mean over channels of |feature|^p, flattened and L2-normalised per example."""
    check_tensor("feature", feature, ndim=4, shape="(B, C, H, W)")
    p = check_float("p", p, min_value=_EPS)
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer_loss(
    student_feats: Tensor | Sequence[Tensor], teacher_feats: Tensor | Sequence[Tensor], p: float = 2.0,
) -> Tensor:
    """Mean over layers of ``(attention_map(s) - attention_map(t)).pow(2).mean()``.

    This is the public attention-transfer code's normalisation (also RepDistiller's): the squared difference
    averaged over batch and positions, which is smooth at zero, rather than the paper's per-example L2 norm
    ||a_s - a_t||_2. Where spatial sizes differ the larger feature map is average-pooled to the smaller one
    first. (RepDistiller sums over layers; this averages, so its beta is ours times the number of layers.)"""
    s_list = [student_feats] if isinstance(student_feats, Tensor) else list(student_feats)
    t_list = [teacher_feats] if isinstance(teacher_feats, Tensor) else list(teacher_feats)
    if not s_list or len(s_list) != len(t_list):
        raise ValueError(f"student_feats ({len(s_list)}) and teacher_feats ({len(t_list)}) must hold the same, "
                         "non-zero number of feature maps")
    losses = []
    for s, t in zip(s_list, t_list):
        check_tensor("student_feats[i]", s, ndim=4, shape="(B, C, H, W)")
        check_tensor("teacher_feats[i]", t, ndim=4, shape="(B, C, H, W)")
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"student_feats[i] ({s.shape[0]} examples) and teacher_feats[i] ({t.shape[0]}) differ in batch")
        s, t = _common_size(s, t.detach())
        losses.append((attention_map(s, p) - attention_map(t, p)).pow(2).mean())
    return torch.stack(losses).mean()


def _embedding(feature: Tensor, param: str) -> Tensor:
    """(B, D): 4-D feature maps global-average-pooled, anything else flattened."""
    check_tensor(param, feature)
    if feature.dim() < 2:
        raise ValueError(f"{param} must be (B, D) embeddings or (B, C, H, W) maps, got {tuple(feature.shape)}")
    return feature.mean(dim=(2, 3)) if feature.dim() == 4 else feature.flatten(1)


def _normalized_distances(e: Tensor) -> Tensor:
    """Distances of the B(B-1)/2 pairs i < j, divided by their mean."""
    i, j = torch.triu_indices(len(e), len(e), offset=1, device=e.device)
    d = (e[i] - e[j]).pow(2).sum(1).clamp_min(_EPS).sqrt()
    return d / d.mean().clamp_min(_EPS)


def _rkd_pair(student_emb: Tensor, teacher_emb: Tensor) -> tuple[Tensor, Tensor]:
    s, t = _embedding(student_emb, "student_emb"), _embedding(teacher_emb, "teacher_emb").detach()
    if len(s) != len(t):
        raise ValueError(f"student_emb ({len(s)} examples) and teacher_emb ({len(t)}) differ in batch")
    return s, t


def rkd_distance_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Smooth-L1 between the student's and the teacher's pairwise distances, each divided by its batch's mean
    distance (so scaling an embedding changes nothing), averaged over the pairs i < j; 0 for a batch of one.
    (Public RKD code averages over all B² entries, zero diagonal included: (B-1)/B times this.)"""
    s, t = _rkd_pair(student_emb, teacher_emb)
    if len(s) < 2:
        return s.sum() * 0.0
    return F.smooth_l1_loss(_normalized_distances(s), _normalized_distances(t))


def _angles(e: Tensor) -> Tensor:
    """cos of the angle at j of every triplet (i, j, k) of distinct examples."""
    n = len(e)
    unit = F.normalize(e[None, :, :] - e[:, None, :], dim=2)          # unit[j, i] = (e_i - e_j) / |e_i - e_j|
    cos = torch.bmm(unit, unit.transpose(1, 2))                         # cos[j, i, k] = <e_ji, e_jk>
    idx = torch.arange(n, device=e.device)
    distinct = (idx[:, None, None] != idx[None, :, None]) & (idx[:, None, None] != idx[None, None, :]) \
        & (idx[None, :, None] != idx[None, None, :])
    return cos[distinct]


def rkd_angle_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Smooth-L1 between the student's and teacher's cosines of the angle at j of every triplet (i, j, k) of
    distinct examples (scale-free by construction), averaged over triplets; 0 for fewer than 3 examples.
    (Public RKD code averages over all B³ index triplets, the degenerate ones adding zeros.)"""
    s, t = _rkd_pair(student_emb, teacher_emb)
    if len(s) < 3:
        return s.sum() * 0.0
    return F.smooth_l1_loss(_angles(s), _angles(t))


def rkd_loss(
    student_emb: Tensor, teacher_emb: Tensor, *,
    distance_weight: float = RKD_DISTANCE_WEIGHT, angle_weight: float = RKD_ANGLE_WEIGHT,
) -> Tensor:
    """Relational KD (Park et al. 2019): ``distance_weight * rkd_distance_loss + angle_weight * rkd_angle_loss``
    on (B, D) embeddings ((B, C, H, W) maps are global-average-pooled: the penultimate embedding of a
    survey_lib classifier is its pooled backbone output). Student and teacher widths may differ."""
    dw = check_float("distance_weight", distance_weight, min_value=0.0)
    aw = check_float("angle_weight", angle_weight, min_value=0.0)
    return dw * rkd_distance_loss(student_emb, teacher_emb) + aw * rkd_angle_loss(student_emb, teacher_emb)


# ----------------------------------------------------------------------------------------------------------
# Feature capture and layer choice
# ----------------------------------------------------------------------------------------------------------
def _modules(model: nn.Module, names: Iterable[str], who: str) -> dict[str, nn.Module]:
    """{name: submodule}; ValueError naming ``layers`` for a name ``model`` does not have."""
    modules = dict(model.named_modules())
    found = {}
    for name in names:
        if name not in modules:
            some = ", ".join(repr(n) for n in list(modules)[1:9])
            raise ValueError(f"layers: the {who} has no module {name!r}; its modules include {some}, ...")
        found[name] = modules[name]
    return found


@contextmanager
def capture_features(model: nn.Module, names: Iterable[str], who: str = "model") -> Iterator[dict[str, Tensor]]:
    """Forward hooks on ``model``'s modules ``names``: inside the block every forward pass stores each
    module's output in the yielded dict (the latest pass wins, autograd graph included); removed on exit."""
    features: dict[str, Tensor] = {}

    def store(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"layers: module {name!r} of the {who} returns {type(output).__name__}, not a tensor")
            features[name] = output
        return hook

    handles = [m.register_forward_hook(store(n)) for n, m in _modules(check_type(who, model, nn.Module, "a torch.nn.Module"),
                                                                       list(dict.fromkeys(names)), who).items()]
    try:
        yield features
    finally:
        for h in handles:
            h.remove()


def probe(model: nn.Module, x: Tensor, names: Iterable[str] = (), who: str = "model") -> tuple[Tensor, dict[str, Tensor]]:
    """(output, {name: feature}) of one forward pass in eval mode without gradients; the training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_features(model, names, who) as features:
            output = run_forward(model, x, f"the example input for the {who}")
    finally:
        model.train(was_training)
    return output, dict(features)


def _stages(model: nn.Module, x: Tensor, who: str) -> dict[tuple[int, int], str]:
    """{(H, W): name of the last backbone child with that output size}, for sizes larger than 1x1."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"layers=None needs a {who} with a .backbone (a survey_lib TaskModel); pass layers=... "
                         "naming the modules to compare")
    names = [f"backbone.{n}" for n, _ in backbone.named_children()] or ["backbone"]
    _, features = probe(model, x, names, who)
    stages: dict[tuple[int, int], str] = {}
    for name in names:
        f = features.get(name)
        if f is not None and f.dim() == 4 and f.shape[2] * f.shape[3] > 1:
            stages[tuple(f.shape[2:])] = name
    return stages


def stage_pairs(student: nn.Module, teacher: nn.Module, x: Tensor) -> list[tuple[str, str]]:
    """(student, teacher) module names: for every spatial size both backbones produce, the last backbone
    child producing it (the end of each stage), largest size first."""
    s_stages, t_stages = _stages(student, x, "student"), _stages(teacher, x, "teacher")
    pairs = [(s_stages[size], t_stages[size]) for size in s_stages if size in t_stages]
    if not pairs:
        raise ValueError(f"layers=None: the student's feature sizes {list(s_stages)} and the teacher's {list(t_stages)} "
                         "have none in common; pass layers=... naming the modules to compare")
    return pairs


def _parse_layers(layers: Any) -> list[tuple[str, str]]:
    """[(student name, teacher name)] from a name, a {student: teacher} dict, or a list of names / pairs."""
    if isinstance(layers, str):
        items: list[Any] = [layers]
    elif isinstance(layers, Mapping):
        items = list(layers.items())
    elif isinstance(layers, Iterable):
        items = list(layers)
    else:
        raise TypeError(f"layers must be a module name, a list of names or (student, teacher) pairs, or a "
                        f"{{student: teacher}} dict, got {type(layers).__name__}")
    pairs = []
    for item in items:
        pair = (item, item) if isinstance(item, str) else tuple(item) if isinstance(item, (tuple, list)) else None
        if pair is None or len(pair) != 2 or not all(isinstance(n, str) for n in pair):
            raise TypeError(f"layers items must be module names or (student, teacher) name pairs, got {item!r}")
        pairs.append(pair)
    if not pairs:
        raise ValueError("layers is empty: name at least one module (or pass layers=None for the default)")
    return pairs


def layer_pairs(method: str, layers: Any, student: nn.Module, teacher: nn.Module, x: Tensor) -> list[tuple[str, str]]:
    """The (student, teacher) module pairs ``method`` compares: ``layers`` if given, else "kd": none;
    "hint" and "rkd": the backbone outputs; "attention": :func:`stage_pairs`."""
    check_choice("method", method, METHODS)
    if method == "kd":
        if layers is not None:
            raise ValueError("layers must be None for method='kd': it compares outputs only")
        return []
    if layers is None:
        if method == "attention":
            return stage_pairs(student, teacher, x)
        layers = "backbone"
    pairs = _parse_layers(layers)
    _modules(student, [s for s, _ in pairs], "student")
    _modules(teacher, [t for _, t in pairs], "teacher")
    return pairs


# ----------------------------------------------------------------------------------------------------------
# Hint regressors on the student
# ----------------------------------------------------------------------------------------------------------
def attach_regressors(student: nn.Module, regressors: Sequence[nn.Module]) -> nn.Module:
    """Put ``regressors`` on ``student`` as ``student.distill_regressors`` (keys "0", "1", ...), so that an
    optimizer over ``student.parameters()`` trains them; return ``student``."""
    check_type("student", student, nn.Module, "a torch.nn.Module")
    setattr(student, REGRESSORS, nn.ModuleDict({str(i): check_type("regressors[i]", r, nn.Module, "a torch.nn.Module")
                                                for i, r in enumerate(regressors)}))
    return student


def strip_regressors(model: nn.Module) -> nn.Module:
    """Remove ``model.distill_regressors`` if present; return ``model``."""
    if REGRESSORS in getattr(check_type("model", model, nn.Module, "a torch.nn.Module"), "_modules", {}):
        delattr(model, REGRESSORS)
    return model


def _hint_regressors(student: nn.Module, teacher: nn.Module, pairs: Sequence[tuple[str, str]], x: Tensor,
                     seed: int) -> list[nn.Module]:
    """One seeded :func:`hint_regressor` per pair, sized from a probe forward pass (global RNG untouched)."""
    _, s_feats = probe(student, x, [s for s, _ in pairs], "student")
    _, t_feats = probe(teacher, x, [t for _, t in pairs], "teacher")
    device = next((p.device for p in student.parameters()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [hint_regressor(_as_map(s_feats[s], f"student feature {s!r}").shape[1],
                               _as_map(t_feats[t], f"teacher feature {t!r}").shape[1]).to(device) for s, t in pairs]


# ----------------------------------------------------------------------------------------------------------
# The teacher's side, computed once
# ----------------------------------------------------------------------------------------------------------
def input_fingerprints(x: Tensor) -> list[bytes]:
    """One 16-byte BLAKE2b digest of the raw bytes of each example of ``x`` (dtype and shape included)."""
    check_tensor("x", x)
    rows = x.detach().cpu().contiguous()
    head = f"{rows.dtype}{tuple(rows.shape[1:])}".encode()
    return [hashlib.blake2b(head + row.numpy().tobytes(), digest_size=16).digest() for row in rows]


class TeacherCache:
    """The frozen teacher's outputs and feature targets on one dataset, computed once and looked up by the
    bytes of each input, so that distilling many students from one teacher runs the teacher once.

    A batch is served from the cache only when every example of it is in the dataset the cache was built
    on (an exact match of its bytes); otherwise the loss runs the teacher (``misses`` counts those
    batches). The teacher runs in eval mode at ``batch_size``: its cached outputs equal a live pass up to
    the float rounding of a different batch size (tests: 1e-5). Memory: the outputs plus the targets,
    e.g. attention maps (H·W floats per layer), not the feature maps they come from."""

    def __init__(self, teacher: nn.Module, dataset: Any, *, batch_size: int = 256) -> None:
        check_type("teacher", teacher, nn.Module, "a trained torch.nn.Module")
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.dataset = dataset
        self.batch_size = check_int("batch_size", batch_size, min_value=1)
        self._reference = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        self._index: dict[bytes, int] = {}
        self._store: dict[tuple, Tensor] = {}
        self.hits = self.misses = 0
        self.seconds = 0.0
        for i, key in enumerate(k for x, *_ in self._batches() for k in input_fingerprints(x)):
            self._index.setdefault(key, i)

    def _batches(self) -> Iterator[tuple[Tensor, ...]]:
        from ..data import loader

        yield from loader(self.dataset, self.batch_size, shuffle=False)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in self._store.values())

    def matches(self, teacher: nn.Module) -> bool:
        """Whether ``teacher`` has the very weights and buffers the cache was built from."""
        state = check_type("teacher", teacher, nn.Module, "a torch.nn.Module").state_dict()
        return state.keys() == self._reference.keys() and all(
            state[k].shape == v.shape and torch.equal(state[k].detach().cpu(), v.cpu()) for k, v in self._reference.items())

    def ensure(self, *losses: "DistillationLoss") -> None:
        """Compute, in one teacher pass over the dataset, whatever the ``losses`` need that is not cached yet."""
        needed: dict[tuple, DistillationLoss] = {}
        for loss in losses:
            check_type("losses[i]", loss, DistillationLoss, "a DistillationLoss (see distillation_loss)")
            needed.update({k: loss for k in loss.cache_keys() if k not in self._store and k not in needed})
        keys = list(needed)
        if not keys:
            return
        start = time.perf_counter()
        layers = sorted({k[1] for k in keys if len(k) > 1})
        parts: dict[tuple, list[Tensor]] = {k: [] for k in keys}
        device = next((t.device for t in self.teacher.parameters()), torch.device("cpu"))
        with torch.no_grad(), capture_features(self.teacher, layers, "teacher") as feats:
            for x, *_ in self._batches():
                out = self.teacher(x.to(device))
                for key in keys:
                    value = out if key == ("output",) else needed[key].teacher_target(feats[key[1]], key[2])
                    parts[key].append(value.detach().cpu())
        self._store.update({k: torch.cat(v) for k, v in parts.items()})
        self.seconds += time.perf_counter() - start

    def lookup(self, x: Tensor, keys: Sequence[tuple]) -> list[Tensor] | None:
        """The cached tensors under ``keys`` for the examples of ``x`` (on ``x``'s device), or None when an
        example or a key is missing."""
        idx = [self._index.get(k) for k in input_fingerprints(x)]
        if any(i is None for i in idx) or any(k not in self._store for k in keys):
            self.misses += 1
            return None
        self.hits += 1
        rows = torch.tensor(idx, dtype=torch.long)
        return [self._store[k].index_select(0, rows).to(x.device) for k in keys]


# ----------------------------------------------------------------------------------------------------------
# The extra loss and the method
# ----------------------------------------------------------------------------------------------------------
def _check_beta(method: str, beta: Any) -> float:
    if beta is None:
        return DEFAULT_BETA[method]
    value = check_float("beta", beta, min_value=0.0)
    if method == "kd" and value != 0.0:
        raise ValueError(f"beta={beta!r}: beta weights the feature term of 'hint', 'attention' and 'rkd'; "
                         "method='kd' has none (leave beta=None)")
    return value


class DistillationLoss:
    """The ``extra_loss`` of :func:`distill`: returns ``alpha * (D - task.loss) + beta * F`` (see the module
    docstring), so fit's total is ``(1 - alpha) * task.loss + alpha * D + beta * F``.

    Holds a frozen copy of ``teacher`` (eval mode, no gradients). ``student_features`` is the dict that
    :func:`capture_features` fills during the student's forward pass (needed for every method but "kd").
    ``sizes`` fixes, per layer pair, the spatial size both feature maps are pooled to (None: taken from each
    batch's features); ``cache`` (needs ``sizes``) serves the teacher's side from a :class:`TeacherCache`."""

    def __init__(
        self, task: Task, teacher: nn.Module, *, method: str = "kd", temperature: float | None = None,
        alpha: float | None = None, beta: float | None = None, pairs: Sequence[tuple[str, str]] = (),
        p: float = 2.0, student_features: Mapping[str, Tensor] | None = None,
        sizes: Sequence[tuple[int, int] | None] | None = None, cache: "TeacherCache | None" = None,
    ) -> None:
        self.task = check_type("task", task, Task, "a survey_lib.tasks.Task")
        self.method = check_choice("method", method, METHODS)
        self.temperature = TASK_TEMPERATURE[task.name] if temperature is None else check_temperature(temperature)
        self.alpha = DEFAULT_ALPHA[method] if alpha is None else check_float("alpha", alpha, min_value=0.0, max_value=1.0)
        self.beta = _check_beta(method, beta)
        self.p = check_float("p", p, min_value=_EPS)
        self.pairs = [tuple(pair) for pair in pairs]
        if (method != "kd") != bool(self.pairs):
            raise ValueError(f"pairs: method={method!r} needs " + ("no layer pairs (it compares outputs only)" if method == "kd"
                             else "(student, teacher) layer pairs (see layer_pairs)"))
        self.teacher = copy.deepcopy(check_type("teacher", teacher, nn.Module, "a trained torch.nn.Module")).eval()
        self.teacher.requires_grad_(False)
        _modules(self.teacher, [t for _, t in self.pairs], "teacher")
        self.student_features = student_features
        if sizes is not None and len(sizes) != len(self.pairs):
            raise ValueError(f"sizes holds {len(sizes)} entries for {len(self.pairs)} layer pairs")
        self.sizes = None if sizes is None else [None if z is None else tuple(z) for z in sizes]
        self.cache = None if cache is None else check_type("cache", cache, TeacherCache, "a TeacherCache or None")

    def __call__(self, model: nn.Module, x: Tensor, output: Tensor, target: Tensor) -> Tensor:
        """The extra loss of one batch (called by ``fit`` after the student's forward pass)."""
        s = [self._student_feature(name) for name, _ in self.pairs]
        t_out, t_targets, sizes = self.teacher_targets(x, s)
        loss = output.new_zeros(())
        if self.alpha > 0:
            distilled = output_distill_loss(self.task, output, t_out, temperature=self.temperature)
            loss = loss + self.alpha * (distilled - self.task.loss(output, target))
        if self.method != "kd":
            loss = loss + self.beta * self._feature_term(model, s, t_targets, sizes)
        return loss

    def _student_feature(self, name: str) -> Tensor:
        if self.student_features is None or name not in self.student_features:
            raise RuntimeError(f"the student's feature {name!r} was not captured: run the student inside "
                               "capture_features(student, names) and pass its dict as student_features")
        return self.student_features[name]

    def common_sizes(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> list[tuple[int, int] | None]:
        """Per layer pair, the spatial size both maps are pooled to (each dim the smaller); None for (B, C) features."""
        return [None if s.dim() != 4 or t.dim() != 4 else (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
                for s, t in zip(student_feats, teacher_feats)]

    def teacher_target(self, feature: Tensor, size: tuple[int, int] | None) -> Tensor:
        """What the feature term needs of one teacher feature: its pooled-to-``size`` map (hint), that map's
        attention map (attention) or its embedding (rkd)."""
        if self.method == "rkd":
            return _embedding(feature, "teacher feature")
        if size is not None and feature.dim() == 4 and tuple(feature.shape[2:]) != tuple(size):
            feature = F.adaptive_avg_pool2d(feature, size)
        return attention_map(feature, self.p) if self.method == "attention" else feature

    def cache_keys(self) -> list[tuple]:
        """The keys under which a :class:`TeacherCache` stores what this loss needs (output first)."""
        if self.sizes is None:
            raise RuntimeError("cache_keys needs the pooled sizes: set .sizes (distill does, from a probe)")
        keys: list[tuple] = [("output",)]
        for (_, t_name), size in zip(self.pairs, self.sizes):
            keys.append((self.method, t_name, size, self.p if self.method == "attention" else None))
        return keys

    def teacher_targets(self, x: Tensor, student_feats: Sequence[Tensor] = ()) -> tuple[Tensor, list[Tensor], list]:
        """(teacher output, feature targets, pooled sizes) for the batch ``x``: looked up in ``self.cache``
        when it holds every example of ``x``, else computed by the frozen teacher. Without ``self.sizes``
        the sizes come from ``student_feats``."""
        if self.cache is not None and self.sizes is not None:
            found = self.cache.lookup(x, self.cache_keys())
            if found is not None:
                return found[0], found[1:], list(self.sizes)
        self.teacher.to(x.device)   # the loss's own copy follows the student's batches (a no-op on the CPU)
        with torch.no_grad(), capture_features(self.teacher, [t for _, t in self.pairs], "teacher") as t_feats:
            t_out = self.teacher(x)
            raw = [t_feats[name] for _, name in self.pairs]
        sizes = list(self.sizes) if self.sizes is not None else self.common_sizes(student_feats, raw)
        with torch.no_grad():
            return t_out, [self.teacher_target(t, size) for t, size in zip(raw, sizes)], sizes

    def feature_loss(self, model: nn.Module, student_feats: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
        """The method's feature term F of raw student and teacher features, averaged over the layer pairs."""
        sizes = self.common_sizes(student_feats, teacher_feats)
        targets = [self.teacher_target(t.detach(), z) for t, z in zip(teacher_feats, sizes)]
        return self._feature_term(model, student_feats, targets, sizes)

    def _feature_term(self, model: nn.Module, student_feats: Sequence[Tensor], targets: Sequence[Tensor],
                      sizes: Sequence[tuple[int, int] | None]) -> Tensor:
        """F from the student's raw features and the teacher's targets (:meth:`teacher_target`) at ``sizes``."""
        if self.method == "attention":
            losses = []
            for s, t, size in zip(student_feats, targets, sizes):
                s = _as_map(s, "student feature")
                if size is not None and tuple(s.shape[2:]) != tuple(size):
                    s = F.adaptive_avg_pool2d(s, size)
                if s.shape[0] != t.shape[0]:
                    raise ValueError(f"student feature ({s.shape[0]} examples) and teacher target ({t.shape[0]}) differ in batch")
                losses.append((attention_map(s, self.p) - t).pow(2).mean())
            return torch.stack(losses).mean()
        if self.method == "rkd":
            return torch.stack([rkd_loss(s, t) for s, t in zip(student_feats, targets)]).mean()
        regressors = getattr(model, REGRESSORS, None)
        if not isinstance(regressors, nn.ModuleDict) or len(regressors) != len(self.pairs):
            raise RuntimeError(f"method='hint' needs one regressor per layer pair on the student as "
                               f"student.{REGRESSORS} (see attach_regressors)")
        return torch.stack([hint_loss(s, t, regressors[str(i)])
                            for i, (s, t) in enumerate(zip(student_feats, targets))]).mean()


def _check_cache(cache: Any, teacher: nn.Module, ctx: Context) -> TeacherCache:
    """TypeError/ValueError unless ``cache`` is a TeacherCache of ``teacher`` on ``ctx.data.train``."""
    check_type("cache", cache, TeacherCache, "a TeacherCache or None")
    if cache.dataset is not ctx.data.train:
        raise ValueError("cache was built on another dataset: build it with TeacherCache(teacher, ctx.data.train)")
    if not cache.matches(teacher):
        raise ValueError("cache was built from another teacher (or the teacher's weights changed since): "
                         "build a new TeacherCache(teacher, ctx.data.train)")
    return cache


def thin_student(base: Any, width: float = 0.25, *, seed: int = 0, arch: str | None = None) -> nn.Module:
    """An untrained net of ``base``'s architecture (or ``arch``) and task at ``width``, seeded by ``seed``
    (global RNG untouched), in eval mode: a thin student for a ``survey_lib.baselines.Baseline`` teacher."""
    from ..baselines import Baseline
    from ..models import build_model

    check_type("base", base, Baseline, "a survey_lib.baselines.Baseline (the teacher's baseline)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(check_int("seed", seed, min_value=0))
        model = build_model(base.config["arch"] if arch is None else arch, base.task, in_channels=base.data.info.in_channels,
                            width=width, depth=base.config["depth"], image_size=base.data.info.image_size)
    return model.eval()


def distillation_loss(
    student: nn.Module,
    ctx: Context,
    *,
    teacher: nn.Module | None = None,
    method: str = "kd",
    temperature: float | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    layers: Any = None,
    p: float = 2.0,
) -> DistillationLoss:
    """The :class:`DistillationLoss` that :func:`distill` trains ``student`` with (same arguments), its layer
    pairs and pooled sizes fixed from a probe; e.g. to fill a :class:`TeacherCache` for several methods in one
    teacher pass: ``cache.ensure(*(distillation_loss(s, ctx, teacher=t, method=m) for m in METHODS))``."""
    check_type("student", student, nn.Module, "a torch.nn.Module")
    check_ctx(ctx)
    if teacher is None:
        raise TypeError("teacher is missing: distill(student, ctx, teacher=trained_model) needs the trained network "
                        "to distil from")
    check_type("teacher", teacher, nn.Module, "a trained torch.nn.Module (the network to distil from)")
    check_choice("method", method, METHODS)
    if temperature is not None:
        check_temperature(temperature)
    x = ctx.example_input(2)
    plain = strip_regressors(copy.deepcopy(student))
    s_out, _ = probe(plain, x, (), "student")
    t_out, _ = probe(teacher, x, (), "teacher")
    if s_out.shape != t_out.shape:
        raise ValueError(f"teacher output of shape {tuple(t_out.shape)} does not match the student's {ctx.task.name} "
                         f"output of shape {tuple(s_out.shape)} (on {tuple(x.shape)} inputs): the teacher must solve "
                         "the same task with the same head")
    pairs = layer_pairs(method, layers, plain, teacher, x)
    loss = DistillationLoss(ctx.task, teacher, method=method, temperature=temperature, alpha=alpha, beta=beta,
                            pairs=pairs, p=p)
    _, s_feats = probe(plain, x, [a for a, _ in pairs], "student")
    _, t_feats = probe(teacher, x, [b for _, b in pairs], "teacher")
    loss.sizes = loss.common_sizes([s_feats[a] for a, _ in pairs], [t_feats[b] for _, b in pairs])
    return loss


def distill(
    student: nn.Module,
    ctx: Context,
    *,
    teacher: nn.Module | None = None,
    method: str = "kd",
    temperature: float | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    layers: Any = None,
    p: float = 2.0,
    epochs: int | None = None,
    lr: float | None = None,
    callbacks: Iterable[Callback] = (),
    cache: TeacherCache | None = None,
) -> nn.Module:
    """A copy of ``student`` trained for ``epochs`` (default ``ctx.budget``) on ``ctx``'s task with guidance
    from ``teacher`` (required, keyword: the method signature every family shares is ``(model, ctx, **config)``),
    through ``ctx.finetune(..., extra_loss=distillation_loss(...))``. The objective is
    ``(1 - alpha) * task.loss + alpha * D + beta * F`` (module docstring); ``alpha``/``beta`` default to
    DEFAULT_ALPHA/DEFAULT_BETA of ``method``, ``temperature`` to TASK_TEMPERATURE of the task. ``layers`` (hint, attention, rkd) names the modules compared:
    a name, names, (student, teacher) pairs or a {student: teacher} dict; None picks :func:`layer_pairs`'
    default. ``p`` is the attention exponent. ``cache`` (a :class:`TeacherCache` of this teacher on
    ``ctx.data.train``) serves the teacher's side from memory: its first use runs the teacher once over the
    training split, later runs not at all. Neither ``student`` nor ``teacher`` is changed."""
    loss = distillation_loss(student, ctx, teacher=teacher, method=method, temperature=temperature, alpha=alpha,
                             beta=beta, layers=layers, p=p)
    if cache is not None:
        _check_cache(cache, teacher, ctx)
        cache.ensure(loss)
        loss.cache = cache
    out = strip_regressors(copy.deepcopy(student))
    pairs = loss.pairs
    regressor_params = 0
    if method == "hint":
        attach_regressors(out, _hint_regressors(out, teacher, pairs, ctx.example_input(2), ctx.seed))
        regressor_params = sum(t.numel() for t in getattr(out, REGRESSORS).parameters())
    try:
        with capture_features(out, [s for s, _ in pairs], "student") as features:
            loss.student_features = features
            history = ctx.finetune(out, epochs=epochs, callbacks=callbacks, extra_loss=loss, lr=lr)
    finally:
        strip_regressors(out)
    out.eval()
    final = history.train_loss[-1] if history.train_loss else float("nan")
    return mark(out, "distillation", "training", variant=method, temperature=loss.temperature, alpha=loss.alpha,
                beta=loss.beta, layers=[list(pair) for pair in pairs], p=loss.p, epochs=len(history.train_loss),
                train_loss=final if math.isfinite(final) else None, regressor_params=regressor_params,
                teacher_params=sum(t.numel() for t in teacher.parameters()),
                student_params=sum(t.numel() for t in out.parameters()), cached_teacher=cache is not None)


STUDY_METHODS = ("scratch",) + METHODS


def compare_students(
    base: Any,
    *,
    methods: Sequence[str] = ("scratch", "kd", "hint", "attention"),
    seeds: Sequence[int] = (0, 1, 2),
    width: float = 0.25,
    epochs: int | None = None,
    lr: float | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    cache: TeacherCache | None = None,
) -> list[dict[str, Any]]:
    """Train the same :func:`thin_student` per seed from scratch and by each distillation method from
    ``base.model``, all with one budget (``epochs``/``lr``, default the baseline's own) and the seed's data
    order; one row per (seed, method): ``method``, ``seed``, the test ``metrics``, ``train_seconds``
    (measured, wall clock), ``student_params`` and the trained ``model``. ``options[method]`` passes extra
    :func:`distill` arguments (e.g. ``{"kd": {"temperature": 1.0}}``); ``cache`` defaults to a new
    :class:`TeacherCache`, filled for every method in one teacher pass before the clock starts."""
    import dataclasses

    from ..baselines import Baseline

    check_type("base", base, Baseline, "a survey_lib.baselines.Baseline (the teacher's baseline)")
    methods = [check_choice("methods[i]", m, STUDY_METHODS) for m in _sequence("methods", methods)]
    seeds = [check_int("seeds[i]", x, min_value=0) for x in _sequence("seeds", seeds)]
    options = dict(options or {})
    for name in options:
        check_choice("options key", name, METHODS)
    epochs = base.config["epochs"] if epochs is None else check_int("epochs", epochs, min_value=1)
    lr = base.config["lr"] if lr is None else check_float("lr", lr, min_value=0.0)
    ctx0 = Context.from_baseline(base, budget=epochs, lr=lr, batch_size=base.config["batch_size"])
    cache = TeacherCache(base.model, ctx0.data.train) if cache is None else _check_cache(cache, base.model, ctx0)
    probe_student = thin_student(base, width)
    cache.ensure(*(distillation_loss(probe_student, ctx0, teacher=base.model, method=m, **options.get(m, {}))
                   for m in methods if m != "scratch"))
    rows = []
    for seed in seeds:
        ctx = dataclasses.replace(ctx0, seed=seed)
        student = thin_student(base, width, seed=seed)
        for method in methods:
            start = time.perf_counter()
            if method == "scratch":
                model = copy.deepcopy(student)
                ctx.finetune(model)
                model.eval()
            else:
                model = distill(student, ctx, teacher=base.model, method=method, cache=cache, **options.get(method, {}))
            seconds = time.perf_counter() - start
            rows.append({"method": method, "seed": seed, "metrics": ctx.evaluate(model), "train_seconds": seconds,
                         "student_params": sum(t.numel() for t in model.parameters()), "model": model})
    return rows


def _sequence(name: str, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a non-empty list, got {type(value).__name__}")
    items = list(value)
    if not items or len(set(map(repr, items))) != len(items):
        raise ValueError(f"{name} must be a non-empty list without repeats, got {items!r}")
    return items
