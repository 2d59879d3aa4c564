"""PENNI (Li et al., ICML 2020): every k x k kernel of a conv layer as a sparse combination of d shared basis kernels.

The four steps of the paper, each a small function here:

1. :func:`kernel_basis` -- decompose the layer's Cout·Cin kernels (vectors of length k·k) into ``d`` basis
   kernels and per-kernel coefficients, initialised from the kernels' principal components. The mean
   must be part of what the basis reconstructs: the library takes the leading singular vectors of the
   *uncentred* kernels (PCA about the origin), the best ``d``-kernel basis in least squares, so
   ``kernel = sum_j coefficients[j] * basis[j]`` with no offset left out. (The public research code takes the
   principal directions of the *centred* kernels and drops the mean from the reconstruction, which then
   misses the mean kernel in every position; ``include_mean=False`` reproduces that for the lesson.) With
   ``d = k·k`` the basis is complete and every kernel is reproduced exactly.
   :func:`decompose` swaps every eligible conv for a :class:`SharedBasisConv2d` (training form).
2. :func:`train_alternating` -- train with an L1 penalty on the coefficients (:func:`coefficient_l1`),
   alternating which of basis and coefficients learns every ``switch_every`` epochs
   (:class:`AlternateBasisCoefficients`); everything else (BatchNorm, 1x1 convs, the head) trains throughout.
3. :func:`prune_coefficients` -- zero the coefficients below ``threshold_std`` standard deviations of their
   layer's coefficients (the paper: one), or the ``sparsity`` fraction of smallest ones per layer (the
   operating point a sweep sets); :func:`finetune_pruned` retrains with the pruned coefficients held at zero.
   Scattered zeros shrink the nonzero count but not the dense shapes a runtime executes, so
   ``pair_sparsity`` (an addition, not in the paper) also zeros whole (input channel, basis) coefficient
   columns, which the two-stage form then drops: counted MACs fall with it (``pair_l1`` in
   :func:`train_alternating` adds a group penalty on those columns, to empty pairs during training).
4. :func:`shrink` -- remove channels physically and rewire their neighbours. An input channel whose
   coefficients are zero in every layer that reads it is unused, so its producing filter, BatchNorm entry
   and consumer slices go (:mod:`survey_lib.methods.structured` slices every coupled layer). An output
   channel whose coefficients are all zero is removed too when what reaches its readers is exactly zero
   (e.g. a BatchNorm shift that ReLU clips); one that carries a constant is kept, because a constant through
   a zero-padded conv is not constant near the border. Then each layer is built for deployment:

   * ``form="two_stage"``: a basis conv (:class:`BasisConv`: gather the input channel of each kept
     (channel, basis) pair, then a depthwise k x k conv with that pair's basis kernel) followed by a 1x1
     coefficient conv. Pairs whose coefficient is zero for every output channel are dropped.
   * ``form="fused"``: the shrunk layer as one ordinary conv with the rebuilt kernels.

   Both compute what the pruned-but-unshrunk model computes (to float rounding). Which runs faster
   depends on the layer and the runtime: measure both (depthwise convs are memory-bound).

:class:`SharedBasisConv2d` rebuilds the full kernel from basis and coefficients in its forward pass. That
is the *training* form (one dense conv, the cheapest way to train on a CPU) and it runs no faster than the
original layer; only :func:`shrink` gives a smaller, faster network. :func:`penni` composes the steps into
one method. Only ordinary convs (groups 1, a kernel larger than 1x1, zero padding) are decomposed.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_bool, check_choice, check_float, check_fraction, check_int, check_model, check_type
from ..train import Callback, CosineLR, ExtraLoss, History, TrainState
from .base import Context, counted_totals, mark, replace_module
from .pruning import MaskCallback, check_finetune_ctx
from .structured import Group, channel_groups, channel_indices, prune_channels

__all__ = [
    "FORMS", "DEFAULT_D", "kernel_basis", "reconstruct", "basis_error", "SharedBasisConv2d", "BasisConv", "PenniConv",
    "candidate_convs", "decompose", "shared_layers", "coefficient_l1", "AlternateBasisCoefficients", "CoefficientTrace",
    "train_alternating", "coefficient_masks", "prune_coefficients", "finetune_pruned", "coefficient_sparsity",
    "dense_equivalent", "shrink_plan", "shrink", "layer_table", "penni",
]

FORMS = ("two_stage", "fused")
DEFAULT_D = 5              # basis kernels per layer (the paper's setting)
DEFAULT_L1 = 1e-4          # L1 weight on the coefficients (the paper's setting)
DEFAULT_SWITCH = 2         # epochs between basis / coefficient switches (the paper's setting)
DEFAULT_THRESHOLD = 1.0    # prune coefficients below this many standard deviations (the paper's setting)
_NULL = 1e-6               # a direction whose residual norm is below this (relative) adds nothing to the basis


# ----------------------------------------------------------------------------------------------------------
# Step 1: the basis
# ----------------------------------------------------------------------------------------------------------
def _check_d(d: Any, kernel: tuple[int, int], name: str = "layer") -> int:
    check_int("d", d)
    top = kernel[0] * kernel[1]
    if not 1 <= d <= top:
        raise ValueError(f"d={d} is out of range for {name!r} with a {kernel[0]}x{kernel[1]} kernel; accepted: "
                         f"1 <= d <= {top} (k*k basis kernels already reproduce every kernel exactly)")
    return d


def _orthonormal(vectors: Tensor, d: int) -> Tensor:
    """The first ``d`` directions of ``vectors`` (rows, in order) that add something, orthonormalised."""
    basis: list[Tensor] = []
    scale = max(float(vectors.norm(dim=1).max()), 1e-30)
    for v in vectors:
        for b in basis:
            v = v - (v @ b) * b
        if float(v.norm()) > _NULL * scale:
            basis.append(v / v.norm())
        if len(basis) == d:
            break
    return torch.stack(basis)


def kernel_basis(weight: Tensor, d: int = DEFAULT_D, *, include_mean: bool = True) -> tuple[Tensor, Tensor]:
    """(basis (d, kh, kw), coefficients (Cout, Cin, d)) of a conv weight, from the kernels' principal components.

    ``include_mean=True``: the ``d`` leading right singular vectors of the *uncentred* kernels (PCA about the
    origin), so the basis represents the kernels' mean as well as their spread; of all ``d``-kernel bases it
    reconstructs the kernels with the least squared error (Eckart-Young). ``include_mean=False``: the top ``d``
    principal directions of the *centred* kernels with the mean left out of the reconstruction, as the public
    research code does (it cannot reproduce the kernels even with ``d = k*k``)."""
    check_type("weight", weight, Tensor, "a conv weight tensor (Cout, Cin, kh, kw)")
    if weight.dim() != 4:
        raise ValueError(f"weight must be a conv weight (Cout, Cin, kh, kw), got shape {tuple(weight.shape)}")
    check_bool("include_mean", include_mean)
    cout, cin, kh, kw = weight.shape
    _check_d(d, (kh, kw))
    kernels = weight.detach().reshape(cout * cin, kh * kw).double()
    rows = kernels if include_mean else kernels - kernels.mean(0)
    _, _, vt = torch.linalg.svd(rows, full_matrices=False)      # (min(N, k·k), k·k): never N x N
    basis = _orthonormal(torch.cat([vt, torch.eye(kh * kw, dtype=vt.dtype)]), d)   # completed when N < d
    coefficients = rows @ basis.T
    dtype = weight.dtype
    return basis.reshape(d, kh, kw).to(dtype), coefficients.reshape(cout, cin, d).to(dtype)


def reconstruct(basis: Tensor, coefficients: Tensor) -> Tensor:
    """The conv weight (Cout, Cin, kh, kw) that ``coefficients`` (Cout, Cin, d) make of ``basis`` (d, kh, kw)."""
    check_type("basis", basis, Tensor, "a (d, kh, kw) tensor")
    check_type("coefficients", coefficients, Tensor, "a (Cout, Cin, d) tensor")
    if basis.dim() != 3 or coefficients.dim() != 3 or coefficients.shape[2] != basis.shape[0]:
        raise ValueError(f"basis (d, kh, kw) and coefficients (Cout, Cin, d) must share d; got shapes "
                         f"{tuple(basis.shape)} and {tuple(coefficients.shape)}")
    return torch.einsum("oid,dhw->oihw", coefficients, basis)


def basis_error(weight: Tensor, d: int = DEFAULT_D, *, include_mean: bool = True) -> float:
    """Relative Frobenius error of the ``d``-kernel basis reconstruction of ``weight``."""
    basis, coefficients = kernel_basis(weight, d, include_mean=include_mean)
    diff = reconstruct(basis, coefficients) - weight.detach()
    return float(diff.norm() / weight.detach().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------
class SharedBasisConv2d(nn.Module):
    """Training form of a PENNI layer: ``conv2d(x, einsum(coefficients, basis))``; as slow as the dense conv."""

    def __init__(self, basis: Tensor, coefficients: Tensor, bias: Tensor | None, *, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1) -> None:
        super().__init__()
        reconstruct(basis, coefficients)   # checks the shapes
        self.basis = nn.Parameter(basis.detach().clone())
        self.coefficients = nn.Parameter(coefficients.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.stride, self.padding, self.dilation = stride, padding, dilation

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, d: int = DEFAULT_D, *, include_mean: bool = True,
                  name: str = "layer") -> "SharedBasisConv2d":
        """The PCA-initialised PENNI layer of an ordinary ``conv`` (groups 1, zero padding)."""
        _check_conv(conv, name)
        _check_d(d, conv.kernel_size, name)
        basis, coefficients = kernel_basis(conv.weight, d, include_mean=include_mean)
        return cls(basis, coefficients, conv.bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)

    @property
    def d(self) -> int:
        """Number of basis kernels."""
        return self.basis.shape[0]

    def weight(self) -> Tensor:
        """The full conv kernel the basis and coefficients make."""
        return reconstruct(self.basis, self.coefficients)

    def forward(self, x: Tensor) -> Tensor:
        """The conv with the rebuilt kernel."""
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)

    def to_conv(self) -> nn.Conv2d:
        """The equivalent ordinary conv (pruned coefficients give exactly zero kernels)."""
        cout, cin, d = self.coefficients.shape
        conv = nn.Conv2d(cin, cout, tuple(self.basis.shape[1:]), stride=self.stride, padding=self.padding,
                         dilation=self.dilation, bias=self.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(self.weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.to(self.basis.device)

    def extra_repr(self) -> str:
        cout, cin, d = self.coefficients.shape
        return f"{cin}, {cout}, kernel_size={tuple(self.basis.shape[1:])}, d={d}, stride={self.stride}, padding={self.padding}"


class BasisConv(nn.Module):
    """Deployed basis stage: gather the input channel of each kept (channel, basis) pair, then a depthwise
    conv of each gathered channel with that pair's basis kernel. Params: the d basis kernels only."""

    def __init__(self, basis: Tensor, channel_index: Tensor, basis_index: Tensor, *, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1) -> None:
        super().__init__()
        if channel_index.shape != basis_index.shape or channel_index.dim() != 1 or channel_index.numel() == 0:
            raise ValueError("channel_index and basis_index must be equal-length, non-empty 1-D index tensors")
        self.basis = nn.Parameter(basis.detach().clone())
        self.register_buffer("channel_index", channel_index.long().clone())
        self.register_buffer("basis_index", basis_index.long().clone())
        self.stride, self.padding, self.dilation = stride, padding, dilation

    @property
    def pairs(self) -> int:
        """Number of (input channel, basis kernel) pairs = output channels of this stage."""
        return self.channel_index.numel()

    def forward(self, x: Tensor) -> Tensor:
        """Depthwise conv of the gathered channels with their basis kernels."""
        kernels = self.basis.index_select(0, self.basis_index).unsqueeze(1)
        return F.conv2d(x.index_select(1, self.channel_index), kernels, None, self.stride, self.padding,
                        self.dilation, self.pairs)

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, d={self.basis.shape[0]}, kernel_size={tuple(self.basis.shape[1:])}, stride={self.stride}"


