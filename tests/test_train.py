"""Tests for survey_lib.train: fit/evaluate, callbacks, determinism, progress switch, checkpoint cache."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import TensorDataset

from survey_lib import train as train_mod
from survey_lib.models import build_model
from survey_lib.tasks import get_task
from survey_lib.train import Callback, cache_key, cache_path, cached_train, evaluate, fit, show_progress


def blobs(n: int = 96, seed: int = 0) -> TensorDataset:
    """Three easy classes on 1x4x4 images: the class sets the mean brightness."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 4, 4, generator=g) * 0.3 + (y.float() - 1)[:, None, None, None] * 2
    return TensorDataset(x, y)


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    task = get_task("classification", num_classes=3, image_size=4)
    return build_model("vgg", task, in_channels=1, width=0.25), task


def test_fit_learns_and_reports_history():
    model, task = small_model()
    data = blobs()
    history = fit(model, task, data, val_data=blobs(30, seed=1), epochs=4, batch_size=16, lr=1e-2, progress=False)
    assert len(history.train_loss) == len(history.val_metrics) == len(history.epoch_seconds) == 4
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.val_metrics[-1]["accuracy"] > 0.9
    assert history.steps == 4 * 6 and history.seconds > 0
    assert not model.training  # fit leaves the model in eval mode
    assert evaluate(model, task, data)["accuracy"] > 0.9


def test_fit_is_deterministic_by_seed():
    from survey_lib.profiles import torch_threads

    runs = []
    for seed in (0, 0, 1):
        model, task = small_model()
        with torch_threads(2):   # the thread count seed_everything's guarantee is stated for
            fit(model, task, blobs(), epochs=2, batch_size=16, seed=seed, progress=False)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("threads", [1, 2])
def test_fit_keeps_the_callers_thread_count(threads):
    from survey_lib.profiles import torch_threads

    seen = []

    class Threads(Callback):
        def on_step_end(self, state):
            seen.append(torch.get_num_threads())

    model, task = small_model()
    with torch_threads(threads):
        fit(model, task, blobs(), epochs=1, batch_size=32, progress=False, callbacks=[Threads()])
        after = torch.get_num_threads()
    print(f"threads set {threads}, seen in training {sorted(set(seen))}, after fit {after}")
    assert set(seen) == {threads} and after == threads


def test_evaluate_restores_training_flag_and_needs_no_grad():
    model, task = small_model()
    for flag in (True, False):
        model.train(flag)
        evaluate(model, task, blobs(20))
        assert model.training is flag
    for p in model.parameters():
        assert p.grad is None


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, state):
        self.events.append(("begin", state.step))

    def on_step_end(self, state):
        self.events.append(("step", state.step))
        assert state.loss == state.loss  # not NaN

    def on_epoch_end(self, state):
        self.events.append(("epoch", state.epoch))
        assert len(state.history.train_loss) == state.epoch + 1

    def on_train_end(self, state):
        self.events.append(("end", state.step))


def test_callbacks_see_every_event_in_order():
    model, task = small_model()
    rec = Recorder()
    fit(model, task, blobs(32), epochs=2, batch_size=16, callbacks=[rec], progress=False)
    assert rec.events == [("begin", 0), ("step", 1), ("step", 2), ("epoch", 0), ("step", 3), ("step", 4),
                          ("epoch", 1), ("end", 4)]


def test_max_steps_and_stop_flag_end_training():
    model, task = small_model()
    history = fit(model, task, blobs(), epochs=10, batch_size=16, max_steps=5, progress=False)
    assert history.steps == 5 and len(history.train_loss) == 1

    class StopAfterThree(Callback):
        def on_step_end(self, state):
            state.stop = state.step >= 3

    model, task = small_model()
    assert fit(model, task, blobs(), epochs=10, batch_size=16, callbacks=[StopAfterThree()], progress=False).steps == 3


def test_extra_loss_is_added_and_sees_the_batch():
    calls = []

    def pull_to_zero(model, x, output, target):
        calls.append((x.shape[0], output.shape, target.shape))
        return 100.0 * output.pow(2).mean()

    model, task = small_model()
    fit(model, task, blobs(), epochs=3, batch_size=16, lr=1e-2, extra_loss=pull_to_zero, progress=False)
    assert len(calls) == 18 and calls[0] == (16, (16, 3), (16,))
    with torch.no_grad():
        assert model(blobs().tensors[0]).abs().mean() < 0.5  # the extra term dominates


