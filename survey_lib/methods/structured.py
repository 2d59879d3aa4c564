"""Structured pruning that physically shrinks the network: filter pruning (L1) and network slimming.

The Torch-Pruning way, in three small pieces:

1. :func:`channel_groups` traces the model with ``torch.fx`` and builds a dependency graph of *channel
   groups*. A group is one channel space: the conv/linear layers that **produce** it (weight dim 0), the
   layers sliced along it (**members**: BatchNorm, depthwise convs, ``Unflatten``) and the layers that
   **consume** it (weight dim 1). Channels added together (``a + b``) are one space, so a residual stage
   (stem conv, every block's ``conv2``/``bn2`` and the 1x1 projection shortcut) is ONE coupled group: its
   channels are pruned together in every layer at once, which keeps the additions consistent. A block's
   internal ``conv1`` channels form their own, uncoupled group. A depthwise conv (groups == channels) has
   no channel space of its own, so it is a member of the group that feeds it and is pruned together with
   its producing layer. Groups that reach the model output (class logits, the detection and segmentation
   maps) or come from the network input are *fixed*.
2. An importance per group: :func:`l1_importance` (sum of |w| over each producing filter, Li et al. 2017)
   or :func:`bn_scale_importance` (mean |gamma| of the group's BatchNorms, Liu et al. 2017).
3. :func:`prune_channels` takes a plan ``{group_id: kept_indices}`` and rebuilds every affected
   ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` / ``nn.Unflatten`` with sliced weights. The result is a
   smaller dense model of the same class; its kept channels compute exactly what they computed before
   (up to the contributions of removed input channels).

The methods :func:`l1_filter_prune`, :func:`slimming_train` and :func:`slim_prune` compose these with the
shared fine-tuning budget (``ctx.finetune``). Residual groups are pruned too by default; pass
``prune_residual=False`` to prune only block-internal channels (the scheme of Li et al. for ResNets).

Not supported (a ``ValueError`` names the layer): grouped convs other than depthwise, modules and
functions that mix or reshape channels in other ways (``cat``, ``view``, custom leaf modules), a module
called twice. A ``Flatten`` of a spatial map (as at the input of the MLP) freezes the channels it mixes.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .._validate import (
    check_bool, check_finite, check_float, check_fraction, check_int, check_mapping, check_model, check_tensor, check_type,
)
from ..train import CosineLR, ExtraLoss
from .base import Context, check_ctx, mark, replace_module
from .pruning import check_finetune_ctx

__all__ = [
    "Group", "channel_groups", "channel_indices", "l1_importance", "bn_scale_importance", "prune_channels", "keep_plan",
    "l1_filter_prune", "bn_l1_penalty", "slimming_train", "slim_prune", "channel_counts",
    "structured_plan_summary", "check_ratio",
]

# Modules that act on every channel separately: channel spaces pass through them unchanged.
CHANNELWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardtanh,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity, nn.Dropout,
    nn.Dropout2d, nn.Upsample,
)
CHANNELWISE_FUNCTIONS = (F.relu, torch.relu, torch.sigmoid, torch.tanh, F.relu6, F.silu, F.gelu)
CHANNELWISE_METHODS = ("relu", "sigmoid", "tanh", "contiguous")
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


@dataclass
class Group:
    """One channel space of the network and every layer that must be sliced when its channels are pruned.

    ``producers``: conv/linear layers whose output channels (weight dim 0) are these channels; more than
    one means the space is coupled by additions (a residual stream). ``members``: layers sliced along the
    channel dim (BatchNorm, depthwise conv, Unflatten). ``consumers``: conv/linear layers whose input
    channels (weight dim 1) are these channels. ``fixed`` says why the group cannot be pruned (None: it can).
    """

    id: int
    size: int
    producers: tuple[str, ...]
    members: tuple[str, ...]
    consumers: tuple[str, ...]
    fixed: str | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    @property
    def prunable(self) -> bool:
        """True if channels of this group may be removed."""
        return self.fixed is None

    @property
    def coupled(self) -> bool:
        """True if several layers produce these channels (they are added together)."""
        return len(self.producers) > 1

    def batchnorms(self) -> list[nn.BatchNorm2d | nn.BatchNorm1d]:
        """The affine BatchNorm members (the ones with a scale gamma)."""
        return [m for n in self.members if isinstance(m := self.modules[n], nn.modules.batchnorm._BatchNorm)
                and m.affine]


# ----------------------------------------------------------------------------------------------------------
# Dependency graph
# ----------------------------------------------------------------------------------------------------------
class _Space:
    """A channel space under construction (union-find node)."""

    def __init__(self, idx: int, size: int | None, fixed: str | None = None) -> None:
        self.idx = idx
        self.parent = idx
        self.size = size
        self.producers: list[str] = []
        self.members: list[str] = []
        self.consumers: list[str] = []
        self.fixed = fixed


class _Graph:
    def __init__(self) -> None:
        self.spaces: list[_Space] = []

    def new(self, size: int | None, fixed: str | None = None) -> int:
        self.spaces.append(_Space(len(self.spaces), size, fixed))
        return len(self.spaces) - 1

    def find(self, i: int) -> int:
        while self.spaces[i].parent != i:
            self.spaces[i].parent = self.spaces[self.spaces[i].parent].parent
            i = self.spaces[i].parent
        return i

    def get(self, i: int) -> _Space:
        return self.spaces[self.find(i)]

    def fix(self, i: int, reason: str) -> None:
        s = self.get(i)
        s.fixed = s.fixed or reason

    def check_size(self, i: int, size: int, name: str) -> None:
        s = self.get(i)
        if s.size is None:
            s.size = size
        elif s.size != size:
            raise ValueError(f"cannot prune {name}: it expects {size} channels but receives {s.size}")

    def union(self, a: int, b: int, name: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        keep, drop = (ra, rb) if ra < rb else (rb, ra)
        sk, sd = self.spaces[keep], self.spaces[drop]
        if sk.size is not None and sd.size is not None and sk.size != sd.size:
            raise ValueError(f"cannot prune {name}: it adds tensors with {sk.size} and {sd.size} channels")
        sk.size = sk.size if sk.size is not None else sd.size
        sk.producers += sd.producers
        sk.members += sd.members
        sk.consumers += sd.consumers
        sk.fixed = sk.fixed or sd.fixed
        sd.parent = keep
        return keep


@dataclass
class _Feat:
    """What fx node values carry during the walk: their channel space and layout."""

    space: int
    layout: str  # "map" (B,C,H,W), "map1" (B,C,1,1), "flat" (B,C)


def _is_one(size: Any) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - report what failed, with the cause
        raise ValueError(f"cannot prune {type(model).__name__}: torch.fx could not trace it ({err})") from err


def _walk(model: nn.Module) -> tuple[_Graph, dict[str, nn.Module]]:
    """Trace ``model`` and assign every tensor a channel space; return the graph and the modules by name."""
    gm = _trace(model)
    modules = dict(model.named_modules())
    graph = _Graph()
    feats: dict[fx.Node, _Feat] = {}
    called: set[str] = set()

    def feat(arg: Any, where: str) -> _Feat:
        if not isinstance(arg, fx.Node) or arg not in feats:
            raise ValueError(f"cannot prune {where}: its input is not a traced tensor")
        return feats[arg]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            feats[node] = _Feat(graph.new(None, fixed="network input"), "map")
        elif node.op == "call_module":
            name = str(node.target)
            if name in called:
                raise ValueError(f"cannot prune {name}: the module is called more than once")
            called.add(name)
            feats[node] = _module_step(graph, name, modules[name], feat(node.args[0], name))
        elif node.op in ("call_function", "call_method"):
            feats[node] = _function_step(graph, node, feat)
        elif node.op == "output":
            for leaf in torch.utils._pytree.tree_leaves(node.args):
                if isinstance(leaf, fx.Node) and leaf in feats:
                    graph.fix(feats[leaf].space, "reaches the model output")
        else:  # get_attr: a parameter used directly in forward
            raise ValueError(f"cannot prune {node.target}: direct use of a parameter or buffer in forward")
    return graph, modules


def _module_step(graph: _Graph, name: str, m: nn.Module, x: _Feat) -> _Feat:
    """Channel space of ``m``'s output given its input ``x``; records producers/members/consumers."""
    if isinstance(m, nn.Conv2d):
        if m.groups == 1:
            graph.check_size(x.space, m.in_channels, name)
            graph.get(x.space).consumers.append(name)
            out = graph.new(m.out_channels)
            graph.spaces[out].producers.append(name)
            return _Feat(out, "map")
        if m.groups == m.in_channels == m.out_channels:
            graph.check_size(x.space, m.in_channels, name)
            graph.get(x.space).members.append(name)
            return _Feat(x.space, "map")
        raise ValueError(f"cannot prune {name}: grouped conv with groups={m.groups} not supported "
                         f"(only groups=1 or depthwise groups=in_channels=out_channels)")
    if isinstance(m, nn.Linear):
        if x.layout != "flat":
            raise ValueError(f"cannot prune {name}: Linear applied to a feature map, not to flat features")
        graph.check_size(x.space, m.in_features, name)
        graph.get(x.space).consumers.append(name)
        out = graph.new(m.out_features)
        graph.spaces[out].producers.append(name)
        return _Feat(out, "flat")
    if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        graph.check_size(x.space, m.num_features, name)
        graph.get(x.space).members.append(name)
        return x
    if isinstance(m, nn.AdaptiveAvgPool2d) or isinstance(m, nn.AdaptiveMaxPool2d):
        return _Feat(x.space, "map1" if _is_one(m.output_size) else "map")
    if isinstance(m, CHANNELWISE):
        return x
    if isinstance(m, nn.Flatten):
        return _flatten(graph, name, x, m.start_dim, m.end_dim)
    if isinstance(m, nn.Unflatten):
        size = tuple(m.unflattened_size)
        if m.dim == 1 and x.layout == "flat" and len(size) == 3 and size[1:] == (1, 1):
            graph.check_size(x.space, size[0], name)
            graph.get(x.space).members.append(name)
            return _Feat(x.space, "map1")
        graph.fix(x.space, f"reshaped by {name}")
        return _Feat(graph.new(None, fixed=f"reshaped by {name}"), "map")
    raise ValueError(f"cannot prune {name}: module type {type(m).__name__} is not supported by channel pruning")


