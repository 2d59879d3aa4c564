"""The shared method interface: a ``Context`` (task, data, fine-tuning budget) and what a method changes.

Every method is a function ``method(model, ctx, **config) -> nn.Module``. It deep-copies ``model``, never
mutates it, and marks the result with what it *really* changes, so the benchmark can tell simulated
savings (masks, fake-quant) from real ones (smaller tensors, a sparse or low-bit file, int8 kernels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from .._validate import check_choice, check_device, check_float, check_int, check_seed, check_type
from ..data import Splits
from ..tasks import Task
from ..train import Callback, ExtraLoss, History, evaluate, fit, on_device


# What a method really changes (DESIGN.md section 3).
CHANGES = (
    "mask",             # simulated: zeros in dense tensors, nothing smaller or faster by itself
    "dense_shapes",     # real: smaller dense tensors, fewer MACs executed
    "sparse_format",    # real storage: a sparse file format (CSR, bitmask, relative index)
    "low_bit_storage",  # real storage: packed low-bit weights or codebook indices
    "int8_kernel",      # real compute: integer kernels at deployment
    "architecture",     # a different (compact) architecture
    "training",         # only the training changed (e.g. distillation)
)


@dataclass
class Context:
    """What a method may use: the task, the data splits, the fine-tuning budget (epochs) and the device its
    fine-tuning runs on (everything else a method does stays on the CPU)."""

    task: Task
    data: Splits
    budget: int = 1
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.device = check_device(self.device)
        check_int("budget", self.budget, min_value=0)
        check_float("lr", self.lr, min_value=0.0)
        check_int("batch_size", self.batch_size, min_value=1)
        check_seed(self.seed)

    @classmethod
    def from_baseline(cls, base: Any, **overrides: Any) -> "Context":
        """A context on a ``survey_lib.baselines.Baseline``'s task and data."""
        return cls(task=base.task, data=base.data, seed=base.config.get("seed", 0), **overrides)

    def finetune(
        self,
        model: nn.Module,
        *,
        epochs: int | None = None,
        callbacks: Iterable[Callback] = (),
        extra_loss: ExtraLoss | None = None,
        lr: float | None = None,
    ) -> History:
        """Fine-tune ``model`` in place on the training split for ``epochs`` (default: the budget), on the
        context's device; the model is back on its own device (the CPU) afterwards."""
        epochs = self.budget if epochs is None else check_int("epochs", epochs, min_value=0)
        if epochs == 0:
            return History()
        with on_device(model, self.device):
            return fit(model, self.task, self.data.train, epochs=epochs, batch_size=self.batch_size,
                       lr=self.lr if lr is None else lr, seed=self.seed, callbacks=tuple(callbacks),
                       extra_loss=extra_loss)

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        """Metrics of ``model`` on ``split`` ("train", "val" or "test")."""
        check_choice("split", split, ("train", "val", "test"))
        with on_device(model, self.device):
            return evaluate(model, self.task, getattr(self.data, split))

    def score(self, model: nn.Module, split: str = "test") -> float:
        """The task's primary metric of ``model`` on ``split``."""
        return self.evaluate(model, split)[self.task.primary_metric]

    def correct(self, model: nn.Module, split: str = "test") -> np.ndarray:
        """Per-image correctness of a classifier on ``split`` (for paired confidence intervals)."""
        from ..stats import correct_per_image

        return correct_per_image(model, self.task, getattr(self.data, check_choice("split", split, ("train", "val", "test"))))

    def example_input(self, batch: int = 1, split: str = "test") -> Tensor:
        """The first ``batch`` inputs of ``split``, stacked."""
        check_int("batch", batch, min_value=1)
        dataset = getattr(self.data, check_choice("split", split, ("train", "val", "test")))
        return torch.stack([dataset[i][0] for i in range(min(batch, len(dataset)))])

    def calibration_batches(self, n_batches: int = 4) -> list[tuple[Tensor, Tensor]]:
        """A few (input, target) training batches, e.g. for Fisher/Hessian estimates or calibration."""
        from ..data import loader

        check_int("n_batches", n_batches, min_value=1)
        batches = []
        for i, batch in enumerate(loader(self.data.train, self.batch_size, shuffle=True, seed=self.seed)):
            if i >= n_batches:
                break
            batches.append((batch[0], batch[1]))
        return batches


def check_ctx(ctx: Any, *, optional: bool = False) -> Context | None:
    """TypeError unless ``ctx`` is a Context (or None when ``optional``)."""
    if optional and ctx is None:
        return None
    return check_type("ctx", ctx, Context, "a survey_lib.methods.Context" + (" or None" if optional else ""))


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the submodule called ``name`` (dotted path) inside ``root``."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def mark(model: nn.Module, method: str, changes: str | Iterable[str], **info: Any) -> nn.Module:
    """Attach ``model.compression = {method, changes, **info}``; return ``model``."""
    changes = (changes,) if isinstance(changes, str) else tuple(changes)
    for change in changes:
        check_choice("changes", change, CHANGES)
    history = list(getattr(model, "compression_history", []))
    record = {"method": method, "changes": changes, **info}
    history.append(record)
    model.compression = record
    model.compression_history = history
    return model


def counted_totals(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """Whole-model counted ``params``, ``nonzero_params`` and ``macs`` (batch 1) from the cost report's table."""
    from ..cost import count

    table = count(model, example_input[:1])
    return {k: int(table[k].sum()) for k in ("params", "nonzero_params", "macs")}


def compression_info(model: nn.Module) -> dict[str, Any]:
    """What the methods applied to ``model`` changed (empty for an uncompressed model)."""
    return {"last": getattr(model, "compression", None), "history": list(getattr(model, "compression_history", []))}