def test_cosine_schedule_decays_learning_rate_to_zero():
    model, task = small_model()
    seen = []

    class LrProbe(Callback):
        def on_step_end(self, state):
            seen.append(state.optimizer.param_groups[0]["lr"])

    fit(model, task, blobs(), epochs=2, batch_size=16, lr=0.01, schedule="cosine", callbacks=[LrProbe()],
        progress=False)
    assert seen[0] < 0.01 and seen[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(seen, seen[1:]))


@pytest.mark.parametrize(
    "kwargs, error",
    [({"epochs": 0}, ValueError), ({"epochs": 1, "batch_size": 0}, ValueError), ({"epochs": 1, "lr": -1.0}, ValueError),
     ({"epochs": 1, "optimizer": "lbfgs"}, ValueError), ({"epochs": 1, "max_steps": 0}, ValueError),
     ({"epochs": 1.5}, TypeError), ({"epochs": 1, "schedule": "step"}, ValueError)],
)
def test_fit_rejects_bad_arguments(kwargs, error):
    model, task = small_model()
    with pytest.raises(error):
        fit(model, task, blobs(), progress=False, **kwargs)


def test_sgd_optimizer_and_progress_bar_run(capsys):
    model, task = small_model()
    history = fit(model, task, blobs(), epochs=1, optimizer="sgd", lr=0.05, progress=True)
    assert len(history.train_loss) == 1


def test_progress_auto_switch(monkeypatch):
    assert show_progress(True) and not show_progress(False)
    monkeypatch.setenv("SURVEY_LIB_PROGRESS", "off")
    monkeypatch.setattr("sys.stderr", _Tty())
    assert not show_progress(None)
    monkeypatch.setenv("SURVEY_LIB_PROGRESS", "1")
    assert show_progress(None)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not show_progress(None)


class _Tty(io.StringIO):
    def isatty(self):
        return True


# ---------------------------------------------------------------------------------------------- cache
def test_cached_train_trains_once_then_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("SURVEY_LIB_CACHE", str(tmp_path))
    config = {"name": "blobs", "epochs": 2, "seed": 0}
    calls = []

    def train(model):
        calls.append(1)
        _, task = small_model()
        fit(model, task, blobs(), epochs=2, batch_size=16, progress=False)
        return {"accuracy": evaluate(model, task, blobs())["accuracy"]}

    first, metrics = cached_train(config, lambda: small_model(seed=1)[0], train)
    second, metrics2 = cached_train(dict(reversed(list(config.items()))), lambda: small_model(seed=2)[0], train)
    assert len(calls) == 1 and metrics == metrics2
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert cache_path(config).parent == tmp_path and cache_path(config).exists()
    assert list(tmp_path.iterdir()) == [cache_path(config)]  # no temporary files left behind
    payload = torch.load(cache_path(config), weights_only=True)
    assert set(payload) == {"state_dict", "metrics", "config"}
    cached_train({**config, "epochs": 3}, lambda: small_model()[0], train)
    assert len(calls) == 2


def test_cache_key_is_canonical_and_versioned(monkeypatch):
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})
    before = cache_key({"a": 1})
    monkeypatch.setattr(train_mod, "CACHE_SCHEMA", train_mod.CACHE_SCHEMA + 1)
    assert cache_key({"a": 1}) != before


def test_corrupt_checkpoint_is_retrained_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("SURVEY_LIB_CACHE", str(tmp_path))
    config = {"name": "corrupt"}
    cache_path(config).write_bytes(b"not a checkpoint")
    calls = []
    with pytest.warns(RuntimeWarning, match="retraining"):
        cached_train(config, lambda: small_model()[0], lambda m: calls.append(1) or {"ok": 1.0})
    assert calls == [1]
    _, metrics = cached_train(config, lambda: small_model()[0], lambda m: calls.append(1) or {"ok": 2.0})
    assert calls == [1] and metrics == {"ok": 1.0}


def test_cache_rejects_non_json_config(tmp_path, monkeypatch):
    monkeypatch.setenv("SURVEY_LIB_CACHE", str(tmp_path))
    with pytest.raises(TypeError, match="config"):
        cached_train({"f": object()}, lambda: small_model()[0], lambda m: {})