def _flatten(graph: _Graph, name: str, x: _Feat, start: int, end: int) -> _Feat:
    if start != 1 or end != -1:
        raise ValueError(f"cannot prune {name}: flatten(start_dim={start}, end_dim={end}) not supported")
    if x.layout in ("map1", "flat"):
        return _Feat(x.space, "flat")
    # channels and positions are mixed: keep these channels as they are
    graph.fix(x.space, f"flattened with spatial positions by {name}")
    return _Feat(graph.new(None, fixed=f"flattened with spatial positions by {name}"), "flat")


def _function_step(graph: _Graph, node: fx.Node, feat) -> _Feat:
    target, where = node.target, f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    is_add = (node.op == "call_function" and target in ADD_FUNCTIONS) or (node.op == "call_method" and target in ("add", "add_"))
    if is_add and tensors and not node.kwargs.get("alpha"):
        feats = [feat(a, where) for a in tensors]
        space = feats[0].space
        for f in feats[1:]:
            space = graph.union(space, f.space, where)
        layouts = {f.layout for f in feats}
        return _Feat(space, layouts.pop() if len(layouts) == 1 else "map")
    if (node.op == "call_function" and target in CHANNELWISE_FUNCTIONS) or (
            node.op == "call_method" and target in CHANNELWISE_METHODS):
        return feat(node.args[0], where)
    if node.op == "call_function" and target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return _flatten(graph, where, feat(node.args[0], where), start, end)
    raise ValueError(f"cannot prune through {where}: this operation is not supported by channel pruning")


