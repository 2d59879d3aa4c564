"""Tests for survey_lib.deploy: ORT static int8 quantization, the OnnxModel wrapper, its cost hooks (no timings)."""

from __future__ import annotations

import copy
import math
import pickle

import onnx
import pytest
import torch
from torch.utils.data import TensorDataset

from survey_lib import deploy as D
from survey_lib.cost import compare_latency, count, measure_latency, profile, stored_bytes, trace
from survey_lib.cost.latency import cached_onnx
from survey_lib.data import Splits, load
from survey_lib.methods import Context
from survey_lib.models import build_model, count_params
from survey_lib.tasks import task_for


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def quantized(ctx, trained):
    """(int8 OnnxModel of ``trained``, snapshot of ``trained`` taken before quantizing)."""
    snap = snapshot(trained)
    return D.quantize_int8(trained, ctx, n_calibration=64), snap


@pytest.fixture(scope="module")
def x_test(ctx):
    return ctx.example_input(len(ctx.data.test))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


def onnx_graph(path):
    return onnx.load(str(path)).graph


def rel_err(out, ref):
    """Max abs error relative to the reference's range (or its magnitude, for a near-constant output)."""
    return float((out - ref).abs().max()) / max(float(ref.max() - ref.min()), float(ref.abs().max()))


# ---------------------------------------------------------------------------------------------- accuracy
def test_int8_outputs_close_to_fp32(ctx, trained, quantized, x_test):
    q, _ = quantized
    fp32 = D.OnnxModel(q.fp32_path)
    out_f, out_q = fp32(x_test), q(x_test)
    with torch.no_grad():
        ref = trained.eval()(x_test)
    torch.testing.assert_close(out_f, ref, rtol=1e-4, atol=1e-4)  # the fp32 export is the torch model
    assert out_q.shape == ref.shape and out_q.dtype == torch.float32
    assert 0 < rel_err(out_q, out_f) < 0.05  # really quantized, and not by much
    agree = (out_q.argmax(1) == out_f.argmax(1)).float().mean().item()
    assert agree >= 0.9
    acc_torch, acc_int8 = ctx.score(trained), ctx.score(q)
    assert acc_torch > 0.5 and abs(acc_int8 - acc_torch) <= 0.05


def test_int8_graph_and_kernels(quantized):
    q, _ = quantized
    graph = onnx_graph(q.fp32_path)
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    assert q.excluded_nodes == D.first_mac_nodes(graph) == convs[:1]  # keep_fp32="first": the 1-channel stem
    assert q.quantized_nodes == [n for n in D.mac_nodes(graph) if n not in q.excluded_nodes] and q.quantized_nodes
    qgraph = onnx_graph(q.onnx_path)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in qgraph.node}
    weights = {i.name: i for i in qgraph.initializer}
    assert any(w.data_type == onnx.TensorProto.INT8 for w in weights.values())
    ops = D.int8_ops(q)
    assert ops.get("QLinearConv", 0) == len(convs) - 1  # every conv but the stem runs an int8 kernel
    assert ops.get("QGemm", 0) == 1
    assert D.int8_ops(q.onnx_path) == ops
    assert q.calibrator == "minmax" and q.per_channel is True and q.activation_type == "uint8"
    assert q.compression["method"] == "int8_ptq_ort"
    assert set(q.compression["changes"]) == {"int8_kernel", "low_bit_storage"}
    assert q.compression["keep_fp32"] == "first"


def test_input_model_not_mutated(trained, quantized):
    _, (state, training) = quantized
    assert trained.training is training
    for k, v in trained.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize(
    "task, options",
    [
        ("classification", {}),
        ("regression", {"calibrator": "entropy", "keep_fp32": "none"}),
        ("detection", {"calibrator": "distribution", "per_channel": False}),
        ("segmentation", {"calibrator": "percentile", "activation_type": "int8"}),
    ],
)
def test_every_task(task, options):
    data = load("shapes", task, n=48)
    tctx = Context(task=task_for(data), data=data, budget=0)
    torch.manual_seed(0)
    model = build_model("vgg", tctx.task, in_channels=3, width=0.125)
    q = D.quantize_int8(model, tctx, n_calibration=20, **options)  # 20: the last batch is topped up
    assert q.compression["calibrator"] == options.get("calibrator", "minmax")
    assert len(q.excluded_nodes) == (0 if options.get("keep_fp32") == "none" else 1)
    x = tctx.example_input(4)
    with torch.no_grad():
        ref = model.eval()(x)
    assert q(x).shape == ref.shape
    assert rel_err(q(x), D.OnnxModel(q.fp32_path)(x)) < 0.1
    m_torch, m_int8 = tctx.evaluate(model), tctx.evaluate(q)
    assert set(m_int8) == set(m_torch)
    assert all(math.isfinite(v) for v in m_int8.values())