class PenniConv(nn.Sequential):
    """A deployed PENNI layer: :class:`BasisConv` then a 1x1 coefficient conv (which carries the bias)."""

    def __init__(self, basis_conv: BasisConv, coefficient_conv: nn.Conv2d, *, original: str = "") -> None:
        super().__init__(basis_conv, coefficient_conv)
        self.original = original


def _check_conv(conv: Any, name: str) -> nn.Conv2d:
    if type(conv) is not nn.Conv2d:
        raise TypeError(f"layer {name!r} must be an nn.Conv2d to share a kernel basis, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"layer {name!r} has groups={conv.groups}; PENNI shares kernels across a whole layer "
                         "(groups=1 only)")
    if conv.kernel_size[0] * conv.kernel_size[1] < 2:
        raise ValueError(f"layer {name!r} has a 1x1 kernel: there is no kernel shape to share")
    if conv.padding_mode != "zeros":
        raise ValueError(f"layer {name!r} has padding_mode={conv.padding_mode!r}; PENNI layers support 'zeros' only")
    return conv


# ----------------------------------------------------------------------------------------------------------
# Step 1 on a model
# ----------------------------------------------------------------------------------------------------------
def candidate_convs(model: nn.Module) -> list[str]:
    """Names of the convs PENNI can decompose: nn.Conv2d with groups 1, a kernel over 1x1 and zero padding."""
    return [n for n, m in check_model(model).named_modules()
            if type(m) is nn.Conv2d and m.groups == 1 and m.kernel_size[0] * m.kernel_size[1] > 1
            and m.padding_mode == "zeros"]


