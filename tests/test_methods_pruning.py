"""Tests for survey_lib.methods.pruning: masks, schedules, OBD/Fisher vs the exact Hessian, group lasso."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from survey_lib.data import DatasetInfo, Splits, load
from survey_lib.methods import Context
from survey_lib.methods import pruning as P
from survey_lib.models import build_model
from survey_lib.tasks import get_task, task_for


# ---------------------------------------------------------------------------------------------- fixtures
# ctx and trained come from tests/conftest.py
def cnn(ctx, seed=0):
    torch.manual_seed(seed)
    return build_model("vgg", ctx.task, in_channels=1, width=0.25, image_size=8)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


def assert_unchanged(model, snap):
    state, training = snap
    assert model.training is training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


# ---------------------------------------------------------------------------------------------- masks
def test_prunable_weights_and_exclude(ctx):
    model = cnn(ctx)
    names = list(P.prunable_weights(model))
    assert names[0] == "backbone.0.0.weight" and names[-1] == "head.2.weight"
    assert all(n.endswith(".weight") for n in names)
    trimmed = list(P.prunable_weights(model, exclude=("first", "last")))
    assert trimmed == names[1:-1]
    assert list(P.prunable_weights(model, exclude=names[1])) == [names[0]] + names[2:]
    with pytest.raises(ValueError, match="exclude.*first.*last"):
        P.prunable_weights(model, exclude=("middle",))


def test_layerwise_masks_exact_per_layer_and_keep_largest():
    torch.manual_seed(0)
    weights = {"a": torch.randn(10, 7), "b": torch.randn(3, 4, 3, 3)}
    masks = P.layerwise_masks(P.magnitude_scores(weights), 0.7)
    for name, w in weights.items():
        n = w.numel()
        assert int((~masks[name]).sum()) == round(0.7 * n)
        kept, pruned = w.abs()[masks[name]], w.abs()[~masks[name]]
        assert kept.min() >= pruned.max()


def test_global_masks_exact_overall_and_threshold_shared():
    weights = {"small": torch.full((10,), 0.1) + torch.arange(10) * 1e-3, "big": torch.arange(1.0, 11.0)}
    masks = P.global_masks(P.magnitude_scores(weights), 0.5)
    assert P.mask_sparsity(masks) == pytest.approx(0.5)
    # a single global threshold: every small weight goes before any big one
    assert not masks["small"].any() and masks["big"].all()
    # hand example: exactly round(0.3 * 20) = 6 pruned, the six smallest |w|
    masks = P.global_masks(P.magnitude_scores(weights), 0.3)
    assert int((~masks["small"]).sum()) == 6 and masks["small"][6:].all()


def test_random_scores_seeded_and_apply_masks(ctx):
    model = cnn(ctx)
    weights = P.prunable_weights(model)
    a, b = P.random_scores(weights, seed=1), P.random_scores(weights, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    masks = P.layerwise_masks(a, 0.5)
    P.apply_masks(model, masks)
    assert P.weight_sparsity(model) == pytest.approx(P.mask_sparsity(masks), abs=1e-3)
    table = P.sparsity_table(model)
    assert list(table.columns) == ["layer", "params", "zeros", "sparsity"]
    assert P.masks_from_zeros(model).keys() == masks.keys()
    with pytest.raises(ValueError, match="names no parameter"):
        P.apply_masks(model, {"nope.weight": torch.ones(1, dtype=torch.bool)})


@pytest.mark.parametrize("bad, exc", [(-0.1, ValueError), (1.0, ValueError), (1.5, ValueError),
                                      (float("nan"), ValueError), ("0.9", TypeError), (None, TypeError),
                                      (True, TypeError)])
def test_bad_sparsity_raises_naming_range(ctx, bad, exc):
    model = cnn(ctx)
    with pytest.raises(exc, match=r"sparsity.*\[0, 1\)"):
        P.magnitude_prune(model, ctx, sparsity=bad, finetune=False)
    with pytest.raises(exc, match=r"sparsity"):
        P.global_masks(P.magnitude_scores(P.prunable_weights(model)), bad)
    for method in (P.random_prune, P.obd_prune):
        with pytest.raises(exc, match=r"sparsity"):
            method(model, ctx, sparsity=bad, finetune=False)
    with pytest.raises(exc, match=r"sparsity"):
        P.agp_prune(model, ctx, sparsity=bad)
    with pytest.raises(exc, match=r"sparsity"):
        P.iterative_prune(model, ctx, sparsity=bad)


def test_bad_scope_raises(ctx):
    with pytest.raises(ValueError, match="scope.*layer.*global"):
        P.magnitude_prune(cnn(ctx), ctx, sparsity=0.5, scope="net", finetune=False)


# ---------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_prune_keeps_masks_through_finetuning_and_leaves_input(ctx, scope):
    model = cnn(ctx)
    model.train()
    snap = snapshot(model)
    pruned = P.magnitude_prune(model, ctx, sparsity=0.8, scope=scope, exclude=("first",))
    assert_unchanged(model, snap)
    expected = P.make_masks(model, 0.8, scope=scope, exclude=("first",))
    for name, w in P.prunable_weights(pruned, exclude=("first",)).items():
        assert torch.all(w[~expected[name]] == 0), name  # the one-shot masks survived fine-tuning
    assert P.weight_sparsity(pruned, exclude=("first",)) >= 0.8 - 1e-9
    assert not torch.equal(pruned.backbone[0][0].weight, torch.zeros_like(pruned.backbone[0][0].weight))
    info = pruned.compression
    assert info["method"] == "magnitude" and info["changes"] == ("mask",)
    assert info["mask_sparsity"] == pytest.approx(0.8, abs=1e-3) and info["seconds"] > 0


def test_mask_callback_reapplies_after_each_step(ctx):
    model = cnn(ctx)
    masks = P.make_masks(model, 0.6, scope="layer")
    seen = []

    class Probe(P.Callback):
        def on_step_end(self, state):
            seen.append(all(torch.all(w[~masks[n]] == 0) for n, w in P.prunable_weights(state.model).items()))

    ctx.finetune(model, epochs=1, callbacks=[P.MaskCallback(masks), Probe()])
    assert seen and all(seen)


def test_random_prune_is_worse_than_magnitude_without_finetuning(ctx, trained):
    model = trained
    mag = P.magnitude_prune(model, ctx, sparsity=0.7, scope="global", finetune=False)
    rnd = P.random_prune(model, ctx, sparsity=0.7, finetune=False)
    assert rnd.compression["method"] == "random"
    assert ctx.score(mag, "train") > ctx.score(rnd, "train")


# ---------------------------------------------------------------------------------------------- AGP
def test_agp_sparsity_hand_values():
    f = functools.partial(P.agp_sparsity, initial_sparsity=0.0, final_sparsity=0.9, start_step=0, end_step=100)
    assert f(0) == 0.0 and f(-5) == 0.0
    assert f(50) == pytest.approx(0.9 - 0.9 * 0.5**3)  # 0.7875
    assert f(25) == pytest.approx(0.9 - 0.9 * 0.75**3)  # 0.5203125
    assert f(100) == pytest.approx(0.9) and f(1000) == pytest.approx(0.9)
    # with a start step and an initial sparsity: s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3
    assert P.agp_sparsity(30, initial_sparsity=0.2, final_sparsity=0.8, start_step=10, end_step=50) == \
        pytest.approx(0.8 + (0.2 - 0.8) * (1 - 20 / 40) ** 3)  # 0.725
    values = [f(t) for t in range(0, 101)]
    assert all(b >= a for a, b in zip(values, values[1:]))  # monotone


def test_agp_callback_follows_schedule_and_agp_prune_reaches_target(ctx):
    model = cnn(ctx)
    agp = P.AGPCallback(lambda m, s: P.make_masks(m, s, scope="global"), final_sparsity=0.75, start_step=0,
                        end_step=6, frequency=2)
    ctx.finetune(model, epochs=2, callbacks=[agp])  # 2 x 6 steps
    steps = [t for t, _ in agp.schedule]
    assert steps == [2, 4, 6]
    assert [s for _, s in agp.schedule] == pytest.approx([agp.sparsity_at(t) for t in steps])
    assert P.mask_sparsity(agp.masks) == pytest.approx(0.75, abs=1e-3)
    assert P.weight_sparsity(model) >= 0.75 - 1e-3
    model2 = cnn(ctx)
    snap2 = snapshot(model2)
    pruned = P.agp_prune(model2, ctx, sparsity=0.8, scope="layer", epochs=1)
    assert_unchanged(model2, snap2)
    for name, w in P.prunable_weights(pruned).items():
        assert float((w == 0).float().mean()) >= 0.8 - 1 / w.numel(), name
    assert pruned.compression["method"] == "agp"


# ---------------------------------------------------------------------------------------------- iterative
def test_iterative_sparsities_geometric_in_kept_fraction():
    levels = P.iterative_sparsities(0.875, 3)
    assert levels == pytest.approx([0.5, 0.75, 0.875])  # kept 1/2, 1/4, 1/8


def test_iterative_prune_reaches_final_sparsity(ctx):
    model = cnn(ctx)
    snap = snapshot(model)
    pruned = P.iterative_prune(model, ctx, sparsity=0.9, iterations=3, epochs_per_iteration=1)
    assert_unchanged(model, snap)
    assert P.weight_sparsity(pruned) == pytest.approx(0.9, abs=1e-3)
    assert pruned.compression["levels"] == pytest.approx(P.iterative_sparsities(0.9, 3))


# ---------------------------------------------------------------------------------------------- OBD
def test_obd_ranks_differently_from_magnitude_by_hand():
    w = {"layer": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    fisher = {"layer": torch.tensor([100.0, 1.0, 1.0, 0.01])}
    obd = P.obd_scores(w, fisher)["layer"]
    assert obd.tolist() == pytest.approx([50.0, 2.0, 4.5, 0.08])  # 0.5 * F * w^2
    keep_obd = P.layerwise_masks({"layer": obd}, 0.5)["layer"]
    keep_mag = P.layerwise_masks(P.magnitude_scores(w), 0.5)["layer"]
    assert keep_mag.tolist() == [False, False, True, True]
    assert keep_obd.tolist() == [True, False, True, False]  # the big, flat weight goes; the small, sharp one stays


def linear_regression_ctx(n=4000, d=3, noise_var=0.5, seed=0):
    """y = w* . x + eps, eps ~ N(0, noise_var); plain MSE (regression task with mean 0, std 1)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 1.0, 2.0])[:d]
    x = torch.randn(n, 1, 1, d, generator=g) * scale
    w_true = torch.tensor([1.0, -2.0, 0.5])[:d]
    y = (x.reshape(n, d) @ w_true) + torch.randn(n, generator=g) * math.sqrt(noise_var)
    train = TensorDataset(x, y)
    info = DatasetInfo(name="linear", task="regression", in_channels=1, image_size=d, num_classes=1,
                       class_names=("y",))
    task = get_task("regression", num_classes=1, target_mean=0.0, target_std=1.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 1))
    with torch.no_grad():
        model[1].weight.copy_(w_true[None])
        model[1].bias.zero_()
    ctx = Context(task=task, data=Splits(train, train, train, info), batch_size=n // 4)
    return ctx, model, x.reshape(n, d)


def test_hessian_diagonal_exact_and_fisher_matches_it_for_mse():
    ctx, model, x = linear_regression_ctx()
    snap = snapshot(model)
    batches = [(ctx.data.train.tensors[0], ctx.data.train.tensors[1])]
    exact = 2.0 * (x**2).mean(dim=0)  # d^2/dw_j^2 of mean (w.x - y)^2 = 2/N sum x_j^2
    hess = P.hessian_diagonal(model, ctx, batches=batches)["1.weight"].reshape(-1)
    assert hess.tolist() == pytest.approx(exact.tolist(), rel=1e-4)
    # the per-example empirical Fisher E[(2 r x_j)^2] = 4 sigma^2 E[x_j^2] equals the Hessian when the
    # MSE is the Gaussian NLL, i.e. at the true weights with noise variance sigma^2 = 1/2
    fisher = P.fisher_diagonal(model, ctx, batches=batches, micro_batch=1)["1.weight"].reshape(-1)
    assert fisher.tolist() == pytest.approx(exact.tolist(), rel=0.1)
    # whole-batch gradients estimate the same diagonal divided by the batch size (noisy: 4 samples)
    ranked = torch.argsort(P.fisher_diagonal(model, ctx, micro_batch=500, n_batches=4)["1.weight"].reshape(-1))
    assert ranked.tolist() == torch.argsort(exact).tolist()
    assert_unchanged(model, snap)
    for p in model.parameters():
        assert p.grad is None


def test_hessian_diagonal_refuses_large_models(ctx):
    with pytest.raises(ValueError, match="max_params"):
        P.hessian_diagonal(cnn(ctx), ctx, max_params=100)


def test_obd_prune_runs_and_marks(ctx):
    model = cnn(ctx)
    snap = snapshot(model)
    pruned = P.obd_prune(model, ctx, sparsity=0.5, n_batches=1, finetune=False)
    assert_unchanged(model, snap)
    assert pruned.compression["method"] == "obd"
    assert P.weight_sparsity(pruned) == pytest.approx(0.5, abs=1e-3)


# ---------------------------------------------------------------------------------------------- group lasso
def test_group_lasso_penalty_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(2, 2, 1, bias=False), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([3.0, 4.0]).reshape(2, 1, 1, 1))
        model[1].weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0]]).reshape(2, 2, 1, 1))
    # filters: |3| + |4| + ||(3, 4)|| + ||(0, 1)|| = 3 + 4 + 5 + 1; the Linear is not a conv
    assert P.group_lasso_penalty(model, "filters", exclude=()).item() == pytest.approx(13.0)
    # channels of conv 1: ||(3, 0)|| + ||(4, 1)||; conv 0 has one input channel: ||(3, 4)||
    assert P.group_lasso_penalty(model, "channels", exclude=()).item() == pytest.approx(5 + 3 + math.sqrt(17))
    loss = P.group_lasso_loss(0.1, "filters", exclude=())
    assert loss(model, None, None, None).item() == pytest.approx(1.3)
    norms = P.group_norms(model, exclude=())
    assert norms["norm"].tolist() == pytest.approx([3, 4, 5, 1])
    masks = P.zero_small_groups(model, 2.0, exclude=())
    assert masks["1.weight"][:, :, 0, 0].tolist() == [[True, True], [False, False]]
    assert model[1].weight[1].abs().sum() == 0 and model[0].weight[0] != 0