def test_options_and_path(ctx, trained, quantized, tmp_path, x_test):
    q0, _ = quantized
    keep = q0.quantized_nodes[:1]
    q = D.quantize_int8(trained, ctx, calibrator="percentile", per_channel=False, activation_type="int8",
                        keep_fp32=keep, n_calibration=40, path=tmp_path / "net.onnx")
    assert q.onnx_path == tmp_path / "net.onnx" and q.fp32_path == tmp_path / "net.fp32.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.fp32.onnx", "net.onnx"]  # no temp files left
    assert q.excluded_nodes == keep and keep[0] not in q.quantized_nodes
    assert q.compression["keep_fp32"] == keep and q.compression["calibrator"] == "percentile"
    assert q.compression["per_channel"] is False
    assert rel_err(q(x_test), D.OnnxModel(q.fp32_path)(x_test)) < 0.1


def test_calibration_batches_deterministic_and_equal_shapes(ctx):
    batches = D.calibration_batches(ctx, 70, batch=32)
    assert [b.shape[0] for b in batches] == [32, 32, 32]
    first = torch.stack([ctx.data.train[i][0] for i in range(70)]).numpy()
    assert (batches[0] == first[:32]).all() and (batches[2][:6] == first[64:]).all()
    assert (batches[2][6:] == first[:26]).all()  # topped up from the start
    assert [b.shape[0] for b in D.calibration_batches(ctx, 10**6)][:1] == [32]
    assert [b.shape[0] for b in D.calibration_batches(ctx, 5)] == [5]


# ---------------------------------------------------------------------------------------------- storage
def test_int8_file_much_smaller(ctx, tmp_path, x_test):
    torch.manual_seed(0)
    mlp = build_model("mlp", ctx.task, in_channels=1, image_size=8)  # 64 -> 256 -> 256 -> 10: weights dominate
    q = D.quantize_int8(mlp, ctx, n_calibration=32)
    assert q.excluded_nodes == []  # an MLP's first Gemm reads a reshape of the input
    fp32 = D.fp32_onnx(mlp, ctx, path=tmp_path / "mlp.onnx")
    assert fp32.onnx_path == tmp_path / "mlp.onnx"
    with torch.no_grad():
        torch.testing.assert_close(fp32(x_test), mlp.eval()(x_test), rtol=1e-4, atol=1e-4)
    s_q, s_f = stored_bytes(q), stored_bytes(fp32)
    assert s_q.fmt == s_f.fmt == "onnx"
    assert s_q.bytes == q.onnx_path.stat().st_size and s_f.bytes == fp32.onnx_path.stat().st_size
    assert s_f.bytes >= 4 * count_params(mlp)
    assert abs(s_f.bytes - q.fp32_path.stat().st_size) < 0.05 * s_f.bytes
    assert s_q.bytes < s_f.bytes / 2.5
    with pytest.raises(TypeError, match="onnx_path"):
        stored_bytes(mlp, fmt="onnx")


# ---------------------------------------------------------------------------------------------- the wrapper
def test_onnx_model_wrapper(quantized, x_test):
    q, _ = quantized
    out = q(x_test)
    assert q._session is not None and list(q.parameters()) == []
    for clone in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert clone is not q and clone._session is None
        assert clone.onnx_path == q.onnx_path and clone.fp32_path == q.fp32_path
        assert clone.compression == q.compression
        torch.testing.assert_close(clone(x_test), out, rtol=0, atol=0)
    assert q._session is not None  # the original keeps its session
    torch.testing.assert_close(q.train()(x_test[:3]), out[:3], rtol=0, atol=0)  # train/eval change nothing
    q.eval()
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        D.OnnxModel("missing.onnx")
    with pytest.raises(TypeError, match="model"):
        D.int8_ops(3)


def test_fp32_onnx_arguments(trained):
    with pytest.raises(TypeError, match="ctx_or_example"):
        D.fp32_onnx(trained, "digits")
    with pytest.raises(TypeError, match="model"):
        D.fp32_onnx("model", torch.zeros(1, 1, 8, 8))


# ---------------------------------------------------------------------------------------------- cost hooks
def test_latency_accepts_onnx_models(trained, quantized, x_test):
    q, _ = quantized
    fp32 = D.OnnxModel(q.fp32_path)
    x = x_test[:1]
    assert cached_onnx(q, x) == q.onnx_path  # no export, no check
    res = compare_latency({"fp32": fp32, "int8": q, "torch": trained}, x, runtime="ort", runs=30, warmup=1)
    assert list(res) == ["fp32", "int8", "torch"]
    for r in res.values():
        assert (r.runtime, r.batch, r.runs, r.kind) == ("ort", 1, 30, "measured") and r.median_ms > 0
    r = measure_latency(q, x, runtime="ort", batch=4, runs=30, warmup=1)
    assert (r.runtime, r.batch) == ("ort", 4)
    with pytest.raises(ValueError, match="'int8' is an ONNX Runtime model.*runtime='ort'"):
        compare_latency({"torch": trained, "int8": q}, x, runtime="eager", runs=30, warmup=1)


