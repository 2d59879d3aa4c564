"""Structural tests (Torch-Pruning style, untrained small nets) for survey_lib.methods.structured."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from survey_lib.cost import count, export_onnx, ort_session
from survey_lib.cost.latency import check_ort_matches
from survey_lib.data import load
from survey_lib.methods import Context, compression_info
from survey_lib.methods.structured import (
    bn_l1_penalty,
    bn_scale_importance,
    channel_counts,
    channel_groups,
    keep_plan,
    l1_filter_prune,
    l1_importance,
    prune_channels,
    slim_prune,
    slimming_train,
    structured_plan_summary,
)
from survey_lib.models import build_model
from survey_lib.tasks import get_task

SIZE = 16
TASKS = {"classification": 3, "regression": 1, "detection": 2, "segmentation": 3}
ARCHS = ("vgg", "resnet", "mobilenet")
CASES = [(a, t) for a in ARCHS for t in TASKS] + [("mlp", "classification"), ("mlp", "regression")]


def make(arch: str, task: str = "classification", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(arch, get_task(task, num_classes=TASKS[task], image_size=SIZE), in_channels=3,
                        width=0.25, depth=1)
    # untrained BatchNorm stats are 0/1: randomize them so that slicing mistakes show up
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def x_input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def random_plan(model: nn.Module, fraction: float = 0.5, seed: int = 0) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    plan = {}
    for g in channel_groups(model):
        keep = max(1, int(round(g.size * (1 - fraction))))
        plan[g.id] = torch.randperm(g.size, generator=gen)[:keep].sort().values
    return plan


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def macs(model: nn.Module) -> int:
    return int(count(model, x_input(1))["macs"].sum())


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny convs: see tests/conftest.py


@pytest.fixture(scope="module")
def digits_ctx():
    data = load("digits", "classification", n=240)
    from survey_lib.tasks import task_for

    return Context(task=task_for(data), data=data, budget=1, batch_size=32)


# ----------------------------------------------------------------------------------------------------------
# structure
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, task", CASES)
def test_l1_prune_shrinks_every_arch_and_task(arch, task):
    model = make(arch, task)
    before = state(model)
    x = x_input()
    pruned = l1_filter_prune(model, None, ratio=0.5, finetune=False)
    assert pruned is not model
    for k, v in model.state_dict().items():  # input untouched
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    assert params(pruned) < params(model)
    assert macs(pruned) < macs(model)
    info = compression_info(pruned)["last"]
    assert info["method"] == "l1_filter_prune" and info["changes"] == ("dense_shapes",)
    assert info["params_after"] == params(pruned) < info["params_before"]
    assert type(pruned) is type(model)


def test_groups_of_resnet_couple_residual_channels():
    model = make("resnet")
    groups = channel_groups(model, include_fixed=True)
    fixed = [g for g in groups if not g.prunable]
    assert {g.fixed for g in fixed} == {"network input", "reaches the model output"}
    coupled = [g for g in groups if g.coupled]
    # stage 1: stem + identity block; stages 2 and 3: conv2 + projection shortcut
    assert [len(g.producers) for g in coupled] == [2, 2, 2]
    stage2 = coupled[1]
    assert any(p.endswith("shortcut.0") for p in stage2.producers)
    assert any(m.endswith("shortcut.1") for m in stage2.members)
    inner = [g for g in groups if g.prunable and not g.coupled]
    assert all(g.producers[0].endswith("conv1") for g in inner)


def test_depthwise_conv_is_pruned_with_its_producer():
    model = make("mobilenet")
    for g in channel_groups(model):
        depthwise = [n for n in g.members if isinstance(g.modules[n], nn.Conv2d)]
        for n in depthwise:
            assert g.modules[n].groups == g.size
    pruned = l1_filter_prune(model, None, ratio=0.5, finetune=False)
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels


# ----------------------------------------------------------------------------------------------------------
# consistency: kept channels compute what they computed before
# ----------------------------------------------------------------------------------------------------------
def _outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.detach()))
               for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return got


@pytest.mark.parametrize("arch, task", [(a, "classification") for a in ARCHS] + [("resnet", "detection"),
                                                                                  ("mlp", "classification")])
def test_kept_channels_keep_their_activations(arch, task):
    """Pruning one group at a time: the producers' and members' outputs are the original kept channels."""
    model = make(arch, task)
    x = x_input()
    order = list(_outputs(model, [n for n, m in model.named_modules() if not list(m.children())], x))
    for g in channel_groups(model):
        kept = torch.arange(0, g.size, 2)
        pruned = prune_channels(model, {g.id: kept})
        # layers that run before any consumer of the group see unchanged inputs (later producers of a
        # residual group read the pruned stream: the exactness test below covers them)
        first_consumer = min(order.index(c) for c in g.consumers)
        names = [n for n in g.producers + g.members if order.index(n) < first_consumer]
        assert names
        ref, got = _outputs(model, names, x), _outputs(pruned, names, x)
        for n in names:
            assert got[n].shape[1] == len(kept), n
            torch.testing.assert_close(got[n], ref[n][:, kept], rtol=1e-5, atol=1e-5, msg=f"{arch} {n}")


@pytest.mark.parametrize("arch, task", CASES)
def test_pruning_channels_with_zero_outgoing_weights_is_exact(arch, task):
    """Zero every consumer's weights from the removed channels: then removing them changes nothing."""
    model = make(arch, task)
    plan = random_plan(model, 0.5, seed=3)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for g in channel_groups(model):
            removed = sorted(set(range(g.size)) - set(plan[g.id].tolist()))
            for c in g.consumers:
                mods[c].weight[:, removed] = 0.0
    x = x_input()
    pruned = prune_channels(model, plan)
    assert params(pruned) < params(model)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-4, atol=1e-5)


