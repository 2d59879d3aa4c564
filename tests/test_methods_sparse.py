import math

import pandas as pd
import pytest
import torch
from torch import nn

from survey_lib.methods import compression_info
from survey_lib.methods.sparse import (
    SparseConv2d,
    SparseLinear,
    check_sparsity,
    crossover_sparsity,
    crossover_table,
    random_pruned,
    sparsify,
    sparsity_latency_sweep,
    to_sparse_linear,
)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 0.999])
def test_sparse_linear_matches_dense(sparsity):
    torch.manual_seed(0)
    dense = random_pruned(nn.Linear(48, 20), sparsity)
    sp = to_sparse_linear(dense)
    for x in (torch.randn(1, 48), torch.randn(7, 48), torch.randn(2, 3, 48)):
        torch.testing.assert_close(sp(x), dense(x), rtol=1e-5, atol=1e-5)
    assert sp.nnz == int((dense.weight != 0).sum())


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, padding=0), dict(dilation=2, padding=2, bias=False)])
def test_sparse_conv_matches_dense(kw):
    torch.manual_seed(0)
    dense = random_pruned(nn.Conv2d(6, 10, 3, **kw), 0.8)
    sp = SparseConv2d(dense)
    x = torch.randn(3, 6, 11, 9)
    torch.testing.assert_close(sp(x), dense(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sp(x[0]), dense(x[0]), rtol=1e-5, atol=1e-5)


def test_sparsify_model_matches_and_skips_grouped_convs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    with torch.no_grad():
        for m in model:
            if hasattr(m, "weight"):
                m.weight.mul_(torch.rand_like(m.weight) > 0.7)
    out = sparsify(model)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    assert isinstance(out[0], SparseConv2d) and isinstance(out[4], SparseLinear)
    assert isinstance(out[2], nn.Conv2d) and "2" in compression_info(out)["last"]["skipped"]
    assert compression_info(out)["last"]["changes"] == ("sparse_format",)
    assert isinstance(model[0], nn.Conv2d)  # input untouched


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity_values_raise(bad):
    with pytest.raises(ValueError, match="sparsity"):
        check_sparsity(bad)
    with pytest.raises(ValueError, match="sparsity"):
        random_pruned(nn.Linear(4, 4), bad)
    with pytest.raises(ValueError, match="sparsity"):
        sparsity_latency_sweep({"linear": (8, 8)}, sparsities=(bad,))


def _synthetic(sparsity, speedup):
    return pd.DataFrame({"layer": "L", "batch": 1, "threads": 1, "sparsity": sparsity, "speedup": speedup})


def test_crossover_on_synthetic_data():
    s = [0.0, 0.5, 0.8, 0.9, 0.95]
    assert crossover_sparsity(_synthetic(s, [0.1, 0.3, 0.6, 1.4, 3.0])) == pytest.approx(0.8 + 0.1 * 0.4 / 0.8)
    assert crossover_sparsity(_synthetic(s, [1.2, 1.5, 2, 3, 4])) == 0.0
    assert crossover_sparsity(_synthetic(s, [0.1, 0.2, 0.3, 0.5, 0.9])) is None
    # a noisy early win below the real crossover is ignored; order of rows does not matter
    assert crossover_sparsity(_synthetic(s[::-1], [2.0, 1.0, 0.5, 1.1, 0.2])) == pytest.approx(0.9)
    df = pd.DataFrame({"sparsity": s, "dense_median_ms": [1.0] * 5, "sparse_median_ms": [4, 2, 1.25, 0.5, 0.25]})
    assert crossover_sparsity(df) == pytest.approx(0.8 + 0.1 * (1 - 0.8) / (2 - 0.8))


def test_crossover_rejects_mixed_configurations():
    df = pd.concat([_synthetic([0.5, 0.9], [0.5, 2.0]), _synthetic([0.5, 0.9], [0.2, 0.5]).assign(batch=32)])
    with pytest.raises(ValueError, match="batch"):
        crossover_sparsity(df)
    table = crossover_table(df)
    assert table["crossover_sparsity"].iloc[0] == pytest.approx(0.5 + 0.4 * 0.5 / 1.5)
    assert table["crossover_sparsity"].iloc[1] is None or math.isnan(table["crossover_sparsity"].iloc[1])


def test_sweep_shape_and_columns():
    df = sparsity_latency_sweep({"conv": (4, 4, 3, 6)}, sparsities=(0.0, 0.9), batch=(1, 2), runs=30, warmup=1)
    assert len(df) == 4 and set(df["batch"]) == {1, 2}
    assert (df["dense_median_ms"] > 0).all() and (df["sparse_median_ms"] > 0).all()
    assert (df["kind"] == "measured").all()
    assert df.loc[df["sparsity"] == 0.9, "nnz"].iloc[0] == round(0.1 * 4 * 4 * 9)


def test_sparse_layers_and_helpers_reject_bad_input():
    from survey_lib.methods.sparse import make_layer, unsupported_conv

    with pytest.raises(ValueError, match=r"x of shape \(2, 5\) does not fit SparseLinear: its last dim must be in_features=4"):
        SparseLinear(nn.Linear(4, 2))(torch.randn(2, 5))
    with pytest.raises(ValueError, match="it has 2 channels, the conv expects in_channels=3"):
        SparseConv2d(nn.Conv2d(3, 2, 3))(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, H, W\) or \(C, H, W\)"):
        SparseConv2d(nn.Conv2d(3, 2, 3))(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"shape\['linear'\] in=0 is out of range"):
        make_layer({"linear": (0, 4)})
    with pytest.raises(ValueError, match=r"shape must be \{'linear': \(in, out\)\}"):
        make_layer({"linear": (4,)})
    with pytest.raises(TypeError, match="layer must be an nn.Linear or nn.Conv2d, got ReLU"):
        random_pruned(nn.ReLU(), 0.5)
    with pytest.raises(ValueError, match="seed=-1 is out of range"):
        random_pruned(nn.Linear(2, 2), 0.5, seed=-1)
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d, got Linear"):
        unsupported_conv(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"sparsities must be a non-empty list or tuple, got \(\)"):
        sparsity_latency_sweep({"linear": (4, 4)}, sparsities=())
    with pytest.raises(TypeError, match="ctx must be a survey_lib.methods.Context or None"):
        sparsify(nn.Sequential(nn.Linear(2, 2)), ctx="ctx")


def test_crossover_rejects_tables_it_cannot_read():
    with pytest.raises(ValueError, match="df needs a 'sparsity' column"):
        crossover_sparsity(pd.DataFrame({"speedup": [1.2]}))
    with pytest.raises(ValueError, match="df holds NaN, inf or non-positive sparsity/speedup values"):
        crossover_sparsity(pd.DataFrame({"sparsity": [0.5, 0.9], "speedup": [float("nan"), 1.5]}))
    with pytest.raises(ValueError, match="df is empty"):
        crossover_table(pd.DataFrame(columns=["sparsity", "speedup"]))
    with pytest.raises(TypeError, match="df must be a pandas DataFrame"):
        crossover_table([1, 2])
