"""Tests for survey_lib.methods.dynamic: stochastic depth and early exits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from survey_lib.cost import count
from survey_lib.methods import Context, compression_info
from survey_lib.methods import dynamic as D
from survey_lib.models import BasicBlock, build_model
from survey_lib.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny layers, trained by fit: see tests/conftest.py


def resnet_of(ctx: Context, seed: int = 0, arch: str = "resnet") -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, ctx.task, in_channels=1, width=0.25, image_size=8).eval()


@pytest.fixture(scope="module")
def base(ctx) -> nn.Module:
    """A tiny resnet (stem + 3 BasicBlocks, 8/16/32 channels) trained 2 epochs, in eval mode."""
    model = resnet_of(ctx)
    ctx.finetune(model, epochs=2, lr=1e-2)
    return model.eval()


@pytest.fixture(scope="module")
def exit_model(ctx, base) -> D.EarlyExitModel:
    return D.add_exits(base, ctx, after=["1", "2"], epochs=2, lr=1e-2)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def randomized_block(cin: int, cout: int, stride: int, seed: int = 0) -> BasicBlock:
    """A BasicBlock with non-trivial BatchNorm statistics and affine parameters."""
    torch.manual_seed(seed)
    block = BasicBlock(cin, cout, stride)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return block


BLOCKS = [(8, 8, 1), (8, 16, 2)]   # identity shortcut, projection shortcut


# ----------------------------------------------------------------------------------------------------------
# Stochastic depth
# ----------------------------------------------------------------------------------------------------------
def test_linear_survival_is_the_papers_rule():
    assert D.linear_survival(4, 0.5) == pytest.approx([0.875, 0.75, 0.625, 0.5])
    assert D.linear_survival(1, 0.3) == pytest.approx([0.3])
    assert D.linear_survival(3, 1.0) == [1.0, 1.0, 1.0]
    L, p_last = 7, 0.2
    assert D.linear_survival(L, p_last) == pytest.approx([1 - l / L * (1 - p_last) for l in range(1, L + 1)])


@pytest.mark.parametrize("cin, cout, stride", BLOCKS)
@pytest.mark.parametrize("mode", D.MODES)
def test_stochastic_depth_is_the_identity_wrapper_at_inference(cin, cout, stride, mode):
    block = randomized_block(cin, cout, stride).eval()
    x = torch.randn(5, cin, 8, 8)
    wrapped = D.StochasticDepth(block, 0.3, mode).eval()
    for _ in range(3):   # no randomness at inference
        assert torch.equal(wrapped(x), block(x))


@pytest.mark.parametrize("cin, cout, stride", BLOCKS)
@pytest.mark.parametrize("mode", D.MODES)
def test_survival_near_zero_drops_the_branch_in_training(cin, cout, stride, mode):
    block = randomized_block(cin, cout, stride)
    x = torch.randn(6, cin, 8, 8)
    wrapped = D.StochasticDepth(block, 1e-7, mode).train()
    calls = []
    block.conv1.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(0)
    out = wrapped(x)
    assert torch.equal(out, block.relu2(block.shortcut(x)))
    assert not calls                                        # the dropped branch is not computed at all
    assert not torch.allclose(out, block.train()(x))        # and that differs from the block


def test_survival_one_is_the_plain_block_in_training_too():
    block = randomized_block(8, 16, 2).train()
    x = torch.randn(4, 8, 8, 8)
    assert torch.equal(D.StochasticDepth(block, 1.0).train()(x), block(x))


def test_batch_mode_keeps_the_branch_with_probability_survival_scaled_by_its_inverse():
    block = randomized_block(8, 8, 1).eval()   # fixed BN statistics: the two outcomes are deterministic
    x = torch.randn(3, 8, 4, 4)
    p = 0.3
    wrapped = D.StochasticDepth(block, p, "batch")
    wrapped.training = True                    # only the wrapper trains
    dropped = block.relu2(block.shortcut(x))
    kept = block.relu2(D.StochasticDepth.branch(block, x) / p + block.shortcut(x))
    torch.manual_seed(0)
    n_kept = 0
    for _ in range(400):
        out = wrapped(x)
        is_kept = torch.allclose(out, kept)
        assert is_kept or torch.equal(out, dropped)
        n_kept += is_kept
    assert abs(n_kept / 400 - p) < 0.08


def test_row_mode_drops_per_example():
    block = randomized_block(8, 8, 1).eval()
    x = torch.randn(64, 8, 4, 4)
    p = 0.5
    wrapped = D.StochasticDepth(block, p, "row")
    wrapped.training = True
    dropped = block.relu2(block.shortcut(x))
    kept = block.relu2(D.StochasticDepth.branch(block, x) / p + block.shortcut(x))
    torch.manual_seed(0)
    out = wrapped(x)
    row_kept = [torch.allclose(out[i], kept[i]) for i in range(len(x))]
    assert all(k or torch.equal(out[i], dropped[i]) for i, k in enumerate(row_kept))
    assert 10 < sum(row_kept) < 54                          # a mix inside one batch


def test_wrapped_resnet_equals_the_original_at_inference(ctx):
    model = resnet_of(ctx)
    wrapped = resnet_of(ctx)
    names = D.wrap_residual_blocks(wrapped, 0.5)
    assert names == ["backbone.1", "backbone.2", "backbone.3"]
    survivals = [wrapped.get_submodule(n).survival for n in names]
    assert survivals == pytest.approx(D.linear_survival(3, 0.5))
    x = ctx.example_input(16)
    assert torch.equal(wrapped.eval()(x), model(x))
    assert torch.equal(D.unwrap(wrapped)(x), model(x))
    assert not any(isinstance(m, D.StochasticDepth) for m in wrapped.modules())


def test_stochastic_depth_trains_a_new_unwrapped_model(ctx, base):
    before = params(base)
    out = D.stochastic_depth(base, ctx, final_survival=0.5, epochs=1, lr=1e-2)
    assert out is not base and same(params(base), before)          # input untouched
    assert not same(params(out), before)                           # it was trained
    assert not any(isinstance(m, D.StochasticDepth) for m in out.modules())
    assert sum(isinstance(m, BasicBlock) for m in out.modules()) == 3
    assert not out.training
    info = compression_info(out)["last"]
    assert info["method"] == "stochastic_depth" and info["changes"] == ("training",)
    assert info["survival"] == pytest.approx([5 / 6, 4 / 6, 0.5]) and info["epochs"] == 1
    assert info["expected_blocks"] == pytest.approx(2.0)
    assert "compression" not in vars(base)
    x = ctx.example_input(4)
    assert torch.equal(out(x), out(x))                             # deterministic at inference


def test_stochastic_depth_needs_residual_blocks(ctx):
    vgg = resnet_of(ctx, arch="vgg")
    with pytest.raises(ValueError, match=r"residual blocks.*'vgg'"):
        D.stochastic_depth(vgg, ctx, epochs=1)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_survival_out_of_range_raises(ctx, bad):
    block = randomized_block(8, 8, 1)
    with pytest.raises(ValueError, match=r"survival.*0 < survival <= 1"):
        D.StochasticDepth(block, bad)
    with pytest.raises(ValueError, match="final_survival"):
        D.linear_survival(3, bad)
    with pytest.raises(ValueError, match="final_survival"):
        D.stochastic_depth(resnet_of(ctx), ctx, final_survival=bad, epochs=1)


def test_stochastic_depth_type_errors(ctx):
    block = randomized_block(8, 8, 1)
    with pytest.raises(TypeError, match="survival"):
        D.StochasticDepth(block, "0.5")
    with pytest.raises(TypeError, match="block"):
        D.StochasticDepth(nn.Conv2d(8, 8, 3), 0.5)
    with pytest.raises(ValueError, match="mode"):
        D.StochasticDepth(block, 0.5, "sample")
    with pytest.raises(TypeError, match="ctx"):
        D.stochastic_depth(resnet_of(ctx), "ctx")
    with pytest.raises(ValueError, match="n_blocks"):
        D.linear_survival(0, 0.5)


# ----------------------------------------------------------------------------------------------------------
# Early exits
# ----------------------------------------------------------------------------------------------------------
def test_stage_names(ctx, base):
    assert D.stage_names(base) == ["0", "1", "2"]


def test_add_exits_returns_a_new_model_and_keeps_the_input(ctx, base, exit_model):
    assert isinstance(exit_model, D.EarlyExitModel) and not exit_model.training
    assert exit_model.exit_names == ["1", "2", "final"] and exit_model.num_exits == 3
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    assert not base_ptrs & {p.data_ptr() for p in exit_model.parameters()}
    assert all(p.requires_grad for p in exit_model.parameters())
    info = compression_info(exit_model)["last"]
    assert info["method"] == "early_exit" and info["changes"] == ("architecture",)
    assert info["after"] == ["1", "2"] and info["train"] == "exits" and info["epochs"] == 2
    # train="exits" froze the backbone (weights and BN statistics) and the final head
    kept = list(params(nn.Sequential(*exit_model.segments, exit_model.final_head)).values())
    original = list(params(base).values())
    assert len(kept) == len(original) and all(torch.equal(a, b) for a, b in zip(kept, original))


def test_add_exits_leaves_its_input_untouched(ctx):
    model = resnet_of(ctx)
    before = params(model)
    out = D.add_exits(model, ctx, after="2", epochs=1, train="joint")
    assert same(params(model), before) and "compression" not in vars(model)
    kept = list(params(nn.Sequential(*out.segments, out.final_head)).values())
    original = list(params(model).values())
    assert len(kept) == len(original)
    assert not all(torch.equal(a, b) for a, b in zip(kept, original))   # joint: the backbone was trained


@pytest.mark.parametrize("threshold", [1.01, float("inf")])
def test_threshold_above_one_runs_every_input_to_the_end(ctx, base, exit_model, threshold):
    exit_model.threshold = threshold
    x = ctx.example_input(64)
    with torch.no_grad():
        assert torch.equal(exit_model(x), base(x))
    assert exit_model.last_exits.tolist() == [2] * len(x)
    rows = D.evaluate_thresholds(exit_model, ctx, [threshold])
    assert rows[0]["exit_fractions"] == [0.0, 0.0, 1.0]
    assert rows[0]["accuracy"] == pytest.approx(ctx.score(base))


def test_tiny_threshold_leaves_at_the_first_exit(ctx, exit_model):
    exit_model.threshold = 1e-9
    x = ctx.example_input(32)
    with torch.no_grad():
        out = exit_model(x)
        first = exit_model.exits[0](exit_model.segments[0](x))
    assert torch.equal(out, first) and exit_model.last_exits.tolist() == [0] * 32
    row = D.evaluate_thresholds(exit_model, ctx, [1e-9])[0]
    assert row["exit_fractions"] == [1.0, 0.0, 0.0]
    assert row["avg_macs"] == row["exit_macs"][0]


def test_an_early_exit_skips_the_later_stages(ctx, exit_model):
    calls = []
    handle = exit_model.segments[-1].register_forward_hook(lambda *a: calls.append(1))
    x = ctx.example_input(1)
    try:
        exit_model.threshold = 1e-9
        exit_model(x)
        assert calls == [] and exit_model.last_exits.tolist() == [0]
        exit_model.threshold = float("inf")
        exit_model(x)
        assert calls == [1]
    finally:
        handle.remove()


def test_forward_decisions_match_the_rule_per_input(ctx, exit_model):
    x = ctx.example_input(64)
    conf, _ = D.exit_confidences(exit_model, x)
    threshold = float(conf[:, 0].median())          # about half leave at the first exit
    exit_model.threshold = threshold
    with torch.no_grad():
        out = exit_model(x)
        all_logits = exit_model.forward_all(x)
    taken = D.exits_for_threshold(conf, threshold)
    assert torch.equal(exit_model.last_exits, taken)
    assert len(set(taken.tolist())) >= 2
    for i, k in enumerate(taken.tolist()):
        assert torch.allclose(out[i], all_logits[k][i], atol=1e-5)


def test_exit_macs_increase_and_end_at_the_full_model_plus_the_exit_heads(ctx, base, exit_model):
    x = ctx.example_input(1)
    macs = D.exit_macs(exit_model, x)
    assert len(macs) == 3 and all(a < b for a, b in zip(macs, macs[1:]))
    full = int(count(base, x)["macs"].sum())
    with torch.no_grad():
        h1 = exit_model.segments[0](x)
        h2 = exit_model.segments[1](h1)
    heads = int(count(exit_model.exits[0], h1)["macs"].sum()) + int(count(exit_model.exits[1], h2)["macs"].sum())
    assert heads > 0
    assert macs[-1] == full + heads
    assert macs[0] == int(count(nn.Sequential(exit_model.segments[0], exit_model.exits[0]), x)["macs"].sum())
    assert D.full_macs(exit_model, x) == full


def test_evaluate_thresholds_is_consistent_and_monotone(ctx, base, exit_model):
    thresholds = [1e-9, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0, 2.0]
    rows = D.evaluate_thresholds(exit_model, ctx, thresholds)
    assert [r["threshold"] for r in rows] == thresholds
    full = int(count(base, ctx.example_input(1))["macs"].sum())
    for r in rows:
        assert sum(r["exit_fractions"]) == pytest.approx(1.0)
        assert all(0.0 <= f <= 1.0 for f in r["exit_fractions"]) and 0.0 <= r["accuracy"] <= 1.0
        assert r["full_macs"] == full and r["macs_ratio"] == pytest.approx(r["avg_macs"] / full)
        expected = sum(f * m for f, m in zip(r["exit_fractions"], r["exit_macs"]))
        assert r["avg_macs"] == pytest.approx(expected)
    avg = [r["avg_macs"] for r in rows]
    assert all(a <= b for a, b in zip(avg, avg[1:]))
    assert avg[0] < avg[-1]
    # a dataset works as well as a context
    assert D.evaluate_thresholds(exit_model, ctx.data.test, [0.5])[0] == D.evaluate_thresholds(exit_model, ctx, [0.5])[0]


def test_add_exits_with_a_task_builds_untrained_exits(ctx, base):
    out = D.add_exits(base, ctx.task, after=["0"], threshold=0.5)
    assert out.threshold == 0.5 and compression_info(out)["last"]["epochs"] == 0
    x = ctx.example_input(8)
    out.threshold = float("inf")
    assert torch.equal(out(x), base(x))


def test_training_mode_returns_the_final_logits_and_keeps_the_exit_logits(ctx, exit_model):
    import copy

    model = copy.deepcopy(exit_model).train()
    x = ctx.example_input(4)
    out = model(x)
    assert out.shape == (4, ctx.task.num_classes) and len(model.exit_logits) == 2
    loss = D.ExitLoss(ctx.task, 0.5)(model, x, out, torch.zeros(4, dtype=torch.long))
    expected = 0.5 * sum(ctx.task.loss(z, torch.zeros(4, dtype=torch.long)) for z in model.exit_logits)
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize("bad", [0, -0.5, float("nan")])
def test_bad_threshold_raises(ctx, base, exit_model, bad):
    with pytest.raises(ValueError, match=r"threshold.*> 0"):
        D.add_exits(base, ctx.task, after=["1"], threshold=bad)
    with pytest.raises(ValueError, match="threshold"):
        D.evaluate_thresholds(exit_model, ctx, [0.5, bad])


def test_early_exit_argument_errors(ctx, base, exit_model):
    with pytest.raises(TypeError, match="threshold"):
        D.add_exits(base, ctx.task, after=["1"], threshold="0.9")
    with pytest.raises(ValueError, match=r"after='9'.*'0', '1', '2'"):
        D.add_exits(base, ctx.task, after=["9"])
    with pytest.raises(ValueError, match=r"after='3'"):           # the last stage feeds the final head
        D.add_exits(base, ctx.task, after=["3"])
    with pytest.raises(ValueError, match="after"):
        D.add_exits(base, ctx.task, after=[])
    with pytest.raises(ValueError, match="twice"):
        D.add_exits(base, ctx.task, after=["1", "1"])
    with pytest.raises(ValueError, match="train"):
        D.add_exits(base, ctx.task, after=["1"], train="heads")
    with pytest.raises(TypeError, match="TaskModel"):
        D.add_exits(nn.Sequential(nn.Conv2d(1, 4, 3)), ctx.task, after=["0"])
    with pytest.raises(TypeError, match="ctx"):
        D.add_exits(base, "classification", after=["1"])
    with pytest.raises(TypeError, match="EarlyExitModel"):
        D.exit_macs(base, ctx.example_input(1))
    with pytest.raises(TypeError, match="thresholds"):
        D.evaluate_thresholds(exit_model, ctx, 0.5)
    mlp = resnet_of(ctx, arch="mlp")
    with pytest.raises(ValueError, match=r"after='1'.*feature map"):
        D.add_exits(mlp, ctx.task, after=["1"])


@pytest.mark.parametrize("name", ["regression", "segmentation"])
def test_early_exits_need_classification(ctx, base, name):
    task = get_task(name, num_classes=1 if name == "regression" else 3, image_size=8)
    with pytest.raises(ValueError, match=rf"task='{name}'.*accepted values: 'classification'"):
        D.add_exits(base, task, after=["1"])
    bad_ctx = Context(task=task, data=ctx.data, budget=1)
    with pytest.raises(ValueError, match=rf"task='{name}'"):
        D.add_exits(base, bad_ctx, after=["1"])


# ----------------------------------------------------------------------------------------------------------
# Cascades and per-input latency
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(ctx) -> nn.Module:
    """A tiny vgg classifier of the same digits, trained 1 epoch."""
    torch.manual_seed(3)
    model = build_model("vgg", ctx.task, in_channels=1, width=0.25, image_size=8)
    ctx.finetune(model, epochs=1, lr=1e-2)
    return model.eval()


def test_exit_macs_leaves_a_model_in_training_mode_untouched(ctx, exit_model):
    model = D.add_exits(exit_model_base := resnet_of(ctx), ctx, after=["1"], epochs=0).train()
    before = params(model)
    D.exit_macs(model, ctx.example_input(1))
    D.full_macs(model, ctx.example_input(1))
    assert same(params(model), before) and model.training
    assert same(params(exit_model_base), params(resnet_of(ctx)))


def test_cascade_runs_small_first_and_big_only_when_unsure(ctx, base, small):
    x = ctx.example_input(64)
    with torch.no_grad():
        s_out, b_out = small(x), base(x)
    full = D.cascade(small, base, ctx, threshold=float("inf"))
    assert not full.training
    with torch.no_grad():
        torch.testing.assert_close(full(x), b_out)
        assert bool((full.last_exits == 1).all())
        torch.testing.assert_close(D.cascade(small, base, ctx, threshold=1e-6)(x), s_out)
        confidence = torch.softmax(s_out, 1).amax(1)
        mid = D.cascade(small, base, ctx, threshold=float(confidence.median()))
        out = mid(x)
    sure = confidence >= float(confidence.median())
    assert 0 < int(sure.sum()) < len(x)                     # both paths are exercised
    torch.testing.assert_close(out[sure], s_out[sure])
    torch.testing.assert_close(out[~sure], b_out[~sure])
    assert mid.last_exits.tolist() == [0 if s else 1 for s in sure.tolist()]


def test_cascade_macs_are_small_then_small_plus_big(ctx, base, small):
    x = ctx.example_input(1)
    model = D.cascade(small, base, ctx)
    small_macs, big_macs = int(count(small, x)["macs"].sum()), int(count(base, x)["macs"].sum())
    assert D.exit_macs(model, x) == [small_macs, small_macs + big_macs]
    assert D.full_macs(model, x) == big_macs
    rows = D.evaluate_thresholds(model, ctx, [1e-6, float("inf")])
    assert rows[0]["avg_macs"] == small_macs and rows[1]["avg_macs"] == small_macs + big_macs
    assert rows[0]["accuracy"] == pytest.approx(ctx.score(small)) and rows[1]["accuracy"] == pytest.approx(ctx.score(base))


def test_cascade_rejects_mismatched_models_and_other_tasks(ctx, base, small):
    other = build_model("vgg", get_task("classification", num_classes=3), in_channels=1, width=0.25, image_size=8)
    with pytest.raises(ValueError, match="same classification task"):
        D.cascade(other, base, ctx)
    with pytest.raises(TypeError, match="TaskModel"):
        D.cascade(small, nn.Linear(2, 2), ctx)
    with pytest.raises(ValueError, match="threshold"):
        D.cascade(small, base, ctx, threshold=0)
    with pytest.raises(ValueError, match="classification"):
        D.cascade(small, base, get_task("regression", num_classes=1, image_size=8))


def test_per_input_latency_times_each_input_at_its_exit(ctx, base, small):
    x = ctx.example_input(6)
    with torch.no_grad():
        conf = torch.softmax(small(x), 1).amax(1).sort().values
    # halfway between the 3rd and 4th confidence: no input sits on the threshold, where batch-1 and batch-6
    # rounding could send it different ways
    model = D.cascade(small, base, ctx, threshold=float(conf[2] + conf[3]) / 2)
    rows = D.per_input_latency(model, x, runs=2, warmup=1)
    with torch.no_grad():
        model(x)
    assert [r["index"] for r in rows] == list(range(6))
    assert [r["exit"] for r in rows] == model.last_exits.tolist()
    assert all(r["early_ms"] > 0 and r["full_ms"] > 0 and r["kind"] == "measured" for r in rows)
    assert all(r["exit"] == 1 for r in D.per_input_latency(model, x[:2], threshold=float("inf"), runs=1, warmup=0))
    with pytest.raises(ValueError, match="runs"):
        D.per_input_latency(model, x, runs=0)
    with pytest.raises(TypeError, match="inputs"):
        D.per_input_latency(model, [1, 2])
