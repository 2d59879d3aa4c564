"""Datasets for the workbook: digits (real, bundled with scikit-learn), shapes (procedural scenes) and cifar10.

Every dataset is returned as :class:`Splits`: three in-memory ``TensorDataset`` objects (train, val, test)
plus a :class:`DatasetInfo`. Images are standardized with statistics of the training split only.

Task views (the second tensor of each dataset):

* ``classification``: int64 class index.
* ``regression`` (shapes only): float32 tensor of shape ``(1,)`` = number of objects in the scene.
* ``detection`` (shapes only): float32 tensor ``(max_objects, 5)`` of ``[cls, x1, y1, x2, y2]`` in pixels,
  padded with rows of ``-1``, so the default collate stacks it.
* ``segmentation`` (shapes only): int64 mask ``(H, W)``, 0 = background, ``1 + class`` for an object pixel.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ._io import as_path, not_valid, reading
from ._validate import check_bool, check_choice, check_float, check_int, check_mapping, check_seed, check_type

DATASETS = ("digits", "shapes", "cifar10")
TASKS = ("classification", "regression", "detection", "segmentation")
DATASET_TASKS = {
    "digits": ("classification",),
    "shapes": TASKS,
    "cifar10": ("classification",),
}
SHAPE_CLASSES = ("square", "disc", "triangle", "cross", "ring")
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_ENV = "SURVEY_LIB_CIFAR10"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
MIN_SHAPES_SIZE = 16


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a task need to know about a dataset."""

    name: str
    task: str
    in_channels: int
    image_size: int
    num_classes: int
    class_names: tuple[str, ...]
    target_spec: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass
