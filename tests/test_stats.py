"""survey_lib.stats: intervals checked against closed forms and scipy-free identities, and the wording."""

import math

import numpy as np
import pytest
import torch

from survey_lib import stats
from survey_lib.data import load
from survey_lib.models import build_model
from survey_lib.tasks import task_for


def test_wilson_interval_matches_closed_form_and_contains_the_estimate():
    lo, hi = stats.wilson_interval(0.9, 100)
    # Wilson 95% for 90/100: 0.8256 .. 0.9448 (standard tables)
    assert math.isclose(lo, 0.8256, abs_tol=5e-4) and math.isclose(hi, 0.9448, abs_tol=5e-4)
    assert stats.wilson_interval(1.0, 50)[1] == 1.0 and stats.wilson_interval(1.0, 50)[0] < 1.0
    assert stats.wilson_interval(0.0, 50)[0] == 0.0
    narrow, wide = stats.wilson_interval(0.5, 10_000), stats.wilson_interval(0.5, 100)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 5


def test_unpaired_difference_is_measurable_only_when_large():
    small = stats.difference_interval(0.97, 0.96, n=359)
    assert not small.measurable and small.low < 0 < small.high
    assert "no measurable difference" in small.describe("pruned", "dense")
    big = stats.difference_interval(0.97, 0.80, n=359)
    assert big.measurable and big.low > 0
    assert big.describe("a", "b").startswith("a is measurably higher")
    assert math.isclose(big.images, 0.17 * 359)


def test_paired_difference_uses_per_image_agreement():
    rng = np.random.default_rng(0)
    a = rng.random(1000) < 0.9
    same = stats.difference_interval(a, a.copy())
    assert same.delta == 0 and not same.measurable and same.discordant == 0
    assert same.high - same.low < 0.02  # +-1/n floor, not zero width
    b = a.copy()
    flip = np.flatnonzero(a)[:60]
    b[flip] = False  # b loses 60 images a gets right
    d = stats.difference_interval(a, b)
    assert d.paired and d.measurable and d.discordant == 60 and math.isclose(d.delta, 0.06)
    # paired is tighter than unpaired on the same accuracies
    unpaired = stats.difference_interval(float(a.mean()), float(b.mean()), n=1000)
    assert (d.high - d.low) < (unpaired.high - unpaired.low)


def test_spread_and_points():
    s = stats.spread([0.9, 0.92, 0.94])
    assert math.isclose(s.mean, 0.92) and math.isclose(s.std, 0.02) and s.low == 0.9 and s.high == 0.94
    assert "3 values" in s.describe()
    assert math.isclose(stats.point_per_image(359), 100 / 359)


@pytest.mark.parametrize("call,match", [
    (lambda: stats.wilson_interval(1.5, 10), "accuracy"),
    (lambda: stats.wilson_interval(0.5, 0), "n"),
    (lambda: stats.wilson_interval(0.5, 10, confidence=1.5), "confidence"),
    (lambda: stats.difference_interval(0.5, 0.4), "n"),
    (lambda: stats.difference_interval([True, False], [True]), "same"),
    (lambda: stats.spread([]), "values"),
    (lambda: stats.spread([1.0, float("nan")]), "values"),
])
def test_bad_input_names_the_parameter(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_correct_per_image_agrees_with_accuracy():
    data = load("digits", "classification", n=200)
    task = task_for(data)
    torch.manual_seed(0)
    model = build_model("mlp", task, in_channels=1, image_size=8)
    hits = stats.correct_per_image(model, task, data.test)
    assert hits.dtype == bool and hits.shape == (len(data.test),)
    from survey_lib.train import evaluate

    assert math.isclose(hits.mean(), evaluate(model, task, data.test)["accuracy"])
    with pytest.raises(ValueError, match="classification"):
        reg = load("shapes", "regression", n=60)
        stats.correct_per_image(build_model("mlp", task_for(reg), in_channels=3, image_size=32), task_for(reg), reg.test)


def test_signed_points_never_prints_a_nonzero_value_as_zero_or_a_minus_zero():
    assert stats.signed_points(0.0123) == "+1.2"
    assert stats.signed_points(-0.0) == "+0.0" and stats.signed_points(-1e-19) == "+0.0"
    assert stats.signed_points(0.0003) == "+0.03"        # 0.03 points would print as +0.0 with one decimal
    assert stats.signed_points(-0.00004, 2) == "-0.004"
    with pytest.raises(ValueError, match="digits"):
        stats.signed_points(0.1, digits=-1)
    with pytest.raises(TypeError, match="fraction"):
        stats.signed_points("0.1")


def test_describe_gives_a_near_zero_bound_with_enough_digits():
    d = stats.Difference(a=0.50, b=0.49, n=1000, low=0.00003, high=0.02, confidence=0.95, paired=True)
    assert "CI +0.003 to +2.00" in d.describe("a", "b") and d.describe("a", "b").startswith("a is measurably higher")


def test_spread_verdict_needs_the_seed_ranges_apart():
    from survey_lib.stats import spread, spread_verdict

    assert spread_verdict(spread([0.9, 0.91, 0.92]), spread([0.8, 0.85, 0.89])) == 1
    assert spread_verdict(spread([0.8, 0.85, 0.89]), spread([0.9, 0.91, 0.92])) == -1
    assert spread_verdict(spread([0.8, 0.95]), spread([0.9, 0.91])) == 0
    assert spread_verdict(spread([0.9]), spread([0.9])) == 0
    with pytest.raises(TypeError, match="Spread"):
        spread_verdict([0.9], spread([0.8]))
