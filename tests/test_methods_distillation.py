"""Tests for survey_lib.methods.distillation: KD, hint, attention and relational losses, and ``distill``."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from survey_lib.data import load
from survey_lib.methods import Context, compression_info
from survey_lib.methods import distillation as D
from survey_lib.models import build_model
from survey_lib.tasks import get_task, task_for
from survey_lib.train import Callback

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny layers, trained by fit: see tests/conftest.py

SIZE = 16
TASKS = ("classification", "regression", "detection", "segmentation")


def student_of(ctx: Context, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("vgg", ctx.task, in_channels=ctx.example_input(1).shape[1], width=0.25).eval()


def teacher_of(ctx: Context, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet", ctx.task, in_channels=ctx.example_input(1).shape[1], width=0.25).eval()


@pytest.fixture(scope="module")
def teacher(ctx) -> nn.Module:
    """A resnet teacher for the digits context, trained 1 epoch (distillation needs a different net, not a good one)."""
    model = teacher_of(ctx)
    ctx.finetune(model, epochs=1, lr=1e-2)
    return model.eval()


def shapes_ctx(task_name: str) -> Context:
    data = load("shapes", task_name, n=48, image_size=SIZE)
    return Context(task=task_for(data), data=data, budget=1, batch_size=32)   # one batch per epoch: few shapes to warm up


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------
# Hinton KD
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (4.0, 0.9), (2.5, 0.0), (8.0, 1.0)])
def test_kd_loss_is_the_hand_computed_formula(temperature, alpha):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    p_t = torch.softmax(t / temperature, dim=1)
    kl = (p_t * (torch.log_softmax(t / temperature, dim=1) - torch.log_softmax(s / temperature, dim=1))).sum(1).mean()
    ce = -torch.log_softmax(s, dim=1)[torch.arange(6), y].mean()
    expected = alpha * temperature**2 * kl + (1 - alpha) * ce
    got = D.kd_loss(s, t, y, temperature=temperature, alpha=alpha)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_kd_loss_gradient_reaches_the_student_only():
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    D.kd_loss(s, t, torch.tensor([0, 1, 2, 0])).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": "4"}, "temperature"),
    ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha"),
])
def test_kd_loss_rejects_bad_settings(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        D.kd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), **kwargs)


def test_kd_loss_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="teacher_logits"):
        D.kd_loss(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target"):
        D.kd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1, 2]))


# ----------------------------------------------------------------------------------------------------------
# Output terms per task
# ----------------------------------------------------------------------------------------------------------
def random_output(task_name: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {"classification": (4, 5), "regression": (4, 1), "detection": (4, 10, 4, 4), "segmentation": (4, 6, 8, 8)}
    return torch.randn(*shape[task_name], generator=g) * 2


def task_named(task_name: str):
    classes = {"classification": 5, "regression": 1, "detection": 5, "segmentation": 6}[task_name]
    return get_task(task_name, num_classes=classes, image_size=SIZE, target_std=2.0)


@pytest.mark.parametrize("task_name", TASKS)
def test_output_distill_loss_is_zero_for_equal_outputs_and_positive_otherwise(task_name):
    task = task_named(task_name)
    s = random_output(task_name, 0)
    assert float(D.output_distill_loss(task, s, s.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(D.output_distill_loss(task, s, random_output(task_name, 1))) > 1e-3
    assert float(D.output_distill_loss(task_name, s, random_output(task_name, 1))) > 1e-3   # by name too


def test_output_distill_loss_matches_hand_computations():
    s, t, temperature = random_output("segmentation", 0), random_output("segmentation", 1), 3.0
    per_pixel = (torch.softmax(t / temperature, 1) * (torch.log_softmax(t / temperature, 1)
                                                      - torch.log_softmax(s / temperature, 1))).sum(1)
    got = D.output_distill_loss(task_named("segmentation"), s, t, temperature=temperature)
    torch.testing.assert_close(got, temperature**2 * per_pixel.mean(), atol=1e-5, rtol=1e-5)
    s, t = random_output("regression", 0), random_output("regression", 1)
    torch.testing.assert_close(D.output_distill_loss(task_named("regression"), s, t), ((s - t) / 2.0).pow(2).mean())
    s, t = random_output("classification", 0), random_output("classification", 1)
    torch.testing.assert_close(D.output_distill_loss("classification", s, t, temperature=2.0),
                               D.kd_loss(s, t, torch.zeros(4, dtype=torch.long), temperature=2.0, alpha=1.0))


@pytest.mark.parametrize("channels", [slice(0, 1), slice(1, 3), slice(3, 5), slice(5, 6)],   # one class: a shift of all cancels
                         ids=["objectness", "offsets", "sizes", "classes"])
def test_detection_distill_loss_sees_every_part_of_the_grid(channels):
    t = random_output("detection", 0)
    s = t.clone()
    s[:, channels] += 1.0
    assert float(D.detection_distill_loss(s, t)) > 1e-3


def test_detection_box_terms_are_weighted_by_the_teachers_confidence():
    t = torch.zeros(1, 7, 2, 1)
    t[0, 0, 0, 0], t[0, 0, 1, 0] = 8.0, -8.0                 # cell 0: object, cell 1: background
    sure, unsure = t.clone(), t.clone()
    sure[0, 3, 0, 0] += 1.0                                   # wrong log-width where the teacher sees an object
    unsure[0, 3, 1, 0] += 1.0                                 # the same error where it sees none
    assert float(D.detection_distill_loss(sure, t)) > 100 * float(D.detection_distill_loss(unsure, t))


def test_output_distill_loss_rejects_unknown_tasks_and_mismatched_outputs():
    with pytest.raises(ValueError, match="task.*accepted values: 'classification', 'regression', 'detection'"):
        D.output_distill_loss("keypoints", torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="task"):
        D.output_distill_loss(3, torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"teacher_out of shape \(2, 4\).*\(2, 3\)"):
        D.output_distill_loss("classification", torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        D.output_distill_loss("segmentation", torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), temperature=0)


# ----------------------------------------------------------------------------------------------------------
# Feature terms
# ----------------------------------------------------------------------------------------------------------
def test_attention_transfer_is_the_hand_computed_formula():
    g = torch.Generator().manual_seed(0)
    s1, t1 = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 8, 6, 6, generator=g)
    s2, t2 = torch.randn(3, 5, 8, 8, generator=g), torch.randn(3, 7, 4, 4, generator=g)

    def at(f):
        a = f.pow(2).mean(1).reshape(len(f), -1)
        return a / a.norm(dim=1, keepdim=True)

    layer1 = ((at(s1) - at(t1)) ** 2).mean()
    layer2 = ((at(F.avg_pool2d(s2, 2)) - at(t2)) ** 2).mean()   # 8x8 pooled to the teacher's 4x4
    got = D.attention_transfer_loss([s1, s2], [t1, t2])
    torch.testing.assert_close(got, (layer1 + layer2) / 2)
    assert float(D.attention_transfer_loss(s1, s1 * 3)) == pytest.approx(0.0, abs=1e-7)   # scale-free
    torch.testing.assert_close(D.attention_map(s1, p=1), F.normalize(s1.abs().mean(1).flatten(1)))


def test_attention_transfer_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same, non-zero number"):
        D.attention_transfer_loss([torch.randn(2, 3, 4, 4)], [])
    with pytest.raises(ValueError, match="student_feats"):
        D.attention_transfer_loss(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="p"):
        D.attention_map(torch.randn(2, 3, 4, 4), p=0)


def test_rkd_is_zero_for_equal_embeddings_and_ignores_the_scale_of_the_student():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 6, generator=g), torch.randn(8, 12, generator=g)   # widths may differ
    assert float(D.rkd_loss(s, s.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(D.rkd_loss(s, t)) > 0.1
    for fn in (D.rkd_distance_loss, D.rkd_angle_loss, D.rkd_loss):
        torch.testing.assert_close(fn(3.7 * s, t), fn(s, t), atol=1e-5, rtol=1e-5)
    maps = torch.randn(8, 6, 3, 3, generator=g)                               # feature maps are pooled first
    torch.testing.assert_close(D.rkd_loss(maps, t), D.rkd_loss(maps.mean(dim=(2, 3)), t))


def test_rkd_terms_match_loops_over_pairs_and_triplets():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)

    def huber(a, b):
        d = abs(a - b)
        return 0.5 * d * d if d < 1 else d - 0.5

    def distances(e):
        d = {(i, j): float((e[i] - e[j]).norm()) for i, j in itertools.combinations(range(4), 2)}
        mean = sum(d.values()) / len(d)
        return {k: v / mean for k, v in d.items()}

    def cosines(e):
        out = {}
        for i, j, k in itertools.permutations(range(4), 3):
            a, b = e[i] - e[j], e[k] - e[j]
            out[i, j, k] = float(a @ b / (a.norm() * b.norm()))
        return out

    ds, dt = distances(s), distances(t)
    cs, ct = cosines(s), cosines(t)
    distance = sum(huber(ds[k], dt[k]) for k in ds) / len(ds)
    angle = sum(huber(cs[k], ct[k]) for k in cs) / len(cs)
    assert float(D.rkd_distance_loss(s, t)) == pytest.approx(distance, rel=1e-5)
    assert float(D.rkd_angle_loss(s, t)) == pytest.approx(angle, rel=1e-5)
    assert float(D.rkd_loss(s, t, distance_weight=2.0, angle_weight=3.0)) == pytest.approx(2 * distance + 3 * angle, rel=1e-5)
    assert float(D.rkd_loss(s[:1], t[:1])) == 0.0   # one example: no relations


def test_hint_loss_regresses_pools_and_checks_channels():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    regressor = D.hint_regressor(3, 5)
    expected = F.mse_loss(F.avg_pool2d(regressor(s), 2), t)
    torch.testing.assert_close(D.hint_loss(s, t, regressor), expected)
    assert float(D.hint_loss(t, t.clone())) == 0.0
    with pytest.raises(ValueError, match="hint_regressor"):
        D.hint_loss(s, t)


# ----------------------------------------------------------------------------------------------------------
# Feature capture and layers
# ----------------------------------------------------------------------------------------------------------
def test_capture_features_records_each_forward_and_removes_its_hooks(ctx):
    model = student_of(ctx)
    x = ctx.example_input(3)
    with D.capture_features(model, ["backbone.0", "backbone"]) as feats:
        out = model(x)
        assert feats["backbone.0"].shape[:2] == (3, 8) and feats["backbone.0"].requires_grad
        torch.testing.assert_close(model.head(feats["backbone"]), out)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="layers: the model has no module 'nope'"):
        with D.capture_features(model, ["nope"]):
            pass


def test_default_layers_match_stages_by_spatial_size(ctx):
    student, teacher = student_of(ctx), teacher_of(ctx)
    x = ctx.example_input(2)
    pairs = D.layer_pairs("attention", None, student, teacher, x)
    _, s_feats = D.probe(student, x, [s for s, _ in pairs])
    _, t_feats = D.probe(teacher, x, [t for _, t in pairs])
    sizes = [tuple(s_feats[s].shape[2:]) for s, _ in pairs]
    assert sizes == [tuple(t_feats[t].shape[2:]) for _, t in pairs] and sizes == [(8, 8), (4, 4)]
    assert D.layer_pairs("hint", None, student, teacher, x) == [("backbone", "backbone")]
    assert D.layer_pairs("rkd", {"backbone.1": "backbone.2"}, student, teacher, x) == [("backbone.1", "backbone.2")]
    assert D.layer_pairs("kd", None, student, teacher, x) == []
    with pytest.raises(ValueError, match="layers: the teacher has no module 'nope'"):
        D.layer_pairs("hint", [("backbone", "nope")], student, teacher, x)
    with pytest.raises(ValueError, match="layers must be None for method='kd'"):
        D.layer_pairs("kd", "backbone", student, teacher, x)
    with pytest.raises(TypeError, match="layers"):
        D.layer_pairs("hint", 3, student, teacher, x)


# ----------------------------------------------------------------------------------------------------------
# The extra loss: the documented weighting
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, alpha, beta", [("kd", 0.7, None), ("attention", 0.4, 10.0), ("rkd", 0.0, 2.0)])
def test_fit_total_is_the_documented_weighting(ctx, teacher, method, alpha, beta):
    student = student_of(ctx)
    x, y = ctx.calibration_batches(1)[0]
    pairs = D.layer_pairs(method, None, student, teacher, x)
    loss = D.DistillationLoss(ctx.task, teacher, method=method, temperature=3.0, alpha=alpha, beta=beta, pairs=pairs)
    with D.capture_features(student, [s for s, _ in pairs]) as feats:
        loss.student_features = feats
        out = student(x)
        total = ctx.task.loss(out, y) + loss(student, x, out, y)      # what fit minimizes
    with torch.no_grad(), D.capture_features(teacher, [t for _, t in pairs]) as t_feats:
        t_out = teacher(x)
    expected = (1 - alpha) * ctx.task.loss(out, y) + alpha * D.output_distill_loss(ctx.task, out, t_out, temperature=3.0)
    if method == "kd":
        torch.testing.assert_close(total, D.kd_loss(out, t_out, y, temperature=3.0, alpha=alpha))
    else:
        s, t = [feats[n] for n, _ in pairs], [t_feats[n] for _, n in pairs]
        feature = D.attention_transfer_loss(s, t) if method == "attention" else D.rkd_loss(s[0], t[0])
        expected = expected + beta * feature
    torch.testing.assert_close(total, expected)


def test_distillation_loss_needs_the_students_features(ctx, teacher):
    loss = D.DistillationLoss(ctx.task, teacher, method="attention", pairs=[("backbone", "backbone")])
    x, y = ctx.calibration_batches(1)[0]
    with pytest.raises(RuntimeError, match="capture_features"):
        loss(teacher, x, teacher(x), y)
    with pytest.raises(ValueError, match="pairs: method='kd' needs no layer pairs"):
        D.DistillationLoss(ctx.task, teacher, pairs=[("backbone", "backbone")])
    with pytest.raises(ValueError, match="pairs: method='rkd' needs"):
        D.DistillationLoss(ctx.task, teacher, method="rkd")


# ----------------------------------------------------------------------------------------------------------
# distill
# ----------------------------------------------------------------------------------------------------------
def test_distill_returns_a_new_marked_model_and_leaves_student_and_teacher_alone(ctx, teacher):
    student = student_of(ctx)
    student_before, teacher_before = params(student), params(teacher)
    teacher.train()
    out = D.distill(student, ctx, teacher=teacher, epochs=1)
    teacher.eval()
    assert out is not student and not same(params(out), student_before)
    assert same(params(student), student_before) and same(params(teacher), teacher_before)
    assert all(p.requires_grad for p in teacher.parameters())
    assert all(not m._forward_hooks for m in itertools.chain(student.modules(), teacher.modules(), out.modules()))
    info = compression_info(out)["last"]
    assert info["method"] == "distillation" and info["changes"] == ("training",)
    assert info["variant"] == "kd" and info["temperature"] == 4.0 and info["alpha"] == 0.9 and info["epochs"] == 1
    assert not out.training


def test_kd_with_alpha_one_pulls_the_student_towards_the_teacher(ctx, teacher):
    student = student_of(ctx)
    x = torch.stack([ctx.data.train[i][0] for i in range(len(ctx.data.train))])

    def gap(model):
        with torch.no_grad():
            return float(D.softened_kl(model.eval()(x), teacher(x), 4.0))

    out = D.distill(student, ctx, teacher=teacher, alpha=1.0, epochs=3, lr=1e-2)
    assert gap(out) < 0.5 * gap(student)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"teacher": None}, TypeError, "teacher is missing"),
    ({"teacher": "resnet"}, TypeError, "teacher must be a trained torch.nn.Module"),
    ({"method": "crd"}, ValueError, "method='crd' is not supported; accepted values: 'kd', 'hint', 'attention', 'rkd'"),
    ({"temperature": 0}, ValueError, "temperature"),
    ({"temperature": -2.0}, ValueError, "temperature"),
    ({"alpha": 2.0}, ValueError, "alpha"),
    ({"beta": 1.0}, ValueError, "beta"),
    ({"beta": -1.0, "method": "rkd"}, ValueError, "beta"),
    ({"layers": "backbone.99", "method": "hint"}, ValueError, "layers"),
    ({"ctx": None}, TypeError, "ctx"),
])
def test_distill_rejects_bad_arguments(ctx, teacher, kwargs, error, match):
    args = {"ctx": ctx, "teacher": teacher, **kwargs}
    with pytest.raises(error, match=match):
        D.distill(student_of(ctx), args.pop("ctx"), **args)


def test_distill_rejects_a_teacher_of_another_task(ctx):
    other = build_model("vgg", get_task("classification", num_classes=4, image_size=8), in_channels=1, width=0.25)
    with pytest.raises(ValueError, match=r"teacher output of shape \(2, 4\) does not match .* \(2, 10\)"):
        D.distill(student_of(ctx), ctx, teacher=other)
    seg = shapes_ctx("segmentation")
    with pytest.raises(ValueError, match="teacher"):     # does not even take the student's inputs
        D.distill(student_of(seg), seg, teacher=other)


class RegressorWatch(Callback):
    """Copies the hint regressors' weights when training starts and ends."""

    def on_train_begin(self, state):
        self.before = params(getattr(state.model, D.REGRESSORS))

    def on_train_end(self, state):
        self.after = params(getattr(state.model, D.REGRESSORS))