def _check_layers(model: nn.Module, layers: Any) -> list[str]:
    candidates = candidate_convs(model)
    if layers is None:
        return candidates
    if isinstance(layers, str) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be None or a list of conv names, got {type(layers).__name__}")
    modules = dict(model.named_modules())
    names = list(layers)
    for name in names:
        if name not in modules:
            raise ValueError(f"layers names {name!r}, which is not a module of the model; accepted: {', '.join(candidates)}")
        _check_conv(modules[name], name)
    return names


def decompose(model: nn.Module, *, d: int = DEFAULT_D, layers: Iterable[str] | None = None,
              include_mean: bool = True) -> nn.Module:
    """A copy of ``model`` whose convs (``layers``, default all candidates) are PCA-initialised
    :class:`SharedBasisConv2d` layers with ``d`` basis kernels each; same outputs when ``d = k*k``."""
    check_model(model)
    check_bool("include_mean", include_mean)
    names = _check_layers(model, layers)
    if not names:
        raise ValueError("the model has no conv PENNI can decompose (nn.Conv2d, groups=1, kernel > 1x1, zero padding)")
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    for name in names:
        replace_module(out, name, SharedBasisConv2d.from_conv(modules[name], d, include_mean=include_mean, name=name))
    return out


def shared_layers(model: nn.Module) -> dict[str, SharedBasisConv2d]:
    """The :class:`SharedBasisConv2d` layers of ``model``, by name."""
    return {n: m for n, m in check_model(model).named_modules() if isinstance(m, SharedBasisConv2d)}


