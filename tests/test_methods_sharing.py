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


# ---------------------------------------------------------------- same seed, same bits


@pytest.fixture
def nondeterministic_torch():
    """torch's default kernels (deterministic algorithms off) at 2 threads, as in a session that never seeded;
    the previous settings are restored after."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(2)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.set_num_threads(threads)


def _big_pruned_mlp() -> nn.Module:
    """An MLP whose first layer has 153600 weights: far above torch's 32768-element grain, from which plain
    indexing's gradient is summed with parallel atomic adds (in an order that changes when threads overlap)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2400), nn.ReLU(), nn.Linear(2400, 10))
    return _pruned(net, 0.9)


def test_codebook_gradient_is_the_same_bits_at_two_threads_as_serial(nondeterministic_torch):
    layer = kmeans_share(_big_pruned_mlp(), bits=5, finetune=False)[1]
    upstream = torch.randn(layer.indices.shape, generator=torch.Generator().manual_seed(0))
    grads = []
    for _ in range(50):
        layer.codebook.grad = None
        (layer.weight * upstream).sum().backward()
        grads.append(layer.codebook.grad.clone())
    torch.set_num_threads(1)  # reference: plain indexing at 1 thread sums serially, in index order
    cb = torch.cat([layer.codebook.new_zeros(1), layer.codebook[1:]]).detach().requires_grad_()
    (cb[layer.indices] * upstream).sum().backward()
    reference = cb.grad.clone()
    reference[0] = 0.0
    distinct = {g.numpy().tobytes() for g in grads}
    print(f"distinct codebook gradients over 50 runs at 2 threads: {len(distinct)}")
    assert len(distinct) == 1 and torch.equal(grads[0], reference)


def _share_and_store(ctx: Context, path) -> tuple[dict[str, torch.Tensor], bytes]:
    model = kmeans_share(_big_pruned_mlp(), ctx, bits=5)
    stored_bytes(model, path=path)
    return model.state_dict(), path.read_bytes()


def test_kmeans_share_same_seed_gives_the_same_bits(ctx, tmp_path, nondeterministic_torch):
    # fine-tuning runs fit(), whose seed_everything turns deterministic kernels on: the promise, end to end
    (a, file_a), (b, file_b) = (_share_and_store(ctx, tmp_path / f"{i}.shared") for i in (1, 2))
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    print(f"tensors that differ: {differ}; file bytes {len(file_a)} vs {len(file_b)}")
    assert not differ and file_a == file_b


_SHARE_SCRIPT = """
import hashlib, sys, pathlib, torch
sys.path.insert(0, {tests!r})
from test_methods_sharing import _big_pruned_mlp
from survey_lib.cost import stored_bytes
from survey_lib.data import load
from survey_lib.methods import Context
from survey_lib.methods.sharing import kmeans_share
from survey_lib.tasks import task_for
torch.set_num_threads(2)
data = load("digits", "classification", n=300)
ctx = Context(task=task_for(data), data=data, budget=1, batch_size=32)
path = pathlib.Path({path!r})
stored_bytes(kmeans_share(_big_pruned_mlp(), ctx, bits=5), path=path)
print(hashlib.sha256(path.read_bytes()).hexdigest())
"""


@pytest.fixture(scope="module")
def shared_in_two_processes(tmp_path_factory) -> tuple[list[str], list]:
    """The file kmeans_share + stored_bytes writes in two fresh Python processes: (sha256 digests, paths)."""
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path_factory.mktemp("two_processes")
    digests, paths = [], [folder / f"{i}.shared" for i in (1, 2)]
    for path in paths:
        script = _SHARE_SCRIPT.format(tests=str(Path(__file__).parent), path=str(path))
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        digests.append(out.stdout.strip().splitlines()[-1])
    return digests, paths


@pytest.mark.xfail(strict=False, reason="open: at 2 threads about 1 process in 20 fine-tunes to other last bits "
                   "(7 of ~140 measured; max weight difference 3e-7); not MKL's CNR mode (MKL_CBWR=AUTO kept it)")
def test_kmeans_share_file_is_the_same_bits_in_two_processes(shared_in_two_processes):
    digests, _ = shared_in_two_processes
    print(f"sha256 of the stored file in two processes: {digests}")
    assert digests[0] == digests[1] and len(digests[0]) == 64


