"""Uncertainty for the workbook's claims: confidence intervals on accuracy and on differences, seed spread.

A test set of n images measures an accuracy only to about ±1/sqrt(n); a difference of one or two images is
no finding.  These helpers turn raw figures into intervals and into wording: ``compare`` says "no
measurable difference" whenever the interval of a difference contains zero.

* ``wilson_interval``: score interval of a proportion (Wilson 1927), sound at accuracies near 0 or 1.
* ``difference_interval``: interval of acc_a - acc_b.  Paired (both models on the same images, with
  per-image correctness): Wald interval of the mean of the paired differences, with the discordant count
  shown.  Unpaired: Newcombe's hybrid score interval (method 10, Newcombe 1998).
* ``spread``: mean, standard deviation, min and max over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

from ._validate import check_float, check_int, check_type


def _z(confidence: float) -> float:
    check_float("confidence", confidence, min_value=0.5, max_value=0.999999)
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _check_accuracy(param: str, value: Any) -> float:
    return check_float(param, value, min_value=0.0, max_value=1.0)


def wilson_interval(accuracy: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``accuracy`` measured on ``n`` examples."""
    p = _check_accuracy("accuracy", accuracy)
    n = check_int("n", n, min_value=1)
    z = _z(confidence)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Difference:
    """acc_a - acc_b with its confidence interval, in accuracy units (0.01 = 1 point)."""

    a: float
    b: float
    n: int
    low: float
    high: float
    confidence: float
    paired: bool
    discordant: int | None = None

    @property
    def delta(self) -> float:
        """acc_a - acc_b."""
        return self.a - self.b

    @property
    def measurable(self) -> bool:
        """True when the interval excludes zero."""
        return self.low > 0 or self.high < 0

    @property
    def images(self) -> float:
        """The difference as a number of test images."""
        return self.delta * self.n

    def describe(self, name_a: str = "a", name_b: str = "b", unit: str = "points") -> str:
        """One sentence: the difference with its interval, and whether it is measurable."""
        fmt = (lambda v: signed_points(v, 2)) if unit == "points" else (lambda v: f"{v + 0.0:+.2f}")
        body = (f"{name_a} − {name_b} = {fmt(self.delta)} {unit} "
                f"({self.confidence:.0%} CI {fmt(self.low)} to {fmt(self.high)}; "
                f"{self.images:+.0f} of {self.n} test images)")
        if not self.measurable:
            return f"no measurable difference: {body}"
        better = name_a if self.delta > 0 else name_b
        return f"{better} is measurably higher: {body}"


def difference_interval(
    a: float | Sequence[bool] | np.ndarray,
    b: float | Sequence[bool] | np.ndarray,
    n: int | None = None,
    confidence: float = 0.95,
) -> Difference:
    """Interval of acc_a - acc_b: paired when ``a`` and ``b`` are per-image correctness arrays, else unpaired
    (two accuracies on ``n`` images each; Newcombe's score interval, conservative for a shared test set)."""
    if np.ndim(a) == 1 and np.ndim(b) == 1:
        return _paired(np.asarray(a, dtype=bool), np.asarray(b, dtype=bool), confidence)
    if n is None:
        raise ValueError("n (the number of test images) is required when a and b are accuracies, "
                         "not per-image correctness arrays")
    pa, pb = _check_accuracy("a", a), _check_accuracy("b", b)
    n = check_int("n", n, min_value=1)
    la, ha = wilson_interval(pa, n, confidence)
    lb, hb = wilson_interval(pb, n, confidence)
    d = pa - pb
    low = d - math.sqrt((pa - la) ** 2 + (hb - pb) ** 2)
    high = d + math.sqrt((ha - pa) ** 2 + (pb - lb) ** 2)
    return Difference(pa, pb, n, low, high, confidence, paired=False)


