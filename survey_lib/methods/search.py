"""Data-driven compression: a reinforcement-learning search over layer removal and shrinkage.

After Pahwa et al. 2019 ("Data-Driven Compression of Convolutional Neural Networks"), which builds on N2N
(Ashok et al. 2018). A policy walks the conv layers of a reference net and decides, per layer, whether to
remove it (only where its input and output channel counts match, so the layers around it still fit) and how
many of its output channels to keep (a keep-ratio from RATIOS). The candidate is built physically, as a
smaller dense net: each kept layer keeps its largest-L1 filters (:mod:`.structured`), a removed layer becomes
the identity. It is trained briefly by distillation from the reference (a :class:`TeacherCache` serves the
teacher's outputs) and scored on the deployment's validation split.

The reward combines that accuracy with **measured** latency (batch 1, the candidate and the reference run
interleaved in one call of the latency harness, so the ratio is a same-run figure) and **counted** params::

    C = (memory * (1 - params / params_ref) + latency * (1 - latency / latency_ref)) / (memory + latency)
    reward = (A / A_ref) ** accuracy * C * (2 - C)

With ``latency = 0`` this is N2N's size-only reward (A/A_teacher)·C(2−C). Constraints (``max_drop``,
``min_compression``) give a violating candidate the reward −1, as N2N does for an invalid one.

The controller is N2N's: a bidirectional LSTM over the layer sequence gives each removable layer a removal
probability, and an autoregressive LSTM picks each kept layer's keep-ratio given the previous choice. Both
are sampled in one episode (N2N runs them as two stages) and trained by REINFORCE with a moving-average
baseline. ``strategy="random"`` samples the same action space uniformly; ``"uniform"`` walks the uniform-width
heuristic (one keep-ratio for every layer, with and without the removable layers).

Every evaluated candidate is stored in a :class:`SearchStore` (SQLite, one transaction per row) under its
deployment and architecture, and every episode under its search. Evaluation does not depend on the reward
weights or the strategy, so all searches of one deployment share candidates, and an architecture is never
trained or measured twice. Searches are deterministic given their seed and the stored figures, so calling
an interrupted search again replays the stored episodes without evaluating them and continues.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .._validate import check_choice, check_float, check_int, check_seed, check_type
from ..data import Splits, subset_classes
from ..models import MIN_CHANNELS
from ..cost.counting import eval_mode
from .base import Context, check_ctx, counted_totals, mark, replace_module
from .distillation import TeacherCache, distill
from .structured import channel_groups, l1_importance, prune_channels

RATIOS = (0.125, 0.25, 0.5, 0.75, 1.0)
STRATEGIES = ("rl", "random", "uniform")
RUNTIMES = ("eager", "ort")
STORE_SCHEMA = "survey_lib.search/1"


# ----------------------------------------------------------------------------------------------------------
# The action space: the layers a policy walks, and architectures as kept channels per layer
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    """One conv layer the policy decides on: its channel group, the block a removal replaces, its shapes
    and counted cost (batch 1), and whether it can be removed (input and output channels match)."""

    name: str
    block: str
    group: int
    cin: int
    cout: int
    size: int
    params: int
    macs: int
    removable: bool


def _block_of(model: nn.Module, conv: str) -> str:
    """The conv-BN-ReLU container of ``conv`` when it is one (a removal replaces it), else ``conv``."""
    parent = conv.rpartition(".")[0]
    if parent:
        block = model.get_submodule(parent)
        if isinstance(block, nn.Sequential) and len(block) == 3 and block[0] is model.get_submodule(conv) \
                and isinstance(block[1], nn.BatchNorm2d) and isinstance(block[2], nn.ReLU):
            return parent
    return conv


def search_layers(model: nn.Module, example_input: Tensor) -> list[Layer]:
    """The conv layers of ``model``'s backbone the search decides on, in forward order; ValueError for a net
    whose channels are coupled by additions (residual nets) or that has no prunable conv."""
    from ..cost import count

    check_type("model", model, nn.Module, "a torch.nn.Module")
    prefix = "backbone." if hasattr(model, "backbone") else ""
    groups = [g for g in channel_groups(model) if all(p.startswith(prefix) for p in g.producers)]
    coupled = [g for g in groups if g.coupled]
    if coupled:
        raise ValueError(f"the search walks chain nets (arch 'vgg'); channels of {', '.join(coupled[0].producers)} "
                         "are added together (a residual net), so layers cannot be removed or shrunk one by one")
    table = count(model, example_input[:1]).set_index("name")
    shapes = _conv_input_sizes(model, example_input[:1])
    layers = []
    for g in groups:
        name = g.producers[0]
        conv = model.get_submodule(name)
        if not isinstance(conv, nn.Conv2d):
            continue
        block = _block_of(model, name)
        removable = (block != name and conv.in_channels == conv.out_channels and conv.stride == (1, 1)
                     and conv.groups == 1)
        layers.append(Layer(name, block, g.id, conv.in_channels, conv.out_channels, shapes[name],
                            int(table.loc[name, "params"]), int(table.loc[name, "macs"]), removable))
    if not layers:
        raise ValueError("model has no prunable conv layer in its backbone for the search to walk")
    return layers


def _conv_input_sizes(model: nn.Module, x: Tensor) -> dict[str, int]:
    sizes: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: sizes.__setitem__(n, int(inp[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return sizes


Arch = tuple[int, ...]   # kept output channels per layer, 0 = removed


def kept_channels(layer: Layer, ratio: float) -> int:
    """Output channels ``layer`` keeps at keep-ratio ``ratio`` (at least MIN_CHANNELS, at most all)."""
    return min(layer.cout, max(MIN_CHANNELS, int(round(ratio * layer.cout))))


def arch_from_actions(layers: Sequence[Layer], removed: Sequence[bool], ratios: Sequence[int]) -> Arch:
    """The architecture of per-layer actions: removal flags and keep-ratio indices into RATIOS."""
    if len(removed) != len(layers) or len(ratios) != len(layers):
        raise ValueError(f"actions must give one removal flag and one ratio index per layer ({len(layers)}), "
                         f"got {len(removed)} and {len(ratios)}")
    return tuple(0 if r else kept_channels(layer, RATIOS[int(i)]) for layer, r, i in zip(layers, removed, ratios))


def check_arch(layers: Sequence[Layer], arch: Any) -> Arch:
    """``arch`` as a tuple of kept channels per layer; ValueError naming the first layer that cannot take it."""
    if isinstance(arch, (str, bytes)) or not isinstance(arch, Sequence):
        raise TypeError(f"arch must be a sequence of kept channels per layer (0 = removed), got {type(arch).__name__}")
    if len(arch) != len(layers):
        raise ValueError(f"arch has {len(arch)} entries; the net has {len(layers)} searchable layers "
                         f"({', '.join(layer.name for layer in layers)})")
    out = []
    for i, (layer, c) in enumerate(zip(layers, arch)):
        c = check_int(f"arch[{i}]", c, min_value=0, max_value=layer.cout)
        if c == 0 and not layer.removable:
            raise ValueError(f"arch[{i}] = 0 removes {layer.name}, which cannot be removed (its {layer.cin} input and "
                             f"{layer.cout} output channels differ); accepted: {MIN_CHANNELS}..{layer.cout}")
        if 0 < c < min(MIN_CHANNELS, layer.cout):
            raise ValueError(f"arch[{i}] = {c} keeps fewer than {MIN_CHANNELS} channels of {layer.name}; "
                             f"accepted: 0 (remove, where allowed) or {MIN_CHANNELS}..{layer.cout}")
        out.append(c)
    return tuple(out)


def arch_key(arch: Sequence[int]) -> str:
    """A readable key for an architecture, e.g. '16-0-32-64-96-128' (0 = removed)."""
    return "-".join(str(int(c)) for c in arch)


def describe_arch(layers: Sequence[Layer], arch: Sequence[int]) -> str:
    """Per layer 'kept/original' channels or 'removed', e.g. '16/32 removed 32/64 ...'."""
    return " ".join("removed" if c == 0 else f"{c}/{layer.cout}" for layer, c in zip(layers, arch))


def build_candidate(model: nn.Module, arch: Sequence[int], layers: Sequence[Layer] | None = None,
                    example_input: Tensor | None = None) -> nn.Module:
    """A new, smaller dense net: each layer of ``model`` keeps its ``arch[i]`` largest-L1 filters, a layer with
    ``arch[i] = 0`` becomes the identity (the next layer reads the channels the previous one kept, as if the
    removed layer passed them through). ``model`` is not changed; the result is in eval mode."""
    if layers is None:
        if example_input is None:
            raise TypeError("build_candidate needs layers= (from search_layers) or example_input= to find them")
        layers = search_layers(model, example_input)
    arch = check_arch(layers, arch)
    groups = {g.id: g for g in channel_groups(model)}
    plan: dict[int, Tensor] = {}
    previous: Tensor | None = None
    for layer, c in zip(layers, arch):
        if c == 0:
            kept = previous if previous is not None else torch.arange(layer.cin)
        else:
            score = l1_importance(groups[layer.group])
            kept = torch.topk(score, c).indices.sort().values
        plan[layer.group] = kept
        previous = kept
    out = prune_channels(model, plan)
    for layer, c in zip(layers, arch):
        if c == 0:
            replace_module(out, layer.block, nn.Identity())
    out.eval()
    return mark(out, "data_driven_search", ("dense_shapes", "architecture"), arch=list(arch),
                removed=[layer.name for layer, c in zip(layers, arch) if c == 0])


# ----------------------------------------------------------------------------------------------------------
# Class subsets
# ----------------------------------------------------------------------------------------------------------
def _check_classes(classes: Any, num_classes: int) -> list[int]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise TypeError(f"classes must be a list of class indices, got {type(classes).__name__}")
    ids = [check_int(f"classes[{i}]", c, min_value=0, max_value=num_classes - 1) for i, c in enumerate(classes)]
    if len(ids) < 2 or len(set(ids)) != len(ids):
        raise ValueError(f"classes must name at least 2 distinct classes of 0..{num_classes - 1}, got {list(classes)!r}")
    return ids


def restrict_classes(model: nn.Module, classes: Sequence[int]) -> nn.Module:
    """A copy of a classifier whose last Linear keeps only the rows of ``classes`` (in that order): the same net
    deployed for a subset of its classes, predicting among those only."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("restrict_classes needs a classifier whose last layer is an nn.Linear over the classes")
    name, last = linears[-1]
    ids = _check_classes(classes, last.out_features)
    out = copy.deepcopy(model)
    new = nn.Linear(last.in_features, len(ids), bias=last.bias is not None)
    with torch.no_grad():
        new.weight.copy_(last.weight[ids])
        if last.bias is not None:
            new.bias.copy_(last.bias[ids])
    replace_module(out, name, new)
    return out.eval()