def test_hint_regressor_is_trained_by_fit_and_removed_afterwards(ctx, teacher):
    watch = RegressorWatch()
    student = student_of(ctx)
    out = D.distill(student, ctx, teacher=teacher, method="hint", layers={"backbone.1": "backbone.2"}, epochs=1, callbacks=[watch])
    assert set(watch.before) == {"0.weight", "0.bias"} and watch.before["0.weight"].shape == (16, 8, 1, 1)
    assert not same(watch.before, watch.after)
    assert not hasattr(out, D.REGRESSORS) and not any(D.REGRESSORS in k for k in out.state_dict())
    assert set(out.state_dict()) == set(student.state_dict())
    info = compression_info(out)["last"]
    assert info["regressor_params"] == 16 * 8 + 16 and info["beta"] == 100.0 and info["alpha"] == 0.0


@pytest.mark.parametrize("task_name", TASKS)
def test_distill_works_for_every_task_and_method(task_name):
    ctx = shapes_ctx(task_name)
    student, teacher = student_of(ctx), teacher_of(ctx)
    x = ctx.example_input(2)
    for method in D.METHODS:
        out = D.distill(student, ctx, teacher=teacher, method=method, alpha=0.5, epochs=1)
        assert out(x).shape == student(x).shape and torch.isfinite(out(x)).all()
        info = compression_info(out)["last"]
        assert info["variant"] == method and info["train_loss"] is not None
        assert not hasattr(out, D.REGRESSORS)


