"""Measured latency: fields, statistics, ORT agreement, interleaving, settings validation (no absolute times)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from survey_lib.cost import compare_latency, export_onnx, latency_grid, measure_latency, ort_session
from survey_lib.cost.latency import cached_onnx


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


X = torch.randn(1, 3, 8, 8)


def check_result(r, runtime, batch, threads, runs=30, warmup=10):
    assert (r.runtime, r.batch, r.threads, r.runs, r.warmup, r.kind) == (runtime, batch, threads, runs, warmup, "measured")
    assert len(r.samples_ms) == runs and all(s > 0 for s in r.samples_ms)
    assert r.min_ms <= r.q1_ms <= r.median_ms <= r.q3_ms
    assert r.iqr_ms == pytest.approx(r.q3_ms - r.q1_ms)
    assert r.median_ms == pytest.approx(float(np.median(r.samples_ms)))
    assert r.per_item_ms == pytest.approx(r.median_ms / batch)


def test_eager_fields_threads_restored_and_model_untouched():
    model = small().train()
    threads_before = torch.get_num_threads()
    r = measure_latency(model, X, batch=4, threads=1)
    check_result(r, "eager", 4, 1)
    assert torch.get_num_threads() == threads_before
    assert model.training
    assert set(r.to_dict()) >= {"median_ms", "q1_ms", "q3_ms", "iqr_ms", "per_item_ms", "samples_ms"}


def test_ort_agrees_with_torch_and_measures(tmp_path):
    model = small().eval()
    path = export_onnx(model, X, tmp_path / "m.onnx")
    assert path.exists() and path.stat().st_size > 0
    sess = ort_session(path, threads=1)
    got = sess.run(None, {sess.get_inputs()[0].name: X.numpy()})[0]
    with torch.no_grad():
        ref = model(X).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    r = measure_latency(model, X, runtime="ort", threads=2, runs=30, warmup=2)
    check_result(r, "ort", 1, 2, warmup=2)
    assert cached_onnx(model, X) == cached_onnx(model, X)  # exported once per model state


def test_compare_interleaved_one_result_per_model():
    models = {"a": small(), "b": nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))}
    res = compare_latency(models, X, runtime="eager", threads=1, runs=30, warmup=1)
    assert list(res) == ["a", "b"]
    for r in res.values():
        check_result(r, "eager", 1, 1, warmup=1)


def test_grid_rows_and_settings():
    df = latency_grid(small(), X, batches=(1, 2), threads=(1, 2), runtimes=("eager",), warmup=1)
    assert len(df) == 4
    assert set(zip(df["batch"], df["threads"])) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert (df["q1_ms"] <= df["median_ms"]).all() and (df["median_ms"] <= df["q3_ms"]).all()
    assert (df["kind"] == "measured").all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"runtime": "tvm"}, "runtime"),
        ({"threads": 0}, "threads"),
        ({"runs": 5}, "runs"),
        ({"warmup": -1}, "warmup"),
    ],
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_latency(small(), X, **kwargs)


def test_bad_input():
    with pytest.raises(ValueError, match="does not fit model"):
        measure_latency(small(), torch.randn(1, 4, 8, 8))
    with pytest.raises(TypeError, match="example_input"):
        measure_latency(small(), np.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="runtimes"):
        latency_grid(small(), X, runtimes=("eager", "trt"))


def test_one_onnx_export_serves_every_batch_size():
    from survey_lib.cost.latency import _EXPORTS, cached_onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    first = cached_onnx(model, torch.randn(1, 3, 8, 8))
    assert cached_onnx(model, torch.randn(5, 3, 8, 8)) == first
    (key, entry), = _EXPORTS[model].items()
    assert key[0] is None and entry.checked_batches == {1, 5}  # symbolic batch, checked at both sizes


# ---------------------------------------------------------------- bad files and bad arguments


def _bad_onnx_files(tmp_path, bad_files) -> dict[str, object]:
    """A valid ONNX file broken the usual ways, plus a valid file of another format."""
    from survey_lib.cost import stored_bytes

    good = export_onnx(nn.Sequential(nn.Linear(4, 2)), torch.randn(1, 4), tmp_path / "good.onnx")
    stored_bytes(nn.Linear(2, 2), path=tmp_path / "other.dense")
    return bad_files(good.read_bytes(), (tmp_path / "other.dense").read_bytes(), ".onnx")


def test_ort_session_names_a_bad_onnx_file(tmp_path, bad_files):
    for case, path in _bad_onnx_files(tmp_path, bad_files).items():
        with pytest.raises(ValueError, match=f"{path.name}: not a valid ONNX file: "):
            ort_session(path)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        ort_session(tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        ort_session(5)


def test_latency_helpers_check_their_arguments():
    from survey_lib.cost.latency import check_ort_matches, summarize, torch_threads

    with pytest.raises(ValueError, match="samples_ms must be a non-empty list of finite times >= 0"):
        summarize([], runtime="eager", batch=1, threads=1, warmup=0)
    with pytest.raises(ValueError, match="got 3 values from nan to nan"):
        summarize([float("nan")] * 3, runtime="eager", batch=1, threads=1, warmup=0)
    with pytest.raises(ValueError, match="threads=0 is out of range"):
        with torch_threads(0):
            pass
    with pytest.raises(TypeError, match="batches must be a list or tuple of values, got int"):
        latency_grid(small(), X, batches=1)
    with pytest.raises(TypeError, match="seed must be an int, got str"):
        compare_latency({"m": small()}, X, seed="a")
    with pytest.raises(ValueError, match="models must be a non-empty dict"):
        compare_latency({}, X)
    with pytest.raises(TypeError, match="session must be an onnxruntime.InferenceSession"):
        check_ort_matches(nn.Linear(4, 2), "session", torch.randn(1, 4))


def test_ort_runtime_rejects_an_input_the_onnx_model_does_not_fit(tmp_path):
    from survey_lib.cost.latency import ort_run

    path = export_onnx(nn.Sequential(nn.Linear(4, 2)), torch.randn(1, 4), tmp_path / "m.onnx", dynamic_batch=True)
    with pytest.raises(ValueError, match=r"x of shape \(1, 7\) does not fit the ONNX model's input 'input'"):
        ort_run(ort_session(path), torch.randn(1, 7))
