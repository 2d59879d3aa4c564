"""The method registry: every benchmarked method of every family, called one way at an operating point.

Each entry names its family, what it changes (the ``survey_lib.methods.CHANGES`` vocabulary), what its
operating point means and which points apply, which tasks and architectures it supports, and how to apply
it: ``method.apply(model, ctx, point)`` returns a new model, the input untouched. Most points are a
compression target ``x`` (2, 4, 8, 16, 32 ...) on the figure the method shrinks; the entry's ``point``
text says which figure, so that a sweep never compares a stored-bytes target with a MAC target unlabelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .._validate import check_choice, check_float
from ..data import TASKS
from ..models import ARCHS
from ..methods import Context

FAMILIES = ("reference", "pruning_sharing", "quantization", "low_rank", "compact_filters", "distillation_dynamic", "data_driven")
FAMILY_TITLES = {
    "reference": "the uncompressed baseline every method starts from",
    "pruning_sharing": "parameter pruning and sharing",
    "quantization": "quantization",
    "low_rank": "low-rank factorization",
    "compact_filters": "transferred / compact convolutional filters",
    "distillation_dynamic": "knowledge distillation and dynamic computation",
    "data_driven": "data-driven compression (search)",
}
CONV_ARCHS = ("vgg", "resnet", "mobilenet")

Apply = Callable[[nn.Module, Context, float | None], nn.Module]


@dataclass(frozen=True)
class Method:
    """One benchmarked method: its family, what it changes, its operating point and how to apply it."""

    name: str
    family: str
    changes: tuple[str, ...]
    point: str                                   # what an operating point means (None: the method has one setting)
    points: tuple[float, ...]                    # the default sweep (empty: one setting, point None)
    valid: tuple[float, float] | None            # the closed range of points that apply
    apply_fn: Apply = field(repr=False)
    tasks: tuple[str, ...] = TASKS
    archs: tuple[str, ...] = ARCHS
    trains: bool = True                          # whether it fine-tunes (for the spec's fine-tuning budget)
    description: str = ""
    measures_latency: bool = False               # times candidates while it runs: never beside other work
    target_check: Callable[[float, dict[str, Any]], str | None] | None = field(default=None, repr=False)

    def check_point(self, point: Any) -> float | None:
        """``point`` as a float if it applies to this method, else a ValueError naming the valid range."""
        if self.valid is None:
            if point is not None:
                raise ValueError(f"method {self.name!r} has a single setting; its operating point must be empty, got {point!r}")
            return None
        lo, hi = self.valid
        try:
            return check_float(f"operating point of {self.name!r} ({self.point})", point, min_value=lo, max_value=hi)
        except TypeError as err:
            raise ValueError(str(err)) from err

    def check_target(self, point: float | None, task: str, dataset: str, arch: str, profile: str) -> str | None:
        """None if ``point`` can be built on that target's baseline (its config, nothing trained), else why not."""
        if self.target_check is None or point is None or self.supports(task, arch) is not None:
            return None
        from ..baselines import baseline_config

        return self.target_check(point, baseline_config(task, dataset, profile=profile, arch=arch))

    def supports(self, task: str, arch: str) -> str | None:
        """None if the method applies to ``task`` on ``arch``, else the reason it does not."""
        if task not in self.tasks:
            return f"method {self.name!r} supports tasks {list(self.tasks)}, not {task!r}"
        if arch not in self.archs:
            return f"method {self.name!r} supports architectures {list(self.archs)}, not {arch!r}"
        return None

    def apply(self, model: nn.Module, ctx: Context, point: Any = None) -> nn.Module:
        """A new model: this method applied to ``model`` on ``ctx`` at ``point`` (the input is not changed)."""
        reason = self.supports(ctx.task.name, arch_of(model))
        if reason is not None:
            raise ValueError(reason)
        return self.apply_fn(model, ctx, self.check_point(point))


def arch_of(model: Any) -> str:
    """The architecture a survey_lib model was built as (``model.config["arch"]``)."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or config.get("arch") not in ARCHS:
        raise TypeError(f"model must be a survey_lib model (from baseline() or build_model(), with config['arch'] in "
                        f"{list(ARCHS)}), got {type(model).__name__}")
    return config["arch"]


# ----------------------------------------------------------------------------------------------------------
# The operating point -> each method's own parameter
# ----------------------------------------------------------------------------------------------------------
def sparsity_for(x: float) -> float:
    """The sparsity that keeps 1/x of the prunable weights."""
    return 1.0 - 1.0 / x


def channel_ratio_for(x: float) -> float:
    """The fraction of channels to remove so that a conv's weights shrink about x-fold (both sides shrink)."""
    return 1.0 - 1.0 / math.sqrt(x)


def bits_for(x: float) -> int:
    """Weight bits that store fp32 weights x-fold smaller (indices or codes, codebooks aside)."""
    return max(1, int(round(32 / x)))


def _reference(model: nn.Module, ctx: Context, x: float | None) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def _magnitude(model: nn.Module, ctx: Context, x: float | None) -> nn.Module:
    from ..methods.pruning import magnitude_prune

    return magnitude_prune(model, ctx, sparsity=sparsity_for(x))


def _filters(model: nn.Module, ctx: Context, x: float | None) -> nn.Module:
    from ..methods.structured import l1_filter_prune

    return l1_filter_prune(model, ctx, ratio=channel_ratio_for(x))


def _kmeans(model: nn.Module, ctx: Context, x: float | None) -> nn.Module:
    from ..methods.sharing import kmeans_share

    return kmeans_share(model, ctx, bits=bits_for(x))


def _ptq(model: nn.Module, ctx: Context, x: float | None) -> nn.Module:
    from ..methods.quantization import ptq

    return ptq(model, ctx, bits=bits_for(x), act_bits=8)