# ----------------------------------------------------------------------------------------------------------
# The teacher cache
# ----------------------------------------------------------------------------------------------------------
def test_input_fingerprints_tell_inputs_apart_by_their_bytes():
    x = torch.randn(3, 2, 4, 4)
    same_bytes = x.clone()
    changed = x.clone()
    changed[1, 0, 0, 0] += 1e-6
    assert D.input_fingerprints(x) == D.input_fingerprints(same_bytes)
    fx, fc = D.input_fingerprints(x), D.input_fingerprints(changed)
    assert fx[0] == fc[0] and fx[1] != fc[1] and len(set(fx)) == 3
    assert D.input_fingerprints(x.double())[0] != fx[0]


def cached_loss(ctx, teacher, method, cache=None):
    """A DistillationLoss of ``method`` with the sizes distill would fix, and its student."""
    student = student_of(ctx)
    x = ctx.example_input(2)
    pairs = D.layer_pairs(method, None, student, teacher, x)
    loss = D.DistillationLoss(ctx.task, teacher, method=method, pairs=pairs, cache=cache)
    _, s = D.probe(student, x, [a for a, _ in pairs])
    _, t = D.probe(teacher, x, [b for _, b in pairs])
    loss.sizes = loss.common_sizes([s[a] for a, _ in pairs], [t[b] for _, b in pairs])
    return loss, student