def test_prune_channels_does_not_mutate_and_keeps_train_flags():
    model = make("resnet").train()
    before = state(model)
    pruned = prune_channels(model, random_plan(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(m.training for m in pruned.modules())
    assert all(p.requires_grad for p in pruned.parameters())


# ----------------------------------------------------------------------------------------------------------
# importance and plans
# ----------------------------------------------------------------------------------------------------------
def test_l1_prune_removes_the_smallest_filters():
    model = make("vgg")
    g = channel_groups(model)[0]
    conv = g.modules[g.producers[0]]
    with torch.no_grad():
        conv.weight[[1, 5]] *= 1e-3
    scores = l1_importance(g)
    assert torch.allclose(scores, conv.weight.detach().abs().sum((1, 2, 3)).double())
    pruned = l1_filter_prune(model, None, ratio=0.25, finetune=False)
    new_conv = dict(pruned.named_modules())[g.producers[0]]
    assert new_conv.out_channels == g.size - 2
    keep = [i for i in range(g.size) if i not in (1, 5)]
    torch.testing.assert_close(new_conv.weight, conv.weight[keep])


def test_slim_prune_global_threshold_respects_min_channels():
    model = make("vgg", "detection")
    groups = channel_groups(model)
    first = groups[0]
    bn = first.batchnorms()[0]
    with torch.no_grad():
        bn.weight.fill_(1e-4)  # the whole first group looks useless
    scores = {g.id: bn_scale_importance(g) for g in groups}
    plan = keep_plan(groups, scores, 0.3, min_channels=3, global_threshold=True)
    assert len(plan[first.id]) == 3  # floored at min_channels, not emptied
    total = sum(g.size for g in groups)
    assert sum(g.size - len(plan[g.id]) for g in groups) == round(0.3 * total)
    pruned = slim_prune(model, None, ratio=0.3, finetune=False, min_channels=3)
    assert channel_counts(pruned)[first.producers[0]] == 3
    assert compression_info(pruned)["last"]["global_threshold"] is True


@pytest.mark.parametrize("global_threshold", [False, True])
def test_round_to_keeps_multiples(global_threshold):
    model = make("resnet", "detection")
    groups = channel_groups(model)
    scores = {g.id: l1_importance(g) for g in groups}
    plan = keep_plan(groups, scores, 0.4, round_to=8, global_threshold=global_threshold)
    for g in groups:
        assert len(plan[g.id]) % 8 == 0 or len(plan[g.id]) == g.size
        assert torch.equal(plan[g.id], plan[g.id].sort().values)
    pruned = slim_prune(model, None, ratio=0.4, round_to=8, finetune=False)
    assert all(c % 8 == 0 for n, c in channel_counts(pruned).items() if not n.endswith("head.3"))


def test_bn_importance_needs_a_batchnorm():
    model = make("mlp")
    g = channel_groups(model)[0]
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_scale_importance(g)
    with pytest.raises(ValueError, match="BatchNorm"):
        slim_prune(model, None, ratio=0.5, finetune=False)


def test_prune_residual_false_and_ignore_keep_those_channels():
    model = make("resnet", "detection")
    pruned = l1_filter_prune(model, None, ratio=0.5, finetune=False, prune_residual=False, ignore=("head",))
    before, after = channel_counts(model), channel_counts(pruned)
    for g in channel_groups(model):
        for p in g.producers:
            if g.coupled or p.startswith("head"):
                assert after[p] == before[p], p
            else:
                assert after[p] < before[p], p


def test_plan_summary_and_channel_counts():
    model = make("mobilenet")
    plan = random_plan(model, 0.5)
    table = structured_plan_summary(model, plan)
    assert len(table) == len(channel_groups(model))
    assert (table["kept"] + table["removed"] == table["size"]).all()
    counts = channel_counts(prune_channels(model, plan))
    assert all(counts[p] == row.kept for row in table.itertuples() for p in row.producers.split(", "))


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
@pytest.mark.parametrize("method", [l1_filter_prune, slim_prune])
def test_bad_ratio_raises(method, ratio):
    with pytest.raises(ValueError, match="ratio"):
        method(make("vgg"), None, ratio=ratio, finetune=False)


def test_grouped_conv_gives_a_clear_error():
    model = make("resnet")
    block = model.backbone[3]
    block.conv1 = nn.Conv2d(block.conv1.in_channels, block.conv1.out_channels, 3, padding=1, groups=4, bias=False)
    with pytest.raises(ValueError, match=r"cannot prune backbone\.3\.conv1: grouped conv with groups=4"):
        l1_filter_prune(model, None, ratio=0.5, finetune=False)


def test_unsupported_operation_gives_a_clear_error():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    with pytest.raises(ValueError, match="cannot prune through cat"):
        channel_groups(Cat())

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.GroupNorm(2, 4)

        def forward(self, x):
            return self.norm(self.conv(x))

    with pytest.raises(ValueError, match="cannot prune norm: module type GroupNorm"):
        channel_groups(Odd())


def test_bad_plans_raise():
    model = make("vgg")
    fixed = [g for g in channel_groups(model, include_fixed=True) if not g.prunable]
    g = channel_groups(model)[0]
    with pytest.raises(ValueError, match="cannot be pruned"):
        prune_channels(model, {fixed[0].id: [0]})
    with pytest.raises(ValueError, match="at least one"):
        prune_channels(model, {g.id: []})
    with pytest.raises(ValueError, match="lie in"):
        prune_channels(model, {g.id: [0, g.size]})
    with pytest.raises(ValueError, match="duplicates"):
        prune_channels(model, {g.id: [0, 0]})
    with pytest.raises(ValueError, match="groups 0"):
        prune_channels(model, {999: [0]})


def test_finetune_needs_a_context():
    with pytest.raises(ValueError, match="ctx"):
        l1_filter_prune(make("vgg"), None, ratio=0.5)


# ----------------------------------------------------------------------------------------------------------
# training, slimming and deployment
# ----------------------------------------------------------------------------------------------------------
def test_bn_l1_penalty_value():
    model = make("resnet")
    pen = bn_l1_penalty(1e-3)
    expected = 1e-3 * sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    x = x_input()
    torch.testing.assert_close(pen(model, x, model(x), None), expected)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="strength"):
            bn_l1_penalty(bad)


def test_slimming_then_prune_then_finetune(digits_ctx):
    torch.manual_seed(0)
    model = build_model("vgg", digits_ctx.task, in_channels=1, width=0.25, depth=1, image_size=8)
    before = state(model)
    gamma = lambda m: sum(float(b.weight.detach().abs().sum()) for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    plain = copy.deepcopy(model)
    digits_ctx.finetune(plain, epochs=1)
    sparse = slimming_train(model, digits_ctx, strength=5e-3, epochs=1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert gamma(sparse) < gamma(plain)
    assert compression_info(sparse)["last"]["changes"] == ("training",)
    pruned = slim_prune(sparse, digits_ctx, ratio=0.4)
    info = compression_info(pruned)
    assert [h["method"] for h in info["history"]] == ["slimming_train", "slim_prune"]
    assert info["last"]["finetune_epochs"] == 1
    assert params(pruned) < params(model)
    assert not math.isnan(digits_ctx.score(pruned))


def test_pruned_model_exports_to_onnx(tmp_path):
    model = make("resnet", "segmentation")
    pruned = l1_filter_prune(model, None, ratio=0.5, finetune=False)
    x = x_input(1)
    path = export_onnx(pruned, x, tmp_path / "pruned.onnx")
    check_ort_matches(pruned, ort_session(path), x)


def test_ignore_names_and_context_are_checked():
    prune = l1_filter_prune
    model = build_model("vgg", get_task("classification", num_classes=3), in_channels=3, width=0.25, image_size=16)
    as_string = prune(model, None, ratio=0.5, finetune=False, ignore="backbone")
    as_tuple = prune(model, None, ratio=0.5, finetune=False, ignore=("backbone",))
    assert sum(p.numel() for p in as_string.parameters()) == sum(p.numel() for p in as_tuple.parameters())
    with pytest.raises(ValueError, match="ignore='nonexistent' matches no module"):
        prune(model, None, ratio=0.5, finetune=False, ignore=("nonexistent",))
    with pytest.raises(TypeError, match="ctx must be a survey_lib.methods.Context"):
        prune(model, "ctx", ratio=0.5)


# ---------------------------------------------------------------------------------------------- bad input
def _vgg():
    return build_model("vgg", get_task("classification", num_classes=3), in_channels=3, width=0.25, image_size=16)


BAD_STRUCTURED_CALLS = [
    (lambda m, g: l1_filter_prune(m, None, ratio=0.5, finetune="no"), TypeError, "finetune must be True or False"),
    (lambda m, g: l1_filter_prune(m, None, ratio=0.5, finetune=False, prune_residual="no"), TypeError,
     "prune_residual"),
    (lambda m, g: l1_filter_prune(m, None, ratio=0.5, finetune=False, ignore=5), TypeError, "ignore"),
    (lambda m, g: l1_filter_prune(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), None, ratio=0.5, finetune=False),
     ValueError, "no prunable channel group"),
    (lambda m, g: slim_prune(m, None, ratio=0.5, finetune=False, global_threshold="no"), TypeError, "global_threshold"),
    (lambda m, g: slimming_train(m, None), TypeError, "ctx"),
    (lambda m, g: slimming_train("model", None), TypeError, "model"),
    (lambda m, g: channel_groups(m, include_fixed="no"), TypeError, "include_fixed"),
    (lambda m, g: l1_importance("group"), TypeError, "group"),
    (lambda m, g: bn_scale_importance("group"), TypeError, "group"),
    (lambda m, g: prune_channels(m, [1, 2]), TypeError, "plan"),
    (lambda m, g: prune_channels(m, {g.id: "ab"}), TypeError, "kept indices"),
    (lambda m, g: keep_plan([g], [1], 0.5), TypeError, "scores"),
    (lambda m, g: keep_plan([g], {g.id: torch.rand(2)}, 0.5), ValueError, "scores.* has 2 values"),
    (lambda m, g: keep_plan([g], {g.id: torch.full((g.size,), float("nan"))}, 0.5), ValueError, "must be finite"),
    (lambda m, g: keep_plan([g], {99: torch.rand(3)}, 0.5), ValueError, "scores names none of the groups"),
    (lambda m, g: keep_plan("abc", {}, 0.5), TypeError, "groups"),
    (lambda m, g: channel_counts("model"), TypeError, "model"),
]


@pytest.mark.parametrize("call,error,match", BAD_STRUCTURED_CALLS)
def test_bad_structured_arguments(call, error, match):
    model = _vgg()
    with pytest.raises(error, match=match):
        call(model, channel_groups(model)[0])