def test_group_lasso_training_lowers_group_norms(ctx):
    model = cnn(ctx)
    snap = snapshot(model)
    plain = P.group_lasso_train(model, ctx, strength=0.0, epochs=2, threshold=0.0, lr=1e-2)
    lasso = P.group_lasso_train(model, ctx, strength=0.5, epochs=2, threshold=0.0, lr=1e-2)
    assert_unchanged(model, snap)
    assert P.group_norms(lasso)["norm"].sum() < 0.7 * P.group_norms(plain)["norm"].sum()
    zeroed = P.group_lasso_train(model, ctx, strength=0.5, epochs=2, threshold=0.8, lr=1e-2)
    info = zeroed.compression
    assert info["changes"] == ("mask",) and info["groups_zeroed"] > 0
    assert (P.group_norms(zeroed)["norm"] == 0).sum() == info["groups_zeroed"]


# ---------------------------------------------------------------------------------------------- other tasks
@pytest.mark.parametrize("task_name", ["segmentation", "detection"])
def test_methods_work_on_dense_tasks(task_name):
    data = load("shapes", task_name, n=48, image_size=16)
    ctx = Context(task=task_for(data), data=data, budget=1, batch_size=16)
    torch.manual_seed(0)
    model = build_model("vgg", ctx.task, in_channels=data.info.in_channels, width=0.125, depth=1)
    snap = snapshot(model)
    for pruned in (P.magnitude_prune(model, ctx, sparsity=0.8, exclude="last"),
                   P.obd_prune(model, ctx, sparsity=0.8, n_batches=1, micro_batch=None, finetune=False,
                               exclude="last"),
                   P.agp_prune(model, ctx, sparsity=0.8, epochs=1, exclude="last")):
        assert pruned(ctx.example_input(2)).shape[0] == 2
        assert P.weight_sparsity(pruned, exclude="last") >= 0.8 - 1e-3, pruned.compression["method"]
        assert math.isfinite(ctx.score(pruned))
    assert_unchanged(model, snap)