def subset_splits(data: Splits, classes: Sequence[int]) -> Splits:
    """``data`` keeping only ``classes`` (relabelled 0..k-1 in that order) in every split."""
    ids = _check_classes(classes, data.info.num_classes)
    info = dataclasses.replace(data.info, num_classes=len(ids), class_names=tuple(data.info.class_names[i] for i in ids))
    parts = {s: subset_classes(getattr(data, s), ids) if len(getattr(data, s)) else getattr(data, s)
             for s in ("train", "val", "test")}
    return Splits(info=info, **parts)


# ----------------------------------------------------------------------------------------------------------
# The reward
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RewardWeights:
    """How a user weighs the candidates: ``memory`` and ``latency`` weigh the two savings (only their ratio
    matters), ``accuracy`` is the exponent of A/A_ref; ``max_drop`` (points of the primary metric below the
    reference) and ``min_compression`` (params_ref / params) are hard constraints (reward −1 when broken)."""

    memory: float = 1.0
    latency: float = 0.0
    accuracy: float = 1.0
    max_drop: float | None = None
    min_compression: float | None = None

    def __post_init__(self) -> None:
        for name in ("memory", "latency"):
            check_float(name, getattr(self, name), min_value=0.0, max_value=1e6)
        if self.memory + self.latency <= 0:
            raise ValueError("memory and latency weights are both 0: give at least one a positive weight "
                             "(memory=1, latency=0 is N2N's size-only reward)")
        check_float("accuracy", self.accuracy, min_value=0.0, max_value=100.0)
        if self.accuracy <= 0:
            raise ValueError(f"accuracy must be > 0 (the exponent of A/A_ref), got {self.accuracy}")
        if self.max_drop is not None:
            check_float("max_drop", self.max_drop, min_value=0.0, max_value=100.0)
        if self.min_compression is not None:
            check_float("min_compression", self.min_compression, min_value=1.0, max_value=1e6)

    def to_dict(self) -> dict[str, Any]:
        """The weights as a JSON-able dict."""
        return dataclasses.asdict(self)