def channel_groups(model: nn.Module, *, include_fixed: bool = False) -> list[Group]:
    """The channel groups of ``model`` (prunable ones only unless ``include_fixed``); ids are stable.

    Raises ValueError naming the module for a layer pattern that channel pruning cannot handle.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_bool("include_fixed", include_fixed)
    graph, modules = _walk(model)
    roots = [s for s in graph.spaces if graph.find(s.idx) == s.idx]
    groups = []
    for gid, s in enumerate(roots):
        fixed = s.fixed
        if fixed is None and not s.producers:
            fixed = "no layer produces these channels"
        names = s.producers + s.members + s.consumers
        groups.append(Group(gid, int(s.size or 0), tuple(s.producers), tuple(s.members), tuple(s.consumers),
                            fixed, {n: modules[n] for n in names}))
    return groups if include_fixed else [g for g in groups if g.prunable]


# ----------------------------------------------------------------------------------------------------------
# Importance
# ----------------------------------------------------------------------------------------------------------
def l1_importance(group: Group) -> Tensor:
    """Per channel, the sum over the producing layers of the L1 norm of that output filter (Li et al. 2017)."""
    check_type("group", group, Group, "a Group from channel_groups")
    score = torch.zeros(group.size, dtype=torch.float64)
    for name in group.producers:
        w = group.modules[name].weight.detach()
        score += w.abs().flatten(1).sum(1).double().cpu()
    return score


def bn_scale_importance(group: Group) -> Tensor:
    """Per channel, the mean |gamma| over the group's BatchNorms (Liu et al. 2017); ValueError without one."""
    check_type("group", group, Group, "a Group from channel_groups")
    bns = group.batchnorms()
    if not bns:
        raise ValueError(f"group {group.id} (produced by {', '.join(group.producers) or 'nothing'}) has no "
                         f"BatchNorm scale; use l1_importance")
    return torch.stack([bn.weight.detach().abs().double().cpu() for bn in bns]).mean(0)


