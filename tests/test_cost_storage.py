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