SIZE_ONLY = RewardWeights(memory=1.0, latency=0.0)
SPEED_FIRST = RewardWeights(memory=0.0, latency=1.0)


def reward(candidate: dict[str, Any], weights: RewardWeights = SIZE_ONLY) -> dict[str, float]:
    """The reward of an evaluated candidate and its components: ``accuracy_ratio`` (A/A_ref), the
    ``memory_saving`` (1 − params/params_ref, counted) and ``latency_saving`` (1 − measured same-run ratio),
    their weighted ``saving`` C, the ``shaped`` saving C(2−C), ``feasible`` and the ``reward``."""
    check_type("weights", weights, RewardWeights, "a RewardWeights")
    ratio = max(candidate["score"], 0.0) / candidate["reference_score"] if candidate["reference_score"] > 0 else 0.0
    mem = 1.0 - candidate["params"] / candidate["reference_params"]
    lat = 1.0 - candidate["latency_ratio"]
    saving = (weights.memory * mem + weights.latency * lat) / (weights.memory + weights.latency)
    shaped = saving * (2.0 - saving)
    feasible = True
    if weights.max_drop is not None and (candidate["reference_score"] - candidate["score"]) * 100 > weights.max_drop:
        feasible = False
    if _breaks_size_target(candidate["params"], candidate["reference_params"], weights):
        feasible = False
    value = ratio ** weights.accuracy * shaped if feasible else -1.0
    return {"accuracy_ratio": ratio, "memory_saving": mem, "latency_saving": lat, "saving": saving,
            "shaped": shaped, "feasible": feasible, "reward": float(value)}


def _breaks_size_target(params: int, reference_params: int, weights: RewardWeights) -> bool:
    """Whether a candidate of ``params`` is compressed less than ``weights.min_compression``."""
    return weights.min_compression is not None and reference_params / params < weights.min_compression


