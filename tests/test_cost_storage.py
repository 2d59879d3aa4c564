"""Stored bytes are measured from the file; dense size ignores zeros, gzip does not."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from survey_lib.cost import load_dense, register_format, stored_bytes
from survey_lib.cost.storage import _FORMATS, formats, write_dense_tensors


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))


def test_bytes_is_file_size_and_about_4_per_param(tmp_path):
    model = mlp()
    path = tmp_path / "m.dense"
    s = stored_bytes(model, "dense", path)
    assert s.path == path and s.fmt == "dense" and s.kind == "measured"
    assert s.bytes == os.path.getsize(path)
    tensors = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() for p in model.parameters())
    assert tensors >= 4 * params
    assert tensors < s.bytes < tensors + 4096  # raw bytes + small JSON header
    assert 0 < s.gzip_bytes
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers


def test_zeros_keep_dense_size_but_shrink_gzip():
    dense_model, sparse_model = mlp(), mlp()
    with torch.no_grad():
        for p in sparse_model.parameters():
            p[torch.rand_like(p) < 0.9] = 0.0
    a, b = stored_bytes(dense_model), stored_bytes(sparse_model)
    assert a.path is None and b.path is None
    assert a.bytes == b.bytes  # dense storage does not care about zeros
    assert b.gzip_bytes < 0.5 * a.gzip_bytes


def test_round_trip(tmp_path):
    model = mlp()
    model.register_buffer("codes", torch.arange(-5, 5, dtype=torch.int8))
    model.register_buffer("scale", torch.tensor(0.5, dtype=torch.bfloat16))
    path = tmp_path / "m.dense"
    stored_bytes(model, path=path)
    back = load_dense(path)
    ref = model.state_dict()
    assert list(back) == list(ref)
    for k, v in ref.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_format_registry_and_model_attribute(tmp_path):
    def halves(model, path):  # a toy format: every float tensor at fp16
        write_dense_tensors([(k, v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()], path)

    name = "test_fp16"
    register_format(name, halves, overwrite=True)
    try:
        model = mlp()
        full = stored_bytes(model)
        model.storage_format = name
        half = stored_bytes(model, path=tmp_path / "h.bin")
        assert half.fmt == name and half.bytes < 0.6 * full.bytes
        assert stored_bytes(model, fmt="dense").bytes == full.bytes  # explicit fmt wins
        with pytest.raises(ValueError, match="already registered"):
            register_format(name, halves)
    finally:
        _FORMATS.pop(name, None)
    with pytest.raises(ValueError, match="accepted values: 'dense'"):
        stored_bytes(mlp(), fmt="csr_nope")
    assert "dense" in formats()


# ---------------------------------------------------------------- bad files and bad arguments


def test_load_dense_names_the_file_and_what_is_wrong(tmp_path, bad_files):
    from survey_lib.methods.packing import write_packed

    stored_bytes(mlp(), path=tmp_path / "good.dense")
    write_packed(nn.Linear(4, 2), tmp_path / "other.packed")
    good, other = (tmp_path / "good.dense").read_bytes(), (tmp_path / "other.packed").read_bytes()
    expected = {"empty": "the file is empty", "random": "bad magic", "truncated": "truncated",
                "wrong magic": "bad magic", "another format": "bad magic: expected b'SLDENSE1', got b'SLPACK01'"}
    for case, path in bad_files(good, other, ".dense").items():
        with pytest.raises(ValueError, match=f"{path.name}: not a valid dense file: {expected[case]}"):
            load_dense(path)
    with pytest.raises(FileNotFoundError, match="missing.dense"):
        load_dense(tmp_path / "missing.dense")


def test_load_dense_rejects_a_corrupt_header(tmp_path):
    stored_bytes(nn.Linear(2, 2), path=tmp_path / "m.dense")
    good = (tmp_path / "m.dense").read_bytes()
    (tmp_path / "json.dense").write_bytes(good[:16] + b"!" + good[17:])  # header no longer JSON
    with pytest.raises(ValueError, match="json.dense: not a valid dense file: header is not valid JSON"):
        load_dense(tmp_path / "json.dense")
    (tmp_path / "dtype.dense").write_bytes(good.replace(b'"float32"', b'"float99"', 1))
    with pytest.raises(ValueError, match="dtype.dense: not a valid dense file: unknown dtype 'float99'"):
        load_dense(tmp_path / "dtype.dense")
    (tmp_path / "key.dense").write_bytes(good.replace(b'"tensors"', b'"tensorz"', 1))
    with pytest.raises(ValueError, match="key.dense: not a valid dense file: entry 'tensors' is missing"):
        load_dense(tmp_path / "key.dense")


def test_storage_functions_check_their_arguments(tmp_path):
    from survey_lib.cost.storage import gzip_size, model_tensors, write_dense_tensors

    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        stored_bytes(mlp(), path=5)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        load_dense(None)
    stored_bytes(mlp(), path=tmp_path / "m.dense")
    with pytest.raises(ValueError, match="level=12 is out of range"):
        gzip_size(tmp_path / "m.dense", level=12)
    with pytest.raises(ValueError, match="chunk=0 is out of range"):
        gzip_size(tmp_path / "m.dense", chunk=0)
    with pytest.raises(TypeError, match=r"tensors\[0\] must be a \(non-empty str name, torch.Tensor\) pair"):
        write_dense_tensors([("a", 5)], tmp_path / "w")
    with pytest.raises(ValueError, match=r"tensors repeats a name: \['a'\]"):
        write_dense_tensors([("a", torch.zeros(1)), ("a", torch.ones(1))], tmp_path / "w")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        model_tensors("model")