def _require_shared(model: nn.Module, what: str) -> dict[str, SharedBasisConv2d]:
    layers = shared_layers(model)
    if not layers:
        raise ValueError(f"{what} needs a model with SharedBasisConv2d layers; call penni.decompose(model) first")
    return layers


# ----------------------------------------------------------------------------------------------------------
# Step 2: alternating training with an L1 penalty on the coefficients
# ----------------------------------------------------------------------------------------------------------
def coefficient_l1(strength: float = DEFAULT_L1, *, pair_strength: float = 0.0) -> ExtraLoss:
    """An extra loss ``strength * sum |coefficients|`` over the model's PENNI layers (for ``fit``), plus
    ``pair_strength`` times the summed L2 norms of the (input channel, basis) coefficient columns (a group
    lasso that empties whole pairs for ``pair_sparsity``; not in the paper, 0 = off)."""
    check_float("strength", strength, min_value=0.0)
    check_float("pair_strength", pair_strength, min_value=0.0)

    def penalty(model: nn.Module, x: Tensor, output: Tensor, target: Tensor) -> Tensor:
        terms = [strength * m.coefficients.abs().sum() + pair_strength * m.coefficients.norm(dim=0).sum()
                 for m in model.modules() if isinstance(m, SharedBasisConv2d)]
        return torch.stack(terms).sum() if terms else output.new_zeros(())

    return penalty