# ----------------------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------------------
class SearchStore:
    """Evaluated candidates (per deployment and architecture) and search episodes (per search and episode)
    in an SQLite file (or in memory with ``path=None``); every row is written in its own transaction, so an
    interrupted search loses at most the candidate being trained. A file that is not a search store (or not
    SQLite) raises ValueError and is left untouched."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else Path(check_type("path", path, (str, os.PathLike), "a file path or None"))
        if self.path is not None and self.path.exists():
            _check_store_file(self.path)
        elif self.path is not None and not self.path.parent.is_dir():
            raise FileNotFoundError(f"path {str(self.path)!r}: its folder does not exist; create it first")
        self.conn = sqlite3.connect(":memory:" if self.path is None else str(self.path))
        try:
            self._init()
        except sqlite3.DatabaseError as err:
            self.conn.close()
            raise ValueError(f"{self.path} is not a search store (SQLite said: {err}); choose another path") from err

    def _init(self) -> None:
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            raise ValueError(f"{self.path} is an SQLite file of something else (tables {sorted(tables)}); choose another path")
        with self.conn:
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.conn.execute("INSERT INTO meta VALUES ('schema', ?)", (STORE_SCHEMA,))
            elif row[0] != STORE_SCHEMA:
                raise ValueError(f"{self.path} holds schema {row[0]!r}, not {STORE_SCHEMA!r}; choose another path")
            self.conn.execute("CREATE TABLE IF NOT EXISTS candidates (deployment TEXT, arch TEXT, record TEXT NOT NULL, "
                              "PRIMARY KEY (deployment, arch))")
            self.conn.execute("CREATE TABLE IF NOT EXISTS episodes (search TEXT, episode INTEGER, arch TEXT NOT NULL, "
                              "record TEXT NOT NULL, PRIMARY KEY (search, episode))")

    def candidate(self, deployment: str, arch: str) -> dict[str, Any] | None:
        """The stored evaluation of ``arch`` for ``deployment``, or None."""
        row = self.conn.execute("SELECT record FROM candidates WHERE deployment=? AND arch=?", (deployment, arch)).fetchone()
        return None if row is None else json.loads(row[0])

    def add_candidate(self, deployment: str, arch: str, record: dict[str, Any]) -> None:
        """Store an evaluation (one transaction); an architecture already stored is kept as it was."""
        with self.conn:
            self.conn.execute("INSERT OR IGNORE INTO candidates VALUES (?, ?, ?)", (deployment, arch, json.dumps(record)))

    def episodes(self, search: str) -> list[dict[str, Any]]:
        """The stored episodes of ``search``, in order."""
        rows = self.conn.execute("SELECT record FROM episodes WHERE search=? ORDER BY episode", (search,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def add_episode(self, search: str, episode: int, record: dict[str, Any]) -> None:
        """Store one episode (one transaction); ValueError if a different one is stored under that number."""
        with self.conn:
            row = self.conn.execute("SELECT arch FROM episodes WHERE search=? AND episode=?", (search, episode)).fetchone()
            if row is not None:
                if row[0] != record["arch"]:
                    raise ValueError(f"the store holds arch {row[0]} at episode {episode} of this search, the replay "
                                     f"sampled {record['arch']}: the store was written by other code; use a new store")
                return
            self.conn.execute("INSERT INTO episodes VALUES (?, ?, ?, ?)", (search, episode, record["arch"], json.dumps(record)))

    def count(self, deployment: str | None = None) -> int:
        """Number of stored candidates (of ``deployment``, or all)."""
        if deployment is None:
            return self.conn.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]
        return self.conn.execute("SELECT COUNT(*) FROM candidates WHERE deployment=?", (deployment,)).fetchone()[0]

    def close(self) -> None:
        """Close the database."""
        self.conn.close()


def _check_store_file(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(16)
    if head and head != b"SQLite format 3\x00":
        raise ValueError(f"{path} exists and is not an SQLite search store; choose another path (it was left untouched)")


# ----------------------------------------------------------------------------------------------------------
# A deployment: what candidates are trained and scored on
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_fit_bars() -> Iterator[None]:
    from ..train import PROGRESS_ENV

    old = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = old


def _state_digest(model: nn.Module) -> str:
    return _state_digest_dict(model.state_dict())


class Deployment:
    """What a search compresses for: the reference ``model`` on ``ctx``'s task, optionally restricted to
    ``classes``; candidates train for ``epochs`` on ``train_images`` seeded training images (at ``lr`` and
    ``batch_size``, default the context's, under ``schedule``: "cosine" decays the rate to 0, "constant")
    by distillation from the reference, are scored on the validation split, and are timed at batch 1
    against the reference (``runtime``, ``threads``, ``latency_runs``). Evaluations go to ``store``
    (default: in memory)."""

    def __init__(self, model: nn.Module, ctx: Context, *, classes: Sequence[int] | None = None,
                 train_images: int | None = 1024, epochs: int = 1, lr: float | None = None,
                 batch_size: int | None = None, schedule: str = "cosine", runtime: str = "eager", threads: int = 1,
                 latency_runs: int = 30, store: SearchStore | None = None) -> None:
        check_type("model", model, nn.Module, "a trained torch.nn.Module (the reference net)")
        check_ctx(ctx)
        from ..train import SCHEDULES

        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        self.runtime = check_choice("runtime", runtime, RUNTIMES)
        self.threads = check_int("threads", threads, min_value=1, max_value=256)
        from ..cost.latency import MIN_RUNS

        self.latency_runs = check_int("latency_runs", latency_runs, min_value=MIN_RUNS)
        self.epochs = check_int("epochs", epochs, min_value=1)
        self.lr = ctx.lr if lr is None else check_float("lr", lr, min_value=0.0)
        self.batch_size = ctx.batch_size if batch_size is None else check_int("batch_size", batch_size, min_value=1)
        self.store = SearchStore() if store is None else check_type("store", store, SearchStore, "a SearchStore or None")
        self.classes = None
        data, task, reference = ctx.data, ctx.task, copy.deepcopy(model).eval()
        if classes is not None:
            if ctx.task.name != "classification":
                raise ValueError(f"classes= needs a classification task, got {ctx.task.name!r} (a class subset of a "
                                 "scene-level target is not defined)")
            self.classes = _check_classes(classes, ctx.data.info.num_classes)
            from ..tasks import task_for

            data = subset_splits(ctx.data, self.classes)
            task = task_for(data)
            reference = restrict_classes(reference, self.classes)
        if len(data.val) == 0:
            raise ValueError("the search scores candidates on the validation split, which is empty: raise val_fraction")
        n = len(data.train) if train_images is None else check_int("train_images", train_images, min_value=1)
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(ctx.seed))[:n].sort().values
        train = torch.utils.data.TensorDataset(*(t[order] for t in data.train.tensors))
        self.data = data
        self.reference = reference
        self.ctx = Context(task=task, data=Splits(train=train, val=data.val, test=data.test, info=data.info),
                           budget=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=ctx.seed, device=ctx.device)
        self.full_ctx = Context(task=task, data=data, budget=ctx.budget, lr=ctx.lr, batch_size=ctx.batch_size, seed=ctx.seed,
                                device=ctx.device)
        self.example = self.ctx.example_input(1)
        self.layers = search_layers(self.reference, self.example)
        self.cache = TeacherCache(self.reference, self.ctx.data.train)
        self._full_cache: TeacherCache | None = None
        self.reference_score = self.ctx.score(self.reference, "val")
        self.reference_params = sum(p.numel() for p in self.reference.parameters())
        from ..host import cpu_features

        self.key = hashlib.blake2b(json.dumps({
            "reference": _state_digest(self.reference), "classes": self.classes, "task": task.name,
            "train": [int(i) for i in order], "epochs": self.epochs, "lr": self.lr, "batch": self.batch_size, "schedule": self.schedule,
            "seed": ctx.seed, "runtime": runtime, "threads": threads, "runs": latency_runs,
            "cpu": cpu_features()[0], "torch": torch.__version__,
        }, sort_keys=True).encode(), digest_size=12).hexdigest()
        self.evaluations = 0
        self._counts: dict[Arch, dict[str, int]] = {}

    def candidate(self, arch: Sequence[int]) -> nn.Module:
        """The untrained candidate of ``arch`` (weights inherited from the reference)."""
        return build_candidate(self.reference, arch, self.layers)

    def count(self, arch: Sequence[int]) -> dict[str, int]:
        """Counted params and MACs (batch 1) of the candidate of ``arch``, without training it."""
        arch = check_arch(self.layers, arch)
        if arch not in self._counts:
            self._counts[arch] = counted_totals(self.candidate(arch), self.example)
        return self._counts[arch]

    def untrained(self, arch: Sequence[int]) -> dict[str, Any]:
        """A record of ``arch`` with its counted figures only (score and latency NaN): a candidate the search
        rejects on its counted size, so it is never trained or timed."""
        nan = float("nan")
        return self._record(check_arch(self.layers, arch), score=nan, latency=None, train_seconds=0.0, seconds=0.0)

    def evaluate(self, arch: Sequence[int]) -> dict[str, Any]:
        """The stored evaluation of ``arch``, or a new one (build, distil briefly, score, count, time; stored)."""
        arch = check_arch(self.layers, arch)
        key = arch_key(arch)
        stored = self.store.candidate(self.key, key)
        if stored is not None:
            return stored
        start = time.perf_counter()
        with _no_fit_bars():
            model = distill(self.candidate(arch), self.ctx, teacher=self.reference, cache=self.cache,
                            callbacks=self._callbacks())
        train_seconds = time.perf_counter() - start
        score = self.ctx.score(model, "val")
        lat = self.latency({"reference": self.reference, "candidate": model})
        record = self._record(arch, score=score, latency=lat, train_seconds=train_seconds,
                              seconds=time.perf_counter() - start)
        self.store.add_candidate(self.key, key, record)
        self.evaluations += 1
        return record

    def _record(self, arch: Arch, *, score: float, latency: dict[str, Any] | None, train_seconds: float,
                seconds: float) -> dict[str, Any]:
        """One candidate's row: counted figures, score, latency (NaN when ``latency`` is None: not timed)."""
        counted = self.count(arch)
        nan = float("nan")
        timed = latency is not None
        cand, ref = (latency["candidate"], latency["reference"]) if timed else (None, None)
        return {
            "arch": arch_key(arch), "channels": list(arch), "score": score, "reference_score": self.reference_score,
            "params": counted["params"], "reference_params": self.reference_params, "macs": counted["macs"],
            "latency_ms": cand.median_ms if timed else nan, "latency_iqr_ms": cand.iqr_ms if timed else nan,
            "reference_latency_ms": ref.median_ms if timed else nan,
            "latency_ratio": cand.median_ms / ref.median_ms if timed else nan,
            "train_seconds": train_seconds, "seconds": seconds, "seed": self.ctx.seed, "trained": timed,
        }

    def latency(self, models: dict[str, nn.Module], runs: int | None = None, seed: int = 0) -> dict[str, Any]:
        """Batch-1 latency of ``models``, interleaved in one call of the harness (this deployment's settings)."""
        from ..cost.latency import compare_latency

        return compare_latency(models, self.example, runtime=self.runtime, threads=self.threads,
                               runs=self.latency_runs if runs is None else runs, seed=seed)

    def finalize(self, arch: Sequence[int], *, epochs: int | None = None) -> nn.Module:
        """The candidate of ``arch`` distilled for ``epochs`` (default the context's budget) on the whole
        training split of the deployment: the model a search hands over."""
        if self._full_cache is None:
            self._full_cache = TeacherCache(self.reference, self.full_ctx.data.train)
        with _no_fit_bars():
            return distill(self.candidate(arch), self.full_ctx, teacher=self.reference, cache=self._full_cache,
                           epochs=epochs, callbacks=self._callbacks())

    def _callbacks(self) -> list[Any]:
        from ..train import CosineLR

        return [CosineLR()] if self.schedule == "cosine" else []


# ----------------------------------------------------------------------------------------------------------
# The controller
# ----------------------------------------------------------------------------------------------------------
def layer_features(layers: Sequence[Layer]) -> Tensor:
    """Per layer: position, log channels in/out, log input size, share of params and of MACs, removable."""
    total_p = sum(layer.params for layer in layers) or 1
    total_m = sum(layer.macs for layer in layers) or 1
    n = len(layers)
    rows = [[i / max(n - 1, 1), math.log2(layer.cin) / 10, math.log2(layer.cout) / 10, math.log2(layer.size) / 10,
             layer.params / total_p, layer.macs / total_m, float(layer.removable)] for i, layer in enumerate(layers)]
    return torch.tensor(rows, dtype=torch.float32)


class Controller(nn.Module):
    """N2N's policy: a bidirectional LSTM over the layers gives removal logits; an autoregressive LSTM cell
    picks each layer's keep-ratio from the layer, the previous ratio and this layer's removal flag."""

    def __init__(self, n_features: int = 7, n_ratios: int = len(RATIOS), hidden: int = 32) -> None:
        super().__init__()
        self.n_ratios = n_ratios
        self.embed = nn.Linear(n_features, hidden)
        self.removal = nn.LSTM(hidden, hidden, batch_first=True, bidirectional=True)
        self.removal_head = nn.Linear(2 * hidden, 1)
        self.shrink = nn.LSTMCell(hidden + n_ratios + 1, hidden)
        self.shrink_head = nn.Linear(hidden, n_ratios)

    def sample(self, features: Tensor, removable: Tensor, generator: torch.Generator | None = None,
               uniform: bool = False) -> tuple[list[bool], list[int], Tensor, Tensor]:
        """One episode's actions (removal flags, ratio indices), their summed log-probability and entropy;
        ``uniform`` samples every choice uniformly (random search) with zero log-probability."""
        emb = torch.tanh(self.embed(features)).unsqueeze(0)
        remove_logits = self.removal_head(self.removal(emb)[0]).squeeze(0).squeeze(-1)
        logp, entropy = torch.zeros(()), torch.zeros(())
        removed: list[bool] = []
        for i in range(len(features)):
            if not removable[i]:
                removed.append(False)
                continue
            dist = torch.distributions.Bernoulli(logits=torch.zeros(()) if uniform else remove_logits[i])
            flag = bool(torch.rand((), generator=generator) < dist.probs)
            removed.append(flag)
            if not uniform:
                logp = logp + dist.log_prob(torch.tensor(float(flag)))
                entropy = entropy + dist.entropy()
        h = c = torch.zeros(1, self.shrink.hidden_size)
        prev = torch.zeros(1, self.n_ratios)
        ratios: list[int] = []
        for i in range(len(features)):
            step = torch.cat([emb[0, i:i + 1], prev, torch.tensor([[float(removed[i])]])], 1)
            h, c = self.shrink(step, (h, c))
            if removed[i]:
                ratios.append(self.n_ratios - 1)
                continue
            logits = torch.zeros(self.n_ratios) if uniform else self.shrink_head(h)[0]
            probs = torch.softmax(logits, 0)
            choice = int(torch.multinomial(probs.detach(), 1, generator=generator))
            ratios.append(choice)
            if not uniform:
                logp = logp + torch.log(probs[choice])
                entropy = entropy - (probs * torch.log(probs)).sum()
            prev = torch.nn.functional.one_hot(torch.tensor([choice]), self.n_ratios).float()
        return removed, ratios, logp, entropy


def uniform_archs(layers: Sequence[Layer]) -> list[Arch]:
    """The uniform-width heuristic: every keep-ratio of RATIOS for every layer, without and with the
    removable layers removed (widest first)."""
    out: list[Arch] = []
    for r in range(len(RATIOS) - 1, -1, -1):
        for drop in (False, True):
            removed = [drop and layer.removable for layer in layers]
            arch = arch_from_actions(layers, removed, [r] * len(layers))
            if arch not in out:
                out.append(arch)
    return out


# ----------------------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """One search's episodes (a DataFrame: arch, reward and its components, the candidate's figures,
    ``best_reward`` so far), its final ``controller`` state, how many candidates it evaluated anew, reused
    from the store, and ``rejected`` untrained for breaking the size target on counted params."""

    strategy: str
    seed: int
    weights: RewardWeights
    episodes: pd.DataFrame
    controller: dict[str, Tensor] | None
    evaluated: int
    reused: int
    seconds: float
    key: str = ""
    layers: list[Layer] = field(default_factory=list)
    rejected: int = 0

    @property
    def best(self) -> pd.Series:
        """The episode with the highest reward (the earliest one on ties)."""
        return self.episodes.loc[self.episodes["reward"].idxmax()]

    def episodes_to_reach(self, target: float) -> int | None:
        """The first episode (1-based) whose best reward so far reaches ``target``, or None."""
        hit = np.flatnonzero(self.episodes["best_reward"].to_numpy() >= target - 1e-12)
        return int(hit[0]) + 1 if len(hit) else None


def _check_budget(episodes: Any, seconds: Any) -> tuple[int, float | None]:
    episodes = check_int("episodes", episodes, min_value=0)
    if seconds is not None:
        seconds = check_float("seconds", seconds, min_value=0.0)
    if episodes == 0 or seconds == 0:
        raise ValueError("the search budget is zero: give episodes >= 1 (and seconds > 0 or None)")
    return episodes, seconds


def search(
    deployment: Deployment,
    *,
    weights: RewardWeights = SIZE_ONLY,
    strategy: str = "rl",
    episodes: int = 24,
    seconds: float | None = None,
    seed: int = 0,
    batch: int = 4,
    lr: float = 0.05,
    entropy: float = 0.01,
    baseline_decay: float = 0.8,
    warm_start: SearchResult | dict[str, Tensor] | None = None,
    progress: bool | None = None,
) -> SearchResult:
    """Search ``deployment`` for ``episodes`` candidates (and at most ``seconds``, if given) by ``strategy``:
    "rl" (REINFORCE, ``batch`` episodes per update, Adam at ``lr``, an ``entropy`` bonus, a moving-average
    baseline), "random" (uniform over the same actions) or "uniform" (the uniform-width heuristic). The
    episodes are stored; calling again with the same arguments replays them from the store and continues.
    A candidate that breaks ``weights.min_compression`` on its counted params gets reward −1 untrained.
    ``warm_start`` starts the controller from an earlier search's (policy transfer)."""
    check_type("deployment", deployment, Deployment, "a Deployment")
    check_type("weights", weights, RewardWeights, "a RewardWeights (e.g. SIZE_ONLY, SPEED_FIRST)")
    check_choice("strategy", strategy, STRATEGIES)
    episodes, seconds = _check_budget(episodes, seconds)
    check_seed(seed)
    check_int("batch", batch, min_value=1)
    check_float("lr", lr, min_value=0.0)
    check_float("entropy", entropy, min_value=0.0)
    check_float("baseline_decay", baseline_decay, min_value=0.0, max_value=1.0)
    warm = _warm_state(warm_start)
    if warm is not None and strategy != "rl":
        raise ValueError(f"warm_start needs strategy='rl' (a policy to start from), got strategy={strategy!r}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controller = Controller()
    if warm is not None:
        controller.load_state_dict(warm)
    opt = torch.optim.Adam(controller.parameters(), lr=lr)
    features = layer_features(deployment.layers)
    removable = torch.tensor([layer.removable for layer in deployment.layers])
    plan = uniform_archs(deployment.layers) if strategy == "uniform" else None
    if plan is not None:
        episodes = min(episodes, len(plan))
    key = hashlib.blake2b(json.dumps({
        "deployment": deployment.key, "strategy": strategy, "weights": weights.to_dict(), "seed": seed, "batch": batch,
        "lr": lr, "entropy": entropy, "decay": baseline_decay,
        "warm": None if warm is None else _state_digest_dict(warm)}, sort_keys=True).encode(), digest_size=12).hexdigest()
    bar = _bar(episodes, strategy, progress)
    rows: list[dict[str, Any]] = []
    pending: list[tuple[Tensor, Tensor, float]] = []
    base_value: float | None = None
    evaluated = reused = rejected = 0
    best = -math.inf
    start = time.perf_counter()
    try:
        for episode in range(episodes):
            if seconds is not None and time.perf_counter() - start >= seconds:
                break
            if plan is not None:
                arch, logp, ent = plan[episode], torch.zeros(()), torch.zeros(())
            else:
                removed, ratios, logp, ent = controller.sample(features, removable, generator, uniform=strategy == "random")
                arch = arch_from_actions(deployment.layers, removed, ratios)
            before = deployment.evaluations
            if _too_large(deployment, arch, weights):
                record = deployment.untrained(arch)
                rejected += 1
            else:
                record = deployment.evaluate(arch)
                evaluated += deployment.evaluations - before
                reused += deployment.evaluations == before
            parts = reward(record, weights)
            best = max(best, parts["reward"])
            row = {"episode": episode + 1, **record, **parts, "best_reward": best}
            deployment.store.add_episode(key, episode, {k: v for k, v in row.items() if _jsonable(v)})
            rows.append(row)
            if strategy == "rl":
                pending.append((logp, ent, parts["reward"]))
                if len(pending) == batch:
                    base_value = _update(opt, pending, base_value, entropy, baseline_decay)
                    pending = []
            if bar is not None:
                bar.update(1)
                bar.set_postfix(best=f"{best:.3f}", new=evaluated)
    finally:
        if bar is not None:
            bar.close()
    return SearchResult(strategy, seed, weights, pd.DataFrame(rows),
                        {k: v.detach().clone() for k, v in controller.state_dict().items()} if strategy == "rl" else None,
                        evaluated, reused, time.perf_counter() - start, key, list(deployment.layers), rejected)


def _too_large(deployment: Deployment, arch: Arch, weights: RewardWeights) -> bool:
    """Whether ``arch`` breaks the size target on its counted params alone (no need to train it)."""
    return weights.min_compression is not None and \
        _breaks_size_target(deployment.count(arch)["params"], deployment.reference_params, weights)


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, list)) or v is None


