"""Low-rank factorization: a layer's weight tensor replaced by a few thin factors that run one after the other.

Four schemes, each a chain of ordinary dense layers (so ONNX export, ONNX Runtime and the cost report see
real, smaller layers; no layer rebuilds the full kernel in its forward pass):

* ``svd`` -- truncated SVD. A Linear becomes Linear(in, r) -> Linear(r, out); a k x k conv becomes a k x k conv
  to r channels -> 1x1 conv (Zhang et al. 2015). 1x1 convs and Linears always use it.
* ``tucker2`` -- Tucker-2 on the two channel modes (Kim et al. 2016): 1x1 (in -> r_in) -> k x k core
  (r_in -> r_out) -> 1x1 (r_out -> out). The factors come from TensorLy's ``partial_tucker`` (HOOI).
* ``cp`` -- CP (Lebedev et al. 2015): 1x1 (in -> R) -> depthwise k x 1 -> depthwise 1 x k -> 1x1 (R -> out).
  The fit is :func:`cp_als`, alternating least squares written here (see its docstring for why) with an SVD
  initialisation, a small ridge, restarts, and a check that no factor is NaN or degenerate.
* ``spatial`` -- spatially separable filters (Jaderberg et al. 2014, scheme 2): a k x 1 conv to K channels
  -> a 1 x k conv, with the optimal factors from one SVD of the kernel reshaped to (in·k, out·k).

Stride, padding (zeros, reflect, circular), dilation and groups are kept: with ``groups`` g every group is
factored on its own and every factor conv is grouped by g; depthwise convs have nothing to factor across
channels and are left alone. Ranks come from one of: an explicit ``rank``, the retained spectral
``energy``, ``vbmf`` (Kim et al.'s choice, on the channel unfoldings, modes 0 and 1), or a global budget
``target_mac_reduction`` / ``target_param_reduction`` (one energy threshold for all layers, found by
bisection; the operating point a sweep sets). A layer whose factors would cost more MACs than it does is
left dense unless its rank was given explicitly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .._validate import check_bool, check_choice, check_float, check_int, check_model, check_type
from ..train import CosineLR
from .base import Context, mark, replace_module
from .pruning import check_finetune_ctx

__all__ = [
    "SCHEMES", "ALLOCATIONS", "Factorized", "LayerPlan", "candidate_layers", "max_rank", "decompose_layer", "reconstruct",
    "relative_error", "cp_als", "cp_svd_start", "unfoldings", "spectrum", "energy_rank", "vbmf_rank", "plan_ranks", "plan_table",
    "apply_plan", "decompose", "finetune_factorized", "rank_for", "svd_decompose", "tucker2_decompose", "cp_decompose", "spatial_decompose",
    "factorized_layers",
]

SCHEMES = ("svd", "tucker2", "cp", "spatial")
ALLOCATIONS = ("energy", "uniform")
CP_ITERATIONS = 100        # ALS sweeps per start
CP_TOL = 1e-8              # stop when the relative error improves by less than this
CP_RIDGE = 1e-6            # ridge, relative to the mean diagonal of each normal matrix
CP_DEGENERACY = 10.0       # see _cp_degeneracy: above this the rank-1 terms cancel each other (degenerate)
TUCKER_ITERATIONS = 25     # HOOI sweeps of TensorLy's partial_tucker


class Factorized(nn.Sequential):
    """A layer replaced by its factors: a ``nn.Sequential`` of smaller dense layers, run in order."""

    def __init__(self, layers: Iterable[nn.Module], *, scheme: str, rank: int | tuple[int, int], original: str) -> None:
        super().__init__(*layers)
        self.scheme = scheme
        self.rank = rank
        self.original = original

    def extra_repr(self) -> str:
        return f"scheme={self.scheme!r}, rank={self.rank}, original={self.original!r}"


# ----------------------------------------------------------------------------------------------------------
# Layer geometry and rank bounds
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Geom:
    """What a factorization needs to know about a Conv2d or Linear."""

    kind: str                      # "linear", "conv1x1" or "conv"
    out: int
    inp: int
    groups: int = 1
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    padding_mode: str = "zeros"
    bias: bool = True

    @property
    def og(self) -> int:
        return self.out // self.groups

    @property
    def ig(self) -> int:
        return self.inp // self.groups


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _padding(name: str, conv: nn.Conv2d) -> tuple[int, int]:
    if not isinstance(conv.padding, str):
        return _pair(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(t % 2 for t in totals):
        raise ValueError(f"cannot factor layer {name!r}: padding='same' with an even kernel pads asymmetrically")
    return (totals[0] // 2, totals[1] // 2)


def _geom(name: str, layer: nn.Module) -> _Geom:
    if isinstance(layer, nn.Linear):
        return _Geom("linear", layer.out_features, layer.in_features, bias=layer.bias is not None)
    if type(layer) is not nn.Conv2d:
        raise ValueError(f"cannot factor layer {name!r}: {type(layer).__name__} is not an nn.Linear or nn.Conv2d")
    kernel = _pair(layer.kernel_size)
    if layer.in_channels // layer.groups == 1:
        raise ValueError(f"cannot factor layer {name!r}: a depthwise conv has one input channel per group, "
                         "nothing to factor across channels")
    return _Geom("conv1x1" if kernel == (1, 1) else "conv", layer.out_channels, layer.in_channels, layer.groups,
                 kernel, _pair(layer.stride), _padding(name, layer), _pair(layer.dilation), layer.padding_mode,
                 layer.bias is not None)


def _layer_scheme(geom: _Geom, scheme: str) -> str:
    """The scheme a layer really gets: Linears and 1x1 convs are matrices, so always SVD."""
    return scheme if geom.kind == "conv" else "svd"


def _max_rank(geom: _Geom, scheme: str) -> int | tuple[int, int]:
    kh, kw = geom.kernel
    if scheme == "svd":
        return min(geom.og, geom.ig * kh * kw)
    if scheme == "tucker2":
        return (geom.og, geom.ig)
    if scheme == "spatial":
        return min(geom.ig * kh, geom.og * kw)
    dims = sorted((geom.og, geom.ig, kh, kw))   # cp: a tensor's rank is at most the product of its 3 smallest dims
    return dims[0] * dims[1] * dims[2]


def _check_exclude(exclude: Any) -> tuple[str, ...]:
    items = (exclude,) if isinstance(exclude, str) else exclude
    if not isinstance(items, (tuple, list)) or not all(isinstance(i, str) for i in items):
        raise TypeError(f"exclude must be 'first', 'last', a module name or a sequence of them, got {exclude!r}")
    return tuple(items)


def candidate_layers(model: nn.Module, exclude: str | Iterable[str] = ()) -> dict[str, nn.Module]:
    """The layers a low-rank method can factor: Linears and non-depthwise Conv2ds, by module name.

    ``exclude`` may hold "first" (the first Conv2d/Linear, usually the stem conv with few input channels),
    "last" (the last one: the task's output layer) and module names (a name excludes its children too).
    """
    exclude = _check_exclude(exclude)
    inside_factors = tuple(f + "." for f in factorized_layers(model))       # found once, not once per module
    layers = [(n, m) for n, m in check_model(model).named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.startswith(inside_factors)]
    names = [n for n, _ in layers]
    for e in exclude:
        if e not in ("first", "last") and not any(n == e or n.startswith(e + ".") for n in names):
            raise ValueError(f"exclude={e!r} names no Conv2d/Linear layer; accepted: 'first', 'last' or one of "
                             f"{', '.join(names)}")
    drop = {names[0]} if names and "first" in exclude else set()
    drop |= {names[-1]} if names and "last" in exclude else set()
    out = {}
    for name, m in layers:
        if name in drop or any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        if isinstance(m, nn.Linear) and min(m.in_features, m.out_features) > 1:
            out[name] = m
        elif type(m) is nn.Conv2d and m.in_channels // m.groups > 1 and m.out_channels // m.groups > 1:
            out[name] = m
    return out


def max_rank(layer: nn.Module, scheme: str, name: str = "layer") -> int | tuple[int, int]:
    """The largest rank ``scheme`` accepts for ``layer`` ((r_out, r_in) for Tucker-2; SVD for Linear/1x1)."""
    check_choice("scheme", scheme, SCHEMES)
    geom = _geom(name, layer)
    return _max_rank(geom, _layer_scheme(geom, scheme))


def _check_rank(name: str, geom: _Geom, scheme: str, rank: Any) -> int | tuple[int, int]:
    top = _max_rank(geom, scheme)
    if scheme == "tucker2":
        pair = (rank, rank) if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool) else rank
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"rank of layer {name!r} (tucker2) must be an int or a pair (r_out, r_in), got {rank!r}")
        for label, r, hi in (("r_out", pair[0], top[0]), ("r_in", pair[1], top[1])):
            check_type(f"rank ({label}) of layer {name!r}", r, (int, np.integer), "an int")
            if isinstance(r, bool) or not 1 <= r <= hi:
                raise ValueError(f"rank {label}={r!r} of layer {name!r} (tucker2) is outside the allowed range 1..{hi}")
        return (int(pair[0]), int(pair[1]))
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank of layer {name!r} ({scheme}) must be an int, got {type(rank).__name__} ({rank!r})")
    if not 1 <= rank <= top:
        raise ValueError(f"rank {rank} of layer {name!r} ({scheme}) is outside the allowed range 1..{top}")
    return int(rank)


# ----------------------------------------------------------------------------------------------------------
# Decompositions of one tensor
# ----------------------------------------------------------------------------------------------------------
def _weight64(layer: nn.Module, geom: _Geom) -> Tensor:
    """The weight as float64, shaped (groups, out/g, in/g, kh, kw)."""
    w = layer.weight.detach().to("cpu", torch.float64)
    return w.reshape(geom.groups, geom.og, geom.ig, *geom.kernel)


def _svd_factors(mats: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Batched truncated SVD: (g, m, n) -> left (g, m, r) and right (g, r, n), the singular values split evenly."""
    u, s, vh = torch.linalg.svd(mats, full_matrices=False)
    root = s[..., :rank].sqrt()
    return u[..., :rank] * root[..., None, :], root[..., :, None] * vh[..., :rank, :]


def _partial_tucker(tensor: np.ndarray, ranks: tuple[int, int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """TensorLy's HOOI on modes 0 and 1 (tensorly >= 0.8 returns ((core, factors), errors))."""
    from tensorly.decomposition import partial_tucker

    out = partial_tucker(tensor, rank=list(ranks), modes=[0, 1], init="svd", n_iter_max=TUCKER_ITERATIONS, tol=1e-6)
    (core, factors), _errors = out
    return np.asarray(core), [np.asarray(f) for f in factors]


def _mttkrp(tensor: Tensor, factors: list[Tensor], mode: int) -> Tensor:
    """Matricized tensor times Khatri-Rao product for ``mode``, contracting one mode at a time (no big Khatri-Rao)."""
    letters = "abcdefgh"[: tensor.dim()]
    others = [m for m in range(tensor.dim()) if m != mode]
    spec = f"{letters}," + ",".join(f"{letters[m]}z" for m in others) + f"->{letters[mode]}z"
    return torch.einsum(spec, tensor, *[factors[m] for m in others])


def cp_svd_start(tensor: Tensor, rank: int, seed: int = 0) -> list[Tensor]:
    """CP's SVD start: the leading left singular vectors of every unfolding (economy SVD), padded with seeded
    random columns where ``rank`` exceeds the mode's size."""
    gen = torch.Generator().manual_seed(check_int("seed", seed, min_value=0))
    tensor = check_type("tensor", tensor, Tensor, "a torch.Tensor").detach().to(torch.float64)
    factors = []
    for mode in range(tensor.dim()):
        unfolded = tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)
        u = torch.linalg.svd(unfolded, full_matrices=False)[0][:, :rank]
        if u.shape[1] < rank:
            pad = torch.randn(u.shape[0], rank - u.shape[1], generator=gen, dtype=tensor.dtype) / math.sqrt(u.shape[0])
            u = torch.cat([u, pad], dim=1)
        factors.append(u)
    return factors


def cp_als(
    tensor: Tensor,
    rank: int,
    *,
    init: str | list[Tensor] = "svd",
    n_iter: int = CP_ITERATIONS,
    tol: float = CP_TOL,
    ridge: float = CP_RIDGE,
    seed: int = 0,
) -> tuple[list[Tensor], float]:
    """CP by alternating least squares: factors (one (dim, rank) matrix per mode) and the relative error.

    Written here rather than taken from TensorLy because, on conv kernels, ``tensorly.parafac`` 0.9 builds the
    full Khatri-Rao product every sweep (about 120 ms per sweep for a 128x128x3x3 kernel at rank 100 on 2 cores)
    and its ``init="svd"`` asks for a full SVD of the 3 x 49,152 unfolding of a spatial mode (an 18 GiB
    matrix). The update is the same (``tests`` check it against ``parafac`` from the same start); ``ridge``
    adds ``ridge`` x (mean diagonal) to each normal matrix, which keeps rank-1 terms from growing to cancel
    each other. ``init``: "svd", "random" or a list of factor matrices.
    """
    check_type("tensor", tensor, Tensor, "a torch.Tensor")
    rank = check_int("rank", rank, min_value=1)
    check_int("n_iter", n_iter, min_value=1)
    check_float("tol", tol, min_value=0.0)
    check_float("ridge", ridge, min_value=0.0)
    t = tensor.detach().to(torch.float64)
    gen = torch.Generator().manual_seed(check_int("seed", seed, min_value=0))
    if isinstance(init, str):
        check_choice("init", init, ("svd", "random"))
        factors = cp_svd_start(t, rank, seed) if init == "svd" else [
            torch.randn(d, rank, generator=gen, dtype=torch.float64) / math.sqrt(d) for d in t.shape]
    else:
        factors = [f.detach().to(torch.float64).clone() for f in init]
    norm2 = float((t * t).sum())
    if norm2 == 0:
        return [torch.zeros(d, rank, dtype=torch.float64) for d in t.shape], 0.0
    error, eye = math.inf, torch.eye(rank, dtype=torch.float64)
    for _ in range(n_iter):
        for mode in range(t.dim()):
            gram = torch.ones(rank, rank, dtype=torch.float64)
            for m, f in enumerate(factors):
                if m != mode:
                    gram = gram * (f.T @ f)
            lam = ridge * float(gram.diagonal().mean())
            mtt = _mttkrp(t, factors, mode)
            factors[mode] = torch.linalg.solve(gram + lam * eye, mtt.T).T
        inner = float((mtt * factors[-1]).sum())
        est2 = float((gram * (factors[-1].T @ factors[-1])).sum())
        new = math.sqrt(max(norm2 - 2 * inner + est2, 0.0) / norm2)
        if not math.isfinite(new) or abs(error - new) < tol:
            error = new
            break
        error = new
    return factors, _cp_error(t, factors)


def _cp_full(factors: list[Tensor]) -> Tensor:
    letters = "abcdefgh"[: len(factors)]
    return torch.einsum(",".join(f"{c}z" for c in letters) + f"->{letters}", *factors)


def _cp_error(t: Tensor, factors: list[Tensor]) -> float:
    if not all(torch.isfinite(f).all() for f in factors):
        return math.nan
    return float(torch.linalg.vector_norm(t - _cp_full(factors)) / torch.linalg.vector_norm(t))


def _cp_degeneracy(factors: list[Tensor]) -> float:
    """Root of the sum of the rank-1 terms' squared norms over the norm of their sum: 1 when the terms are
    orthogonal, large when they cancel each other (a degenerate fit whose float32 factors lose precision)."""
    term_norms = torch.ones(factors[0].shape[1], dtype=torch.float64)
    for f in factors:
        term_norms = term_norms * f.norm(dim=0)
    total = float(torch.linalg.vector_norm(_cp_full(factors)))
    return float(term_norms.norm()) / total if total > 0 else 1.0


def _balanced(factors: list[Tensor]) -> list[Tensor]:
    """Equal column norms across the modes (same product), so that no float32 factor is huge or tiny."""
    norms = [f.norm(dim=0).clamp_min(1e-300) for f in factors]
    scale = torch.stack(norms).prod(dim=0) ** (1 / len(factors))
    return [f / n * scale for f, n in zip(factors, norms)]


def _cp_fit(name: str, tensor: Tensor, rank: int, restarts: int, seed: int, n_iter: int) -> tuple[list[Tensor], dict[str, float]]:
    """CP-ALS from the SVD start; when that fit is NaN or degenerate, up to ``restarts`` random starts."""
    tried = []
    for k in range(restarts + 1):
        factors, err = cp_als(tensor, rank, init="svd" if k == 0 else "random", seed=seed + k, n_iter=n_iter)
        degeneracy = _cp_degeneracy(factors) if math.isfinite(err) else math.inf
        tried.append((round(err, 6), round(degeneracy, 2)))
        if math.isfinite(err) and degeneracy <= CP_DEGENERACY:
            return _balanced(factors), {"error": err, "degeneracy": degeneracy, "starts": k + 1}
    raise ValueError(f"CP of layer {name!r} at rank {rank} failed from the SVD start and {restarts} random ones "
                     f"((relative error, degeneracy) of each: {tried}); choose a lower rank or scheme='tucker2'")


# ----------------------------------------------------------------------------------------------------------
# Factor layers
# ----------------------------------------------------------------------------------------------------------
def _conv(like: nn.Module, cin: int, cout: int, kernel: tuple[int, int], weight: Tensor, *, groups: int = 1,
          stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1),
          mode: str = "zeros", bias: Tensor | None = None) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=bias is not None, padding_mode=mode)
    return _load(conv, like, weight, bias)