# ----------------------------------------------------------------------------------------------------------
# Surgery
# ----------------------------------------------------------------------------------------------------------
def _index(idx: Tensor, device: torch.device) -> Tensor:
    return idx.to(device=device, dtype=torch.long)


def _filled(new: nn.Module, weight: Tensor, bias: Tensor | None, out_idx: Tensor | None) -> nn.Module:
    """Copy the sliced ``weight`` and the kept entries of ``bias`` into the fresh layer ``new``."""
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            b = bias.detach()
            new.bias.copy_(b if out_idx is None else b[_index(out_idx, b.device)])
    return new


def _sliced_conv(m: nn.Conv2d, out_idx: Tensor | None, in_idx: Tensor | None) -> nn.Conv2d:
    w = m.weight.detach()
    depthwise = m.groups > 1
    if depthwise:  # groups == in == out: one index slices both
        in_idx = out_idx
    if out_idx is not None:
        w = w[_index(out_idx, w.device)]
    if in_idx is not None and not depthwise:
        w = w[:, _index(in_idx, w.device)]
    cout = w.shape[0]
    cin = cout if depthwise else w.shape[1]
    new = nn.Conv2d(cin, cout, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                    groups=cout if depthwise else 1, bias=m.bias is not None, padding_mode=m.padding_mode,
                    device=w.device, dtype=w.dtype)
    return _filled(new, w, m.bias, out_idx)


def _sliced_linear(m: nn.Linear, out_idx: Tensor | None, in_idx: Tensor | None) -> nn.Linear:
    w = m.weight.detach()
    if out_idx is not None:
        w = w[_index(out_idx, w.device)]
    if in_idx is not None:
        w = w[:, _index(in_idx, w.device)]
    new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, device=w.device, dtype=w.dtype)
    return _filled(new, w, m.bias, out_idx)


def _sliced_bn(m: nn.modules.batchnorm._BatchNorm, idx: Tensor) -> nn.Module:
    new = type(m)(len(idx), eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats)
    ref = m.weight if m.affine else m.running_mean
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for attr in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(m, attr)
            if src is not None:
                getattr(new, attr).copy_(src.detach()[_index(idx, src.device)])
        if m.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(m.num_batches_tracked)
    return new