class AlternateBasisCoefficients(Callback):
    """Train the coefficients (basis frozen) for ``switch_every`` epochs, then the basis (coefficients frozen),
    and so on; ``phases`` lists which one each epoch trained. Other parameters train throughout."""

    def __init__(self, switch_every: int = DEFAULT_SWITCH) -> None:
        self.switch_every = check_int("switch_every", switch_every, min_value=1)
        self.phases: list[str] = []

    def _set(self, model: nn.Module, epoch: int) -> None:
        phase = "coefficients" if (epoch // self.switch_every) % 2 == 0 else "basis"
        for m in model.modules():
            if isinstance(m, SharedBasisConv2d):
                m.coefficients.requires_grad_(phase == "coefficients")
                m.basis.requires_grad_(phase == "basis")
        self.phases.append(phase)

    def on_train_begin(self, state: TrainState) -> None:
        """Start with the coefficients."""
        self._set(state.model, 0)

    def on_epoch_end(self, state: TrainState) -> None:
        """Switch at the boundary of every ``switch_every`` epochs."""
        if state.epoch + 1 < state.epochs:
            self._set(state.model, state.epoch + 1)

    def on_train_end(self, state: TrainState) -> None:
        """Leave both trainable."""
        for m in state.model.modules():
            if isinstance(m, SharedBasisConv2d):
                m.coefficients.requires_grad_(True)
                m.basis.requires_grad_(True)


class CoefficientTrace(Callback):
    """Per epoch (and at the start): the fraction of coefficients that pruning at ``threshold_std`` standard
    deviations would zero at that moment, and the L1 norm of all coefficients (for plots)."""

    def __init__(self, threshold_std: float = DEFAULT_THRESHOLD) -> None:
        self.threshold_std = check_float("threshold_std", threshold_std, min_value=0.0)
        self.below: list[float] = []
        self.l1: list[float] = []

    def _take(self, model: nn.Module) -> None:
        layers = [m.coefficients.detach() for m in model.modules() if isinstance(m, SharedBasisConv2d)]
        below = sum(int((c.abs() < self.threshold_std * c.std()).sum()) for c in layers)
        self.below.append(below / max(1, sum(c.numel() for c in layers)))
        self.l1.append(float(sum(c.abs().sum() for c in layers)))

    def on_train_begin(self, state: TrainState) -> None:
        """Record the starting point."""
        self._take(state.model)

    def on_epoch_end(self, state: TrainState) -> None:
        """Record after every epoch."""
        self._take(state.model)


def train_alternating(model: nn.Module, ctx: Context, *, epochs: int | None = None, l1: float = DEFAULT_L1,
                      pair_l1: float = 0.0, switch_every: int = DEFAULT_SWITCH, lr: float | None = None,
                      callbacks: Iterable[Callback] = ()) -> tuple[nn.Module, History, list[str]]:
    """A trained copy of a decomposed ``model``: ``epochs`` (default ``ctx.budget``) of alternating basis /
    coefficient training with ``l1`` on the coefficients (and ``pair_l1`` on their pair columns, see
    :func:`coefficient_l1`), cosine learning rate, plus any ``callbacks``
    (e.g. :class:`CoefficientTrace`); returns (model, history, phases)."""
    _require_shared(model, "train_alternating")
    check_finetune_ctx("train_alternating", ctx, True)
    epochs = ctx.budget if epochs is None else check_int("epochs", epochs, min_value=0)
    check_float("l1", l1, min_value=0.0)
    check_float("pair_l1", pair_l1, min_value=0.0)
    out = copy.deepcopy(model)
    alternate = AlternateBasisCoefficients(switch_every)
    history = ctx.finetune(out, epochs=epochs, callbacks=[CosineLR(), alternate, *callbacks],
                           extra_loss=coefficient_l1(l1, pair_strength=pair_l1), lr=lr)
    return out.eval(), history, alternate.phases


# ----------------------------------------------------------------------------------------------------------
# Step 3: coefficient pruning
# ----------------------------------------------------------------------------------------------------------
def _pair_keep(coefficients: Tensor, pair_sparsity: float) -> Tensor:
    """(Cin, d) keep-flags: all but the ``pair_sparsity`` fraction of (input channel, basis) pairs whose
    coefficient columns have the smallest L2 norm over the output channels (at least one pair stays)."""
    norms = coefficients.detach().norm(dim=0).flatten()
    k = min(int(round(pair_sparsity * norms.numel())), norms.numel() - 1)
    keep = torch.ones_like(norms, dtype=torch.bool)
    keep[torch.argsort(norms, stable=True)[:k]] = False
    return keep.reshape(coefficients.shape[1:])


def coefficient_masks(model: nn.Module, *, threshold_std: float | None = DEFAULT_THRESHOLD,
                      sparsity: float | None = None, pair_sparsity: float = 0.0) -> dict[str, Tensor]:
    """Boolean keep-masks of every PENNI layer's coefficients, by parameter name.

    ``threshold_std``: keep |c| >= threshold_std x std(c) of the layer (the paper: 1.0). ``sparsity``: instead,
    zero that fraction of each layer's coefficients, smallest magnitude first (the operating point a sweep sets).
    Give exactly one. ``pair_sparsity`` (not in the paper; 0 = off): also zero that fraction of each layer's
    (input channel, basis kernel) pairs, whole coefficient columns with the smallest L2 norm, so that the
    two-stage form drops them and the counted MACs fall, not only the nonzero count."""
    layers = _require_shared(model, "coefficient_masks")
    if (threshold_std is None) == (sparsity is None):
        raise ValueError("give exactly one of threshold_std (in standard deviations, e.g. 1.0) and sparsity "
                         "(the fraction of coefficients to zero, in [0, 1))")
    if sparsity is not None:
        check_fraction("sparsity", sparsity, meaning="the fraction of coefficients to zero")
        if sparsity >= 1.0:
            raise ValueError(f"sparsity={sparsity} would zero every coefficient; accepted: 0 <= sparsity < 1")
    else:
        check_float("threshold_std", threshold_std, min_value=0.0)
    check_fraction("pair_sparsity", pair_sparsity, meaning="the fraction of (input channel, basis) pairs to zero")
    if pair_sparsity >= 1.0:
        raise ValueError(f"pair_sparsity={pair_sparsity} would zero every pair; accepted: 0 <= pair_sparsity < 1")
    masks = {}
    for name, m in layers.items():
        c = m.coefficients.detach().abs()
        if sparsity is not None:
            k = int(round(sparsity * c.numel()))
            keep = torch.ones_like(c, dtype=torch.bool).flatten()
            keep[torch.argsort(c.flatten(), stable=True)[:k]] = False
            keep = keep.reshape(c.shape)
        else:
            keep = c >= threshold_std * float(m.coefficients.detach().std())
        if pair_sparsity > 0:
            keep &= _pair_keep(c, pair_sparsity).unsqueeze(0)
        masks[f"{name}.coefficients"] = keep
    return masks


def prune_coefficients(model: nn.Module, *, threshold_std: float | None = DEFAULT_THRESHOLD,
                       sparsity: float | None = None, pair_sparsity: float = 0.0) -> tuple[nn.Module, dict[str, Tensor]]:
    """A copy of ``model`` with its small coefficients set to zero, and the masks (see :func:`coefficient_masks`)."""
    masks = coefficient_masks(model, threshold_std=threshold_std, sparsity=sparsity, pair_sparsity=pair_sparsity)
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            params[name].mul_(keep)
    return out, masks


def finetune_pruned(model: nn.Module, ctx: Context, masks: Mapping[str, Tensor], *, epochs: int | None = None,
                    lr: float | None = None) -> tuple[nn.Module, History]:
    """A copy of ``model`` retrained ``epochs`` (default ``ctx.budget``) with the pruned coefficients held at zero."""
    _require_shared(model, "finetune_pruned")
    check_finetune_ctx("finetune_pruned", ctx, True)
    out = copy.deepcopy(model)
    history = ctx.finetune(out, epochs=epochs, callbacks=[CosineLR(), MaskCallback(masks)], lr=lr)
    return out.eval(), history


def coefficient_sparsity(model: nn.Module) -> float:
    """Fraction of zero coefficients over all PENNI layers of ``model``."""
    layers = _require_shared(model, "coefficient_sparsity")
    zeros = sum(int((m.coefficients == 0).sum()) for m in layers.values())
    return zeros / sum(m.coefficients.numel() for m in layers.values())


# ----------------------------------------------------------------------------------------------------------
# Step 4: shrinking
# ----------------------------------------------------------------------------------------------------------
def dense_equivalent(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every PENNI layer as an ordinary conv: the pruned-but-unshrunk network."""
    out = copy.deepcopy(check_model(model))
    for name, m in shared_layers(out).items():
        replace_module(out, name, m.to_conv().train(m.training))
    return out


def _weight_in(module: nn.Module) -> Tensor | None:
    """Weight with the input channel along dim 1 (ordinary conv or linear); None for other modules."""
    if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
        return module.weight.detach()
    return None


def _unread(group: Group) -> Tensor:
    """Channels of ``group`` that no consumer reads (zero weights in every consumer)."""
    unread = torch.ones(group.size, dtype=torch.bool)
    for name in group.consumers:
        w = _weight_in(group.modules[name])
        if w is None or w.shape[1] != group.size:
            return torch.zeros(group.size, dtype=torch.bool)
        unread &= (w.transpose(0, 1).reshape(group.size, -1).abs().sum(1) == 0).cpu()
    return unread


def _silent_producers(group: Group) -> Tensor:
    """Channels whose producing filters (and biases) are zero in every producer of ``group``."""
    silent = torch.ones(group.size, dtype=torch.bool)
    for name in group.producers:
        m = group.modules[name]
        silent &= (m.weight.detach().reshape(group.size, -1).abs().sum(1) == 0).cpu()
        if m.bias is not None:
            silent &= (m.bias.detach() == 0).cpu()
    return silent


def _zero_at_consumers(model: nn.Module, groups: list[Group], example_input: Tensor) -> dict[int, Tensor]:
    """Per group: channels that are exactly zero everywhere at the input of every consumer, for ``example_input``."""
    seen: dict[str, Tensor] = {}
    hooks = []
    wanted = {n for g in groups for n in g.consumers}
    for name, m in model.named_modules():
        if name in wanted:
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].detach())))
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    zero = {}
    for g in groups:
        flags = torch.ones(g.size, dtype=torch.bool)
        for name in g.consumers:
            x = seen.get(name)
            if x is None or x.dim() < 2 or x.shape[1] != g.size:
                flags[:] = False
                break
            flags &= (x.transpose(0, 1).reshape(g.size, -1).abs().sum(1) == 0).cpu()
        zero[g.id] = flags
    return zero


def shrink_plan(model: nn.Module, example_input: Tensor) -> dict[int, Tensor]:
    """``{group id: kept channels}`` of a pruned-but-unshrunk (ordinary conv) model: the channels that are
    read by no consumer, or produced by all-zero filters and exactly zero where they are read, go."""
    check_model(model)
    groups = channel_groups(model)
    silent = {g.id: _silent_producers(g) for g in groups}
    zero = _zero_at_consumers(model, groups, example_input)
    plan = {}
    for g in groups:
        drop = _unread(g) | (silent[g.id] & zero[g.id])
        if bool(drop.any()):
            kept = torch.nonzero(~drop).flatten()
            plan[g.id] = kept if kept.numel() else torch.tensor([0])
    return plan


def _penni_conv(layer: SharedBasisConv2d, out_idx: Tensor | None, in_idx: Tensor | None, name: str) -> PenniConv:
    """The two-stage deployed layer of ``layer`` restricted to the kept output and input channels."""
    c = layer.coefficients.detach()
    c = c if out_idx is None else c.index_select(0, out_idx.to(c.device))
    c = c if in_idx is None else c.index_select(1, in_idx.to(c.device))
    used = (c != 0).any(0)                             # (Cin', d): pairs some output channel reads
    if not bool(used.any()):
        used[0, 0] = True                              # a layer with no coefficient left still needs one pair
    channel_index, basis_index = torch.nonzero(used, as_tuple=True)
    stage1 = BasisConv(layer.basis, channel_index, basis_index, stride=layer.stride, padding=layer.padding,
                       dilation=layer.dilation)
    cout = c.shape[0]
    stage2 = nn.Conv2d(stage1.pairs, cout, 1, bias=layer.bias is not None)
    with torch.no_grad():
        stage2.weight.copy_(c[:, channel_index, basis_index].reshape(cout, stage1.pairs, 1, 1))
        if layer.bias is not None:
            stage2.bias.copy_(layer.bias.detach() if out_idx is None else layer.bias.detach()[out_idx.to(c.device)])
    return PenniConv(stage1, stage2, original=name).to(layer.basis.device)


def shrink(model: nn.Module, example_input: Tensor, *, form: str = "two_stage") -> nn.Module:
    """The physically smaller network of a PENNI model (``form`` "two_stage" or "fused"; see the module
    docstring); computes what :func:`dense_equivalent` computes. ``example_input`` checks which channels are
    exactly zero where they are read."""
    layers = _require_shared(model, "shrink")
    check_choice("form", form, FORMS)
    check_type("example_input", example_input, Tensor, "an input batch tensor")
    dense = dense_equivalent(model)
    plan = shrink_plan(dense, example_input)
    small = prune_channels(dense, plan)
    if form == "fused":
        return small.eval()
    out_idx, in_idx = channel_indices(dense, plan)
    for name, layer in layers.items():
        replace_module(small, name, _penni_conv(layer, out_idx.get(name), in_idx.get(name), name))
    return small.eval()


def layer_table(model: nn.Module, shrunk: nn.Module) -> list[dict[str, Any]]:
    """Per PENNI layer of ``model`` (training form): channels, pairs and params before and after :func:`shrink`."""
    rows = []
    modules = dict(check_model(shrunk).named_modules())
    for name, m in _require_shared(model, "layer_table").items():
        cout, cin, d = m.coefficients.shape
        kh, kw = m.basis.shape[1:]
        new = modules.get(name)
        row = {"layer": name, "kernel": f"{kh}x{kw}", "d": d, "in": cin, "out": cout,
               "nonzero_coefficients": int((m.coefficients != 0).sum()), "coefficients": m.coefficients.numel(),
               "params_dense": cout * cin * kh * kw + (cout if m.bias is not None else 0)}
        if isinstance(new, PenniConv):
            basis_conv, coef = new[0], new[1]
            row.update(in_after=int(torch.unique(basis_conv.channel_index).numel()), out_after=coef.out_channels,
                       pairs=basis_conv.pairs, params_after=sum(p.numel() for p in new.parameters()))
        elif isinstance(new, nn.Conv2d):
            row.update(in_after=new.in_channels, out_after=new.out_channels, pairs=None,
                       params_after=sum(p.numel() for p in new.parameters()))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------
def penni(
    model: nn.Module,
    ctx: Context,
    *,
    d: int = DEFAULT_D,
    l1: float = DEFAULT_L1,
    pair_l1: float = 0.0,
    switch_every: int = DEFAULT_SWITCH,
    epochs: int | None = None,
    finetune_epochs: int | None = None,
    threshold_std: float | None = DEFAULT_THRESHOLD,
    sparsity: float | None = None,
    pair_sparsity: float = 0.0,
    form: str = "two_stage",
    lr: float | None = None,
    layers: Iterable[str] | None = None,
) -> nn.Module:
    """PENNI end to end: decompose (``d`` basis kernels), train alternately with ``l1`` (``epochs``, default
    ``ctx.budget``), prune the coefficients (``threshold_std`` or ``sparsity``, and ``pair_sparsity``: the
    operating points), retrain
    (``finetune_epochs``, default ``ctx.budget``) and shrink (``form``). Returns a new, smaller model."""
    check_model(model)
    check_finetune_ctx("penni", ctx, True)
    check_choice("form", form, FORMS)
    x = ctx.example_input(1)
    decomposed = decompose(model, d=d, layers=layers)
    trained, history, phases = train_alternating(decomposed, ctx, epochs=epochs, l1=l1, pair_l1=pair_l1,
                                                switch_every=switch_every, lr=lr)
    pruned, masks = prune_coefficients(trained, threshold_std=threshold_std, sparsity=sparsity, pair_sparsity=pair_sparsity)
    tuned, tune_history = finetune_pruned(pruned, ctx, masks, epochs=finetune_epochs, lr=lr)
    small = shrink(tuned, x, form=form)
    before, after = counted_totals(model, x), counted_totals(small, x)
    return mark(small, "penni", ("dense_shapes", "mask"), d=d, l1=l1, pair_l1=pair_l1, switch_every=switch_every,
                form=form, threshold_std=threshold_std, sparsity=sparsity, pair_sparsity=pair_sparsity, phases=phases,
                train_epochs=len(history.train_loss), finetune_epochs=len(tune_history.train_loss),
                coefficient_sparsity=coefficient_sparsity(tuned), layers=layer_table(tuned, small),
                params_before=before["params"], params_after=after["params"],
                nonzero_params_before=before["nonzero_params"], nonzero_params_after=after["nonzero_params"],
                macs_before=before["macs"], macs_after=after["macs"])