def test_kmeans_share_in_two_processes_agrees_to_1e_5(shared_in_two_processes):
    (_, a, _), (_, b, _) = (read_stored(path) for path in shared_in_two_processes[1])
    worst = max(float((torch.as_tensor(a[k]).double() - torch.as_tensor(b[k]).double()).abs().max()) for k in a)
    print(f"largest difference between the two processes' stored tensors: {worst:.2e} (<= 1e-5)")
    assert a.keys() == b.keys() and worst <= 1e-5


def test_seed_everything_turns_on_deterministic_kernels_and_checks_its_arguments(nondeterministic_torch):
    from survey_lib.profiles import seed_everything

    seed_everything(0, threads=2)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.get_num_threads() == 2
    with pytest.raises(TypeError, match="deterministic must be True or False"):
        seed_everything(0, deterministic="yes")
    with pytest.raises(ValueError, match="threads=0 is out of range"):
        seed_everything(0, threads=0)
    with pytest.raises(ValueError, match="seed=-1 is out of range"):
        seed_everything(-1)


# ---------------------------------------------------------------- bad files and bad arguments


@pytest.mark.parametrize("fmt", ["sparse", "shared", "deep_compression"])
def test_read_stored_names_the_file_and_what_is_wrong(tmp_path, fmt, bad_files):
    pruned = _pruned(_net(), 0.85)
    stored_bytes(pruned if fmt == "sparse" else kmeans_share(pruned, bits=5, finetune=False), fmt=fmt, path=tmp_path / "good")
    stored_bytes(pruned, fmt="dense", path=tmp_path / "other.dense")
    good, other = (tmp_path / "good").read_bytes(), (tmp_path / "other.dense").read_bytes()
    expected = {"empty": "the file is empty", "random": "bad magic", "truncated": "truncated",
                "wrong magic": "bad magic b'NOTMAGIC'", "another format": "bad magic b'SLDENSE1'"}
    for case, path in bad_files(good, other, f".{fmt}").items():
        with pytest.raises(ValueError, match=f"{path.name}: not a valid sparse/shared/deep_compression file: {expected[case]}"):
            load_stored(path, _net())
    with pytest.raises(FileNotFoundError, match="missing.shared"):
        read_stored(tmp_path / "missing.shared")


def test_read_stored_rejects_a_corrupt_header_and_streams(tmp_path):
    import json
    import struct
    import zlib

    shared = kmeans_share(_pruned(_net(), 0.85), bits=5, finetune=False)
    stored_bytes(huffman_coding(shared), path=tmp_path / "m.dc")
    good = (tmp_path / "m.dc").read_bytes()
    (hlen,) = struct.unpack_from("<I", good, 8)
    (tmp_path / "zlib.dc").write_bytes(good[:12] + bytes(b ^ 0xFF for b in good[12:20]) + good[20:])
    with pytest.raises(ValueError, match="zlib.dc: not a valid sparse/shared/deep_compression file: corrupt compressed data"):
        read_stored(tmp_path / "zlib.dc")

    def with_header(edit) -> bytes:
        header = json.loads(zlib.decompress(good[12:12 + hlen]))
        edit(header)
        blob = zlib.compress(json.dumps(header).encode())
        return good[:8] + struct.pack("<I", len(blob)) + blob + good[12 + hlen:]

    (tmp_path / "keys.dc").write_bytes(with_header(lambda h: h.pop("t")))
    (tmp_path / "dtype.dc").write_bytes(with_header(lambda h: [e.update(d="Linear") for e in h["t"] if e["e"] == "raw"]))
    for file, match in (("keys.dc", "entry 't' is missing"), ("dtype.dc", "unknown dtype 'Linear'")):
        with pytest.raises(ValueError, match=f"{file}: not a valid sparse/shared/deep_compression file: {match}"):
            read_stored(tmp_path / file)
    # a Huffman table inside the file that no longer parses: the error names the file and the table
    entries = json.loads(zlib.decompress(good[12:12 + hlen]))["t"]
    i = next(i for i, e in enumerate(entries) if e["e"] == "cbh" and e["h"][0])  # its gap stream is Huffman coded
    start = 12 + hlen + sum(sum(e["l"]) for e in entries[:i]) + entries[i]["l"][0]  # after the codebook stream
    # a codebook cut to one entry while the codes still point further: rejected, not an IndexError at inference
    cb_at = 12 + hlen + sum(sum(e["l"]) for e in entries[:i])
    short = [dict(e, l=[4] + e["l"][1:]) if j == i else e for j, e in enumerate(entries)]
    blob = zlib.compress(json.dumps({"f": "deep_compression", "v": 1, "t": short}).encode())
    (tmp_path / "codes.dc").write_bytes(good[:8] + struct.pack("<I", len(blob)) + blob + good[12 + hlen:cb_at + 4]
                                        + good[cb_at + entries[i]["l"][0]:])
    with pytest.raises(ValueError, match=f"codes.dc: not a valid sparse/shared/deep_compression file: layer "
                                         f"'{entries[i]['n']}' has code .* but a codebook of 1 entries"):
        read_stored(tmp_path / "codes.dc")
    broken = bytearray(good)
    broken[start + 2] = 3  # table symbol width 3: not 1, 2 or 4
    (tmp_path / "table.dc").write_bytes(bytes(broken))
    with pytest.raises(ValueError, match="table.dc: not a valid sparse/shared/deep_compression file: data: not a valid "
                                         "Huffman table: symbol width 3"):
        read_stored(tmp_path / "table.dc")