def _rebuilt(m: nn.Module, out_idx: Tensor | None, in_idx: Tensor | None) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        new = _sliced_conv(m, out_idx, in_idx)
    elif isinstance(m, nn.Linear):
        new = _sliced_linear(m, out_idx, in_idx)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        new = _sliced_bn(m, out_idx)
    elif isinstance(m, nn.Unflatten):
        new = nn.Unflatten(m.dim, (len(out_idx),) + tuple(m.unflattened_size)[1:])
    else:  # pragma: no cover - the graph only records the types above
        raise ValueError(f"cannot slice module type {type(m).__name__}")
    for p_old, p_new in zip(m.parameters(), new.parameters()):
        p_new.requires_grad_(p_old.requires_grad)
    return new.train(m.training)


def _check_keep(group: Group, kept: Any) -> Tensor:
    try:
        idx = torch.as_tensor(kept).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"kept indices of group {group.id} must be a sequence or tensor of ints, got "
                        f"{type(kept).__name__}") from err
    if idx.numel() == 0:
        raise ValueError(f"group {group.id} ({', '.join(group.producers)}) must keep at least one channel")
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise TypeError(f"kept indices of group {group.id} must be integers, got {idx.dtype}")
    idx = idx.long()
    if int(idx.min()) < 0 or int(idx.max()) >= group.size:
        raise ValueError(f"kept indices of group {group.id} must lie in [0, {group.size}), got "
                         f"{int(idx.min())}..{int(idx.max())}")
    uniq = torch.unique(idx)  # sorted: kept channels keep their order
    if uniq.numel() != idx.numel():
        raise ValueError(f"kept indices of group {group.id} contain duplicates")
    return uniq


