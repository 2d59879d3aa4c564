"""Tests for survey_lib.baselines: the digits baseline for real, shapes baselines on a tiny budget."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from survey_lib.baselines import BUDGETS, baseline, baseline_config
from survey_lib.data import CIFAR10_CLASSES
from survey_lib.train import cache_path

SHAPE_TASKS = ("classification", "regression", "detection", "segmentation")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURVEY_LIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SURVEY_LIB_PROGRESS", "0")
    return tmp_path / "cache"


def test_digits_baseline_reaches_97_percent_and_is_cached(cache, monkeypatch):
    first = baseline()
    assert first.metrics["accuracy"] >= 0.97
    assert first.config["dataset"] == "digits" and first.config["profile"] == "default"
    assert not first.model.training
    assert first.train_seconds > 0
    assert cache_path(first.config).exists()
    def no_training(*args, **kwargs):
        raise AssertionError("the cached baseline was retrained")

    monkeypatch.setattr("survey_lib.baselines.fit", no_training)
    second = baseline("classification", "digits")  # loaded, not retrained
    assert second.metrics == first.metrics and second.train_seconds == first.train_seconds
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    x = second.data.test.tensors[0][:5]
    assert torch.equal(first.model(x), second.model(x))


def test_baselines_train_at_the_default_thread_count_and_restore_the_callers(cache, monkeypatch):
    import survey_lib.baselines as baselines_mod
    from survey_lib.profiles import DEFAULT_THREADS, torch_threads

    seen = []
    real_fit = baselines_mod.fit
    monkeypatch.setattr(baselines_mod, "fit", lambda *a, **k: (seen.append(torch.get_num_threads()), real_fit(*a, **k))[1])
    caller = 3 if DEFAULT_THREADS != 3 else 1
    with torch_threads(caller):
        baseline("regression", "shapes", budget={"n": 120, "epochs": 1, "width": 0.25})
        after = torch.get_num_threads()
    print(f"caller's threads {caller}; trained at {seen}; after {after}; DEFAULT_THREADS {DEFAULT_THREADS}")
    assert seen == [DEFAULT_THREADS] and after == caller


@pytest.mark.parametrize("task", SHAPE_TASKS)
def test_shapes_baseline_tiny_budget_smoke(cache, task):
    b = baseline(task, "shapes", budget={"n": 160, "epochs": 1, "width": 0.25})
    assert b.config["n"] == 160 and b.config["arch"] == "vgg" and b.task.name == task
    assert b.task.primary_metric in b.metrics and b.task.primary_metric in b.val_metrics
    assert not b.model.training
    x, y = b.data.test[:2]
    assert b.model(x).shape[0] == 2


def test_baseline_arch_choice(cache):
    b = baseline("regression", "shapes", arch="mlp", budget={"n": 120, "epochs": 1})
    assert b.config["arch"] == "mlp" and "r2" in b.metrics


def test_cifar10_baseline_on_a_fake_directory(cache, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                         b"labels": list(range(10))}, fh)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, fh)
    monkeypatch.setenv("SURVEY_LIB_CIFAR10", str(root))
    b = baseline("classification", "cifar10", budget={"n": None, "epochs": 1, "width": 0.25})
    assert 0.0 <= b.metrics["accuracy"] <= 1.0 and len(b.data.test) == 10


@pytest.mark.parametrize(
    "args, kwargs, match",
    [(("detection", "digits"), {}, "digits"), (("classification", "mnist"), {}, "dataset"),
     (("classification", "digits"), {"profile": "huge"}, "profile"),
     (("segmentation", "shapes"), {"arch": "mlp"}, "mlp"), (("classification", "digits"), {"arch": "vit"}, "arch"),
     (("classification", "digits"), {"budget": {"epochz": 3}}, "budget")],
)
def test_baseline_rejects_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        baseline_config(*args, **kwargs)


def test_every_profile_has_a_budget_and_full_is_bigger():
    for (dataset, task, profile), budget in BUDGETS.items():
        if profile == "full":
            default = BUDGETS[(dataset, task, "default")]
            assert budget["epochs"] > default["epochs"]
    config = baseline_config("detection", "shapes", profile="full", seed=3)
    assert {"profile", "seed", "arch", "dataset", "task", "n", "epochs", "schema"} <= set(config)


@pytest.mark.slow
@pytest.mark.parametrize("task, floor", [("classification", 0.6), ("regression", 0.5), ("detection", 0.5),
                                          ("segmentation", 0.35)])
def test_shapes_default_profile_baselines_are_meaningful(monkeypatch, task, floor):
    """In the user's checkpoint cache (SURVEY_LIB_CACHE, as the notebooks use it), not a temporary one: these are
    the checkpoints the notebooks load, so a test run before the notebooks trains each of them once, not twice."""
    monkeypatch.setenv("SURVEY_LIB_PROGRESS", "0")
    b = baseline(task, "shapes")
    assert b.metrics[b.task.primary_metric] > floor
    assert b.train_seconds > 0


def test_a_baseline_trained_elsewhere_than_the_cpu_has_its_own_key():
    cpu = baseline_config("classification", "digits")
    assert "device" not in cpu and baseline_config("classification", "digits", device="cpu") == cpu
    with pytest.raises((ValueError, TypeError), match="device"):
        baseline_config("classification", "digits", device="gpu")
    if torch.cuda.is_available():
        assert baseline_config("classification", "digits", device="cuda")["device"] == "cuda"