def test_counting_refuses_onnx_models(quantized, x_test):
    q, _ = quantized
    for fn in (trace, count, profile):
        with pytest.raises(TypeError, match="ONNX Runtime model.*count the torch model"):
            fn(q, x_test[:1])


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"n_calibration": 0}, ValueError, "n_calibration"),
        ({"n_calibration": 1.5}, TypeError, "n_calibration"),
        ({"calibrator": "kl"}, ValueError, "calibrator.*'minmax'.*'entropy'"),
        ({"activation_type": "fp16"}, ValueError, "activation_type.*'uint8'"),
        ({"per_channel": "yes"}, TypeError, "per_channel"),
        ({"keep_fp32": "last"}, ValueError, "keep_fp32.*'first'"),
        ({"keep_fp32": 3}, TypeError, "keep_fp32"),
        ({"keep_fp32": [3]}, TypeError, "keep_fp32"),
        ({"threads": 0}, ValueError, "threads"),
        ({"path": 3}, TypeError, "path"),
    ],
)
def test_invalid_arguments(ctx, trained, kwargs, err, match):
    with pytest.raises(err, match=match):
        D.quantize_int8(trained, ctx, **kwargs)


def test_invalid_model_ctx_and_data(ctx, trained):
    with pytest.raises(TypeError, match="ctx"):
        D.quantize_int8(trained, "ctx")
    with pytest.raises(TypeError, match="model"):
        D.quantize_int8("model", ctx)
    empty = Splits(ctx.data.train, ctx.data.val, ctx.data.test, ctx.data.info)
    empty.train = TensorDataset(torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="calibration needs data"):
        D.quantize_int8(trained, Context(task=ctx.task, data=empty, budget=0))


def test_unknown_keep_fp32_node_lists_available(ctx, trained, quantized):
    q, _ = quantized
    with pytest.raises(ValueError, match=r"keep_fp32 names unknown ONNX nodes \['conv9'\].*" + q.quantized_nodes[0]):
        D.quantize_int8(trained, ctx, keep_fp32=["conv9"], n_calibration=8)


def test_op_profile_lists_kernels_in_order(quantized, x_test):
    q, _ = quantized
    x = x_test[:1]
    table = D.op_profile(q, x, runs=3)
    assert list(table.columns) == ["node", "op", "median_us", "mac"] and table.attrs["kind"] == "measured"
    assert (table["median_us"] >= 0).all() and table["node"].is_unique
    kernels = table[table["mac"]]["op"].tolist()
    assert kernels[0] == "Conv" and "QLinearConv" in kernels and kernels[-1] == "QGemm"  # stem fp32, head int8
    fp32 = D.op_profile(D.OnnxModel(q.fp32_path), x, runs=3)
    assert not fp32["op"].str.startswith("Q").any()
    with pytest.raises(TypeError, match="model"):
        D.op_profile(q.fp32_path, x)
    with pytest.raises(ValueError, match="runs"):
        D.op_profile(q, x, runs=0)


def test_bad_keep_fp32_writes_nothing(ctx, trained, tmp_path):
    with pytest.raises(ValueError, match="keep_fp32"):
        D.quantize_int8(trained, ctx, keep_fp32=["no_such_node"], path=tmp_path / "m.onnx", n_calibration=32)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- bad files and input


def test_onnx_model_names_a_bad_file_when_built(tmp_path, quantized, bad_files):
    q, _ = quantized
    stored_bytes(torch.nn.Linear(2, 2), path=tmp_path / "other.dense")
    for case, path in bad_files(q.onnx_path.read_bytes(), (tmp_path / "other.dense").read_bytes(), ".onnx").items():
        with pytest.raises(ValueError, match=f"{path.name}: not a valid ONNX file: "):
            D.OnnxModel(path)
        with pytest.raises(ValueError, match=f"{path.name}: not a valid ONNX file: "):
            D.int8_ops(path)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        D.OnnxModel(3)


def test_deploy_rejects_inputs_that_do_not_fit(ctx, trained, quantized, x_test):
    q, _ = quantized
    with pytest.raises(ValueError, match=r"x of shape \(2, 3, 8, 8\) does not fit the ONNX model's input"):
        q(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"x of shape \(1, 1, 4, 4\) does not fit the ONNX model's input"):
        D.op_profile(q, torch.randn(1, 1, 4, 4), runs=1)
    with pytest.raises(TypeError, match="graph must be an ONNX GraphProto"):
        D.mac_nodes("graph")
    with pytest.raises(TypeError, match="graph must be an ONNX GraphProto"):
        D.first_mac_nodes(onnx.load(str(q.onnx_path)))  # the model, not its .graph
    with pytest.raises(TypeError, match="ctx must be a survey_lib.methods.Context"):
        D.calibration_batches(None, 4)
    with pytest.raises(ValueError, match="threads=0 is out of range"):
        D.fp32_onnx(trained, ctx, threads=0)
