"""Kernel-capped latency: levels from the CPU's features, workers that really run capped, bad input rejected."""

import pandas as pd
import pytest
import torch
from torch import nn

from survey_lib.host import host_info
from survey_lib.kernel_caps import HOST_LEVEL, capped_latency, kernel_levels, summarize_levels


def _info(machine: str = "x86_64", **features: bool) -> dict:
    return {"machine": machine, "features": features}


def test_levels_follow_the_features():
    assert list(kernel_levels(_info(avx2=True, avx512=True))) == [HOST_LEVEL, "AVX2 only", "SSE4 only (no AVX)"]
    assert list(kernel_levels(_info(avx2=True, avx512=False))) == [HOST_LEVEL, "SSE4 only (no AVX)"]
    assert list(kernel_levels(_info(avx2=False))) == [HOST_LEVEL]
    assert kernel_levels(_info("aarch64", neon=True)) == {HOST_LEVEL: {}}


def test_workers_run_at_their_cap_and_are_interleaved():
    torch.manual_seed(0)
    models = {"a": nn.Conv2d(3, 4, 3), "b": nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())}
    levels = {HOST_LEVEL: {}, "capped": {"ATEN_CPU_CAPABILITY": "default"}}
    df = capped_latency(models, torch.randn(1, 3, 8, 8), levels, rounds=2, runs=3, warmup=1)
    assert len(df) == 2 * 2 * 2 and (df["median_ms"] > 0).all() and set(df["kind"]) == {"measured"}
    assert set(df.loc[df["level"] == "capped", "torch_capability"]) == {"DEFAULT"}
    # rounds alternate the levels: level order inside each round is the dict's
    assert list(df[df["round"] == 0]["level"].drop_duplicates()) == [HOST_LEVEL, "capped"]
    summary = summarize_levels(df)
    assert (summary.loc[summary["level"] == HOST_LEVEL, "ratio"] == 1.0).all()
    assert ((summary["low_ms"] <= summary["median_ms"]) & (summary["median_ms"] <= summary["high_ms"])).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"models": {}}, "models must be a non-empty dict"),
    ({"models": [nn.Linear(2, 2)]}, "models must be"),
    ({"levels": {}}, "levels must name at least one level"),
    ({"levels": {"x": {"PATH": "/"}}}, r"levels\['x'\] sets \['PATH'\]; accepted variables"),
    ({"rounds": 0}, "rounds"),
    ({"runs": 0}, "runs"),
])
def test_bad_input_names_the_parameter(kwargs, match):
    args = {"models": {"m": nn.Linear(2, 2)}, "example_input": torch.randn(1, 2), "levels": {HOST_LEVEL: {}}}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        capped_latency(**args)


@pytest.mark.skipif(not kernel_levels().get("SSE4 only (no AVX)"), reason="needs an x86 CPU with AVX2 to emulate one without")
def test_onednn_really_runs_at_the_sse_cap():
    levels = {HOST_LEVEL: {}, "SSE4 only (no AVX)": kernel_levels()["SSE4 only (no AVX)"]}
    df = capped_latency({"conv": nn.Conv2d(32, 32, 3, padding=1)}, torch.randn(1, 32, 32, 32), levels, rounds=1, runs=2, warmup=1)
    isa = df.set_index("level")["onednn_isa"]
    if not isa[HOST_LEVEL]:
        pytest.skip(f"this torch build ran the conv without oneDNN ({host_info()['torch']})")
    assert isa["SSE4 only (no AVX)"] == "sse41" and "sse41" not in isa[HOST_LEVEL]


def test_summary_rejects_other_tables():
    with pytest.raises(ValueError, match="lacks the columns"):
        summarize_levels(pd.DataFrame({"level": ["x"]}))
    df = pd.DataFrame({"level": ["a"], "model": ["m"], "round": [0], "median_ms": [1.0]})
    with pytest.raises(ValueError, match="reference must be one of"):
        summarize_levels(df)