def _paired(a: np.ndarray, b: np.ndarray, confidence: float) -> Difference:
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"a and b must be per-image correctness arrays of the same non-zero length, "
                         f"got {a.shape} and {b.shape}")
    n = a.size
    diff = a.astype(float) - b.astype(float)
    mean = float(diff.mean())
    # Wald interval of the mean paired difference, with at least one discordant image's worth of variance
    # so that two identical models still get an interval of about +-1/n rather than a zero-width one.
    var = max(float(diff.var(ddof=1)) if n > 1 else 0.0, 1.0 / n)
    half = _z(confidence) * math.sqrt(var / n)
    return Difference(float(a.mean()), float(b.mean()), n, mean - half, mean + half, confidence, paired=True,
                      discordant=int((a != b).sum()))


def compare(a: Any, b: Any, n: int | None = None, name_a: str = "a", name_b: str = "b",
            confidence: float = 0.95) -> str:
    """``difference_interval(a, b, n).describe(name_a, name_b)``: the wording the notebooks print."""
    return difference_interval(a, b, n, confidence).describe(name_a, name_b)


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation, min and max of a figure over seeds (or repeats)."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

    @property
    def low(self) -> float:
        return float(min(self.values))

    @property
    def high(self) -> float:
        return float(max(self.values))

    def describe(self, fmt: str = ".3f") -> str:
        """'mean ± std (min-max, n values)'."""
        return (f"{self.mean:{fmt}} ± {self.std:{fmt}} (range {self.low:{fmt}}–{self.high:{fmt}}, "
                f"{len(self.values)} values)")


def spread(values: Sequence[float]) -> Spread:
    """The spread of ``values`` (e.g. one figure over seeds 0-3)."""
    vals = tuple(check_float(f"values[{i}]", v) for i, v in enumerate(values))
    if not vals:
        raise ValueError("values must hold at least one number")
    return Spread(vals)


def spread_verdict(a: Spread, b: Spread) -> int:
    """+1 if every value of ``a`` is above every value of ``b`` (the seed ranges do not overlap), -1 if every
    value is below, 0 otherwise: "no measurable difference" at this number of seeds."""
    check_type("a", a, Spread, "a stats.Spread (see spread)")
    check_type("b", b, Spread, "a stats.Spread (see spread)")
    return 1 if a.low > b.high else -1 if a.high < b.low else 0


def correct_per_image(model: Any, task: Any, data: Any, *, batch_size: int = 256) -> np.ndarray:
    """Per-image correctness (bool array) of a classifier on ``data``, for paired ``difference_interval``."""
    import torch

    from .data import loader
    from .train import check_model_task_data

    check_model_task_data(model, task, data)
    if getattr(task, "name", None) != "classification":
        raise ValueError(f"correct_per_image needs a classification task, got task={getattr(task, 'name', task)!r}; "
                         "for other tasks compare metrics over seeds with spread()")
    was_training = model.training
    model.eval()
    hits = []
    try:
        with torch.no_grad():
            for x, y in loader(data, batch_size, shuffle=False):
                hits.append((model(x).argmax(dim=1) == y).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(hits).astype(bool)


def signed_points(fraction: float, digits: int = 1) -> str:
    """``fraction`` as signed accuracy points (0.0123 -> '+1.2'), with more decimals (up to 6) where a nonzero
    value would print as zero, and never '-0.0'."""
    x = check_float("fraction", fraction) * 100
    digits = check_int("digits", digits, min_value=0, max_value=6)
    x = 0.0 if abs(x) < 1e-9 else x  # floating-point residue of a zero difference
    while x != 0 and round(x, digits) == 0 and digits < 6:
        digits += 1
    return f"{round(x, digits) + 0.0:+.{digits}f}"


def point_per_image(n: int) -> float:
    """Accuracy points one test image is worth on a test set of ``n`` images."""
    return 100.0 / check_int("n", n, min_value=1)


__all__ = ["correct_per_image", "wilson_interval", "difference_interval", "Difference", "compare", "spread", "Spread", "point_per_image",
           "signed_points"]
