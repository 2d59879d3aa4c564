"""Tests for survey_lib.data: shapes generator, loaders, splits, class subsets, CIFAR-10 reader."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from survey_lib import data
from survey_lib.data import SHAPE_CLASSES, load, loader, make_shapes, subset_classes


def write_fake_cifar(directory, per_batch: int = 10, seed: int = 0) -> None:
    """A tiny cifar-10-batches-py directory: same pickle format, ``per_batch`` images per batch."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = [int(v) for v in np.arange(per_batch) % 10]
        batch = {b"batch_label": name.encode(), b"labels": labels,
                 b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}
        with open(directory / name, "wb") as fh:
            pickle.dump(batch, fh)
    meta = {b"label_names": [s.encode() for s in data.CIFAR10_CLASSES], b"num_cases_per_batch": per_batch}
    with open(directory / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh)


# ---------------------------------------------------------------------------------------------- shapes
def test_make_shapes_keys_shapes_and_dtypes():
    s = make_shapes(64, seed=1, image_size=32, max_objects=3)
    assert s["images"].shape == (64, 3, 32, 32) and s["images"].dtype == np.float32
    assert s["images"].min() >= 0.0 and s["images"].max() <= 1.0
    assert s["label"].shape == (64,) and s["label"].dtype == np.int64
    assert s["count"].min() >= 1 and s["count"].max() <= 3
    assert s["area"].shape == (64,) and s["area"].dtype == np.float32
    assert s["boxes"].shape == (64, 3, 4) and s["boxes"].dtype == np.float32
    assert s["box_labels"].shape == (64, 3) and s["box_labels"].dtype == np.int64
    assert s["masks"].shape == (64, 32, 32) and s["masks"].dtype == np.int64
    assert s["masks"].min() >= 0 and s["masks"].max() <= len(SHAPE_CLASSES)


def test_make_shapes_labels_are_consistent():
    s = make_shapes(300, seed=2)
    valid = s["box_labels"] >= 0
    assert (valid.sum(axis=1) == s["count"]).all()
    assert (s["box_labels"][:, 0] == s["label"]).all()  # main object first
    assert (s["boxes"][~valid] == 0).all()
    b = s["boxes"][valid]
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 32).all() and (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all()
    widths = s["boxes"][:, :, 2] - s["boxes"][:, :, 0]
    assert (widths[:, :1] >= widths[:, 1:]).all()  # main = largest
    main_pixels = (s["masks"] == (s["label"] + 1)[:, None, None]).sum(axis=(1, 2))
    # drawn last, so fully visible (other objects of the same class may add pixels)
    assert (main_pixels >= np.round(s["area"] * 32**2)).all()
    alone = (s["box_labels"][:, 1:] != s["label"][:, None]).all(axis=1)
    assert np.allclose(main_pixels[alone] / 32**2, s["area"][alone])
    assert (s["area"] > 0).all()
    assert len(np.unique(s["label"])) == len(SHAPE_CLASSES)


def test_make_shapes_is_deterministic_by_seed():
    a, b, c = make_shapes(20, seed=5), make_shapes(20, seed=5), make_shapes(20, seed=6)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["images"], c["images"])