class Splits:
    """Train / validation / test datasets (tensors in memory) and their :class:`DatasetInfo`."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    info: DatasetInfo

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            if len(getattr(self, split)) == 0:
                raise ValueError(f"the {split} split of {self.info.name!r} is empty: raise n (or the split fractions)")

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------
def load(
    name: str,
    task: str = "classification",
    *,
    seed: int = 0,
    n: int | None = None,
    classes: Sequence[int | str] | None = None,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
) -> Splits:
    """Load dataset ``name`` viewed for ``task`` and split it deterministically (stratified by class) by ``seed``.

    ``n`` caps the total number of examples (all splits together); ``classes`` keeps only those classes
    (indices or names) and relabels them 0..k-1 in the given order (classification only).
    ``image_size=None`` means the native size (digits 8, shapes 32, cifar10 32); only shapes can be
    generated at another size. For cifar10 the official test batch is the test split.
    """
    check_choice("name", name, DATASETS)
    check_choice("task", task, TASKS)
    check_choice(f"task (for dataset {name!r})", task, DATASET_TASKS[name])
    check_seed(seed)
    if n is not None:
        check_int("n", n, min_value=1)
    check_float("val_fraction", val_fraction, min_value=0.0, max_value=0.9)
    check_float("test_fraction", test_fraction, min_value=0.0, max_value=0.9)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
        )
    if classes is not None and task != "classification":
        raise ValueError(
            f"classes= is only supported for task='classification', got task={task!r} "
            "(a class subset of a detection/segmentation/regression scene is not defined)"
        )
    if root is not None:
        as_path(root, "root")
    if name == "digits":
        return _load_digits(seed, n, classes, image_size, val_fraction, test_fraction)
    if name == "shapes":
        return _load_shapes(task, seed, n, classes, image_size, val_fraction, test_fraction)
    return _load_cifar10(seed, n, classes, root, image_size, val_fraction, test_fraction)


def loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A deterministic DataLoader: no worker processes, shuffling driven by a generator seeded with ``seed``."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) or isinstance(dataset, (str, bytes)):
        raise TypeError(f"dataset must be a map-style dataset (e.g. a TensorDataset), got {type(dataset).__name__}")
    check_int("batch_size", batch_size, min_value=1)
    check_bool("shuffle", shuffle)
    check_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0, generator=generator)


def subset_classes(dataset: TensorDataset, classes: Sequence[int]) -> TensorDataset:
    """Keep the examples whose label (second tensor) is in ``classes``; relabel them 0..k-1 in that order.

    ``classes`` are distinct class indices, each with at least one example (as in ``load(classes=...)``)."""
    check_type("dataset", dataset, TensorDataset, "a TensorDataset of (inputs, int64 labels)")
    labels = dataset.tensors[1] if len(dataset.tensors) >= 2 else None
    if labels is None or labels.dtype != torch.int64 or labels.dim() != 1:
        raise ValueError("subset_classes needs a classification dataset (int64 label vector as second tensor)")
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"dataset holds label {int(labels.min())}; class labels must be >= 0")
    ids = [check_int("classes", c, min_value=0) for c in _class_list(classes)]
    _check_distinct(classes, ids)
    present = set(labels.unique().tolist())
    absent = [c for c in ids if c not in present]
    if absent:
        raise ValueError(f"classes {absent} have no example in dataset; its labels are {sorted(present)}")
    lookup = torch.full((max(present) + 1,), -1, dtype=torch.int64)
    lookup[ids] = torch.arange(len(ids))
    new_labels = lookup[labels]
    keep = new_labels >= 0
    return TensorDataset(dataset.tensors[0][keep], new_labels[keep])


# ----------------------------------------------------------------------------------------------------------
# Procedural shapes
# ----------------------------------------------------------------------------------------------------------
def make_shapes(
    n: int,
    *,
    seed: int = 0,
    image_size: int = 32,
    max_objects: int = 3,
    noise: float = 0.05,
) -> dict[str, np.ndarray]:
    """Generate ``n`` RGB scenes of 1..max_objects shapes (vectorised over the batch) with all their labels.

    Keys: ``images`` (n,3,H,W) float32 in [0,1]; ``label`` class of the main (largest, drawn last, so fully
    visible) object; ``count`` objects per scene; ``area`` main-object area fraction; ``boxes``
    (n,max_objects,4) float32 x1,y1,x2,y2 in pixels (x2,y2 exclusive), main object first, padding 0;
    ``box_labels`` (n,max_objects) int64, padding -1; ``masks`` (n,H,W) int64, 0 background, 1+class.
    """
    check_int("n", n, min_value=1)
    check_seed(seed)
    check_int("image_size", image_size, min_value=MIN_SHAPES_SIZE)
    check_int("max_objects", max_objects, min_value=1, max_value=6)
    check_float("noise", noise, min_value=0.0, max_value=1.0)
    rng = np.random.default_rng(seed)
    objects = _sample_objects(rng, n, image_size, max_objects)
    images, masks, visible = _draw_scene(rng, objects, image_size, noise)
    return _shape_labels(objects, images, masks, visible, image_size)


def _sample_objects(rng: np.random.Generator, n: int, size: int, m: int) -> dict[str, np.ndarray]:
    """Classes, half-sizes, centres and colours of every object slot, largest slot last."""
    scale = size / 32.0
    count = rng.integers(1, m + 1, size=n)
    active = np.arange(m)[None, :] < count[:, None]
    radius = np.round(rng.uniform(3.0, 7.0, size=(n, m)) * scale).astype(np.int64)
    radius = np.where(active, radius, -1)
    order = np.argsort(radius, axis=1, kind="stable")  # inactive first, then small to large
    radius = np.take_along_axis(radius, order, axis=1)
    active = radius >= 0
    cls = rng.integers(0, len(SHAPE_CLASSES), size=(n, m))
    colour = rng.uniform(0.25, 1.0, size=(n, m, 3))
    colour = colour / colour.max(axis=2, keepdims=True) * rng.uniform(0.75, 1.0, size=(n, m, 1))
    centre = _place_centres(rng, radius, active, size)
    return {"count": count, "active": active, "radius": radius, "cls": cls, "colour": colour, "centre": centre}


def _place_centres(rng: np.random.Generator, radius: np.ndarray, active: np.ndarray, size: int) -> np.ndarray:
    """Centres inside the image; a few vectorised rejection rounds keep objects from overlapping much."""
    r = np.maximum(radius, 0)[..., None]
    centre = _uniform_centres(rng, r, size)
    for _ in range(12):
        clash = _clashes(centre, r[..., 0], active)
        if not clash.any():
            break
        centre = np.where(clash[..., None], _uniform_centres(rng, r, size), centre)
    return centre


def _uniform_centres(rng: np.random.Generator, r: np.ndarray, size: int) -> np.ndarray:
    """Integer centres (x, y) so that the whole object lies inside the image."""
    u = rng.uniform(size=r.shape[:-1] + (2,))
    return np.floor(r + u * (size - 2 * r)).astype(np.int64)


def _clashes(centre: np.ndarray, r: np.ndarray, active: np.ndarray) -> np.ndarray:
    """True for an active object that overlaps too much with a larger (later) active object."""
    d = np.abs(centre[:, :, None, :] - centre[:, None, :, :]).max(axis=3)  # Chebyshev distance (n,m,m)
    too_close = d < 0.8 * (r[:, :, None] + r[:, None, :])
    m = r.shape[1]
    later = np.triu(np.ones((m, m), dtype=bool), k=1)
    pair = too_close & later[None] & active[:, :, None] & active[:, None, :]
    return pair.any(axis=2)


def _shape_masks(objects: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Boolean masks (n, m, H, W) of every object slot, by broadcasting pixel coordinates."""
    coords = np.arange(size, dtype=np.float32)
    cx = objects["centre"][..., 0, None, None].astype(np.float32)
    cy = objects["centre"][..., 1, None, None].astype(np.float32)
    dx = np.abs(coords[None, None, None, :] - cx)  # (n, m, 1, W)
    dy_signed = coords[None, None, :, None] - cy  # (n, m, H, 1)
    dy = np.abs(dy_signed)
    r = objects["radius"][..., None, None].astype(np.float32) + 0.5
    cls = objects["cls"][..., None, None]
    dist2 = dx**2 + dy**2
    disc = dist2 <= r**2
    arm = r / 3.0
    out = np.zeros(dist2.shape, dtype=bool)
    out |= (cls == 0) & (dx <= r) & (dy <= r)  # square
    out |= (cls == 1) & disc
    out |= (cls == 2) & (dy <= r) & (dx <= (dy_signed + r) * 0.5)  # triangle, apex up
    out |= (cls == 3) & (((dx <= r) & (dy <= arm)) | ((dy <= r) & (dx <= arm)))  # plus sign
    out |= (cls == 4) & disc & (dist2 >= (0.55 * r) ** 2)  # ring
    return out & objects["active"][..., None, None]


