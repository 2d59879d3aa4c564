"""One training loop for every task, an evaluation function and a checkpoint cache.

Distillation plugs in as ``extra_loss``; pruning schedules and quantization-aware training plug in as
:class:`Callback` objects that read and change the :class:`TrainState`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ._io import atomic_torch_save
from ._validate import check_choice, check_float, check_int, check_mapping, check_model, check_type, run_forward
from .data import loader
from .profiles import seed_everything
from .tasks import Task

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
CACHE_ENV = "SURVEY_LIB_CACHE"
PROGRESS_ENV = "SURVEY_LIB_PROGRESS"
CACHE_SCHEMA = 1

ExtraLoss = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]


@dataclass
class History:
    """Per-epoch training loss, validation metrics and elapsed seconds of one ``fit`` call."""

    train_loss: list[float] = field(default_factory=list)
    val_metrics: list[dict[str, float]] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return {
            "train_loss": list(self.train_loss), "val_metrics": [dict(m) for m in self.val_metrics],
            "epoch_seconds": list(self.epoch_seconds), "steps": self.steps, "seconds": self.seconds,
        }


@dataclass
class TrainState:
    """What callbacks see and may change: set ``stop = True`` to end training after the current step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    task: Task
    epochs: int
    total_steps: int = 0
    epoch: int = 0
    step: int = 0
    loss: float = float("nan")
    history: History = field(default_factory=History)
    stop: bool = False


class Callback:
    """Hooks called by :func:`fit`; override the ones you need."""

    def on_train_begin(self, state: TrainState) -> None:
        """Before the first step."""

    def on_step_end(self, state: TrainState) -> None:
        """After every optimizer step (``state.loss`` holds that step's loss)."""

    def on_epoch_end(self, state: TrainState) -> None:
        """After every epoch, once its history entries are written."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last step."""


class CosineLR(Callback):
    """Cosine learning-rate decay from the optimizer's initial rate to 0 over ``state.total_steps``."""

    def on_train_begin(self, state: TrainState) -> None:
        """Remember the initial learning rates."""
        self.base = [group["lr"] for group in state.optimizer.param_groups]

    def on_step_end(self, state: TrainState) -> None:
        """Set the rate for the next step."""
        factor = 0.5 * (1.0 + math.cos(math.pi * min(1.0, state.step / max(1, state.total_steps))))
        for group, base in zip(state.optimizer.param_groups, self.base):
            group["lr"] = base * factor


def fit(
    model: nn.Module,
    task: Task,
    train_data: Dataset,
    *,
    val_data: Dataset | None = None,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    schedule: str = "constant",
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    extra_loss: ExtraLoss | None = None,
    progress: bool | None = None,
    max_steps: int | None = None,
) -> History:
    """Train ``model`` IN PLACE on ``train_data`` for ``task`` (the one function here that mutates its input).

    It seeds from ``seed`` and keeps torch's thread count as the caller set it (``seed_everything``,
    ``torch_threads``), so a benchmark worker's one thread is not silently raised; a process that never set it
    trains at torch's default (every core), and weights differ in their last bits between thread counts.

    ``schedule="cosine"`` decays the learning rate to 0 over the run (a :class:`CosineLR` callback).
    """
    check_model_task_data(model, task, train_data, "train_data")
    if val_data is not None:
        check_data(val_data, "val_data")
    _check_fit_args(epochs, batch_size, lr, weight_decay, optimizer, max_steps)
    check_choice("schedule", schedule, SCHEDULES)
    callbacks = _check_hooks(callbacks, extra_loss, progress)
    seed_everything(seed, threads=None)
    opt = make_optimizer(model, optimizer, lr, weight_decay)
    total_steps = epochs * math.ceil(len(train_data) / batch_size)
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    state = TrainState(model=model, optimizer=opt, task=task, epochs=epochs, total_steps=total_steps)
    callbacks = ([CosineLR()] if schedule == "cosine" else []) + list(callbacks)
    start = time.perf_counter()
    _call(callbacks, "on_train_begin", state)
    bar = _progress_bar(epochs, show_progress(progress))
    for epoch in range(epochs):
        state.epoch = epoch
        epoch_start = time.perf_counter()
        train_loss = _train_epoch(state, train_data, batch_size, seed + epoch, extra_loss, callbacks, max_steps)
        _end_epoch(state, train_loss, val_data, epoch_start)
        _call(callbacks, "on_epoch_end", state)
        _update_bar(bar, state)
        if state.stop or (max_steps is not None and state.step >= max_steps):
            break
    if bar is not None:
        bar.close()
    state.history.steps = state.step
    state.history.seconds = time.perf_counter() - start
    _call(callbacks, "on_train_end", state)
    model.eval()
    return state.history