def test_load_stored_rejects_a_template_that_does_not_fit(tmp_path):
    stored_bytes(kmeans_share(_pruned(_net()), bits=4, finetune=False), path=tmp_path / "m.shared")
    with pytest.raises(ValueError, match="m.shared: the stored tensors do not fit template"):
        load_stored(tmp_path / "m.shared", nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        load_stored(tmp_path / "m.shared", "template")


def test_kmeans_functions_reject_bad_values():
    x = np.array([1.0, 1.0, 2.0, 2.0])
    with pytest.raises(ValueError, match=r"k=4 is more clusters than x has distinct values \(2\)"):
        kmeans_1d(x, 4)
    with pytest.raises(ValueError, match="init holds NaN or inf"):
        kmeans_1d(x, 2, init=[float("nan"), 1.0])
    with pytest.raises(ValueError, match="max_iter=0 is out of range"):
        kmeans_1d(x, 2, max_iter=0)
    with pytest.raises(ValueError, match="x must hold at least one value"):
        linear_init(np.array([]), 3)
    with pytest.raises(TypeError, match="x must hold real numbers"):
        linear_init(np.array(["a"]), 2)
    from survey_lib.methods.sharing import assign_1d

    with pytest.raises(ValueError, match="centroids must be sorted ascending"):
        assign_1d(np.array([1.0, 5.0]), np.array([4.0, 0.0]))


def test_shared_layer_construction_rejects_bad_codebooks():
    from survey_lib.methods.sharing import make_shared

    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"indices must lie in 0..3 \(the codebook's entries\), got 9..9"):
        make_shared(layer, torch.zeros(4), torch.full((3, 4), 9), 2, False)
    with pytest.raises(ValueError, match="codebook has 8 entries; bits=2 allows 1..4"):
        make_shared(layer, torch.zeros(8), torch.zeros(3, 4, dtype=torch.int64), 2, False)
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        make_shared(layer, torch.zeros(4), torch.zeros(3, 4), 2, False)
    with pytest.raises(TypeError, match="zero_code must be True or False"):
        make_shared(layer, torch.zeros(4), torch.zeros(3, 4, dtype=torch.int64), 2, 1)
    with pytest.raises(ValueError, match="weight must be finite"):
        share_weight(torch.tensor([[float("nan"), 1.0]]), 2)


def test_kmeans_share_rejects_sharing_nothing():
    net = _net()
    with pytest.raises(ValueError, match=r"bits=\{\} shares no layer; name at least one of \['0', '3', '6'\]"):
        kmeans_share(net, bits={}, finetune=False)
    with pytest.raises(ValueError, match=r"bits=\{'0': None\} shares no layer"):
        kmeans_share(net, bits={"0": None}, finetune=False)
    with pytest.raises(ValueError, match="model has no Conv2d or Linear layer left to share"):
        kmeans_share(nn.Sequential(nn.ReLU()), bits=3, finetune=False)
    with pytest.raises(TypeError, match="finetune must be True or False"):
        kmeans_share(net, bits=3, finetune="no")
    with pytest.raises(ValueError, match="model_shared has no shared layer"):
        deep_compression_stages(net, net)
    with pytest.raises(TypeError, match="ctx must be a survey_lib.methods.Context or None"):
        sparse_storage(net, ctx="ctx")