@pytest.mark.parametrize("method", D.METHODS)
def test_cache_serves_what_the_live_teacher_computes(method):
    ctx = shapes_ctx("segmentation" if method == "attention" else "classification")
    teacher = teacher_of(ctx)
    cache = D.TeacherCache(teacher, ctx.data.train, batch_size=20)
    loss, student = cached_loss(ctx, teacher, method, cache)
    cache.ensure(loss)
    x = torch.stack([ctx.data.train[i][0] for i in (7, 0, 23, 7)])   # any order, repeats included
    live = D.DistillationLoss(ctx.task, teacher, method=method, pairs=loss.pairs, sizes=loss.sizes)
    out, targets, sizes = loss.teacher_targets(x)
    out_live, targets_live, _ = live.teacher_targets(x)
    assert cache.hits == 1 and cache.misses == 0 and cache.nbytes > 0 and len(cache) == len(ctx.data.train)
    torch.testing.assert_close(out, out_live, rtol=1e-5, atol=1e-5)
    for a, b in zip(targets, targets_live):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    seconds = cache.seconds
    cache.ensure(loss)                                               # nothing new to compute
    assert cache.seconds == seconds


def test_a_cache_miss_runs_the_teacher_and_gives_the_same_loss(ctx, teacher):
    cache = D.TeacherCache(teacher, ctx.data.train)
    loss, student = cached_loss(ctx, teacher, "attention", cache)
    cache.ensure(loss)
    live = D.DistillationLoss(ctx.task, teacher, method="attention", pairs=loss.pairs, sizes=loss.sizes)
    x, y = ctx.calibration_batches(1)[0]
    unseen = x + 0.5                                                 # not in the training split
    for batch, hits, misses in ((x, 1, 0), (unseen, 1, 1)):
        with D.capture_features(student, [s for s, _ in loss.pairs]) as feats:
            loss.student_features = live.student_features = feats
            out = student(batch)
            torch.testing.assert_close(loss(student, batch, out, y), live(student, batch, out, y), rtol=1e-5, atol=1e-6)
        assert (cache.hits, cache.misses) == (hits, misses)