def _python_calls(fn) -> int:
    """Number of Python-level function calls made while running fn()."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_make_shapes_is_vectorised():
    # Vectorised means the Python work does not grow with the number of scenes: 50x more scenes,
    # the same Python calls (numpy does the per-scene work). Counted, not timed, so it cannot flake.
    few = _python_calls(lambda: make_shapes(20, image_size=32))
    many = _python_calls(lambda: make_shapes(1000, image_size=32))
    print(f"Python calls: {few} for 20 scenes, {many} for 1000 scenes")
    assert many <= few * 1.2, (few, many)


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 4, "image_size": 8}, {"n": 4, "max_objects": 0},
                                    {"n": 4, "noise": -0.1}])
def test_make_shapes_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_shapes(**kwargs)


@pytest.mark.parametrize(
    "task, shape, dtype",
    [("classification", (), torch.int64), ("regression", (1,), torch.float32),
     ("detection", (3, 5), torch.float32), ("segmentation", (32, 32), torch.int64)],
)
def test_load_shapes_task_views(task, shape, dtype):
    splits = load("shapes", task, n=200, seed=0)
    x, y = splits.train[0]
    assert x.shape == (3, 32, 32) and y.shape == shape and y.dtype == dtype
    assert sum(splits.sizes().values()) == 200
    assert splits.info.task == task and splits.info.in_channels == 3 and splits.info.image_size == 32
    expected_classes = {"classification": 5, "regression": 1, "detection": 5, "segmentation": 6}[task]
    assert splits.info.num_classes == expected_classes == len(splits.info.class_names)


def test_detection_targets_padding_and_count():
    splits = load("shapes", "detection", n=200)
    target = splits.train.tensors[1]
    padded = target[:, :, 0] < 0
    assert (target[padded] == -1).all()
    assert (target[~padded][:, 0] < 5).all()
    counts = (~padded).sum(dim=1)
    assert counts.min() >= 1 and counts.max() <= 3


def test_load_shapes_other_image_size():
    splits = load("shapes", "segmentation", n=50, image_size=24)
    assert splits.train.tensors[0].shape[-1] == 24 and splits.train.tensors[1].shape[-1] == 24


# ---------------------------------------------------------------------------------------------- digits
def test_load_digits_split_and_standardization():
    splits = load("digits", seed=0)
    sizes = splits.sizes()
    assert sum(sizes.values()) == 1797
    assert abs(sizes["test"] - 0.2 * 1797) < 12 and abs(sizes["val"] - 0.15 * 1797) < 12
    x = splits.train.tensors[0]
    assert x.shape[1:] == (1, 8, 8)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert splits.info.num_classes == 10 and splits.info.image_size == 8 and splits.info.in_channels == 1
    for part in (splits.train, splits.val, splits.test):  # stratified: every class in every split
        counts = np.bincount(part.tensors[1].numpy(), minlength=10)
        assert counts.min() >= 0.6 * counts.max()


def test_load_is_deterministic_and_seed_dependent():
    a, b, c = load("digits", seed=3), load("digits", seed=3), load("digits", seed=4)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_splits_are_disjoint():
    splits = load("digits", seed=0, n=400)
    rows = [tuple(v.flatten().tolist()) for part in (splits.train, splits.val, splits.test) for v in part.tensors[0]]
    assert len(rows) == 400
    # digits contains a few exact duplicates, so allow a handful
    assert len(set(rows)) >= 395


def test_class_subset_relabels_in_given_order():
    splits = load("digits", classes=[7, 2, 9], seed=0)
    assert splits.info.class_names == ("7", "2", "9") and splits.info.num_classes == 3
    labels = torch.cat([p.tensors[1] for p in (splits.train, splits.val, splits.test)])
    assert set(labels.tolist()) == {0, 1, 2}
    assert len(labels) == 179 + 177 + 180  # the three digit classes in sklearn's data set
    named = load("shapes", classes=["ring", "square"], n=300)
    assert named.info.class_names == ("ring", "square")
    assert set(named.train.tensors[1].tolist()) == {0, 1}


@pytest.mark.parametrize("classes", [[10], [-1], [1, 1], [], "3", ["nine"]])
def test_class_subset_rejects_bad_classes(classes):
    with pytest.raises((ValueError, TypeError)):
        load("digits", classes=classes)


def test_class_subset_only_for_classification():
    with pytest.raises(ValueError, match="classification"):
        load("shapes", "detection", classes=[0, 1], n=50)


def test_subset_classes_function():
    ds = torch.utils.data.TensorDataset(torch.arange(6.0)[:, None], torch.tensor([0, 1, 2, 0, 1, 2]))
    sub = subset_classes(ds, [2, 0])
    assert sub.tensors[0].flatten().tolist() == [0.0, 2.0, 3.0, 5.0]
    assert sub.tensors[1].tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize(
    "args, kwargs, match",
    [(("mnist",), {}, "name"), (("digits", "captioning"), {}, "task"),
     (("digits", "segmentation"), {}, "digits"), (("digits",), {"n": 0}, "n"),
     (("digits",), {"n": 5000}, "n"), (("digits",), {"image_size": 32}, "image_size"),
     (("shapes",), {"image_size": 8}, "image_size"),
     (("digits",), {"val_fraction": 0.6, "test_fraction": 0.5}, "fraction")],
)
def test_load_rejects_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- cifar10
def test_cifar10_missing_directory_names_it(tmp_path, monkeypatch):
    monkeypatch.delenv(data.CIFAR10_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=data.CIFAR10_ENV):
        load("cifar10")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load("cifar10", root=tmp_path / "nowhere")


def test_cifar10_reads_the_python_batches(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path / "cifar-10-batches-py", per_batch=10)
    splits = load("cifar10", root=tmp_path)
    assert splits.sizes()["test"] == 10 and sum(splits.sizes().values()) == 60
    assert splits.train.tensors[0].shape[1:] == (3, 32, 32)
    assert splits.info.class_names == data.CIFAR10_CLASSES
    monkeypatch.setenv(data.CIFAR10_ENV, str(tmp_path / "cifar-10-batches-py"))
    vehicles = load("cifar10", classes=["airplane", "automobile", "ship", "truck"])
    assert vehicles.info.num_classes == 4
    assert sum(vehicles.sizes().values()) == 24
    small = load("cifar10", n=30, test_fraction=0.2)
    assert small.sizes()["test"] == 6 and sum(small.sizes().values()) == 30


def test_cifar10_rejects_a_broken_batch(tmp_path):
    write_fake_cifar(tmp_path, per_batch=4)
    with open(tmp_path / "data_batch_3", "wb") as fh:
        pickle.dump({b"nothing": 1}, fh)
    with pytest.raises(ValueError, match="data_batch_3"):
        load("cifar10", root=tmp_path)


# ---------------------------------------------------------------------------------------------- loader
def test_loader_is_deterministic_by_seed():
    ds = torch.utils.data.TensorDataset(torch.arange(50))
    order = lambda seed: torch.cat([b[0] for b in loader(ds, 8, shuffle=True, seed=seed)]).tolist()  # noqa: E731
    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(50))
    assert torch.cat([b[0] for b in loader(ds, 8)]).tolist() == list(range(50))
    with pytest.raises(ValueError, match="batch_size"):
        loader(ds, 0)


# ---------------------------------------------------------------------------------------------- bad input
def test_subset_classes_rejects_what_load_rejects():
    ds = torch.utils.data.TensorDataset(torch.arange(6.0)[:, None], torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(ValueError, match=r"classes=\[1, 1\] contains a class twice"):
        load("digits", classes=[1, 1])
    with pytest.raises(ValueError, match=r"classes=\[2, 2\] contains a class twice"):
        subset_classes(ds, [2, 2])
    with pytest.raises(ValueError, match="classes must be a non-empty list"):
        subset_classes(ds, [])
    with pytest.raises(TypeError, match="classes must be a non-empty list of class indices or names, got str"):
        subset_classes(ds, "2")
    with pytest.raises(ValueError, match=r"classes \[7\] have no example in dataset; its labels are \[0, 1, 2\]"):
        subset_classes(ds, [0, 7])
    with pytest.raises(ValueError, match="classes=-1 is out of range"):
        subset_classes(ds, [-1])
    with pytest.raises(TypeError, match="dataset must be a TensorDataset"):
        subset_classes([(0, 1)], [0])


def test_loaders_check_their_arguments(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.arange(6.0))
    with pytest.raises(TypeError, match="shuffle must be True or False"):
        loader(ds, 2, shuffle="yes")
    with pytest.raises(TypeError, match="dataset must be a map-style dataset"):
        loader(5, 2)
    with pytest.raises(TypeError, match="root must be a str or os.PathLike, got int"):
        load("cifar10", root=5)
    with pytest.raises(ValueError, match=r"scenes lacks the array\(s\) \['boxes', 'box_labels'\] that task='detection'"):
        data.shapes_target({"label": np.zeros(2)}, "detection")
    with pytest.raises(TypeError, match="scenes must be the dict returned by make_shapes"):
        data.shapes_target([1, 2], "classification")


def _broken_cifar(directory, name: str, content: bytes) -> None:
    write_fake_cifar(directory, per_batch=4)
    (directory / name).write_bytes(content)


def _batch(images: int = 2, size: int = 3072, labels=(0, 1)) -> bytes:
    return pickle.dumps({b"data": np.zeros((images, size), np.uint8), b"labels": list(labels)})


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", r"not a valid CIFAR-10 python pickle: truncated or corrupt pickle \(Ran out of input\)"),
        (_batch()[:40], "not a valid CIFAR-10 python pickle: truncated or corrupt pickle"),
        (np.random.default_rng(0).bytes(300), "not a valid CIFAR-10 python pickle: truncated or corrupt pickle"),
        (pickle.dumps(Path("x")), "not a valid CIFAR-10 python pickle: it refers to pathlib.*Path, which a CIFAR-10"),
        (pickle.dumps([1, 2]), "not a valid CIFAR-10 python pickle: expected a dict, got list"),
        (_batch(size=3000), r"not a valid CIFAR-10 batch: 'data' must be uint8 of shape \(n, 3072\), got uint8 \(2, 3000\)"),
        (_batch(labels=(0, 12)), r"not a valid CIFAR-10 batch: labels must lie in 0..9, got 0..12"),
        (_batch(labels=(0, 1, 2)), r"not a valid CIFAR-10 batch: 'labels' must be 2 integers, got int64 \(3,\)"),
    ],
)
def test_cifar10_names_the_broken_batch_and_what_is_wrong(tmp_path, content, match):
    _broken_cifar(tmp_path, "data_batch_2", content)
    with pytest.raises(ValueError, match=f"data_batch_2: {match}"):
        load("cifar10", root=tmp_path)


def test_cifar10_names_a_broken_meta_file(tmp_path):
    _broken_cifar(tmp_path, "batches.meta", pickle.dumps({b"label_names": [b"cat", b"dog"]}))
    with pytest.raises(ValueError, match="batches.meta: not a valid CIFAR-10 batches.meta: label_names must be 10 distinct"):
        load("cifar10", root=tmp_path)
    _broken_cifar(tmp_path, "batches.meta", b"\x80\x04garbage")
    with pytest.raises(ValueError, match="batches.meta: not a valid CIFAR-10 python pickle"):
        load("cifar10", root=tmp_path)
