import copy

import numpy as np
import pytest
import torch
from torch import nn

from survey_lib.cost import stored_bytes
from survey_lib.cost.storage import formats
from survey_lib.data import load
from survey_lib.methods import Context, compression_info
from survey_lib.methods.sharing import (
    SharedConv2d,
    SharedLinear,
    deep_compression_stages,
    huffman_coding,
    kmeans_1d,
    kmeans_share,
    linear_init,
    load_stored,
    read_stored,
    share_weight,
    sparse_storage,
)
from survey_lib.models import build_model
from survey_lib.tasks import task_for


@pytest.fixture(scope="module")
def ctx():
    data = load("digits", "classification", n=300)
    return Context(task=task_for(data), data=data, budget=1, batch_size=32)


def _pruned(model: nn.Module, sparsity: float = 0.8, seed: int = 0) -> nn.Module:
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) > sparsity)
    return model


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, bias=False),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- k-means


def test_kmeans_1d_matches_sklearn_on_fixed_init():
    from sklearn.cluster import KMeans

    x = np.random.default_rng(0).laplace(size=3000)
    for k in (2, 8, 32):
        init = linear_init(x, k)
        c, labels, inertia = kmeans_1d(x, k, init=init)
        ref = KMeans(n_clusters=k, init=init.reshape(-1, 1), n_init=1, algorithm="lloyd", tol=0, max_iter=300).fit(x.reshape(-1, 1))
        assert inertia == pytest.approx(ref.inertia_, rel=1e-3)
        assert np.allclose(np.sort(ref.cluster_centers_.ravel()), c, atol=1e-3 * np.ptp(x))
        assert np.all(np.diff(c) >= 0) and inertia == pytest.approx(((x - c[labels]) ** 2).sum())


def test_kmeans_is_exact_with_k_equal_to_the_number_of_unique_values():
    # uneven values: linear init leaves clusters empty, which are re-seeded until every value is a centroid
    values = np.array([-3.0, -2.9, 0.1, 0.11, 0.5, 7.0])
    x = np.random.default_rng(1).choice(values, 500)
    c, labels, inertia = kmeans_1d(x, values.size)
    assert inertia == 0.0 and np.array_equal(c, values) and np.array_equal(c[labels], x)
    # and through the method: a pruned layer whose non-zeros take 2**bits - 1 values is reproduced exactly
    w = torch.from_numpy(np.random.default_rng(2).choice(np.r_[0.0, values[:3]], (6, 5, 3, 3))).float()
    conv = nn.Conv2d(5, 6, 3)
    with torch.no_grad():
        conv.weight.copy_(w)
    shared = kmeans_share(nn.Sequential(conv), bits=2, finetune=False)[0]
    assert torch.equal(shared.weight, conv.weight)


def test_share_weight_keeps_zeros_as_code_zero():
    w = torch.randn(20, 30) * (torch.rand(20, 30) > 0.7)
    cb, idx, zero_code = share_weight(w, 3)
    assert zero_code and cb[0] == 0 and cb.numel() == 8
    assert torch.equal(idx == 0, w == 0)
    assert torch.all(torch.diff(cb[1:]) > 0)
    cb2, idx2, zero_code2 = share_weight(torch.randn(10, 10), 3)
    assert not zero_code2 and cb2.numel() == 8 and idx2.max() == 7


# ---------------------------------------------------------------- the method


def test_kmeans_share_structure_and_input_untouched():
    net = _pruned(_net())
    before = copy.deepcopy(net.state_dict())
    out = kmeans_share(net, bits={"0": 4, "6": 2}, finetune=False)
    assert isinstance(out[0], SharedConv2d) and isinstance(out[6], SharedLinear) and type(out[3]) is nn.Conv2d
    for i in (0, 6):
        layer = out[i]
        codebook, indices, _ = share_weight(net[i].weight, layer.bits)  # shared from the original weight
        assert torch.equal(layer.weight, codebook[indices])
        assert torch.equal(layer.weight == 0, net[i].weight == 0)
        assert layer.codebook.numel() <= 2 ** layer.bits and layer.weight_bits == layer.bits
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    info = compression_info(out)["last"]
    assert info["method"] == "kmeans_share" and "low_bit_storage" in info["changes"] and info["bits"] == {"0": 4, "6": 2}
    assert out.storage_format == "shared"
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(out(x), net(x), atol=0.5)  # close, not equal: weights snapped to 16 / 4 values


def test_kmeans_share_rejects_bad_bits_and_missing_ctx():
    net = _net()
    with pytest.raises(ValueError, match="not shareable.*'1'"):
        kmeans_share(net, bits={"1": 4}, finetune=False)
    with pytest.raises(ValueError, match="bits"):
        kmeans_share(net, bits=0, finetune=False)
    with pytest.raises(ValueError, match="ctx"):
        kmeans_share(net, bits=4)