def evaluate(model: nn.Module, task: Task, data: Dataset, *, batch_size: int = 256) -> dict[str, float]:
    """Task metrics of ``model`` on ``data`` in eval mode without gradients, on the model's device; the training
    flag is restored."""
    check_model_task_data(model, task, data)
    check_int("batch_size", batch_size, min_value=1)
    was_training = model.training
    model.eval()
    metrics = task.metric_state()
    device = model_device(model)
    try:
        with torch.no_grad():
            for x, y in loader(data, batch_size, shuffle=False):
                metrics.update(run_forward(model, x.to(device), "inputs of data").cpu(), y)
    finally:
        model.train(was_training)
    return metrics.compute()


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (the CPU for a model with neither): ``fit`` and
    ``evaluate`` move each batch there, so a model on a GPU trains and is evaluated there."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def on_device(model: nn.Module, device: str) -> Iterator[nn.Module]:
    """``model`` moved IN PLACE to ``device`` inside the block and back where it was after it (even on an error);
    a model already there does not move, so blocks nest. Parameters keep their identity, so callbacks holding
    them still see them."""
    home = model_device(model)
    if home == torch.device(device):
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam or SGD (momentum 0.9) over the trainable parameters."""
    check_model(model)
    check_choice("optimizer", name, OPTIMIZERS)
    check_float("lr", lr, min_value=0.0)
    check_float("weight_decay", weight_decay, min_value=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (none with requires_grad=True): nothing to optimize")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def check_model_task_data(model: Any, task: Any, data: Any, param: str = "data") -> None:
    """TypeError unless model is an nn.Module and task a Task; ValueError if data is empty (see check_data)."""
    check_model(model)
    if not isinstance(task, Task):
        raise TypeError(f"task must be a survey_lib.tasks.Task (see get_task), got {type(task).__name__}")
    check_data(data, param)


def check_data(data: Any, param: str = "data") -> None:
    """TypeError unless ``data`` is a dataset of (input, target) tensor pairs; ValueError if empty or not finite."""
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")) or isinstance(data, (str, bytes)):
        raise TypeError(f"{param} must be a dataset of (input, target) pairs (e.g. a TensorDataset), "
                        f"got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{param} is empty: pass a dataset with at least one example")
    first = data[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2 and all(isinstance(t, Tensor) for t in first)):
        got = [type(t).__name__ for t in first] if isinstance(first, (tuple, list)) else type(first).__name__
        raise TypeError(f"{param} must yield (input, target) pairs of tensors, got {got}")
    if isinstance(data, torch.utils.data.TensorDataset):
        for what, t in zip(("inputs", "targets"), data.tensors):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"the {what} of {param} hold NaN or inf: clean the data first")


def _check_hooks(callbacks: Any, extra_loss: Any, progress: Any) -> tuple[Callback, ...]:
    """The callbacks as a tuple; TypeError for a callback, extra_loss or progress of the wrong kind."""
    if isinstance(callbacks, Callback) or not isinstance(callbacks, Iterable):
        raise TypeError(f"callbacks must be a sequence of survey_lib.train.Callback, got {type(callbacks).__name__}")
    callbacks = tuple(callbacks)
    for cb in callbacks:
        check_type("callbacks[i]", cb, Callback, "a survey_lib.train.Callback")
    if extra_loss is not None and not callable(extra_loss):
        raise TypeError(f"extra_loss must be a function (model, x, output, target) -> loss, or None, "
                        f"got {type(extra_loss).__name__}")
    if progress is not None:
        check_type("progress", progress, bool, "True, False or None")
    return callbacks


def _check_fit_args(epochs, batch_size, lr, weight_decay, optimizer, max_steps) -> None:
    check_int("epochs", epochs, min_value=1)
    check_int("batch_size", batch_size, min_value=1)
    check_float("lr", lr, min_value=0.0)
    check_float("weight_decay", weight_decay, min_value=0.0)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    if max_steps is not None:
        check_int("max_steps", max_steps, min_value=1)


def _train_epoch(
    state: TrainState,
    data: Dataset,
    batch_size: int,
    shuffle_seed: int,
    extra_loss: ExtraLoss | None,
    callbacks: Sequence[Callback],
    max_steps: int | None,
) -> float:
    """One pass over ``data``; returns the mean training loss (weighted by batch size)."""
    model, task, opt = state.model, state.task, state.optimizer
    model.train()
    total, seen = 0.0, 0
    device = model_device(model)
    for x, y in loader(data, batch_size, shuffle=True, seed=shuffle_seed):
        x, y = x.to(device), y.to(device)
        output = run_forward(model, x, "inputs of train_data")
        loss = task.loss(output, y)
        if extra_loss is not None:
            loss = loss + extra_loss(model, x, output, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state.step += 1
        state.loss = float(loss.detach())
        total += state.loss * len(x)
        seen += len(x)
        _call(callbacks, "on_step_end", state)
        if state.stop or (max_steps is not None and state.step >= max_steps):
            break
    return total / max(1, seen)


def _end_epoch(state: TrainState, train_loss: float, val_data: Dataset | None, epoch_start: float) -> None:
    """Append this epoch's loss, validation metrics and duration to the history."""
    history = state.history
    history.train_loss.append(train_loss)
    history.val_metrics.append(evaluate(state.model, state.task, val_data) if val_data is not None else {})
    history.epoch_seconds.append(time.perf_counter() - epoch_start)