def _linear(like: nn.Module, cin: int, cout: int, weight: Tensor, bias: Tensor | None = None) -> nn.Linear:
    return _load(nn.Linear(cin, cout, bias=bias is not None), like, weight, bias)


def _load(layer: nn.Module, like: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    layer = layer.to(device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(layer.weight.shape))
        if bias is not None:
            layer.bias.copy_(bias)
    layer.train(like.training)
    return layer


def _bias(layer: nn.Module) -> Tensor | None:
    return None if layer.bias is None else layer.bias.detach()


def _split(g: _Geom) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments of a k x 1 then a 1 x k conv that together stride, pad and dilate like the original."""
    (sh, sw), (ph, pw), (dh, dw) = g.stride, g.padding, g.dilation
    vertical = {"stride": (sh, 1), "padding": (ph, 0), "dilation": (dh, 1), "mode": g.padding_mode}
    horizontal = {"stride": (1, sw), "padding": (0, pw), "dilation": (1, dw), "mode": g.padding_mode}
    return vertical, horizontal


def _svd_layer(layer: nn.Module, g: _Geom, rank: int) -> list[nn.Module]:
    w = _weight64(layer, g)
    left, right = _svd_factors(w.reshape(g.groups, g.og, -1), rank)     # (g, og, r), (g, r, ig*kh*kw)
    if g.kind == "linear":
        return [_linear(layer, g.inp, rank, right[0]), _linear(layer, rank, g.out, left[0], _bias(layer))]
    return [_conv(layer, g.inp, g.groups * rank, g.kernel, right, groups=g.groups, stride=g.stride, padding=g.padding,
                  dilation=g.dilation, mode=g.padding_mode),
            _conv(layer, g.groups * rank, g.out, (1, 1), left, groups=g.groups, bias=_bias(layer))]


def _tucker2_layer(layer: nn.Module, g: _Geom, rank: tuple[int, int]) -> list[nn.Module]:
    r_out, r_in = rank
    parts = [_partial_tucker(t.numpy(), rank) for t in _weight64(layer, g)]
    core = torch.stack([torch.from_numpy(c) for c, _ in parts])                 # (g, r_out, r_in, kh, kw)
    u_out = torch.stack([torch.from_numpy(f[0]) for _, f in parts])             # (g, og, r_out)
    u_in = torch.stack([torch.from_numpy(f[1]).T for _, f in parts])            # (g, r_in, ig)
    return [_conv(layer, g.inp, g.groups * r_in, (1, 1), u_in, groups=g.groups),
            _conv(layer, g.groups * r_in, g.groups * r_out, g.kernel, core, groups=g.groups, stride=g.stride,
                  padding=g.padding, dilation=g.dilation, mode=g.padding_mode),
            _conv(layer, g.groups * r_out, g.out, (1, 1), u_out, groups=g.groups, bias=_bias(layer))]


def _cp_layer(name: str, layer: nn.Module, g: _Geom, rank: int, restarts: int, seed: int,
              n_iter: int) -> tuple[list[nn.Module], dict]:
    fits = [_cp_fit(name, t, rank, restarts, seed, n_iter) for t in _weight64(layer, g)]
    a, b, c, d = (torch.stack([f[m] for f, _ in fits]) for m in range(4))      # (g, og|ig|kh|kw, R)
    vertical, horizontal = _split(g)
    n = g.groups * rank
    layers = [_conv(layer, g.inp, n, (1, 1), b.transpose(1, 2), groups=g.groups),
              _conv(layer, n, n, (g.kernel[0], 1), c.transpose(1, 2), groups=n, **vertical),
              _conv(layer, n, n, (1, g.kernel[1]), d.transpose(1, 2), groups=n, **horizontal),
              _conv(layer, n, g.out, (1, 1), a, groups=g.groups, bias=_bias(layer))]
    info = {"cp_error": max(i["error"] for _, i in fits), "cp_degeneracy": max(i["degeneracy"] for _, i in fits)}
    return layers, info


def _spatial_layer(layer: nn.Module, g: _Geom, rank: int) -> list[nn.Module]:
    kh, kw = g.kernel
    w = _weight64(layer, g)                                                     # (g, og, ig, kh, kw)
    mats = w.permute(0, 2, 3, 1, 4).reshape(g.groups, g.ig * kh, g.og * kw)     # rows (c, y), columns (o, x)
    left, right = _svd_factors(mats, rank)                                      # (g, ig*kh, K), (g, K, og*kw)
    vert = left.reshape(g.groups, g.ig, kh, rank).permute(0, 3, 1, 2)           # (g, K, ig, kh)
    horiz = right.reshape(g.groups, rank, g.og, kw).permute(0, 2, 1, 3)         # (g, og, K, kw)
    vertical, horizontal = _split(g)
    return [_conv(layer, g.inp, g.groups * rank, (kh, 1), vert, groups=g.groups, **vertical),
            _conv(layer, g.groups * rank, g.out, (1, kw), horiz, groups=g.groups, bias=_bias(layer), **horizontal)]


def decompose_layer(
    layer: nn.Module,
    scheme: str,
    rank: int | tuple[int, int],
    *,
    name: str = "layer",
    cp_restarts: int = 2,
    cp_iterations: int = CP_ITERATIONS,
    seed: int = 0,
) -> Factorized:
    """``layer`` (Linear or Conv2d) as a :class:`Factorized` chain at ``rank``; the input is not modified.

    Linears and 1x1 convs always use SVD. ``rank`` must lie in 1..:func:`max_rank` (a ValueError names the
    layer and the range); at the maximum, SVD, Tucker-2 and spatial factors reproduce the layer exactly.
    CP is fitted by :func:`cp_als` (``cp_iterations`` sweeps from an SVD start; ``cp_restarts`` random starts
    if that fit is NaN or degenerate), seeded by ``seed``.
    """
    check_choice("scheme", scheme, SCHEMES)
    check_int("cp_restarts", cp_restarts, min_value=0)
    check_int("cp_iterations", cp_iterations, min_value=1)
    geom = _geom(name, layer)
    scheme = _layer_scheme(geom, scheme)
    rank = _check_rank(name, geom, scheme, rank)
    if not torch.isfinite(layer.weight).all():
        raise ValueError(f"cannot factor layer {name!r}: its weight is not finite (NaN or inf)")
    info: dict[str, float] = {}
    if scheme == "svd":
        layers = _svd_layer(layer, geom, rank)
    elif scheme == "tucker2":
        layers = _tucker2_layer(layer, geom, rank)
    elif scheme == "cp":
        layers, info = _cp_layer(name, layer, geom, rank, cp_restarts, seed, cp_iterations)
    else:
        layers = _spatial_layer(layer, geom, rank)
    out = Factorized(layers, scheme=scheme, rank=rank, original=type(layer).__name__)
    out.train(layer.training)
    if not all(torch.isfinite(p).all() for p in out.parameters()):
        raise ValueError(f"the {scheme} factors of layer {name!r} at rank {rank} are not finite")
    out.fit_info = info
    return out


# ----------------------------------------------------------------------------------------------------------
# Reconstruction (what kernel the factors amount to)
# ----------------------------------------------------------------------------------------------------------
def _grouped(w: Tensor, groups: int) -> Tensor:
    """A grouped weight (out, in/g, ...) as (g, out/g, in/g, ...) float64."""
    return w.detach().to("cpu", torch.float64).reshape(groups, w.shape[0] // groups, *w.shape[1:])


def reconstruct(factorized: Factorized) -> Tensor:
    """The full weight tensor the factors compute (float64, the original layer's shape)."""
    check_type("factorized", factorized, Factorized, "a survey_lib.methods.lowrank.Factorized")
    layers = list(factorized)
    if isinstance(layers[0], nn.Linear):
        return layers[1].weight.detach().double() @ layers[0].weight.detach().double()
    g = layers[0].groups
    if factorized.scheme == "svd":
        first, last = _grouped(layers[0].weight, g), _grouped(layers[1].weight, g)     # (g,r,ig,kh,kw), (g,og,r,1,1)
        full = torch.einsum("gor,grcyx->gocyx", last[..., 0, 0], first)
    elif factorized.scheme == "tucker2":
        first, core, last = (_grouped(m.weight, g) for m in layers)
        full = torch.einsum("gor,grsyx,gsc->gocyx", last[..., 0, 0], core, first[..., 0, 0])
    elif factorized.scheme == "cp":
        rank = layers[1].out_channels // g
        first = _grouped(layers[0].weight, g)[..., 0, 0]                                # (g, R, ig)
        vert = layers[1].weight.detach().double().reshape(g, rank, -1)                   # (g, R, kh)
        horiz = layers[2].weight.detach().double().reshape(g, rank, -1)                  # (g, R, kw)
        last = _grouped(layers[3].weight, g)[..., 0, 0]                                 # (g, og, R)
        full = torch.einsum("gor,grc,gry,grx->gocyx", last, first, vert, horiz)
    else:
        vert, horiz = _grouped(layers[0].weight, g), _grouped(layers[1].weight, g)      # (g,K,ig,kh,1), (g,og,K,1,kw)
        full = torch.einsum("gkcy,gokx->gocyx", vert[..., 0], horiz[..., 0, :])
    return full.reshape(-1, *full.shape[2:])


def relative_error(layer: nn.Module, factorized: Factorized) -> float:
    """||W - W_factors|| / ||W||: how far the factors' kernel is from the layer's (Frobenius norms)."""
    w = layer.weight.detach().to("cpu", torch.float64)
    return float(torch.linalg.vector_norm(w - reconstruct(factorized)) / torch.linalg.vector_norm(w))


# ----------------------------------------------------------------------------------------------------------
# Rank selection
# ----------------------------------------------------------------------------------------------------------
def _unfoldings(layer: nn.Module, geom: _Geom, scheme: str) -> list[Tensor]:
    w = _weight64(layer, geom)
    kh, kw = geom.kernel
    if scheme == "svd":
        return [w.reshape(geom.groups, geom.og, -1)]
    if scheme == "spatial":
        return [w.permute(0, 2, 3, 1, 4).reshape(geom.groups, geom.ig * kh, geom.og * kw)]
    mode0 = w.reshape(geom.groups, geom.og, -1)                            # channel unfoldings, never the spatial
    mode1 = w.transpose(1, 2).reshape(geom.groups, geom.ig, -1)            # modes (Kim et al.)
    return [mode0, mode1]


def unfoldings(layer: nn.Module, scheme: str = "svd", name: str = "layer") -> list[Tensor]:
    """The matrices whose ranks ``scheme`` chooses, each a (groups, rows, columns) float64 stack (see :func:`spectrum`)."""
    check_choice("scheme", scheme, SCHEMES)
    geom = _geom(name, layer)
    return _unfoldings(layer, geom, _layer_scheme(geom, scheme))


def spectrum(layer: nn.Module, scheme: str = "svd", name: str = "layer") -> list[Tensor]:
    """Singular values (descending, one row per group) of the matrices whose ranks ``scheme`` chooses.

    SVD: the (out, in·kh·kw) matrix; spatial: the (in·kh, out·kw) matrix; Tucker-2 and CP: the mode-0
    (output channel) and mode-1 (input channel) unfoldings.
    """
    return [torch.linalg.svdvals(m) for m in unfoldings(layer, scheme, name)]


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest rank keeping at least ``energy`` of the sum of squared singular values (max over groups)."""
    check_float("energy", energy, min_value=0.0, max_value=1.0)
    s2 = singular_values.to(torch.float64).reshape(-1, singular_values.shape[-1]) ** 2
    total = s2.sum(dim=1, keepdim=True).clamp_min(1e-300)
    kept = s2.cumsum(dim=1) / total
    ranks = (kept < energy - 1e-12).sum(dim=1) + 1
    return int(ranks.clamp(max=s2.shape[1]).max())


def vbmf_rank(matrices: Tensor) -> int:
    """EVBMF's rank (Nakajima et al. 2013) of a (g, m, n) stack of matrices: the max over groups, at least 1."""
    from .vbmf import evbmf

    return max(1, max(evbmf(m).rank for m in matrices.reshape(-1, *matrices.shape[-2:])))


def _rank_from(ranks: list[int], scheme: str) -> int | tuple[int, int]:
    if scheme == "tucker2":
        return (ranks[0], ranks[1])
    return max(ranks)       # cp: at least the rank of each channel unfolding


# ----------------------------------------------------------------------------------------------------------
# Plans: which layer, which rank, what it costs (counted, closed form)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class LayerPlan:
    """One layer's decomposition: its scheme and rank, and its counted MACs and params before and after."""

    name: str
    kind: str
    scheme: str
    rank: int | tuple[int, int]
    max_rank: int | tuple[int, int]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    decompose: bool
    energy: float | None = None
    note: str = ""


def _io_shapes(model: nn.Module, layers: dict[str, nn.Module], x: Tensor) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input and output shape of every layer in ``layers`` for one forward pass on ``x``."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, out: Tensor) -> None:   # returns None: the output is untouched
            shapes.setdefault(name, (tuple(args[0].shape), tuple(out.shape)))
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(x)
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _cost(g: _Geom, scheme: str, rank: Any, shapes: tuple[tuple[int, ...], tuple[int, ...]] | None) -> tuple[int, int]:
    """Counted (MACs at batch 1, params) of the layer itself (rank None) or of its factors."""
    bias = g.out if g.bias else 0
    kh, kw = g.kernel
    if g.kind == "linear":
        rows = int(np.prod(shapes[1][1:-1])) if shapes and len(shapes[1]) > 2 else 1
        if rank is None:
            return rows * g.out * g.inp, g.out * g.inp + bias
        return rows * rank * (g.inp + g.out), rank * (g.inp + g.out) + bias
    (hi, wi), (ho, wo) = shapes[0][-2:], shapes[1][-2:]
    if rank is None:
        p = g.out * g.ig * kh * kw
        return ho * wo * p, p + bias
    gr = g.groups
    if scheme == "svd":
        p1, p2 = gr * rank * g.ig * kh * kw, g.out * rank
        return ho * wo * (p1 + p2), p1 + p2 + bias
    if scheme == "tucker2":
        r_out, r_in = rank
        p1, p2, p3 = gr * r_in * g.ig, gr * r_out * r_in * kh * kw, g.out * r_out
        return hi * wi * p1 + ho * wo * (p2 + p3), p1 + p2 + p3 + bias
    if scheme == "cp":
        p1, pv, ph, p4 = gr * rank * g.ig, gr * rank * kh, gr * rank * kw, g.out * rank
        return hi * wi * p1 + ho * wi * pv + ho * wo * (ph + p4), p1 + pv + ph + p4 + bias
    pv, ph = gr * rank * g.ig * kh, g.out * rank * kw
    return ho * wi * pv + ho * wo * ph, pv + ph + bias


def _plan_layer(name: str, layer: nn.Module, scheme: str, rank: Any, shapes: Any, *, forced: bool,
                energy: float | None = None) -> LayerPlan:
    geom = _geom(name, layer)
    sch = _layer_scheme(geom, scheme)
    rank = _check_rank(name, geom, sch, rank)
    before, after = _cost(geom, sch, None, shapes), _cost(geom, sch, rank, shapes)
    cheaper = after[0] < before[0]
    note = "" if cheaper else "its factors would cost more MACs than the layer"
    return LayerPlan(name, geom.kind, sch, rank, _max_rank(geom, sch), before[0], after[0] if (forced or cheaper) else before[0],
                     before[1], after[1] if (forced or cheaper) else before[1], forced or cheaper, energy,
                     note if not forced else "")


def _selected(model: nn.Module, layers: Any, exclude: Any) -> dict[str, nn.Module]:
    found = candidate_layers(model, exclude)
    if layers is None:
        if not found:
            raise ValueError(f"{type(model).__name__} has no layer to factor (no nn.Linear or non-depthwise nn.Conv2d)")
        return found
    layers = [layers] if isinstance(layers, str) else list(layers)
    modules = dict(model.named_modules())
    out = {}
    for n in layers:
        if n not in modules:
            raise ValueError(f"layers: no module named {n!r}; candidates: {', '.join(found) or 'none'}")
        _geom(n, modules[n])           # raises for layers no scheme can factor
        out[n] = modules[n]
    return out


def _selector(rank: Any, energy: Any, vbmf: Any, target_mac_reduction: Any, target_param_reduction: Any) -> str:
    given = {"rank": rank is not None, "energy": energy is not None, "vbmf": bool(vbmf),
             "target_mac_reduction": target_mac_reduction is not None,
             "target_param_reduction": target_param_reduction is not None}
    chosen = [k for k, v in given.items() if v]
    if len(chosen) != 1:
        raise ValueError("give exactly one way to choose ranks: rank=, energy=, vbmf=True, target_mac_reduction= or "
                         f"target_param_reduction= (got {', '.join(chosen) or 'none'})")
    return chosen[0]


def _energy_plans(model_layers: dict[str, nn.Module], scheme: str, shapes: dict, energy: float,
                  spectra: dict[str, list[Tensor]]) -> list[LayerPlan]:
    plans = []
    for n, m in model_layers.items():
        sch = _layer_scheme(_geom(n, m), scheme)
        plans.append(_plan_layer(n, m, scheme, _rank_from([energy_rank(s, energy) for s in spectra[n]], sch),
                                 shapes[n], forced=False, energy=energy))
    return plans


def _totals(plans: list[LayerPlan], what: str) -> tuple[int, int]:
    return (sum(getattr(p, f"{what}_before") for p in plans), sum(getattr(p, f"{what}_after") for p in plans))


def _uniform_rank(geom: _Geom, scheme: str, shapes: Any, factor: float, what: str) -> int | tuple[int, int]:
    """The largest rank whose factors cost at most 1/``factor`` of the layer (Tucker-2: both modes scaled alike)."""
    idx = 0 if what == "macs" else 1
    limit = _cost(geom, scheme, None, shapes)[idx] / factor
    top = _max_rank(geom, scheme)

    def at(step: int) -> int | tuple[int, int]:
        if scheme == "tucker2":
            return (max(1, round(top[0] * step / 1000)), max(1, round(top[1] * step / 1000)))
        return step

    lo, hi = 1, 1000 if scheme == "tucker2" else top
    while lo < hi:                      # largest step whose cost fits (step 1 when none does)
        mid = (lo + hi + 1) // 2
        if _cost(geom, scheme, at(mid), shapes)[idx] <= limit:
            lo = mid
        else:
            hi = mid - 1
    return at(lo)


def rank_for(layer: nn.Module, scheme: str, param_reduction: float, name: str = "layer") -> int | tuple[int, int]:
    """The largest rank whose factors hold at most 1/``param_reduction`` of ``layer``'s parameters (rank 1 if none)."""
    check_choice("scheme", scheme, SCHEMES)
    check_float("param_reduction", param_reduction, min_value=1.0)
    geom = _geom(name, layer)
    sch = _layer_scheme(geom, scheme)
    shapes = ((1, geom.inp, 1, 1), (1, geom.out, 1, 1))      # params do not depend on the feature-map size
    return _uniform_rank(geom, sch, shapes, param_reduction, "params")


def _allocation_plans(model_layers: dict[str, nn.Module], scheme: str, shapes: dict, allocation: str, what: str,
                      spectra: dict[str, list[Tensor]]):
    """A function from one global knob to the plans: an energy threshold, or a per-layer cost reduction."""
    if allocation == "energy":
        return lambda e: _energy_plans(model_layers, scheme, shapes, e, spectra)

    def uniform(knob: float) -> list[LayerPlan]:
        factor = 1.0 / max(knob, 1e-6)   # knob in (0, 1]: 1 keeps each layer's cost, smaller shrinks it
        plans = []
        for n, m in model_layers.items():
            geom = _geom(n, m)
            sch = _layer_scheme(geom, scheme)
            plans.append(_plan_layer(n, m, scheme, _uniform_rank(geom, sch, shapes[n], factor, what), shapes[n],
                                     forced=False))
        return plans

    return uniform


def _budget_plans(model: nn.Module, model_layers: dict[str, nn.Module], scheme: str, shapes: dict, x: Tensor,
                  what: str, target: float, allocation: str) -> list[LayerPlan]:
    """The largest global knob (energy threshold, or kept cost fraction per layer) that brings the whole
    model's ``what`` (MACs or params) down ``target`` times."""
    from ..cost import count

    whole = int(count(model, x)["macs"].sum()) if what == "macs" else sum(p.numel() for p in model.parameters())
    spectra = {n: spectrum(m, scheme, n) for n, m in model_layers.items()} if allocation == "energy" else {}
    plans_at = _allocation_plans(model_layers, scheme, shapes, allocation, what, spectra)

    def reduction(knob: float) -> tuple[float, list[LayerPlan]]:
        plans = plans_at(knob)
        before, after = _totals(plans, what)
        return whole / (whole - before + after), plans

    best, plans = reduction(0.0)
    if best < target:
        raise ValueError(f"target_{'mac' if what == 'macs' else 'param'}_reduction={target} cannot be reached with "
                         f"scheme={scheme!r}: rank 1 everywhere gives {best:.2f}x; choose a smaller target or more layers")
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        r, p = reduction(mid)
        if r >= target:
            lo, plans = mid, p
        else:
            hi = mid
    return plans


def plan_ranks(
    model: nn.Module,
    scheme: str = "tucker2",
    *,
    example_input: Tensor,
    rank: int | tuple[int, int] | Mapping[str, Any] | None = None,
    energy: float | None = None,
    vbmf: bool = False,
    target_mac_reduction: float | None = None,
    target_param_reduction: float | None = None,
    layers: Iterable[str] | str | None = None,
    exclude: str | Iterable[str] = ("first", "last"),
    allocation: str | None = None,
) -> list[LayerPlan]:
    """Choose a scheme and rank per layer (exactly one rule: rank, energy, vbmf or a MAC / params target).

    ``rank``: one int (or (r_out, r_in) for Tucker-2) for every layer, or a {layer: rank} dict (then only
    those layers). ``layers`` names the layers to factor (default: every candidate but ``exclude``; see
    :func:`candidate_layers`: by default the first layer and the output layer stay dense). Ranks chosen by a rule are applied only where the factors cost fewer MACs than the layer.
    ``allocation`` spreads a MAC / params target over the layers: "energy" (one retained-energy threshold
    for all layers, so redundant layers give up more) or "uniform" (every layer's cost cut by the same
    factor). Default: "energy", except for CP, whose rank is not bounded by a spectrum ("uniform").
    """
    check_model(model)
    check_choice("scheme", scheme, SCHEMES)
    check_type("example_input", example_input, Tensor, "a torch.Tensor (one input batch)")
    rule = _selector(rank, energy, vbmf, target_mac_reduction, target_param_reduction)
    if rule == "rank" and isinstance(rank, Mapping):
        layers, per_layer = list(rank), dict(rank)
    else:
        per_layer = None
    chosen = _selected(model, layers, exclude)
    shapes = _io_shapes(model, chosen, example_input[:1])
    for n in chosen:
        if n not in shapes:
            raise ValueError(f"layer {n!r} is not called in the forward pass, so its cost cannot be counted")
    if rule == "rank":
        return [_plan_layer(n, m, scheme, per_layer[n] if per_layer else rank, shapes[n], forced=True)
                for n, m in chosen.items()]
    if rule == "energy":
        check_float("energy", energy, min_value=0.0, max_value=1.0)
        return _energy_plans(chosen, scheme, shapes, energy, {n: spectrum(m, scheme, n) for n, m in chosen.items()})
    if rule == "vbmf":
        check_bool("vbmf", vbmf)
        plans = []
        for n, m in chosen.items():
            geom = _geom(n, m)
            sch = _layer_scheme(geom, scheme)
            ranks = [vbmf_rank(u) for u in _unfoldings(m, geom, sch)]
            top = _max_rank(geom, sch)
            r = _rank_from(ranks, sch)
            r = (min(r[0], top[0]), min(r[1], top[1])) if sch == "tucker2" else min(r, top)
            plans.append(_plan_layer(n, m, scheme, r, shapes[n], forced=False))
        return plans
    what = "macs" if rule == "target_mac_reduction" else "params"
    target = check_float(rule, target_mac_reduction if what == "macs" else target_param_reduction, min_value=1.0)
    allocation = check_choice("allocation", allocation or ("uniform" if scheme == "cp" else "energy"), ALLOCATIONS)
    return _budget_plans(model, chosen, scheme, shapes, example_input[:1], what, target, allocation)


def plan_table(plans: list[LayerPlan]):
    """A pandas table of a plan: layer, scheme, rank / max rank, counted MACs and params before and after."""
    import pandas as pd

    return pd.DataFrame([{"layer": p.name, "kind": p.kind, "scheme": p.scheme if p.decompose else "(kept)",
                          "rank": str(p.rank) if p.decompose else "", "max rank": str(p.max_rank),
                          "MACs before": p.macs_before, "MACs after": p.macs_after,
                          "params before": p.params_before, "params after": p.params_after, "note": p.note}
                         for p in plans])


def apply_plan(model: nn.Module, plans: list[LayerPlan], *, cp_restarts: int = 2, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every planned layer replaced by its factors (no fine-tuning)."""
    out = copy.deepcopy(check_model(model))
    for p in plans:
        if p.decompose:
            layer = out.get_submodule(p.name)
            replace_module(out, p.name, decompose_layer(layer, p.scheme, p.rank, name=p.name,
                                                        cp_restarts=cp_restarts, seed=seed))
    return out


def factorized_layers(model: nn.Module) -> dict[str, Factorized]:
    """The :class:`Factorized` chains inside ``model``, by module name."""
    return {n: m for n, m in check_model(model).named_modules() if isinstance(m, Factorized)}


def decompose(
    model: nn.Module,
    ctx: Context | None,
    *,
    scheme: str = "tucker2",
    rank: int | tuple[int, int] | Mapping[str, Any] | None = None,
    energy: float | None = None,
    vbmf: bool = False,
    target_mac_reduction: float | None = None,
    target_param_reduction: float | None = None,
    layers: Iterable[str] | str | None = None,
    exclude: str | Iterable[str] = ("first", "last"),
    allocation: str | None = None,
    finetune: bool = True,
    example_input: Tensor | None = None,
    cp_restarts: int = 2,
) -> nn.Module:
    """Factor the layers of a copy of ``model`` with ``scheme`` (see module docstring), then fine-tune it for
    ``ctx.budget`` epochs (cosine-annealed learning rate). Exactly one of ``rank``, ``energy``, ``vbmf`` or a
    ``target_*_reduction`` chooses the ranks. Returns a smaller dense model marked ``dense_shapes``.
    """
    check_model(model)
    check_finetune_ctx(f"{scheme}_decompose", ctx, finetune)
    if example_input is None:
        if ctx is None:
            raise ValueError("decompose needs example_input (one input batch) when ctx is None")
        example_input = ctx.example_input(1)
    seed = ctx.seed if ctx is not None else 0
    plans = plan_ranks(model, scheme, example_input=example_input, rank=rank, energy=energy, vbmf=vbmf,
                       target_mac_reduction=target_mac_reduction, target_param_reduction=target_param_reduction,
                       layers=layers, exclude=exclude, allocation=allocation)
    if not any(p.decompose for p in plans):
        raise ValueError(f"no layer gets cheaper with scheme={scheme!r} at these ranks; choose lower ranks")
    out = apply_plan(model, plans, cp_restarts=cp_restarts, seed=seed)
    errors = {p.name: relative_error(model.get_submodule(p.name), out.get_submodule(p.name)) for p in plans if p.decompose}
    out.eval()
    macs = _totals(plans, "macs")
    params = _totals(plans, "params")
    mark(out, f"{scheme}_decompose", "dense_shapes", scheme=scheme,
         selection=_selector(rank, energy, vbmf, target_mac_reduction, target_param_reduction),
         ranks={p.name: p.rank for p in plans if p.decompose}, reconstruction_errors=errors,
         layer_macs_before=macs[0], layer_macs_after=macs[1], layer_params_before=params[0],
         layer_params_after=params[1], finetune_epochs=0)
    return finetune_factorized(out, ctx, copy_model=False) if finetune else out


def finetune_factorized(model: nn.Module, ctx: Context, *, copy_model: bool = True) -> nn.Module:
    """Fine-tune a factorized model for ``ctx.budget`` epochs (cosine-annealed learning rate, the factors
    trained as ordinary layers); returns a copy unless ``copy_model=False``, with its mark's epochs updated."""
    check_model(model)
    check_finetune_ctx("finetune_factorized", ctx, True)
    out = copy.deepcopy(model) if copy_model else model
    if ctx.budget > 0:
        ctx.finetune(out, callbacks=[CosineLR()])
    out.eval()
    if getattr(out, "compression", None) is not None:
        record = dict(out.compression, finetune_epochs=out.compression.get("finetune_epochs", 0) + ctx.budget)
        out.compression = record
        out.compression_history = list(out.compression_history[:-1]) + [record]
    return out


def svd_decompose(model: nn.Module, ctx: Context | None, **config: Any) -> nn.Module:
    """:func:`decompose` with truncated SVD for every layer (k x k conv -> k x k conv to r + 1x1)."""
    return decompose(model, ctx, scheme="svd", **config)


def tucker2_decompose(model: nn.Module, ctx: Context | None, **config: Any) -> nn.Module:
    """:func:`decompose` with Tucker-2 for k x k convs (Kim et al. 2016), SVD for the rest."""
    return decompose(model, ctx, scheme="tucker2", **config)


def cp_decompose(model: nn.Module, ctx: Context | None, **config: Any) -> nn.Module:
    """:func:`decompose` with CP for k x k convs (Lebedev et al. 2015), SVD for the rest."""
    return decompose(model, ctx, scheme="cp", **config)


def spatial_decompose(model: nn.Module, ctx: Context | None, **config: Any) -> nn.Module:
    """:func:`decompose` with spatially separable k x 1 + 1 x k filters (Jaderberg et al. 2014), SVD for the rest."""
    return decompose(model, ctx, scheme="spatial", **config)