def _binary(model: nn.Module, ctx: Context, x: float | None) -> nn.Module:
    from ..methods.quantization import qat

    return qat(model, ctx, quantizer="binary")


def _tucker(model: nn.Module, ctx: Context, x: float | None) -> nn.Module:
    from ..methods.lowrank import decompose

    return decompose(model, ctx, scheme="tucker2", target_param_reduction=x)


def _depthwise(model: nn.Module, ctx: Context, x: float | None) -> nn.Module:
    from ..methods.compact import replace_blocks

    return replace_blocks(model, ctx, "depthwise_separable")


def _penni(model: nn.Module, ctx: Context, x: float | None) -> nn.Module:
    from ..methods.penni import penni

    return penni(model, ctx, sparsity=sparsity_for(x), threshold_std=None)


def _kd(model: nn.Module, ctx: Context, x: float | None) -> nn.Module:
    import torch

    from ..methods.distillation import distill
    from ..models import build_model

    cfg = model.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        student = build_model(cfg["arch"], ctx.task, in_channels=cfg["in_channels"], width=cfg["width"] / math.sqrt(x),
                              depth=cfg["depth"], image_size=cfg["image_size"])
    return distill(student, ctx, teacher=model)


def _student_width_fits(x: float, config: dict[str, Any]) -> str | None:
    from ..models import min_width

    width, lo = config["width"] / math.sqrt(x), min_width(config["arch"])
    return None if width >= lo else (f"the student's width {config['width']:g}/sqrt({x:g}) = {width:.3f} is below "
                                     f"{config['arch']}'s smallest width {lo:.3f}; the largest x here is "
                                     f"{(config['width'] / lo) ** 2:.1f}")


def _search(model: nn.Module, ctx: Context, x: float | None) -> nn.Module:
    from ..methods.search import RewardWeights, data_driven_compress

    out = data_driven_compress(model, ctx, weights=RewardWeights(memory=1.0, min_compression=x), episodes=8,
                               seed=ctx.seed, train_images=512)
    ratio = sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in out.parameters())
    if ratio < x:
        raise ValueError(f"rl_search found no candidate {x:g}x smaller in 8 episodes (best {ratio:.1f}x); "
                         "lower the operating point")
    return out


X_POINTS = (2.0, 4.0, 8.0, 16.0, 32.0)
REFERENCE = "baseline"
_REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method(REFERENCE, "reference", (), "", (), None, _reference, trains=False,
           description="the shared baseline checkpoint, unchanged: every sweep runs it on every target and seed"),
    Method("magnitude_prune", "pruning_sharing", ("mask",), "x fewer nonzero prunable weights (sparsity 1 - 1/x)",
           X_POINTS, (1.0, 1000.0), _magnitude, description="global magnitude pruning, then fine-tuning"),
    Method("l1_filter_prune", "pruning_sharing", ("dense_shapes",), "x fewer conv weights (channels removed: 1 - 1/sqrt(x))",
           (2.0, 4.0, 8.0), (1.0, 64.0), _filters, archs=CONV_ARCHS + ("mlp",),
           description="L1-norm filter pruning (Li et al. 2017), real smaller layers, then fine-tuning"),
    Method("kmeans_share", "pruning_sharing", ("low_bit_storage",), "x smaller weight storage (codebook bits = 32/x)",
           (4.0, 8.0), (2.0, 32.0), _kmeans, description="Deep Compression k-means weight sharing, then fine-tuning"),
    Method("ptq", "quantization", ("low_bit_storage",), "x smaller weight storage (weight bits = 32/x; 8-bit activations)",
           (4.0, 8.0), (2.0, 16.0), _ptq, trains=False, description="post-training uniform quantization (simulated)"),
    Method("binary_qat", "quantization", ("low_bit_storage",), "", (), None, _binary,
           description="binary weights (sign x per-channel scale), quantization-aware training"),
    Method("tucker2", "low_rank", ("dense_shapes",), "x fewer params in the factorized layers' total (target_param_reduction)",
           (2.0, 4.0, 8.0), (1.0, 64.0), _tucker, archs=CONV_ARCHS,
           description="Tucker-2 factorization of the convs, then fine-tuning"),
    Method("depthwise_separable", "compact_filters", ("architecture",), "", (), None, _depthwise, archs=CONV_ARCHS,
           description="3x3 convs replaced by depthwise-separable blocks, trained"),
    Method("penni", "compact_filters", ("dense_shapes",), "x fewer basis coefficients (coefficient sparsity 1 - 1/x)",
           (2.0, 4.0), (1.0, 100.0), _penni, archs=CONV_ARCHS,
           description="PENNI: kernels shared through a few basis kernels, sparse coefficients, then shrunk"),
    Method("kd_thin_student", "distillation_dynamic", ("architecture", "training"),
           "x fewer params in the student (width / sqrt(x))", (4.0, 16.0), (1.0, 64.0), _kd,
           target_check=_student_width_fits, description="Hinton KD into a thinner student of the same architecture"),
    Method("rl_search", "data_driven", ("dense_shapes", "architecture"), "size target x (params_ref / params >= x)",
           (4.0, 8.0), (1.0, 256.0), _search, archs=("vgg",), measures_latency=True,
           description="REINFORCE over layer removal and keep-ratios, candidates trained by KD"),
)}


def methods(family: str | None = None) -> list[Method]:
    """Every registered method (of ``family``, if given), in registry order."""
    if family is not None:
        check_choice("family", family, FAMILIES)
    return [m for m in _REGISTRY.values() if family is None or m.family == family]


def get_method(name: Any) -> Method:
    """The registered method ``name`` (ValueError naming the registered ones otherwise)."""
    return _REGISTRY[check_choice("method", name, tuple(_REGISTRY))]