def _warm_state(warm: Any) -> dict[str, Tensor] | None:
    if warm is None:
        return None
    if isinstance(warm, SearchResult):
        if warm.controller is None:
            raise ValueError(f"warm_start is a {warm.strategy!r} search, which has no policy; pass an 'rl' search")
        return warm.controller
    return check_type("warm_start", warm, dict, "a SearchResult of an 'rl' search, a controller state dict or None")


def _state_digest_dict(state: dict[str, Tensor]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _update(opt: torch.optim.Optimizer, pending: list[tuple[Tensor, Tensor, float]], base_value: float | None,
            entropy: float, decay: float) -> float:
    rewards = [r for _, _, r in pending]
    base_value = float(np.mean(rewards)) if base_value is None else base_value
    loss = torch.zeros(())
    for logp, ent, r in pending:
        loss = loss - (r - base_value) * logp - entropy * ent
    opt.zero_grad()
    (loss / len(pending)).backward()
    opt.step()
    return decay * base_value + (1 - decay) * float(np.mean(rewards))


def _bar(total: int, strategy: str, progress: bool | None):
    from ..train import show_progress

    if not show_progress(progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"search ({strategy})", unit="episode", leave=False)


SHORTLIST_BY = ("reward", "front")


def shortlist(results: Sequence[SearchResult], k: int = 3, by: str = "reward") -> list[Arch]:
    """``k`` distinct architectures the searches in ``results`` trained (not those rejected untrained on their
    size): by="reward", the highest search rewards (best first); by="front", members of the Pareto front of
    counted params against proxy accuracy, spread evenly over log params (most accurate first), a menu of
    sizes for the trained second stage to choose from by the user's weights."""
    check_int("k", k, min_value=1)
    check_choice("by", by, SHORTLIST_BY)
    rows = pd.concat([check_type("results[i]", r, SearchResult, "a SearchResult").episodes for r in results], ignore_index=True)
    if "trained" in rows:
        rows = rows[rows["trained"].fillna(True).astype(bool)]
    if by == "reward":
        rows = rows.sort_values(["reward", "episode"], ascending=[False, True]).drop_duplicates("arch").head(k)
    else:
        front = pareto_front(rows.drop_duplicates("arch"), "params", "score").sort_values("params", ascending=False)
        rows = front.iloc[_spread(np.log(front["params"].to_numpy(dtype=float)), k)]
    return [tuple(int(c) for c in ch) for ch in rows["channels"]]


def _spread(values: np.ndarray, k: int) -> list[int]:
    """Indices of up to ``k`` of the sorted ``values``, the nearest to k evenly spaced points (ends included)."""
    if len(values) <= k:
        return list(range(len(values)))
    picked: list[int] = []
    for target in np.linspace(values[0], values[-1], k):
        order = np.argsort(np.abs(values - target), kind="stable")
        picked.append(next(int(i) for i in order if int(i) not in picked))
    return sorted(picked)


def select_trained(deployment: Deployment, archs: Sequence[Sequence[int]], weights: RewardWeights = SIZE_ONLY,
                   *, epochs: int | None = None) -> tuple[pd.DataFrame, dict[str, nn.Module]]:
    """The second stage of a search: train each of ``archs`` for the deployment's full budget
    (:meth:`Deployment.finalize`), score it on the validation split and recompute its reward with that trained
    accuracy; returns one row per arch (best reward first) and the trained models by arch key."""
    check_type("deployment", deployment, Deployment, "a Deployment")
    check_type("weights", weights, RewardWeights, "a RewardWeights")
    if isinstance(archs, (str, bytes)) or not isinstance(archs, Sequence) or not archs:
        raise ValueError("archs must be a non-empty list of architectures (kept channels per layer)")
    rows, models = [], {}
    for arch in archs:
        record = deployment.evaluate(arch)
        model = deployment.finalize(arch, epochs=epochs)
        trained = {**record, "score": deployment.full_ctx.score(model, "val")}
        parts = reward(trained, weights)
        rows.append({"arch": record["arch"], "channels": record["channels"], "proxy_score": record["score"],
                     "trained_score": trained["score"], "params": record["params"], "latency_ratio": record["latency_ratio"],
                     "proxy_reward": reward(record, weights)["reward"], **{k: v for k, v in parts.items() if k != "accuracy_ratio"},
                     "accuracy_ratio": parts["accuracy_ratio"]})
        models[record["arch"]] = model
    table = pd.DataFrame(rows).sort_values("reward", ascending=False, kind="stable").reset_index(drop=True)
    return table, models


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The rows of ``points`` not dominated in (lower ``x``, higher ``y``), sorted by ``x``."""
    pts = points.sort_values([x, y], ascending=[True, False])
    keep, best = [], -math.inf
    for idx, value in zip(pts.index, pts[y]):
        if value > best:
            keep.append(idx)
            best = value
    return pts.loc[keep]


def data_driven_compress(
    model: nn.Module,
    ctx: Context,
    *,
    weights: RewardWeights = SIZE_ONLY,
    episodes: int = 24,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    store: SearchStore | None = None,
    strategy: str = "rl",
    **deployment: Any,
) -> nn.Module:
    """The method interface: search ``model`` for ``ctx`` (optionally a class subset) under ``weights``
    for ``episodes`` candidates, then distil the best for ``ctx``'s budget. ``model`` is not changed; extra
    keywords go to :class:`Deployment` (``train_images``, ``epochs``, ``runtime``...)."""
    dep = Deployment(model, ctx, classes=classes, store=store, **deployment)
    result = search(dep, weights=weights, strategy=strategy, episodes=episodes, seed=seed, progress=False)
    best = result.best
    out = dep.finalize(best["channels"])
    return mark(out, "data_driven_search", ("dense_shapes", "architecture"), arch=list(best["channels"]),
                reward=float(best["reward"]), strategy=strategy, episodes=len(result.episodes), classes=dep.classes,
                weights=weights.to_dict())