def test_default_cache_dir(monkeypatch):
    monkeypatch.delenv("SURVEY_LIB_CACHE", raising=False)
    assert train_mod.cache_dir().parts[-3:] == (".cache", "survey_lib", "checkpoints")


# ---------------------------------------------------------------------------------------------- bad input
def test_model_and_data_that_do_not_fit_give_a_value_error():
    data = blobs()
    task = get_task("classification", num_classes=3, image_size=4)
    three_channels = build_model("vgg", task, in_channels=3, width=0.25)
    with pytest.raises(ValueError, match="inputs of train_data of shape .* does not fit model"):
        fit(three_channels, task, data, epochs=1)
    with pytest.raises(ValueError, match="inputs of data of shape .* does not fit model"):
        evaluate(three_channels, task, data)
    model, _ = small_model()
    wide_labels = TensorDataset(data.tensors[0], data.tensors[1] + 5)
    with pytest.raises(ValueError, match="target holds class"):
        fit(model, task, wide_labels, epochs=1)
    ten = get_task("classification", num_classes=10, image_size=4)
    with pytest.raises(ValueError, match="output must have shape .* 10 in dim 1"):
        fit(model, ten, data, epochs=1)


BAD_FIT_ARGS = [
    (dict(callbacks=[1]), TypeError, "callbacks"),
    (dict(callbacks=5), TypeError, "callbacks"),
    (dict(extra_loss=5), TypeError, "extra_loss"),
    (dict(progress="yes"), TypeError, "progress"),
    (dict(val_data=[1]), TypeError, "val_data"),
    (dict(lr=float("nan")), ValueError, "lr"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_FIT_ARGS)
def test_bad_fit_arguments(kwargs, error, match):
    model, task = small_model()
    with pytest.raises(error, match=match):
        fit(model, task, blobs(), epochs=1, **kwargs)


def test_bad_training_data_and_optimizer_arguments():
    model, task = small_model()
    x, y = blobs().tensors
    with pytest.raises(TypeError, match="train_data must yield"):
        fit(model, task, [1, 2, 3], epochs=1)
    with pytest.raises(TypeError, match="train_data must yield"):
        fit(model, task, TensorDataset(x), epochs=1)
    with pytest.raises(TypeError, match="train_data must be a dataset"):
        fit(model, task, None, epochs=1)
    with pytest.raises(ValueError, match="inputs of train_data hold NaN"):
        fit(model, task, TensorDataset(torch.full_like(x, float("nan")), y), epochs=1)
    frozen, _ = small_model()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(frozen, task, blobs(), epochs=1)
    for lr, weight_decay, match in ((-1.0, 0.0, "lr"), (0.1, float("inf"), "weight_decay")):
        with pytest.raises(ValueError, match=match):
            train_mod.make_optimizer(model, "sgd", lr, weight_decay)
    with pytest.raises(TypeError, match="progress"):
        show_progress("no")


def test_bad_cache_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("SURVEY_LIB_CACHE", str(tmp_path))
    with pytest.raises(TypeError, match="config must be a dict"):
        cache_key("abc")
    with pytest.raises(TypeError, match="config must be JSON-serializable"):
        cache_path({"a": {1, 2}})
    with pytest.raises(TypeError, match="config must be JSON-serializable"):
        cached_train({"x": float("nan")}, lambda: small_model()[0], lambda m: {})
    with pytest.raises(TypeError, match="build must be a function"):
        cached_train({"x": 1}, 5, lambda m: {})
    with pytest.raises(TypeError, match=r"build\(\) must be a torch.nn.Module"):
        cached_train({"x": 2}, lambda: "model", lambda m: {})
    with pytest.raises(TypeError, match=r"train\(model\) must be a dict"):
        cached_train({"x": 3}, lambda: small_model()[0], lambda m: None)


def test_fit_and_evaluate_follow_the_models_device():
    assert train_mod.model_device(torch.nn.ReLU()).type == "cpu"   # no parameters: the CPU
    task = get_task("classification", num_classes=3, image_size=8)
    data = TensorDataset(torch.randn(24, 1, 8, 8), torch.randint(0, 3, (24,)))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        model = build_model("vgg", task, in_channels=1, width=0.25, image_size=8).to(device)
        fit(model, task, data, epochs=1, batch_size=8)
        assert train_mod.model_device(model).type == device
        assert 0 <= evaluate(model, task, data)["accuracy"] <= 1