def test_distill_with_a_cache_trains_the_same_student_without_rerunning_the_teacher(ctx, teacher):
    cache = D.TeacherCache(teacher, ctx.data.train)
    student = student_of(ctx)
    plain = D.distill(student, ctx, teacher=teacher, method="hint", epochs=1)
    cached = D.distill(student, ctx, teacher=teacher, method="hint", epochs=1, cache=cache)
    steps = -(-len(ctx.data.train) // ctx.batch_size)
    assert cache.hits == steps and cache.misses == 0
    for a, b in zip(plain.state_dict().values(), cached.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert compression_info(cached)["last"]["cached_teacher"] is True
    seconds = cache.seconds
    D.distill(student, ctx, teacher=teacher, method="hint", epochs=1, cache=cache)
    assert cache.seconds == seconds and cache.hits == 2 * steps


def test_distill_rejects_a_cache_of_another_teacher_or_dataset(ctx, teacher):
    student = student_of(ctx)
    other = teacher_of(ctx, seed=5)
    with pytest.raises(ValueError, match="another teacher"):
        D.distill(student, ctx, teacher=teacher, cache=D.TeacherCache(other, ctx.data.train))
    with pytest.raises(ValueError, match="another dataset"):
        D.distill(student, ctx, teacher=teacher, cache=D.TeacherCache(teacher, ctx.data.test))
    with pytest.raises(TypeError, match="cache"):
        D.distill(student, ctx, teacher=teacher, cache={"output": 1})


def test_one_teacher_pass_fills_the_cache_for_several_methods(ctx, teacher):
    cache = D.TeacherCache(teacher, ctx.data.train)
    student = student_of(ctx)
    losses = [D.distillation_loss(student, ctx, teacher=teacher, method=m) for m in D.METHODS]
    cache.ensure(*losses)
    seconds, x = cache.seconds, ctx.example_input(4, split="train")
    for loss in losses:
        cache.ensure(loss)
        assert cache.lookup(x, loss.cache_keys()) is not None
    assert cache.seconds == seconds and cache.hits == len(losses) and cache.misses == 0
    with pytest.raises(TypeError, match="losses"):
        cache.ensure("kd")


# ----------------------------------------------------------------------------------------------------------
# Per-task temperature, thin students and the equal-budget comparison
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A shapes classification baseline of 120 images at 16x16 trained 1 epoch, in a private checkpoint cache."""
    from survey_lib.baselines import baseline

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SURVEY_LIB_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setenv("SURVEY_LIB_PROGRESS", "0")
        return baseline("classification", "digits", budget={"n": 120, "epochs": 1, "width": 0.5})


def test_segmentation_distils_at_temperature_one_by_default():
    assert D.TASK_TEMPERATURE["segmentation"] == 1.0 and D.TASK_TEMPERATURE["classification"] == D.DEFAULT_TEMPERATURE
    for task_name in ("classification", "segmentation"):
        ctx = shapes_ctx(task_name)
        out = D.distill(student_of(ctx), ctx, teacher=teacher_of(ctx), epochs=1)
        assert compression_info(out)["last"]["temperature"] == D.TASK_TEMPERATURE[task_name]
    ctx = shapes_ctx("segmentation")
    out = D.distill(student_of(ctx), ctx, teacher=teacher_of(ctx), epochs=1, temperature=4.0)
    assert compression_info(out)["last"]["temperature"] == 4.0


def test_thin_student_is_the_baselines_net_at_a_width_and_seeded(tiny_base):
    a, b = D.thin_student(tiny_base, 0.5, seed=3), D.thin_student(tiny_base, 0.5, seed=3)
    assert same(params(a), params(b)) and not same(params(a), params(D.thin_student(tiny_base, 0.5, seed=4)))
    thin = D.thin_student(tiny_base, 0.25)
    full = sum(t.numel() for t in tiny_base.model.parameters())
    assert sum(t.numel() for t in thin.parameters()) < full and not thin.training
    x = tiny_base.data.test[0][0][None]
    assert thin(x).shape == tiny_base.model(x).shape
    state = torch.random.get_rng_state()
    D.thin_student(tiny_base, seed=9)
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(TypeError, match="Baseline"):
        D.thin_student(tiny_base.model)


def test_compare_students_trains_each_method_at_one_budget(tiny_base):
    rows = D.compare_students(tiny_base, methods=["scratch", "kd"], seeds=[0, 1], width=0.25, epochs=1)
    assert [(r["method"], r["seed"]) for r in rows] == [("scratch", 0), ("kd", 0), ("scratch", 1), ("kd", 1)]
    for r in rows:
        assert set(r["metrics"]) == {"accuracy"} and r["train_seconds"] > 0 and not r["model"].training
        info = compression_info(r["model"])
        assert (info["last"] is None) if r["method"] == "scratch" else info["last"]["epochs"] == 1
    ctx = Context.from_baseline(tiny_base, budget=1, lr=tiny_base.config["lr"], batch_size=tiny_base.config["batch_size"])
    scratch = D.thin_student(tiny_base, 0.25, seed=1)
    ctx.seed = 1
    ctx.finetune(scratch)
    assert same(params(scratch.eval()), params(rows[2]["model"]))        # the scratch row is the plain student, trained
    for kwargs, error, match in [
        (dict(methods=["dropout"]), ValueError, "methods"),
        (dict(seeds=[0, 0]), ValueError, "seeds"),
        (dict(methods="kd"), TypeError, "methods"),
        (dict(options={"scratch": {}}), ValueError, "options key"),
        (dict(epochs=0), ValueError, "epochs"),
    ]:
        with pytest.raises(error, match=match):
            D.compare_students(tiny_base, **kwargs)
