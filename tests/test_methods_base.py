import pytest
import torch

from survey_lib.data import load
from survey_lib.methods import Context, compression_info, mark
from survey_lib.models import build_model
from survey_lib.tasks import task_for


@pytest.fixture(scope="module")
def ctx():
    data = load("digits", "classification", n=200)
    return Context(task=task_for(data), data=data, budget=1, batch_size=32)


def test_context_finetune_evaluate_and_inputs(ctx):
    model = build_model("mlp", ctx.task, in_channels=1, image_size=8)
    before = ctx.score(model)
    history = ctx.finetune(model, epochs=2)
    assert len(history.train_loss) == 2
    assert ctx.score(model) > before
    assert ctx.example_input(3).shape == (3, 1, 8, 8)
    xs, ys = ctx.calibration_batches(2)[0]
    assert xs.shape[0] == ys.shape[0] == 32


@pytest.mark.parametrize("kwargs, exc", [
    (dict(budget=-1), ValueError), (dict(budget=1.5), TypeError), (dict(batch_size=0), ValueError),
])
def test_context_rejects_bad_budget(ctx, kwargs, exc):
    with pytest.raises(exc):
        Context(task=ctx.task, data=ctx.data, **kwargs)


def test_context_rejects_unknown_split(ctx):
    model = build_model("mlp", ctx.task, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="split.*train.*val.*test"):
        ctx.evaluate(model, "holdout")


def test_mark_records_history_and_rejects_unknown_changes():
    model = torch.nn.Linear(2, 2)
    mark(model, "magnitude", "mask", sparsity=0.9)
    mark(model, "huffman", ["sparse_format", "low_bit_storage"])
    info = compression_info(model)
    assert info["last"]["method"] == "huffman"
    assert [h["method"] for h in info["history"]] == ["magnitude", "huffman"]
    with pytest.raises(ValueError, match="changes.*dense_shapes"):
        mark(model, "x", "faster")


def _digits_ctx(**kw) -> Context:
    data = load("digits", "classification", n=200)
    return Context(task=task_for(data), data=data, budget=1, batch_size=32, **kw)


def test_a_context_trains_on_the_cpu_by_default_and_refuses_a_device_this_machine_lacks():
    ctx = _digits_ctx()
    assert ctx.device == "cpu"
    model = build_model("vgg", ctx.task, in_channels=1, width=0.25, image_size=8)
    ctx.finetune(model)
    assert {p.device.type for p in model.parameters()} == {"cpu"} and 0 <= ctx.score(model) <= 1
    with pytest.raises(ValueError, match="device='tpu'.*accepted values"):
        _digits_ctx(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'"):
            _digits_ctx(device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_context_fine_tunes_there_keeps_masks_and_gives_the_model_back_on_the_cpu():
    from survey_lib.methods import distillation, pruning

    ctx = _digits_ctx(device="cuda")
    model = build_model("vgg", ctx.task, in_channels=1, width=0.25, image_size=8)
    masks = pruning.make_masks(model, 0.5)
    pruning.finetune_masked(model, ctx, masks)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert all(bool((dict(model.named_parameters())[n][m == 0] == 0).all()) for n, m in masks.items())
    teacher = build_model("vgg", ctx.task, in_channels=1, width=0.5, image_size=8).eval()
    student = build_model("vgg", ctx.task, in_channels=1, width=0.25, image_size=8)
    out = distillation.distill(student, ctx, teacher=teacher)   # a live teacher: its copy follows the batches to the GPU
    assert {p.device.type for p in out.parameters()} == {"cpu"} and 0 <= ctx.score(out) <= 1