def test_codebook_gradient_is_the_sum_of_cluster_gradients():
    layer = kmeans_share(nn.Sequential(_pruned(nn.Sequential(nn.Linear(12, 7)))[0]), bits=3, finetune=False)[0]
    x = torch.randn(5, 12)
    layer(x).pow(2).sum().backward()
    dense = nn.Linear(12, 7)
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        dense.bias.copy_(layer.bias)
    dense(x).pow(2).sum().backward()
    expected = torch.zeros_like(layer.codebook).index_add_(0, layer.indices.reshape(-1), dense.weight.grad.reshape(-1))
    expected[0] = 0.0  # the pruned zero never moves
    torch.testing.assert_close(layer.codebook.grad, expected)


def test_finetune_moves_codebook_and_keeps_zeros(ctx):
    model = _pruned(build_model("mlp", ctx.task, in_channels=1, image_size=8), 0.7)
    ctx.finetune(model, epochs=1)  # (zeros refill here; re-prune below)
    model = _pruned(model, 0.7)
    out = kmeans_share(model, ctx, bits=4, finetune=False)
    tuned = kmeans_share(model, ctx, bits=4)
    for (n, a), (_, b) in zip(out.named_modules(), tuned.named_modules()):
        if isinstance(a, (SharedLinear, SharedConv2d)):
            assert torch.equal(a.indices, b.indices)  # assignments fixed, centroids move
            assert not torch.equal(a.codebook, b.codebook)
            assert torch.equal(b.weight == 0, a.weight == 0)
            assert b.codebook.numel() <= 16
    assert compression_info(tuned)["last"]["finetune_epochs"] == 1


# ---------------------------------------------------------------- storage formats


@pytest.mark.parametrize("fmt", ["sparse", "shared", "deep_compression"])
def test_storage_round_trip(tmp_path, fmt):
    pruned = _pruned(_net(), 0.85)
    model = pruned if fmt == "sparse" else kmeans_share(pruned, bits=5, finetune=False)
    size = stored_bytes(model, fmt=fmt, path=tmp_path / f"m.{fmt}")
    assert size.bytes == (tmp_path / f"m.{fmt}").stat().st_size and size.fmt == fmt
    loaded = load_stored(tmp_path / f"m.{fmt}", _net())  # a plain (unshared) template
    assert _same_tensors(loaded, model) and loaded.storage_format == fmt
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_storage_round_trip_edge_cases(tmp_path):
    net = _net()
    with torch.no_grad():
        net[3].weight.zero_()  # an all-zero layer
        net[6].weight[:, 100:] = 0  # one long run of zeros: fillers
    for fmt in ("sparse", "shared", "deep_compression"):
        model = net if fmt == "sparse" else kmeans_share(net, bits={"0": 1, "3": 3, "6": 8}, finetune=False)
        path = tmp_path / f"e.{fmt}"
        stored_bytes(model, fmt=fmt, path=path)
        assert _same_tensors(load_stored(path, _net()), model)
        fmt_read, tensors, shared = read_stored(path)
        assert fmt_read == fmt and (not shared or shared["3"]["zero_code"])


def test_formats_registered_and_storage_format_used():
    assert {"sparse", "shared", "deep_compression"} <= set(formats())
    pruned = _pruned(_net(), 0.9)
    assert sparse_storage(pruned).storage_format == "sparse"
    shared = kmeans_share(pruned, bits=4, finetune=False)
    coded = huffman_coding(shared)
    assert stored_bytes(coded).fmt == "deep_compression" and stored_bytes(shared).fmt == "shared"
    assert compression_info(coded)["last"]["method"] == "huffman_coding"
    assert compression_info(shared)["last"]["method"] == "kmeans_share"


def test_deep_compression_stages_shrink(ctx):
    pruned = _pruned(_net(), 0.9)
    shared = kmeans_share(pruned, bits=4, finetune=False)
    df = deep_compression_stages(pruned, shared)
    assert df["stage"].tolist() == ["dense", "pruned", "shared", "huffman"]
    assert df["format"].tolist() == ["dense", "sparse", "shared", "deep_compression"]
    b = df["stored_bytes"].tolist()
    assert b[0] > b[1] > b[2] and b[3] <= b[2] + 16  # Huffman never codes a layer larger; header may differ
    assert df["compression_ratio"].iloc[0] == 1.0 and (df["kind"] == "measured").all()
    assert df["compression_ratio"].iloc[-1] == pytest.approx(b[0] / b[3])
    assert stored_bytes(pruned).bytes == b[0]  # the dense stage is the plain dense file


def test_storage_helpers_check_their_input():
    from survey_lib.methods.sharing import huffman_coding, sparse_storage

    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sparse_storage("model")
    with pytest.raises(ValueError, match="run kmeans_share first"):
        huffman_coding(torch.nn.Linear(4, 4))