def _background(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Dim per-channel linear gradients, one random direction per scene."""
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    gx = rng.uniform(-0.2, 0.2, size=(n, 3, 1, 1)).astype(np.float32)
    gy = rng.uniform(-0.2, 0.2, size=(n, 3, 1, 1)).astype(np.float32)
    base = rng.uniform(0.05, 0.35, size=(n, 3, 1, 1)).astype(np.float32)
    return base + gx * ramp[None, None, None, :] + gy * ramp[None, None, :, None]


def _draw_scene(
    rng: np.random.Generator, objects: dict[str, np.ndarray], size: int, noise: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint objects in slot order (largest last) over the background; return images, masks, visibility."""
    n, m = objects["cls"].shape
    masks = _shape_masks(objects, size)
    images = np.empty((n, 3, size, size), dtype=np.float32)
    images[...] = _background(rng, n, size)
    seg = np.zeros((n, size, size), dtype=np.int64)
    for j in range(m):  # loop over the few object slots, vectorised over the batch
        mj = masks[:, j]
        colour = objects["colour"][:, j, :, None, None].astype(np.float32)
        np.copyto(images, np.broadcast_to(colour, images.shape), where=mj[:, None])
        np.copyto(seg, np.broadcast_to(objects["cls"][:, j, None, None] + 1, seg.shape), where=mj)
    if noise > 0:  # uniform noise with standard deviation ``noise`` (cheaper to draw than Gaussian)
        u = rng.random(images.shape, dtype=np.float32)
        u -= 0.5
        u *= noise * np.float32(12**0.5)
        images += u
    np.clip(images, 0.0, 1.0, out=images)
    return images, seg, masks


def _shape_labels(
    objects: dict[str, np.ndarray], images: np.ndarray, seg: np.ndarray, masks: np.ndarray, size: int
) -> dict[str, np.ndarray]:
    """Assemble labels with the main object first and padding last."""
    n, m = objects["cls"].shape
    r = objects["radius"].astype(np.float32)
    c = objects["centre"].astype(np.float32)
    boxes = np.stack([c[..., 0] - r, c[..., 1] - r, c[..., 0] + r + 1, c[..., 1] + r + 1], axis=-1)
    boxes = np.clip(boxes, 0, size)
    active = objects["active"]
    boxes = np.where(active[..., None], boxes, 0.0).astype(np.float32)
    box_labels = np.where(active, objects["cls"], -1).astype(np.int64)
    main_area = masks[:, -1].sum(axis=(1, 2)) / float(size * size)
    return {
        "images": images,
        "label": objects["cls"][:, -1].astype(np.int64),
        "count": objects["count"].astype(np.int64),
        "area": main_area.astype(np.float32),
        "boxes": boxes[:, ::-1].copy(),
        "box_labels": box_labels[:, ::-1].copy(),
        "masks": seg,
    }


_TARGET_KEYS = {"classification": ("label",), "regression": ("count",), "detection": ("boxes", "box_labels"),
                "segmentation": ("masks",)}


def shapes_target(scenes: dict[str, np.ndarray], task: str) -> torch.Tensor:
    """The target tensor of ``task`` for scenes from :func:`make_shapes` (see the module docstring)."""
    check_choice("task", task, TASKS)
    check_mapping("scenes", scenes, "the dict returned by make_shapes")
    missing = [k for k in _TARGET_KEYS[task] if not isinstance(scenes.get(k), np.ndarray)]
    if missing:
        raise ValueError(f"scenes lacks the array(s) {missing} that task={task!r} needs: pass make_shapes(...)'s dict")
    if task == "classification":
        return torch.from_numpy(scenes["label"])
    if task == "regression":
        return torch.from_numpy(scenes["count"].astype(np.float32))[:, None]
    if task == "detection":
        cls = scenes["box_labels"].astype(np.float32)[..., None]
        boxes = np.where(cls >= 0, scenes["boxes"], -1.0)
        return torch.from_numpy(np.concatenate([cls, boxes], axis=-1).astype(np.float32))
    return torch.from_numpy(scenes["masks"])


# ----------------------------------------------------------------------------------------------------------
# Loaders per dataset
# ----------------------------------------------------------------------------------------------------------
def _load_digits(seed, n, classes, image_size, val_fraction, test_fraction) -> Splits:
    from sklearn.datasets import load_digits

    _check_native_size("digits", image_size, 8)
    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    y = bunch.target.astype(np.int64)
    names = tuple(str(c) for c in range(10))
    return _finish(x, y, "digits", names, seed, n, classes, val_fraction, test_fraction, per_channel=False)


def _load_shapes(task, seed, n, classes, image_size, val_fraction, test_fraction) -> Splits:
    size = 32 if image_size is None else check_int("image_size", image_size, min_value=MIN_SHAPES_SIZE)
    total = 3000 if n is None else n
    scenes = make_shapes(total, seed=seed, image_size=size)
    x = scenes["images"]
    if task == "classification":
        return _finish(x, scenes["label"], "shapes", SHAPE_CLASSES, seed, None, classes, val_fraction,
                       test_fraction, per_channel=True)
    target = shapes_target(scenes, task)
    idx = _split_indices(scenes["label"], seed, val_fraction, test_fraction)
    x_t = torch.from_numpy(x)
    mean, std = _channel_stats(x_t[idx["train"]], per_channel=True)
    x_t = (x_t - mean) / std
    datasets = {k: TensorDataset(x_t[v], target[v]) for k, v in idx.items()}
    info = DatasetInfo(
        name="shapes", task=task, in_channels=3, image_size=size,
        num_classes=_shapes_num_classes(task), class_names=_shapes_class_names(task),
        target_spec=_shapes_target_spec(task, size), mean=_tuple(mean), std=_tuple(std),
    )
    return Splits(datasets["train"], datasets["val"], datasets["test"], info)


def _load_cifar10(seed, n, classes, root, image_size, val_fraction, test_fraction) -> Splits:
    _check_native_size("cifar10", image_size, 32)
    directory = _cifar10_dir(root)
    train_x, train_y = _read_cifar_batches(directory, [f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = _read_cifar_batches(directory, ["test_batch"])
    names = _cifar_class_names(directory)
    rng = np.random.default_rng(seed)
    if n is not None:
        n_test = min(len(test_y), int(round(n * test_fraction)))
        n_trainval = min(len(train_y), n - n_test)
        train_x, train_y = _stratified_take(train_x, train_y, n_trainval, rng)
        test_x, test_y = _stratified_take(test_x, test_y, n_test, rng)
    x = np.concatenate([train_x, test_x]).astype(np.float32) / 255.0
    y = np.concatenate([train_y, test_y])
    is_test = np.arange(len(y)) >= len(train_y)
    return _finish(x, y, "cifar10", names, seed, None, classes, val_fraction, test_fraction,
                   per_channel=True, fixed_test=is_test)


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def _finish(
    x: np.ndarray,
    y: np.ndarray,
    name: str,
    class_names: Sequence[str],
    seed: int,
    n: int | None,
    classes: Sequence[int | str] | None,
    val_fraction: float,
    test_fraction: float,
    *,
    per_channel: bool,
    fixed_test: np.ndarray | None = None,
) -> Splits:
    """Subsample, subset classes, split, standardize with train statistics and wrap a classification dataset."""
    class_names = tuple(class_names)
    if classes is not None:
        keep_ids = _resolve_classes(classes, class_names)
        x, y, fixed_test = _keep_classes(x, y, keep_ids, fixed_test)
        class_names = tuple(class_names[c] for c in keep_ids)
    if n is not None:
        if n > len(y):
            raise ValueError(f"n={n} is out of range; accepted: 1 <= n <= {len(y)} for dataset {name!r}")
        x, y = _stratified_take(x, y, n, np.random.default_rng(seed))
    if fixed_test is None:
        idx = _split_indices(y, seed, val_fraction, test_fraction)
    else:
        idx = _split_with_fixed_test(y, fixed_test, seed, val_fraction)
    x_t, y_t = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))
    mean, std = _channel_stats(x_t[idx["train"]], per_channel=per_channel)
    x_t = (x_t - mean) / std
    datasets = {k: TensorDataset(x_t[v], y_t[v]) for k, v in idx.items()}
    info = DatasetInfo(
        name=name, task="classification", in_channels=x.shape[1], image_size=x.shape[-1],
        num_classes=len(class_names), class_names=class_names,
        target_spec={"kind": "class index", "shape": (), "dtype": "int64"},
        mean=_tuple(mean), std=_tuple(std),
    )
    return Splits(datasets["train"], datasets["val"], datasets["test"], info)


def _class_list(classes: Any) -> Sequence[Any]:
    """``classes`` if it is a non-empty sequence (not a str); TypeError or ValueError otherwise."""
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise TypeError(f"classes must be a non-empty list of class indices or names, got {type(classes).__name__} "
                        f"({classes!r})")
    if len(classes) == 0:
        raise ValueError("classes must be a non-empty list of class indices or names, got an empty list")
    return classes


def _check_distinct(classes: Sequence[Any], ids: list[int]) -> None:
    if len(set(ids)) != len(ids):
        raise ValueError(f"classes={list(classes)!r} contains a class twice")


def _resolve_classes(classes: Sequence[int | str], class_names: Sequence[str]) -> list[int]:
    """Class indices from indices or names; raise on unknown, out-of-range or repeated classes."""
    ids = []
    for c in _class_list(classes):
        if isinstance(c, str):
            check_choice("classes", c, class_names)
            ids.append(class_names.index(c))
        else:
            ids.append(check_int("classes", c, min_value=0, max_value=len(class_names) - 1))
    _check_distinct(classes, ids)
    return ids


def _keep_classes(x, y, keep_ids, fixed_test):
    """Rows whose label is in ``keep_ids``, relabelled 0..k-1 in that order."""
    lookup = np.full(int(y.max()) + 1, -1, dtype=np.int64)
    lookup[keep_ids] = np.arange(len(keep_ids))
    new_y = lookup[y]
    keep = new_y >= 0
    return x[keep], new_y[keep], None if fixed_test is None else fixed_test[keep]


def _stratified_take(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator):
    """``n`` rows with class proportions kept as far as rounding allows."""
    if n >= len(y):
        return x, y
    order = _interleave_by_class(y, rng)
    chosen = np.sort(order[:n])
    return x[chosen], y[chosen]


def _interleave_by_class(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation where every prefix holds classes in (roughly) their overall proportions."""
    perm = rng.permutation(len(y))
    rank = np.empty(len(y), dtype=np.float64)
    for c in np.unique(y):
        members = perm[y[perm] == c]
        rank[members] = (np.arange(len(members)) + rng.uniform(0.0, 1.0)) / len(members)
    return perm[np.argsort(rank[perm], kind="stable")]


def _split_indices(y: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> dict[str, torch.Tensor]:
    """Stratified train/val/test index tensors: every class is split by the same fractions."""
    rng = np.random.default_rng(seed + 1)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test:n_test + n_val])
        parts["train"].append(members[n_test + n_val:])
    split = {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()}
    if len(split["train"]) == 0:
        raise ValueError(
            f"too few examples ({len(y)}) for val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    return {k: torch.from_numpy(v) for k, v in split.items()}


def _split_with_fixed_test(y: np.ndarray, is_test: np.ndarray, seed: int, val_fraction: float):
    """Keep the given test rows; split the rest into train/val."""
    rest = np.flatnonzero(~is_test)
    sub = _split_indices(y[rest], seed, val_fraction, 0.0)
    return {
        "train": torch.from_numpy(rest[sub["train"].numpy()]),
        "val": torch.from_numpy(rest[sub["val"].numpy()]),
        "test": torch.from_numpy(np.flatnonzero(is_test)),
    }


def _channel_stats(x: torch.Tensor, *, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std for standardization, broadcastable to (N, C, H, W)."""
    dims = (0, 2, 3) if per_channel else (0, 1, 2, 3)
    mean = x.mean(dim=dims, keepdim=True)[0:1]
    std = x.std(dim=dims, keepdim=True)[0:1].clamp_min(1e-6)
    return mean, std


def _tuple(t: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in t.flatten())


def _check_native_size(name: str, image_size: int | None, native: int) -> None:
    if image_size is not None and image_size != native:
        raise ValueError(f"image_size={image_size!r} is not supported for dataset {name!r}; accepted: None or {native}")


def _shapes_num_classes(task: str) -> int:
    return {"regression": 1, "detection": len(SHAPE_CLASSES), "segmentation": len(SHAPE_CLASSES) + 1}[task]


def _shapes_class_names(task: str) -> tuple[str, ...]:
    if task == "segmentation":
        return ("background",) + SHAPE_CLASSES
    if task == "regression":
        return ("count",)
    return SHAPE_CLASSES


def _shapes_target_spec(task: str, size: int) -> dict[str, Any]:
    if task == "regression":
        return {"kind": "object count", "shape": (1,), "dtype": "float32"}
    if task == "detection":
        return {"kind": "boxes [cls, x1, y1, x2, y2] in pixels, -1 padding", "shape": (3, 5), "dtype": "float32"}
    return {"kind": "mask 0=background, 1+class", "shape": (size, size), "dtype": "int64"}


def missing_files(dataset: str) -> str | None:
    """Why ``dataset`` cannot be loaded on this machine without a ``root`` (its local files are absent), or
    None when it can: digits and shapes always can; cifar10 needs env SURVEY_LIB_CIFAR10."""
    check_choice("dataset", dataset, DATASETS)
    if dataset != "cifar10":
        return None
    try:
        _cifar10_dir(None)
    except FileNotFoundError as err:
        return str(err)
    return None


def _cifar10_dir(root: str | os.PathLike | None) -> Path:
    """The cifar-10-batches-py directory from ``root`` or env SURVEY_LIB_CIFAR10; raise if unusable."""
    if root is None:
        root = os.environ.get(CIFAR10_ENV)
    if root is None:
        raise FileNotFoundError(
            f"cifar10 needs a local copy: pass root=... or set {CIFAR10_ENV} to a directory holding "
            f"{', '.join(CIFAR10_FILES)} (the cifar-10-batches-py layout); nothing is downloaded"
        )
    directory = Path(root)
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    missing = [f for f in CIFAR10_FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"cifar10 directory {str(directory)!r} lacks {', '.join(missing)}; expected files: "
            f"{', '.join(CIFAR10_FILES)} (python pickles as in cifar-10-batches-py)"
        )
    return directory


# What a CIFAR-10 python batch pickle may refer to: NumPy arrays and dtypes, and the bytes codec of protocol 2.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, strings, numbers and NumPy arrays (no other objects)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise ValueError(f"it refers to {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    """A CIFAR-10 python pickle as a dict with str keys; ValueError naming the file if it is not one."""
    with open(path, "rb") as fh, reading(path, "CIFAR-10 python pickle"):
        obj = _CifarUnpickler(fh, encoding="bytes").load()
        if not isinstance(obj, dict):
            raise not_valid(path, "CIFAR-10 python pickle", f"expected a dict, got {type(obj).__name__}")
        return {_to_str(k): v for k, v in obj.items()}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 3, 32, 32) uint8, labels (n,) int64) of one CIFAR-10 batch file."""
    batch = _read_pickle(path)
    fmt = "CIFAR-10 batch"
    if "data" not in batch or "labels" not in batch:
        raise not_valid(path, fmt, "it lacks the 'data' and 'labels' entries of a CIFAR-10 batch")
    with reading(path, fmt):
        data = np.asarray(batch["data"])
        labels = np.asarray(batch["labels"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise not_valid(path, fmt, f"'data' must be uint8 of shape (n, 3072), got {data.dtype} {data.shape}")
        if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (data.shape[0],):
            raise not_valid(path, fmt, f"'labels' must be {data.shape[0]} integers, got {labels.dtype} {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
            raise not_valid(path, fmt, f"labels must lie in 0..{len(CIFAR10_CLASSES) - 1}, got {labels.min()}..{labels.max()}")
        return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_cifar_batches(directory: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_cifar_batch(directory / name) for name in names]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _cifar_class_names(directory: Path) -> tuple[str, ...]:
    """The ten class names of batches.meta (the standard names when it lists none)."""
    path = directory / "batches.meta"
    meta = _read_pickle(path)
    names = meta.get("label_names", CIFAR10_CLASSES)
    with reading(path, "CIFAR-10 batches.meta"):
        names = tuple(_to_str(s) for s in names)
    if len(names) != len(CIFAR10_CLASSES) or len(set(names)) != len(names):
        raise not_valid(path, "CIFAR-10 batches.meta", f"label_names must be 10 distinct names, got {list(names)}")
    return names


def _to_str(s: Any) -> str:
    return s.decode("utf-8") if isinstance(s, bytes) else str(s)