# ---------------------------------------------------------------------------------------------- sensitivity
def test_layer_sensitivity_table(ctx, trained):
    model = trained
    snap = snapshot(model)
    table = P.layer_sensitivity(model, ctx, sparsities=(0.0, 0.9), split="train")
    assert_unchanged(model, snap)
    assert list(table.columns) == ["layer", "params", "sparsity", "metric", "value", "baseline", "drop"]
    assert len(table) == 2 * len(P.prunable_weights(model))
    dense = table[table.sparsity == 0.0]
    assert (dense["value"] == dense["baseline"]).all()
    assert (table["metric"] == "accuracy").all()
    with pytest.raises(ValueError, match=r"sparsity.*\[0, 1\)"):
        P.layer_sensitivity(model, ctx, sparsities=(1.2,))


# ---------------------------------------------------------------------------------------------- bad input
def conv1d_net():
    return nn.Sequential(nn.Unflatten(1, (1, 64)), nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(248, 10))


def test_unsupported_layers_are_rejected_not_skipped(ctx):
    with pytest.raises(ValueError, match="cannot prune 1: Conv1d layers are not supported; accepted layer types"):
        P.magnitude_prune(conv1d_net(), ctx, sparsity=0.9, finetune=False)
    with pytest.raises(ValueError, match="Conv1d"):
        P.prunable_weights(conv1d_net())
    only_linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match="nothing to prune"):
        P.magnitude_prune(only_linear, ctx, sparsity=0.5, exclude=("first",), finetune=False)
    with pytest.raises(ValueError, match="nothing to measure"):
        P.weight_sparsity(nn.ReLU())


