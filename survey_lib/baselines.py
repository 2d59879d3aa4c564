"""The shared baselines every notebook compresses: trained once per (dataset, task, arch, profile, seed), cached.

* digits / classification: a small VGG-style CNN at 8x8 (one pooling); >= 97% test accuracy in seconds.
* shapes / every task: the MAIN shapes net, VGG-style at 32x32 (32,32,M,64,64,M,128,128,M; ~38.6 MMACs
  per image for the backbone), so measured latency is compute-dominated. The task changes only the head.
* cifar10 / classification: the same VGG-style net; needs a local copy of the dataset (see data.load).

The ``default`` profile fits a 2-core laptop (each baseline trains in well under half a minute); ``full``
uses more data and epochs. Metrics are on the test split; ``val_metrics`` are on the validation split.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ._validate import check_choice, check_device, check_seed
from .data import DATASET_TASKS, DATASETS, Splits, load
from .models import ARCH_TASKS, ARCHS, build_model
from .profiles import DEFAULT_THREADS, check_profile, torch_threads
from .tasks import Task, task_for
from .train import cached_train, evaluate, fit, on_device

BASELINE_SCHEMA = 1
BUDGET_KEYS = ("n", "epochs", "batch_size", "lr", "weight_decay", "width", "depth", "val_fraction",
               "test_fraction")

_DIGITS = {"n": None, "epochs": 10, "batch_size": 64, "lr": 3e-3, "weight_decay": 0.0, "width": 0.5,
           "depth": 2, "val_fraction": 0.15, "test_fraction": 0.2}
# shapes is generated, so its test split is large (1650 images: one image is 0.06 points) while the
# training split stays at 3300 images.
_SHAPES = {"n": 5500, "epochs": 3, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.0, "width": 1.0,
           "depth": 2, "val_fraction": 0.1, "test_fraction": 0.3}
_CIFAR = {"n": 12000, "epochs": 4, "batch_size": 64, "lr": 2e-3, "weight_decay": 5e-4, "width": 1.0,
          "depth": 2, "val_fraction": 0.1, "test_fraction": 1 / 6}

BUDGETS: dict[tuple[str, str, str], dict[str, Any]] = {
    ("digits", "classification", "default"): _DIGITS,
    ("digits", "classification", "full"): {**_DIGITS, "epochs": 30, "width": 1.0},
    ("cifar10", "classification", "default"): _CIFAR,
    ("cifar10", "classification", "full"): {**_CIFAR, "n": None, "epochs": 30},
}
for _task in DATASET_TASKS["shapes"]:
    BUDGETS[("shapes", _task, "default")] = dict(_SHAPES)
    BUDGETS[("shapes", _task, "full")] = {**_SHAPES, "n": 20000, "epochs": 15, "test_fraction": 0.15}


@dataclass
class Baseline:
    """A trained reference model (eval mode) with its task, data, test metrics, config and training time."""

    model: nn.Module
    task: Task
    data: Splits
    metrics: dict[str, float]
    config: dict[str, Any]
    train_seconds: float
    val_metrics: dict[str, float] = field(default_factory=dict)


def baseline(
    task: str = "classification",
    dataset: str = "digits",
    *,
    profile: str = "default",
    seed: int = 0,
    arch: str | None = None,
    budget: dict[str, Any] | None = None,
    device: str = "cpu",
) -> Baseline:
    """The shared baseline of ``dataset`` x ``task``, trained once and then loaded from the checkpoint cache.

    ``arch=None`` picks the VGG-style reference net; ``budget`` overrides entries of the profile's budget
    (``n``, ``epochs``, ``lr``, ``width`` ...) for quick experiments and tests. ``device`` ("cuda") trains it
    there; the checkpoint is cached under its own key, and the returned model is on the CPU.
    """
    config = baseline_config(task, dataset, profile=profile, seed=seed, arch=arch, budget=budget, device=device)
    data = load(dataset, task, seed=seed, n=config["n"], val_fraction=config["val_fraction"],
                test_fraction=config["test_fraction"])
    task_obj = task_for(data)
    model, metrics = cached_train(
        config,
        build=lambda: _build(config, task_obj, data),
        train=lambda model: _train(model, config, task_obj, data),
    )
    model.eval()
    return Baseline(  # metrics are re-computed, never taken from the cache
        model=model, task=task_obj, data=data, metrics=evaluate(model, task_obj, data.test), config=config,
        train_seconds=float(metrics["train_seconds"]),
        val_metrics=evaluate(model, task_obj, data.val) if len(data.val) else {},
    )


def baseline_config(
    task: str = "classification",
    dataset: str = "digits",
    *,
    profile: str = "default",
    seed: int = 0,
    arch: str | None = None,
    budget: dict[str, Any] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """The full, JSON-able configuration (and cache key material) of a baseline; a device other than the
    CPU is part of it (GPU kernels round differently)."""
    device = check_device(device)
    check_choice("dataset", dataset, DATASETS)
    check_choice(f"task (for dataset {dataset!r})", task, DATASET_TASKS[dataset])
    check_profile(profile)
    check_seed(seed)
    arch = "vgg" if arch is None else check_choice("arch", arch, ARCHS)
    check_choice(f"task (for arch {arch!r})", task, ARCH_TASKS[arch])
    settings = dict(BUDGETS[(dataset, task, profile)])
    for key, value in (budget or {}).items():
        check_choice("budget key", key, BUDGET_KEYS)
        settings[key] = value
    return {"schema": BASELINE_SCHEMA, "code": code_fingerprint(), "dataset": dataset, "task": task, "profile": profile, "seed": seed,
            "arch": arch, "optimizer": "adam", "schedule": "cosine", **settings,
            **({"device": device} if device != "cpu" else {})}


def code_fingerprint() -> str:
    """A hash of the source that decides a baseline's weights (data, models, tasks, training, budgets).

    It is part of the checkpoint key, so editing any of these modules retrains instead of reusing
    weights that may have been trained on other data or another architecture."""
    from . import baselines, data, models, tasks, train

    digest = hashlib.sha256()
    for module in (data, models, tasks, train, baselines):
        with open(module.__file__, "rb") as fh:
            digest.update(fh.read())
    return digest.hexdigest()[:16]


def _build(config: dict[str, Any], task: Task, data: Splits) -> nn.Module:
    """A fresh, seeded model for ``config``."""
    import torch

    torch.manual_seed(config["seed"])
    return build_model(config["arch"], task, in_channels=data.info.in_channels, width=config["width"],
                       depth=config["depth"], image_size=data.info.image_size)


def _train(model: nn.Module, config: dict[str, Any], task: Task, data: Splits) -> dict[str, Any]:
    """Train with the config's budget at DEFAULT_THREADS (a checkpoint's bits depend on the thread count and its
    cache key does not name it); return the training time and loss curve (metrics are computed on load)."""
    start = time.perf_counter()
    with on_device(model, config.get("device", "cpu")), torch_threads(DEFAULT_THREADS):
        history = fit(model, task, data.train, epochs=config["epochs"], batch_size=config["batch_size"],
                      lr=config["lr"], weight_decay=config["weight_decay"], optimizer=config["optimizer"],
                      schedule=config["schedule"], seed=config["seed"])
    seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "train_loss": history.train_loss}