def channel_indices(model: nn.Module, plan: Mapping[int, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per module name, the output channels and the input channels that ``plan`` ({group id: kept channels})
    keeps: producers and members by output, consumers by input; groups kept whole are left out."""
    check_model(model)
    check_mapping("plan", plan, "a {group id: kept channel indices} dict")
    groups = {g.id: g for g in channel_groups(model, include_fixed=True)}
    out_idx: dict[str, Tensor] = {}
    in_idx: dict[str, Tensor] = {}
    for gid, kept in plan.items():
        if gid not in groups:
            raise ValueError(f"plan names group {gid!r}, but the model has groups 0..{len(groups) - 1}")
        group = groups[gid]
        if not group.prunable:
            raise ValueError(f"group {gid} cannot be pruned: {group.fixed}")
        idx = _check_keep(group, kept)
        if idx.numel() == group.size:
            continue
        for name in group.producers + group.members:
            out_idx[name] = idx
        for name in group.consumers:
            in_idx[name] = idx
    return out_idx, in_idx


def prune_channels(model: nn.Module, plan: Mapping[int, Any]) -> nn.Module:
    """A deep copy of ``model`` in which group ``gid`` keeps only the channels ``plan[gid]`` (sorted).

    Producers lose output filters, members (BatchNorm, depthwise conv, Unflatten) are sliced, consumers
    lose input channels. ``model`` is not changed. Group ids are those of :func:`channel_groups`.
    """
    out_idx, in_idx = channel_indices(model, plan)
    result = copy.deepcopy(model)
    modules = dict(result.named_modules())
    for name in sorted(set(out_idx) | set(in_idx)):
        replace_module(result, name, _rebuilt(modules[name], out_idx.get(name), in_idx.get(name)))
    return result


# ----------------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------------
def check_ratio(ratio: Any) -> float:
    """``ratio`` as a float in [0, 1); ValueError naming ``ratio`` otherwise (NaN included)."""
    return check_fraction("ratio", ratio, meaning=" (the fraction of channels removed)")


def _min_keep(size: int, min_channels: int) -> int:
    return max(1, min(size, min_channels))


def _rounded(keep: int, size: int, round_to: int, floor: int) -> int:
    """``keep`` rounded to the nearest multiple of ``round_to`` (half up), at least ``floor``, at most ``size``."""
    if round_to == 1:
        return keep
    rounded = int(math.floor(keep / round_to + 0.5)) * round_to
    if rounded < floor:
        rounded = int(math.ceil(floor / round_to)) * round_to
    return min(size, rounded)


def _top(score: Tensor, keep: int) -> Tensor:
    return torch.sort(torch.argsort(score, descending=True, stable=True)[:keep]).values


def _check_scored(groups: Any, scores: Any) -> list[Group]:
    """The groups that ``scores`` scores; TypeError/ValueError unless each score has one finite value per channel."""
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise TypeError(f"groups must be a sequence of Group (from channel_groups), got {type(groups).__name__}")
    groups = [check_type("groups[i]", g, Group, "a Group from channel_groups") for g in groups]
    check_mapping("scores", scores, "a {group id: per-channel score tensor} dict")
    scored = [g for g in groups if g.id in scores]
    if groups and not scored:
        raise ValueError(f"scores names none of the groups {[g.id for g in groups]}: nothing to plan")
    for g in scored:
        score = check_tensor(f"scores[{g.id}]", scores[g.id], ndim=1, shape=f"({g.size},)")
        if len(score) != g.size:
            raise ValueError(f"scores[{g.id}] has {len(score)} values; group {g.id} has {g.size} channels")
        check_finite(f"scores[{g.id}]", score)
    return scored


def keep_plan(groups: Sequence[Group], scores: Mapping[int, Tensor], ratio: float, *, min_channels: int = 4,
              global_threshold: bool = False, round_to: int = 1) -> dict[int, Tensor]:
    """Kept indices per group: drop the lowest-scoring ``ratio`` of channels, per group or globally.

    Per group, ``round(ratio * size)`` channels go; globally, ``round(ratio * total)`` channels with the lowest
    scores across all groups go. Either way every group keeps at least ``min(size, min_channels)``; the kept
    count is then rounded to the nearest multiple of ``round_to`` (never below that floor, never above the
    size). SIMD kernels work on blocks of channels (8 or 16 fp32 lanes on AVX2/AVX-512, 4 on NEON), so odd
    channel counts can waste a whole block: on one AVX-512 machine, with ONNX Runtime (shapes VGG, 1 thread),
    channels 21/42/83 (2.3x fewer MACs) ran no faster than 32/64/128, while 16/48/80 ran 2x faster.
    Measure it on your host (notebook 02) before relying on ``round_to``.
    """
    ratio = check_ratio(ratio)
    check_int("min_channels", min_channels, min_value=1)
    check_int("round_to", round_to, min_value=1)
    check_bool("global_threshold", global_threshold)
    groups = _check_scored(groups, scores)
    plan: dict[int, Tensor] = {}
    if not global_threshold:
        for g in groups:
            keep = max(_min_keep(g.size, min_channels), g.size - int(round(ratio * g.size)))
            plan[g.id] = _top(scores[g.id], _rounded(keep, g.size, round_to, _min_keep(g.size, min_channels)))
        return plan
    total = sum(g.size for g in groups)
    to_remove = int(round(ratio * total))
    entries = sorted((float(scores[g.id][i]), g.id, i) for g in groups for i in range(g.size))
    kept = {g.id: g.size for g in groups}
    floor = {g.id: _min_keep(g.size, min_channels) for g in groups}
    removed: dict[int, set[int]] = {g.id: set() for g in groups}
    for _, gid, i in entries:
        if to_remove == 0:
            break
        if kept[gid] > floor[gid]:
            removed[gid].add(i)
            kept[gid] -= 1
            to_remove -= 1
    for g in groups:
        if round_to == 1:
            plan[g.id] = torch.tensor([i for i in range(g.size) if i not in removed[g.id]], dtype=torch.long)
        else:  # the best channels, up to the rounded count
            plan[g.id] = _top(scores[g.id], _rounded(kept[g.id], g.size, round_to, floor[g.id]))
    return plan


def _eligible(model: nn.Module, prune_residual: bool, ignore: str | Iterable[str]) -> list[Group]:
    """The prunable groups, less coupled ones (unless ``prune_residual``) and those produced under ``ignore``."""
    check_model(model)
    check_bool("prune_residual", prune_residual)
    ignore = (ignore,) if isinstance(ignore, str) else tuple(ignore) if isinstance(ignore, Iterable) else (ignore,)
    if not all(isinstance(p, str) for p in ignore):
        raise TypeError(f"ignore must be a module-name prefix or a sequence of them, got {ignore!r}")
    names = [n for n, _ in model.named_modules() if n]
    for pre in ignore:
        if not any(n == pre or n.startswith(pre + ".") for n in names):
            raise ValueError(f"ignore={pre!r} matches no module of the model; module names start with: "
                             f"{', '.join(sorted({n.split('.')[0] for n in names}))}")
    groups = channel_groups(model)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no prunable channel group: every channel reaches the output "
                         "or comes from the network input")
    out = []
    for g in groups:
        if g.coupled and not prune_residual:
            continue
        if any(p == pre or p.startswith(pre + ".") for p in g.producers for pre in ignore):
            continue
        out.append(g)
    return out


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every Conv2d and Linear, by module name, for before/after tables."""
    counts = {}
    for name, m in check_model(model).named_modules():
        if isinstance(m, nn.Conv2d):
            counts[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            counts[name] = m.out_features
    return counts


def structured_plan_summary(model: nn.Module, plan: Mapping[int, Any]):
    """A pandas table: one row per prunable group with its producers, size, kept and removed channels."""
    import pandas as pd

    check_mapping("plan", plan, "a {group id: kept channel indices} dict")
    rows = []
    for g in channel_groups(model):
        kept = len(torch.as_tensor(plan[g.id]).flatten()) if g.id in plan else g.size
        rows.append({"group": g.id, "producers": ", ".join(g.producers), "coupled": g.coupled, "size": g.size,
                     "kept": kept, "removed": g.size - kept, "removed_fraction": 1 - kept / g.size if g.size else 0.0})
    return pd.DataFrame(rows)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _finish(pruned: nn.Module, model: nn.Module, ctx: Context | None, finetune: bool, method: str,
            plan: dict[int, Tensor], groups: list[Group], **info: Any) -> nn.Module:
    epochs = 0
    check_finetune_ctx(method, ctx, finetune)
    if finetune:
        epochs = ctx.budget
        if epochs > 0:  # retrain with the learning rate annealed to 0 (cosine), as after any pruning step
            ctx.finetune(pruned, callbacks=[CosineLR()])
    pruned.eval()
    sizes = {g.id: g.size for g in groups}
    removed = sum(sizes[gid] - len(kept) for gid, kept in plan.items())
    return mark(pruned, method, "dense_shapes", **info, finetune_epochs=epochs,
                channels_removed=removed, channels_prunable=sum(sizes.values()),
                params_before=_params(model), params_after=_params(pruned),
                channels_before=channel_counts(model), channels_after=channel_counts(pruned))


# ----------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------
def l1_filter_prune(
    model: nn.Module,
    ctx: Context | None,
    *,
    ratio: float,
    finetune: bool = True,
    min_channels: int = 4,
    prune_residual: bool = True,
    ignore: Iterable[str] = (),
    round_to: int = 1,
) -> nn.Module:
    """Filter pruning by L1 norm (Li et al. 2017): in every prunable group remove the ``ratio`` of channels
    whose producing filters have the smallest sum of |w|, then fine-tune for ``ctx.budget`` epochs.

    ``prune_residual=False`` leaves channels coupled by additions (residual streams) intact; ``ignore`` lists
    module-name prefixes whose output channels stay (e.g. ``("head",)``); ``round_to`` rounds every kept
    channel count to a multiple (e.g. 16, a whole SIMD block on AVX-512). Returns a smaller dense model.
    """
    ratio = check_ratio(ratio)
    check_int("min_channels", min_channels, min_value=1)
    check_finetune_ctx("l1_filter_prune", ctx, finetune)
    groups = _eligible(model, prune_residual, ignore)
    plan = keep_plan(groups, {g.id: l1_importance(g) for g in groups}, ratio, min_channels=min_channels,
                     round_to=round_to)
    pruned = prune_channels(model, plan)
    return _finish(pruned, model, ctx, finetune, "l1_filter_prune", plan, groups, ratio=ratio,
                   min_channels=min_channels, prune_residual=prune_residual, round_to=round_to, importance="l1")


def bn_l1_penalty(strength: float) -> ExtraLoss:
    """An ``extra_loss`` for ``fit``: ``strength`` x sum of |gamma| over all BatchNorm layers (Liu et al. 2017)."""
    strength = check_float("strength", strength, min_value=0.0)
    if math.isnan(strength) or math.isinf(strength):
        raise ValueError(f"strength={strength!r} must be finite")

    def penalty(model: nn.Module, x: Tensor, output: Tensor, target: Tensor) -> Tensor:
        gammas = [m.weight.abs().sum() for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
        if not gammas:
            return output.new_zeros(())
        return strength * torch.stack(gammas).sum()

    penalty.strength = strength  # type: ignore[attr-defined]
    return penalty


def slimming_train(model: nn.Module, ctx: Context, *, strength: float = 1e-4, epochs: int | None = None) -> nn.Module:
    """Sparsity-inducing training (Liu et al. 2017): a copy of ``model`` trained with the L1 penalty on the
    BatchNorm scales for ``epochs`` (default ``ctx.budget``, cosine-annealed learning rate), so that
    unimportant channels get |gamma| near 0.
    """
    check_model(model)
    check_ctx(ctx)
    check_float("strength", strength, min_value=0.0)
    epochs = ctx.budget if epochs is None else check_int("epochs", epochs, min_value=0)
    trained = copy.deepcopy(model)
    if epochs > 0:
        ctx.finetune(trained, epochs=epochs, extra_loss=bn_l1_penalty(strength), callbacks=[CosineLR()])
    trained.eval()
    return mark(trained, "slimming_train", "training", strength=float(strength), epochs=epochs)


def slim_prune(
    model: nn.Module,
    ctx: Context | None,
    *,
    ratio: float,
    global_threshold: bool = True,
    finetune: bool = True,
    min_channels: int = 4,
    prune_residual: bool = True,
    ignore: Iterable[str] = (),
    round_to: int = 1,
) -> nn.Module:
    """Network slimming's pruning step (Liu et al. 2017): remove the ``ratio`` of channels with the smallest
    BatchNorm |gamma|, with one threshold over the whole network (``global_threshold``) or per group, keeping
    at least ``min_channels`` per group; then fine-tune for ``ctx.budget`` epochs.

    Run :func:`slimming_train` first for the sparsity the method relies on. Groups without a BatchNorm
    (e.g. MLP layers) are left intact. ``prune_residual``, ``ignore``, ``round_to``: as in l1_filter_prune.
    """
    ratio = check_ratio(ratio)
    check_int("min_channels", min_channels, min_value=1)
    check_finetune_ctx("slim_prune", ctx, finetune)
    groups = [g for g in _eligible(model, prune_residual, ignore) if g.batchnorms()]
    if not groups:
        raise ValueError("slim_prune needs BatchNorm layers after the prunable layers; this model has none "
                         "(use l1_filter_prune)")
    scores = {g.id: bn_scale_importance(g) for g in groups}
    plan = keep_plan(groups, scores, ratio, min_channels=min_channels, global_threshold=global_threshold,
                     round_to=round_to)
    pruned = prune_channels(model, plan)
    return _finish(pruned, model, ctx, finetune, "slim_prune", plan, groups, ratio=ratio,
                   global_threshold=global_threshold, min_channels=min_channels, prune_residual=prune_residual,
                   round_to=round_to, importance="bn_scale")