def test_ctx_none_is_handled_like_structured_pruning(ctx):
    model = cnn(ctx)
    with pytest.raises(ValueError, match="magnitude_prune: finetune=True needs a Context"):
        P.magnitude_prune(model, None, sparsity=0.5)
    with pytest.raises(ValueError, match="random_prune: finetune=True needs a Context"):
        P.random_prune(model, None, sparsity=0.5)
    with pytest.raises(TypeError, match="ctx must be a survey_lib.methods.Context or None"):
        P.magnitude_prune(model, "ctx", sparsity=0.5, finetune=False)
    with pytest.raises(TypeError, match="finetune must be True or False"):
        P.magnitude_prune(model, ctx, sparsity=0.5, finetune="no")
    pruned = P.magnitude_prune(model, None, sparsity=0.5, finetune=False)
    assert P.weight_sparsity(pruned) == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="seed"):
        P.random_prune(model, None, sparsity=0.5, finetune=False)
    assert P.weight_sparsity(P.random_prune(model, None, sparsity=0.5, finetune=False, seed=0)) == pytest.approx(0.5, abs=1e-3)


BAD_PRUNING_CALLS = [
    (lambda m, c: P.agp_prune(m, None, sparsity=0.5), TypeError, "ctx"),
    (lambda m, c: P.iterative_prune(m, None, sparsity=0.5), TypeError, "ctx"),
    (lambda m, c: P.obd_prune(m, None, sparsity=0.5), TypeError, "ctx"),
    (lambda m, c: P.fisher_diagonal(m, None), TypeError, "ctx"),
    (lambda m, c: P.group_lasso_train(m, None, strength=0.1), TypeError, "ctx"),
    (lambda m, c: P.layer_sensitivity(m, None), TypeError, "ctx"),
    (lambda m, c: P.finetune_masked(m, None, {}), TypeError, "ctx"),
    (lambda m, c: P.layer_sensitivity(m, c, sparsities=()), ValueError, "sparsities is empty"),
    (lambda m, c: P.layer_sensitivity(m, c, sparsities="0.5"), TypeError, "sparsities"),
    (lambda m, c: P.fisher_diagonal(m, c, batches=[]), ValueError, "batches is empty"),
    (lambda m, c: P.fisher_diagonal(m, c, batches=[5]), TypeError, "batches"),
    (lambda m, c: P.fisher_diagonal(m, c, batches=[(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]), ValueError,
     "batches of shape .* does not fit model"),
    (lambda m, c: P.fisher_diagonal(m, c, batches=[(torch.randn(2, 1, 8, 8), torch.tensor([0, 11]))]), ValueError,
     "target holds class 11"),
    (lambda m, c: P.hessian_diagonal(m, c, max_params=-1), ValueError, "max_params"),
    (lambda m, c: P.agp_prune(m, c, sparsity=0.5, initial_sparsity=0.8), ValueError, "initial_sparsity=0.8 must not"),
    (lambda m, c: P.agp_sparsity(5, initial_sparsity=0.8, final_sparsity=0.5, end_step=10), ValueError,
     "initial_sparsity"),
    (lambda m, c: P.AGPCallback(5, final_sparsity=0.5, end_step=10), TypeError, "masks_fn"),
    (lambda m, c: P.magnitude_prune(m, c, sparsity=0.5, exclude=5), TypeError, "exclude"),
    (lambda m, c: P.make_masks(m, 0.5, scores=5), TypeError, "scores"),
    (lambda m, c: P.group_masks(m, 0.5, relative="yes"), TypeError, "relative"),
    (lambda m, c: P.prunable_weights("model"), TypeError, "model"),
    (lambda m, c: P.sparsity_table("model"), TypeError, "model"),
    (lambda m, c: P.group_norms("model"), TypeError, "model"),
]


@pytest.mark.parametrize("call,error,match", BAD_PRUNING_CALLS)
def test_bad_pruning_arguments(ctx, call, error, match):
    with pytest.raises(error, match=match):
        call(cnn(ctx), ctx)


def test_bad_masks_and_scores():
    layer = nn.Linear(2, 2)
    nan_scores = {"a": torch.tensor([float("nan"), 1.0, 2.0])}
    with pytest.raises(ValueError, match=r"scores\['a'\] must be finite"):
        P.layerwise_masks(nan_scores, 0.5)
    with pytest.raises(ValueError, match=r"scores\['a'\] must be finite"):
        P.global_masks(nan_scores, 0.5)
    with pytest.raises(ValueError, match="scores is empty"):
        P.global_masks({}, 0.5)
    with pytest.raises(ValueError, match=r"sparsity has no entry for \['a'\]"):
        P.layerwise_masks({"a": torch.rand(4)}, {"b": 0.5})
    with pytest.raises(TypeError, match="weights must be"):
        P.magnitude_scores([1, 2])
    with pytest.raises(TypeError, match=r"masks\['weight'\] must be a bool tensor"):
        P.apply_masks(layer, {"weight": torch.full((2, 2), 0.5)})
    with pytest.raises(TypeError, match="masks"):
        P.MaskCallback("abc")
    with pytest.raises(ValueError, match="masks is empty"):
        P.mask_sparsity({})
    with pytest.raises(ValueError, match=r"fisher\['a'\] has shape"):
        P.obd_scores({"a": torch.rand(3)}, {"a": torch.rand(4)})