def _call(callbacks: Iterable[Callback], hook: str, state: TrainState) -> None:
    for cb in callbacks:
        getattr(cb, hook)(state)


# ----------------------------------------------------------------------------------------------------------
# Progress bars
# ----------------------------------------------------------------------------------------------------------
def in_notebook() -> bool:
    """True inside a Jupyter kernel."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def show_progress(progress: bool | None) -> bool:
    """Resolve ``progress=None``: off if env SURVEY_LIB_PROGRESS is 0/off, else on in a notebook or a TTY."""
    if progress is not None:
        check_type("progress", progress, bool, "True, False or None")
        return bool(progress)
    if os.environ.get(PROGRESS_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return False
    return in_notebook() or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    if in_notebook():
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(total=total, desc="fit", unit="epoch", leave=False)


def _update_bar(bar, state: TrainState) -> None:
    if bar is None:
        return
    postfix = {"loss": f"{state.history.train_loss[-1]:.4f}"}
    val = state.history.val_metrics[-1]
    if state.task.primary_metric in val:
        postfix[state.task.primary_metric] = f"{val[state.task.primary_metric]:.4f}"
    bar.set_postfix(postfix)
    bar.update(1)


# ----------------------------------------------------------------------------------------------------------
# Checkpoint cache
# ----------------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Env SURVEY_LIB_CACHE, else ~/.cache/survey_lib/checkpoints."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "survey_lib" / "checkpoints"


def cache_key(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config``, the cache schema and the survey_lib and torch versions."""
    from . import __version__

    _check_config(config)
    versions = {"schema": CACHE_SCHEMA, "survey_lib": __version__, "torch": torch.__version__.split("+")[0]}
    canonical = json.dumps({"config": config, **versions}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def cache_path(config: dict[str, Any]) -> Path:
    """Where the checkpoint of ``config`` lives."""
    return cache_dir() / f"{cache_key(config)}.pt"


def cached_train(
    config: dict[str, Any],
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module], dict[str, Any]],
) -> tuple[nn.Module, dict[str, Any]]:
    """Load the model trained under ``config`` from the cache, or ``build()`` + ``train(model)`` and save it.

    ``train`` returns JSON-like metrics stored beside the weights; writes are atomic, and an unreadable
    checkpoint is retrained with a warning.
    """
    _check_config(config)
    for name, fn in (("build", build), ("train", train)):
        if not callable(fn):
            raise TypeError(f"{name} must be a function, got {type(fn).__name__}")
    path = cache_path(config)
    if path.exists():
        loaded = _load_checkpoint(path, config, build)
        if loaded is not None:
            return loaded
    model = check_type("build()", build(), nn.Module, "a torch.nn.Module")
    metrics = check_mapping("train(model)", train(model), "a dict of JSON-serializable metrics")
    _check_json(metrics, "metrics returned by train()")
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_torch_save(path, {"state_dict": state_dict, "metrics": metrics, "config": copy.deepcopy(config)})
    return model, metrics


def _load_checkpoint(path: Path, config: dict[str, Any], build: Callable[[], nn.Module]):
    """(model, metrics) from ``path``, or None (with a warning) if it cannot be used."""
    try:
        payload = torch.load(path, weights_only=True)
        if _canonical(payload["config"]) != _canonical(config):
            raise ValueError("stored config differs from the requested one")
        model = build()
        model.load_state_dict(payload["state_dict"])
        return model, payload["metrics"]
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is retrained
        warnings.warn(f"could not load cached checkpoint {str(path)!r} ({err}); retraining", RuntimeWarning)
        return None


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _check_config(config: Any) -> None:
    check_mapping("config", config, "a dict of JSON-serializable settings")
    _check_json(config, "config")


def _check_json(obj: Any, what: str) -> None:
    try:
        json.dumps(obj, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serializable (dicts, lists, str, int, float, bool, None): {err}")
