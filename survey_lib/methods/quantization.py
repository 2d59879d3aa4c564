"""Quantization: uniform affine grids from first principles, PTQ with calibrators, QAT, binary and ternary
weights, and mixed precision.

A uniform affine quantizer with ``bits`` maps a real ``x`` to an integer code and back::

    q = clamp(round(x / scale) + zero_point, qmin, qmax)        x_hat = (q - zero_point) * scale

*symmetric* grids have ``zero_point = 0`` and the narrow signed range ``[-(2**(b-1) - 1), 2**(b-1) - 1]``;
*asymmetric* grids use ``[0, 2**b - 1]`` and a zero point, so a range like [0, 6] after a ReLU wastes no code.
*per-channel* grids keep one scale per output channel (axis 0 of a conv/linear weight). ``round`` is round
half to even, as in PyTorch's ``fake_quantize_per_*_affine`` ops, which :func:`fake_quantize` equals bit for bit.

Everything here is *simulated* ("fake-quant"): float tensors that hold only grid values. The real savings
are the packed low-bit file (storage format ``"packed"``, :mod:`survey_lib.methods.packing`) and, for int8,
ONNX Runtime's integer kernels (:mod:`survey_lib.deploy`). Methods:

* :func:`ptq` -- post-training quantization: fold BatchNorm, observe activations on a few calibration
  batches, pick clipping ranges with a calibrator (min-max, percentile, MSE-optimal or entropy/KL as in
  TensorRT), freeze.
* :func:`qat` -- quantization-aware training with a straight-through estimator (STE; Bengio et al. 2013,
  Jacob et al. CVPR 2018), or learned step sizes (LSQ, Esser et al. ICLR 2020).
* ``quantizer="binary"`` -- BinaryConnect / XNOR-Net style weights ``alpha * sign(w)`` with a per-channel
  scale ``alpha = mean|w|`` (Courbariaux et al. 2015, Rastegari et al. 2016); ``"ternary"`` -- TWN weights
  in ``{-alpha, 0, alpha}`` with threshold ``0.7 * mean|w|`` (Li et al. 2016). Both train with an STE.
* :func:`bit_sensitivity` and :func:`allocate_bits` -- mixed precision: per-layer sensitivity, then a
  greedy bit allocation under an average-bits budget on weight size or on BitOps.

The first and last quantized layers stay at 8 bits by default (``keep_first_last``), as in most low-bit
papers; every table in the notebook says so.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import (
    check_bool, check_choice, check_finite, check_float, check_fraction, check_int, check_mapping, check_model,
    check_tensor, check_type, run_forward,
)
from ..train import Callback, TrainState
from .base import Context, check_ctx, mark, replace_module
from .packing import QuantizedTensor

BITS_RANGE = (2, 16)          # uniform grids
QUANTIZERS = ("uniform", "lsq", "binary", "ternary")
FIXED_BITS = {"binary": 1, "ternary": 2}  # quantizers whose weights have a fixed number of bits
CALIBRATORS = ("minmax", "percentile", "mse", "entropy")
WEIGHT_CALIBRATORS = ("minmax", "mse")
QUANTIZABLE = (nn.Conv2d, nn.Linear)
ENTROPY_MAX_BITS = 10         # levels must stay well below the 2048 histogram bins
SAMPLE_CAP = 1 << 16          # activation values kept per layer for percentile / MSE / entropy calibration


# ----------------------------------------------------------------------------------------------------------
# Grids, from first principles
# ----------------------------------------------------------------------------------------------------------
def check_bits(bits: object, param: str = "bits", *, low: int = BITS_RANGE[0], high: int = BITS_RANGE[1]) -> int:
    """``bits`` as an int in [low, high]; ValueError/TypeError naming ``param`` otherwise."""
    return check_int(param, bits, min_value=low, max_value=high)


def _resolve_bits(bits: object, quantizer: str, default: int) -> int | None:
    """``bits="auto"``: the quantizer's fixed width (binary 1, ternary 2) or ``default``. For binary/ternary any
    other ``bits`` is rejected."""
    fixed = FIXED_BITS.get(quantizer)
    if isinstance(bits, str):
        if bits != "auto":
            raise ValueError(f"bits={bits!r} is not supported; accepted: an int in [{BITS_RANGE[0]}, {BITS_RANGE[1]}] "
                             "or 'auto'")
        return fixed or default
    if fixed is None or bits is None or bits == fixed:
        return bits
    message = (f"bits={bits!r} does not apply to quantizer={quantizer!r}, whose weights have {fixed} bit(s); "
               f"accepted: bits={fixed} or bits='auto'")
    check_int("bits", bits)
    raise ValueError(message)


def _check_qrange(qmin: object, qmax: object) -> tuple[int, int]:
    check_int("qmin", qmin)
    check_int("qmax", qmax)
    if qmin >= qmax:
        raise ValueError(f"qmin={qmin} must be below qmax={qmax} (a grid needs at least two levels)")
    return int(qmin), int(qmax)


def _as_tensor(param: str, value: object) -> Tensor:
    """A tensor from a tensor or a real number; TypeError naming ``param`` otherwise."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{param} must be a torch.Tensor or a number, got {type(value).__name__}")
    return torch.as_tensor(value)


def _check_scale(scale: object) -> Tensor:
    scale = _as_tensor("scale", scale)
    if scale.is_complex() or not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError(f"scale must be finite and > 0 (the grid step), got {scale.flatten()[:4].tolist()}")
    return scale


def _check_zero_point(zero_point: object, qmin: int | None = None, qmax: int | None = None) -> Tensor:
    zero_point = _as_tensor("zero_point", zero_point)
    if zero_point.is_complex() or not bool((zero_point == torch.round(zero_point.double())).all()):
        raise ValueError(f"zero_point must hold integers (grid codes), got {zero_point.flatten()[:4].tolist()}")
    if qmin is not None and bool(((zero_point < qmin) | (zero_point > qmax)).any()):
        raise ValueError(f"zero_point must lie in [qmin, qmax] = [{qmin}, {qmax}], got "
                         f"{zero_point.flatten()[:4].tolist()}")
    return zero_point


def _check_values(param: str, x: object) -> Tensor:
    check_tensor(param, x)
    if not x.is_floating_point():
        raise TypeError(f"{param} must be a floating-point tensor, got {x.dtype}")
    return check_finite(param, x)


def qrange(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """Integer range of a grid: narrow signed ``[-(2**(b-1)-1), 2**(b-1)-1]`` or unsigned ``[0, 2**b-1]``."""
    check_bits(bits)
    check_bool("symmetric", symmetric)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def qparams(lo: Tensor | float, hi: Tensor | float, bits: int, symmetric: bool = True) -> tuple[Tensor, Tensor]:
    """(scale float32, zero_point int64) mapping the clipping range [lo, hi] onto the grid."""
    lo = check_finite("lo", _as_tensor("lo", lo).to(torch.float32))
    hi = check_finite("hi", _as_tensor("hi", hi).to(torch.float32))
    if bool((lo > hi).any()):
        raise ValueError("clipping range needs lo <= hi")
    qmin, qmax = qrange(bits, symmetric)
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        scale = torch.clamp(torch.maximum(lo.abs(), hi.abs()) / qmax, min=eps)
        return scale, torch.zeros_like(scale, dtype=torch.int64)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # the grid must hold an exact zero
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int64)
    return scale, zero_point


def _along(t: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """Reshape a per-channel ``t`` to broadcast along ``axis`` of ``x``; ValueError if the sizes disagree."""
    if axis is None:
        if t.numel() != 1:
            raise ValueError(f"axis=None (per tensor) needs one scale and zero_point, got {t.numel()}; "
                             "pass axis= for per-channel grids")
        return t.reshape(())
    check_int("axis", axis, min_value=-x.dim(), max_value=x.dim() - 1)
    if t.numel() not in (1, x.shape[axis]):
        raise ValueError(f"scale/zero_point have {t.numel()} values but axis {axis} of x has {x.shape[axis]}")
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None) -> Tensor:
    """Integer codes (int64) of ``x``: clamp(round(x * (1/scale)) + zero_point, qmin, qmax)."""
    qmin, qmax = _check_qrange(qmin, qmax)
    return _quantize(_check_values("x", x), _check_scale(scale), _check_zero_point(zero_point, qmin, qmax), qmin, qmax,
                     axis)


def _quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None) -> Tensor:
    inv = _along(torch.reciprocal(scale.to(torch.float32)), x, axis)
    q = torch.round(x * inv) + _along(zero_point, x, axis)
    return torch.clamp(q, qmin, qmax).to(torch.int64)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    """Real values (float32) of codes ``q``: (q - zero_point) * scale."""
    check_tensor("q", q)
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"q must hold integer codes (e.g. from quantize), got {q.dtype}")
    return _dequantize(q, _check_scale(scale), _check_zero_point(zero_point), axis)


def _dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    return (q - _along(zero_point, q, axis)).to(torch.float32) * _along(scale.to(torch.float32), q, axis)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None) -> Tensor:
    """``dequantize(quantize(x))``: the float tensor a quantized model really computes with."""
    qmin, qmax = _check_qrange(qmin, qmax)
    scale, zero_point = _check_scale(scale), _check_zero_point(zero_point, qmin, qmax)
    return _fake_quantize(_check_values("x", x), scale, zero_point, qmin, qmax, axis)


def _fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                   axis: int | None = None) -> Tensor:
    return _dequantize(_quantize(x, scale, zero_point, qmin, qmax, axis), scale, zero_point, axis)


def sqnr_db(x: Tensor, x_hat: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum x^2 / sum (x - x_hat)^2)."""
    _check_values("x", x)
    _check_values("x_hat", x_hat)
    if x.shape != x_hat.shape or x.numel() == 0:
        raise ValueError(f"x and x_hat must have the same non-empty shape, got {tuple(x.shape)} and "
                         f"{tuple(x_hat.shape)}")
    if not bool(x.any()):
        raise ValueError("x is all zeros: its SQNR is undefined (there is no signal)")
    noise = float(((x - x_hat) ** 2).sum())
    return math.inf if noise == 0 else 10.0 * math.log10(float((x**2).sum()) / noise)


# ----------------------------------------------------------------------------------------------------------
# Calibrators: the clipping range [lo, hi]
# ----------------------------------------------------------------------------------------------------------
def _range_of(x: Tensor, axis: int | None) -> tuple[Tensor, Tensor]:
    if axis is None:
        return x.min(), x.max()
    flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
    return flat.min(1).values, flat.max(1).values


def _clip(lo: Tensor, hi: Tensor, t: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """The range [lo, hi] shrunk to threshold ``t`` (on |x| when symmetric, keeping lo's sign)."""
    if symmetric:
        return -t, t
    return torch.maximum(lo, -t), torch.minimum(hi, t)


def _percentile_range(x: Tensor, percentile: float, symmetric: bool) -> tuple[Tensor, Tensor]:
    p = percentile / 100.0
    if symmetric:
        t = torch.quantile(x.abs().flatten().double(), p).float()
        return -t, t
    flat = x.flatten().double()
    return torch.quantile(flat, 1.0 - p).float(), torch.quantile(flat, p).float()


def _mse_range(x: Tensor, bits: int, symmetric: bool, axis: int | None, steps: int = 100) -> tuple[Tensor, Tensor]:
    """Shrink the min-max range by the factor (geometric grid 1e-3..1) with the least fake-quant MSE (per channel)."""
    lo, hi = _range_of(x, axis)
    qmin, qmax = qrange(bits, symmetric)
    best_err = best_lo = best_hi = None
    for f in torch.logspace(-3, 0, steps):
        clo, chi = lo * f, hi * f
        if symmetric:
            chi = torch.maximum(clo.abs(), chi.abs())
            clo = -chi
        scale, zp = qparams(clo, chi, bits, symmetric)
        err = (_fake_quantize(x, scale, zp, qmin, qmax, axis) - x) ** 2
        err = err.mean() if axis is None else err.transpose(0, axis).reshape(x.shape[axis], -1).mean(1)
        if best_err is None:
            best_err, best_lo, best_hi = err, clo, chi
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, clo, best_lo), torch.where(better, chi, best_hi)
    return best_lo, best_hi


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q = q / max(q.sum(), 1e-12)
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / np.maximum(q[keep], 1e-12))))


def _entropy_threshold(values: np.ndarray, levels: int, bins: int = 2048, stride: int = 8) -> float:
    """TensorRT-style KL calibration: the |x| threshold whose ``levels``-level histogram diverges least.

    Exact zeros (half of all post-ReLU values) are left out: every grid here holds an exact zero, and a
    zero spike merged into its neighbours' bins would dominate the divergence."""
    values = values[values > 0]
    top = float(values.max()) if values.size else 0.0
    if top == 0.0:
        return 0.0
    hist, edges = np.histogram(values, bins=bins, range=(0.0, top))
    hist = hist.astype(np.float64)
    best, best_i = math.inf, bins
    for i in range(max(levels, 1), bins + 1, stride):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()                              # outliers clipped into the last bin
        chunks = np.array_split(np.arange(i), levels)
        q = np.zeros(i)
        for c in chunks:                                     # merge into `levels` bins, spread over non-zeros
            nz = hist[c] > 0
            if nz.any():
                q[c[nz]] = hist[c].sum() / nz.sum()
        kl = _kl(p, q)
        if kl < best:
            best, best_i = kl, i
    return float(edges[best_i])


def _entropy_range(x: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    lo, hi = x.min(), x.max()
    signed = bool(lo < 0)
    levels = 2 ** (bits - 1) if (symmetric or signed) else 2**bits
    t = torch.tensor(_entropy_threshold(x.abs().flatten().double().numpy(), levels), dtype=torch.float32)
    return _clip(lo, hi, t, symmetric)


def calibrate_range(
    x: Tensor, method: str = "minmax", bits: int = 8, *, symmetric: bool = True, axis: int | None = None,
    percentile: float = 99.99,
) -> tuple[Tensor, Tensor]:
    """Clipping range [lo, hi] of ``x`` by ``method``: "minmax", "percentile", "mse" or "entropy"."""
    check_choice("calibrator", method, CALIBRATORS)
    check_bits(bits)
    check_bool("symmetric", symmetric)
    check_float("percentile", percentile, min_value=50.0, max_value=100.0)
    check_tensor("x", x)
    if x.numel() == 0:
        raise ValueError("calibration needs data: got an empty tensor")
    if axis is not None:
        check_int("axis", axis, min_value=-x.dim(), max_value=x.dim() - 1)
    x = _check_values("x", x.detach().float())
    if method == "entropy" and bits > ENTROPY_MAX_BITS:
        raise ValueError(f"the entropy calibrator supports bits <= {ENTROPY_MAX_BITS} (a 2048-bin histogram), got {bits}")
    if axis is not None and method in ("percentile", "entropy"):
        raise ValueError(f"calibrator {method!r} works per tensor (axis=None); per-channel accepts 'minmax' or 'mse'")
    if method == "mse":
        return _mse_range(x, bits, symmetric, axis)
    if method == "percentile":
        return _percentile_range(x, percentile, symmetric)
    if method == "entropy":
        return _entropy_range(x, bits, symmetric)
    lo, hi = _range_of(x, axis)
    if symmetric:
        t = torch.maximum(lo.abs(), hi.abs())
        return -t, t
    return lo, hi


# ----------------------------------------------------------------------------------------------------------
# Straight-through estimators
# ----------------------------------------------------------------------------------------------------------
def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity gradient backward."""
    check_tensor("x", x)
    return x + (torch.round(x) - x).detach()


def sign_ste(x: Tensor) -> Tensor:
    """sign(x) with sign(0) = +1 forward; hard-tanh gradient (1 where |x| <= 1) backward (BinaryConnect)."""
    check_tensor("x", x)
    s = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    clipped = torch.clamp(x, -1.0, 1.0)
    return clipped + (s - clipped).detach()


def _grad_scale(x: Tensor, g: float) -> Tensor:
    return (x - x * g).detach() + x * g


def lsq_quantize(x: Tensor, step: Tensor, qmin: int, qmax: int, axis: int | None = None,
                 features: int | None = None) -> Tensor:
    """Learned step size quantization (Esser et al. 2020): round_ste(clamp(x/s)) * s, s's gradient scaled
    by g = 1/sqrt(features * qmax); ``features``: values per step (default: x.numel() / steps; for
    activations pass the features of one example)."""
    check_tensor("x", x)
    if not bool((torch.isfinite(check_tensor("step", step)) & (step != 0)).all()):
        raise ValueError(f"step must be finite and non-zero (its magnitude is the grid step), got "
                         f"{step.detach().flatten()[:4].tolist()}")
    qmin, qmax = _check_qrange(qmin, qmax)
    if features is not None:
        check_int("features", features, min_value=1)
    n = features if features is not None else x.numel() // max(1, step.numel())
    g = 1.0 / math.sqrt(max(1, n) * max(1, qmax))
    s = _along(_grad_scale(step.abs() + 1e-8, g), x, axis)
    return round_ste(torch.clamp(x / s, qmin, qmax)) * s


def _check_weight(w: object) -> Tensor:
    check_tensor("w", w, ndim=tuple(range(2, 9)), shape="(out_channels, ...) with at least 2 dims")
    if w.numel() == 0:
        raise ValueError(f"w must not be empty, got shape {tuple(w.shape)}")
    return w


def binary_weight(w: Tensor) -> Tensor:
    """XNOR-Net weights: alpha * sign(w), alpha = mean |w| per output channel, with an STE."""
    _check_weight(w)
    alpha = w.abs().flatten(1).mean(1).reshape([-1] + [1] * (w.dim() - 1))
    return alpha * sign_ste(w)


def ternary_weight(w: Tensor, threshold: float = 0.7) -> Tensor:
    """TWN weights in {-alpha, 0, alpha}: |w| <= threshold * mean|w| -> 0, alpha = mean of the rest.

    ``threshold`` lies in [0, 1): below 1 the largest |w| of every channel survives, so the result is ternary."""
    _check_weight(w)
    check_fraction("threshold", threshold, meaning=" (times mean|w|; 0.7 in TWN)")
    flat = w.abs().flatten(1)
    delta = (threshold * flat.mean(1)).reshape([-1] + [1] * (w.dim() - 1))
    keep = (w.abs() > delta).to(w.dtype)
    alpha = (w.abs() * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp(min=1.0)
    alpha = alpha.reshape(delta.shape)
    ternary = torch.sign(w) * keep
    return alpha * (w + (ternary - w).detach())


# ----------------------------------------------------------------------------------------------------------
# Quantized layers
# ----------------------------------------------------------------------------------------------------------
class QuantMixin:
    """Fake-quant weights (per ``quantizer``) and input activations for a Conv2d/Linear subclass.

    Training: the latent float weight is re-quantized every step (STE). After :func:`freeze` the weight
    *holds* grid values and ``integer_weight()`` returns its codes for the packed file; activations then go
    through a single ``torch.fake_quantize_per_tensor_affine`` op, which the cost counter treats as free
    (a deployed integer kernel fuses it into the previous layer's requantization)."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _setup(self, weight_bits: int, act_bits: int | None, quantizer: str, per_channel: bool,
               symmetric: bool, act_symmetric: bool) -> None:
        self.quantizer = quantizer
        self.weight_bits = FIXED_BITS.get(quantizer, weight_bits)
        self.act_bits = act_bits
        self.per_channel = per_channel or quantizer in ("binary", "ternary")
        self.symmetric = symmetric or quantizer in ("lsq", "binary", "ternary")
        self.act_symmetric_preferred = act_symmetric
        self.act_symmetric = act_symmetric
        self.frozen = False
        self.observing = True
        self.weight_calibrator = "minmax"
        n = self.weight.shape[0] if self.per_channel else 1
        dev = self.weight.device
        # zero points are int32, the dtype PyTorch's fake-quant ops take (no conversion op per forward)
        self.register_buffer("w_scale", torch.ones(n, device=dev))
        self.register_buffer("w_zero_point", torch.zeros(n, dtype=torch.int32, device=dev))
        self.register_buffer("a_scale", torch.ones((), device=dev))
        self.register_buffer("a_zero_point", torch.zeros((), dtype=torch.int32, device=dev))
        self.register_buffer("a_lo", torch.zeros((), device=dev))
        self.register_buffer("a_hi", torch.zeros((), device=dev))
        self.register_buffer("a_calibrated", torch.zeros((), dtype=torch.bool, device=dev))
        if quantizer == "lsq":
            self.w_step = nn.Parameter(torch.ones(n, device=dev))
            self.a_step = nn.Parameter(torch.ones((), device=dev))

    # -- grids
    @property
    def w_axis(self) -> int | None:
        return 0 if self.per_channel else None

    def w_range(self) -> tuple[int, int]:
        return qrange(self.weight_bits, self.symmetric)

    def a_range(self) -> tuple[int, int]:
        return qrange(self.act_bits, self.act_symmetric)

    def set_weight_grid(self) -> None:
        """Scale and zero point of the weight grid from the current weights (its weight calibrator)."""
        if self.quantizer in ("binary", "ternary"):
            return
        lo, hi = calibrate_range(self.weight, self.weight_calibrator, self.weight_bits, symmetric=self.symmetric,
                                 axis=self.w_axis)
        scale, zp = qparams(lo, hi, self.weight_bits, self.symmetric)
        self.w_scale.copy_(scale.reshape(self.w_scale.shape))
        self.w_zero_point.copy_(zp.reshape(self.w_zero_point.shape))
        if self.quantizer == "lsq" and not self.frozen:
            self.w_step.data.copy_(self.w_scale)

    def set_act_range(self, lo: Tensor, hi: Tensor) -> None:
        """Clipping range of the input activations, and the grid it implies."""
        self.a_lo.copy_(lo)
        self.a_hi.copy_(hi)
        signed = bool(lo < 0)
        # LSQ has no zero point: a signed grid for signed inputs, an unsigned one after a ReLU
        self.act_symmetric = signed if self.quantizer == "lsq" else (self.act_symmetric_preferred and signed)
        if self.act_symmetric:
            lo, hi = -torch.maximum(lo.abs(), hi.abs()), torch.maximum(lo.abs(), hi.abs())
        scale, zp = qparams(lo, hi, self.act_bits, self.act_symmetric)
        self.a_scale.copy_(scale)
        self.a_zero_point.copy_(zp)
        self.a_calibrated.fill_(True)
        if self.quantizer == "lsq":
            self.a_step.data.copy_(scale)

    # -- forward pieces
    def quant_weight(self) -> Tensor:
        """The weight the layer computes with (grid values; STE gradient to the latent weight)."""
        if self.frozen:
            return self.weight
        if self.quantizer == "binary":
            return binary_weight(self.weight)
        if self.quantizer == "ternary":
            return ternary_weight(self.weight)
        if self.quantizer == "lsq":
            return lsq_quantize(self.weight, self.w_step, *self.w_range(), self.w_axis)
        if self.training:
            self.set_weight_grid()
        return self._grid_weight()

    def _grid_weight(self) -> Tensor:
        qmin, qmax = self.w_range()
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(self.weight, self.w_scale, self.w_zero_point, 0,
                                                          qmin, qmax)
        return torch.fake_quantize_per_tensor_affine(self.weight, self.w_scale[0], self.w_zero_point[0],
                                                     qmin, qmax)

    def _observe(self, x: Tensor, momentum: float = 0.9) -> None:
        lo, hi = x.detach().min(), x.detach().max()
        if bool(self.a_calibrated):
            lo = momentum * self.a_lo + (1 - momentum) * lo
            hi = momentum * self.a_hi + (1 - momentum) * hi
        self.set_act_range(torch.clamp(lo, max=0.0), hi)

    def quant_input(self, x: Tensor) -> Tensor:
        """Fake-quantized input activations (unchanged when ``act_bits`` is None)."""
        if self.act_bits is None:
            return x
        if not bool(self.a_calibrated):
            raise RuntimeError("activation ranges are not calibrated; run calibrate(model, batches) first")
        qmin, qmax = self.a_range()
        if self.quantizer == "lsq" and not self.frozen:
            return lsq_quantize(x, self.a_step, qmin, qmax, features=x[0].numel())
        if self.training and self.observing and self.quantizer != "lsq":
            self._observe(x)
        return torch.fake_quantize_per_tensor_affine(x, self.a_scale, self.a_zero_point, qmin, qmax)

    # -- freezing and storage
    def freeze(self) -> None:
        """Bake the quantized weight into ``weight`` and fix every grid (inference form)."""
        with torch.no_grad():
            if self.quantizer == "lsq":
                self.w_scale.copy_(self.w_step.detach().abs() + 1e-8)
                self.w_zero_point.zero_()
                if self.act_bits is not None:
                    self.a_scale.copy_(self.a_step.detach().abs().reshape(()) + 1e-8)
                    self.a_zero_point.zero_()
            elif self.quantizer == "uniform":
                self.set_weight_grid()
            grid = self.quantizer in ("uniform", "lsq")
            self.weight.data = (self._grid_weight() if grid else self.quant_weight()).detach().clone()
        self.frozen = True

    def integer_weight(self) -> QuantizedTensor:
        """Unsigned codes, scale and zero point of the frozen weight (for the packed file)."""
        if not self.frozen:
            raise RuntimeError("freeze(model) before reading integer weights")
        w = self.weight.detach()
        if self.quantizer in ("binary", "ternary"):
            alpha = w.abs().flatten(1).max(1).values
            if self.quantizer == "binary":
                return QuantizedTensor((w > 0).to(torch.int64), 2 * alpha, torch.full_like(alpha, 0.5), 0, 1)
            return QuantizedTensor((torch.sign(w) + 1).to(torch.int64), alpha, torch.ones_like(alpha), 0, 2)
        qmin, qmax = self.w_range()
        scale = self.w_scale if self.per_channel else self.w_scale[0]
        zp = self.w_zero_point if self.per_channel else self.w_zero_point[0]
        codes = quantize(w, scale, zp, qmin, qmax, self.w_axis) - qmin
        return QuantizedTensor(codes, scale.float(), (zp - qmin).float(), self.w_axis, self.weight_bits)

    def weight_error_output(self, x: Tensor) -> Tensor:
        """Mean over everything but the output channel of layer(x_q; W - W_q): what weight rounding shifts."""
        delta = (self.weight - self._grid_weight()).detach()
        xq = self.quant_input(x)
        if isinstance(self, nn.Conv2d):
            return self._conv_forward(xq, delta, None).mean(dim=(0, 2, 3))
        return F.linear(xq, delta).reshape(-1, delta.shape[0]).mean(0)

    def deploy_tensors(self) -> dict[str, Tensor]:
        """What the packed file stores besides the weight codes: the bias and the activation grid."""
        out = {} if self.bias is None else {"bias": self.bias}
        if self.act_bits is not None:
            out.update(a_scale=self.a_scale, a_zero_point=self.a_zero_point)
        return out

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, quantizer={self.quantizer}, weight_bits={self.weight_bits}, "
                f"act_bits={self.act_bits}, per_channel={self.per_channel}, frozen={self.frozen}")


class QConv2d(QuantMixin, nn.Conv2d):
    """Conv2d with fake-quant weights and input activations."""

    def forward(self, x: Tensor) -> Tensor:
        """conv(fake_quant(x), quantized weight)."""
        return self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias)


class QLinear(QuantMixin, nn.Linear):
    """Linear with fake-quant weights and input activations."""

    def forward(self, x: Tensor) -> Tensor:
        """linear(fake_quant(x), quantized weight)."""
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)


def _quantized_copy(layer: nn.Module, spec: dict) -> nn.Module:
    """A QConv2d/QLinear holding ``layer``'s parameters."""
    kw = dict(device=layer.weight.device, dtype=layer.weight.dtype)
    if isinstance(layer, nn.Conv2d):
        q = QConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                    layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, **kw)
    else:
        q = QLinear(layer.in_features, layer.out_features, layer.bias is not None, **kw)
    q.load_state_dict(layer.state_dict())
    q._setup(**spec)
    return q


def quant_layers(model: nn.Module) -> dict[str, QuantMixin]:
    """The quantized layers of ``model`` by name."""
    return {n: m for n, m in check_model(model).named_modules() if isinstance(m, QuantMixin)}


def _quantized(model: object) -> dict[str, QuantMixin]:
    """The quantized layers; ValueError if there are none (a float model)."""
    layers = quant_layers(model)
    if not layers:
        raise ValueError("model has no quantized layers (QConv2d/QLinear): run prepare(model) first")
    return layers


# ----------------------------------------------------------------------------------------------------------
# BatchNorm folding
# ----------------------------------------------------------------------------------------------------------
def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) names where the BatchNorm2d's only input is the conv's output (torch.fx)."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:
        raise TypeError(f"BatchNorm folding traces the model with torch.fx, which failed ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); pass fold_bn=False") from err
    mods = dict(model.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        has_stats = mods[node.target].running_var is not None  # track_running_stats=False: batch stats, no fold
        if (has_stats and isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(mods.get(src.target), nn.Conv2d) and len(src.users) == 1):
            pairs.append((src.target, node.target))
    return pairs


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv computing bn(conv(x)) in eval mode: w * g/sqrt(v+eps), (b - mean) * g/sqrt(v+eps) + beta."""
    check_type("conv", conv, nn.Conv2d, "a torch.nn.Conv2d")
    check_type("bn", bn, nn.BatchNorm2d, "a torch.nn.BatchNorm2d")
    if bn.num_features != conv.out_channels or bn.running_var is None:
        raise ValueError(f"bn must be a BatchNorm2d with running statistics over the conv's {conv.out_channels} output "
                         f"channels, got num_features={bn.num_features}, track_running_stats={bn.track_running_stats}")
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        factor = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        folded.weight.copy_(conv.weight * factor.reshape(-1, 1, 1, 1))
        folded.bias = nn.Parameter((bias - bn.running_mean) * factor + shift)
    return folded


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every conv -> BatchNorm2d pair folded into the conv (BN becomes Identity)."""
    check_model(model)
    folded = copy.deepcopy(model).eval()
    mods = dict(folded.named_modules())
    for conv_name, bn_name in _conv_bn_pairs(folded):
        replace_module(folded, conv_name, fold_conv_bn(mods[conv_name], mods[bn_name]))
        replace_module(folded, bn_name, nn.Identity())
    return folded


# ----------------------------------------------------------------------------------------------------------
# Prepare, calibrate, freeze
# ----------------------------------------------------------------------------------------------------------
LayerBits = Mapping[str, "int | tuple[int, int | None] | None"]


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear layers, in definition order (first = input layer, last = output layer)."""
    return [n for n, m in check_model(model).named_modules() if isinstance(m, QUANTIZABLE)]


def _check_act_bits(act_bits: object) -> int | None:
    return None if act_bits is None else check_bits(act_bits, "act_bits")


def _layer_plan(model: nn.Module, bits: int | None, act_bits: int | None, quantizer: str, keep_first_last: bool,
                layer_bits: LayerBits | None) -> dict[str, tuple[int, int | None, str]]:
    """(weight bits, act bits, quantizer) for each layer to quantize."""
    names = quantizable_layers(model)
    if layer_bits is not None:
        check_mapping("layer_bits", layer_bits, "a {layer name: bits or (weight_bits, act_bits) or None} dict")
    plan: dict[str, tuple[int, int | None, str]] = {}
    if bits is not None:
        plan = {n: (bits, act_bits, quantizer) for n in names}
        if keep_first_last and names:
            for n in (names[0], names[-1]):
                plan[n] = (max(bits, 8), None if act_bits is None else max(act_bits, 8), "uniform")
    unknown = sorted(set(layer_bits or {}) - set(names))
    if unknown:
        raise ValueError(f"layer_bits names unknown layers {unknown}; accepted: {names}")
    for n, b in (layer_bits or {}).items():
        if b is None:
            plan.pop(n, None)
            continue
        if isinstance(b, tuple) and len(b) != 2:
            raise ValueError(f"layer_bits[{n!r}] must be bits or a (weight_bits, act_bits) pair, got {b!r}")
        wb, ab = b if isinstance(b, tuple) else (b, act_bits)
        plan[n] = (check_bits(wb, f"layer_bits[{n!r}]"), _check_act_bits(ab), "uniform")
    return plan


def prepare(
    model: nn.Module, *, bits: int | None | str = "auto", act_bits: int | None = 8, quantizer: str = "uniform",
    per_channel: bool = True, symmetric: bool = True, act_symmetric: bool = False, fold_bn: bool = True,
    keep_first_last: bool = True, layer_bits: LayerBits | None = None, weight_calibrator: str = "minmax",
) -> nn.Module:
    """A copy of ``model`` (BN folded) whose Conv2d/Linear layers are fake-quant QConv2d/QLinear.

    ``bits=None`` quantizes only the layers named in ``layer_bits`` ({name: bits or (w_bits, a_bits) or None});
    ``bits="auto"``: 8, or the fixed width of ``binary`` (1) and ``ternary`` (2) weights, which accept no other."""
    check_model(model)
    check_choice("quantizer", quantizer, QUANTIZERS)
    bits = _resolve_bits(bits, quantizer, 8)
    check_choice("weight_calibrator", weight_calibrator, WEIGHT_CALIBRATORS)
    for flag, value in (("per_channel", per_channel), ("symmetric", symmetric), ("act_symmetric", act_symmetric),
                        ("fold_bn", fold_bn), ("keep_first_last", keep_first_last)):
        check_type(flag, value, bool, "True or False")
    if quant_layers(model):
        raise ValueError("model is already quantized (it has QConv2d/QLinear layers); start from the float model")
    if not quantizable_layers(model):
        raise ValueError("model has no Conv2d or Linear layer to quantize")
    if bits is None and not layer_bits:
        raise ValueError("nothing to quantize: pass bits (every layer) or layer_bits ({layer name: bits})")
    if bits is not None and quantizer in ("uniform", "lsq"):
        check_bits(bits)
    elif bits is not None:
        bits = 8  # binary / ternary fix their own bits; keep_first_last layers use 8
    act_bits = _check_act_bits(act_bits)
    out = fold_batchnorm(model) if fold_bn else copy.deepcopy(model)
    for name, (wb, ab, qz) in _layer_plan(out, bits, act_bits, quantizer, keep_first_last, layer_bits).items():
        spec = dict(weight_bits=wb, act_bits=ab, quantizer=qz, per_channel=per_channel, symmetric=symmetric,
                    act_symmetric=act_symmetric)
        layer = _quantized_copy(out.get_submodule(name), spec)
        layer.weight_calibrator = weight_calibrator
        with torch.no_grad():
            layer.set_weight_grid()
        replace_module(out, name, layer)
    out.storage_format = "packed"
    return out


def _check_batches(batches: object) -> list:
    """The batches as a list of input tensors; TypeError/ValueError naming ``batches`` otherwise."""
    if batches is not None and (isinstance(batches, (str, bytes, Tensor)) or not isinstance(batches, Iterable)):
        raise TypeError(f"batches must be a sequence of input tensors or (input, target) pairs, "
                        f"got {type(batches).__name__}")
    batches = list(batches) if batches is not None else []
    if not batches:
        raise ValueError("calibration needs data: batches is empty (pass at least one (input, target) batch)")
    inputs = [b[0] if isinstance(b, (tuple, list)) and b else b for b in batches]
    for x in inputs:
        check_tensor("batches", x, shape="(B, ...) inputs, alone or in (input, target) pairs")
        check_finite("batches", x)
    return inputs


def observe_activations(model: nn.Module, batches: Iterable) -> dict[str, Tensor]:
    """Input activations of every quantized layer over ``batches`` (at most SAMPLE_CAP values each; seeded)."""
    batches = _check_batches(batches)
    layers = {n: m for n, m in _quantized(model).items() if m.act_bits is not None}
    seen: dict[str, list[Tensor]] = {n: [] for n in layers}
    gen = torch.Generator().manual_seed(0)

    def hook(name: str):
        def record(mod, inp):
            x = inp[0].detach().flatten()
            if x.numel() > SAMPLE_CAP // len(batches):
                extremes = torch.stack([x.min(), x.max()])
                x = torch.cat([extremes, x[torch.randint(x.numel(), (SAMPLE_CAP // len(batches),), generator=gen)]])
            seen[name].append(x)
        return record

    saved = {n: m.act_bits for n, m in layers.items()}
    try:
        for m in layers.values():
            m.act_bits = None  # observe float activations
        _run_with_pre_hooks(model, batches, {m: hook(n) for n, m in layers.items()})
    finally:
        for n, m in layers.items():
            m.act_bits = saved[n]
    return {n: torch.cat(v) for n, v in seen.items()}


def _run_with_pre_hooks(model: nn.Module, batches: list, hooks: Mapping[nn.Module, Callable]) -> None:
    """Run ``batches`` through ``model`` (eval, no_grad, on its device) with forward pre-hooks attached;
    hooks and the train/eval mode are restored afterwards."""
    handles = [m.register_forward_pre_hook(fn) for m, fn in hooks.items()]
    was_training, device = model.training, next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            for x in batches:
                run_forward(model, x.to(device), "batches")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def calibrate(model: nn.Module, batches: Iterable, calibrator: str = "minmax", *, percentile: float = 99.99) -> nn.Module:
    """Set every quantized layer's activation range from ``batches`` with ``calibrator`` (in place)."""
    check_choice("calibrator", calibrator, CALIBRATORS)
    check_float("percentile", percentile, min_value=50.0, max_value=100.0)
    layers = _quantized(model)
    if all(m.act_bits is None for m in layers.values()):
        raise ValueError("model quantizes no activations (act_bits=None in every layer): nothing to calibrate")
    for name, x in observe_activations(model, batches).items():
        layer = layers[name]
        symmetric = (layer.act_symmetric_preferred or layer.quantizer == "lsq") and bool(x.min() < 0)
        lo, hi = calibrate_range(x, calibrator, layer.act_bits, symmetric=symmetric, percentile=percentile)
        if not symmetric:
            lo = torch.minimum(lo, torch.zeros(()))
        layer.set_act_range(lo, hi)
    return model


def correct_bias(model: nn.Module, batches: Iterable) -> nn.Module:
    """Empirical bias correction (Nagel et al., ICCV 2019): add the mean output shift that weight rounding
    causes, E[(W - W_q) x] per output channel, to each quantized layer's bias (in place, before freeze)."""
    batches = _check_batches(batches)
    layers = {n: m for n, m in _quantized(model).items() if m.quantizer == "uniform" and not m.frozen}
    if not layers:
        raise ValueError("model has no unfrozen uniform quantized layer: run correct_bias after prepare/calibrate and "
                         "before freeze")
    if any(m.act_bits is not None and not bool(m.a_calibrated) for m in layers.values()):
        raise ValueError("model's activation ranges are not calibrated: run calibrate(model, batches) first")
    sums: dict[str, list[Tensor]] = {n: [] for n in layers}
    _run_with_pre_hooks(model, batches, {m: (lambda mod, inp, n=n: sums[n].append(mod.weight_error_output(inp[0])))
                                         for n, m in layers.items()})
    with torch.no_grad():
        for n, m in layers.items():
            shift = torch.stack(sums[n]).mean(0)
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros_like(shift))
            m.bias.add_(shift)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Bake every quantized layer's weights onto its grid (in place); the inference form of the model."""
    for layer in _quantized(model).values():
        layer.freeze()
    return model.eval()


class ObserverFreeze(Callback):
    """QAT schedule: activation ranges follow an EMA of the observed ranges, then stay fixed after ``at``."""

    def __init__(self, at: float = 0.5) -> None:
        self.at = check_float("freeze_observers_at", at, min_value=0.0, max_value=1.0)

    def _set(self, state: TrainState, on: bool) -> None:
        for layer in quant_layers(state.model).values():
            layer.observing = on

    def on_train_begin(self, state: TrainState) -> None:
        """Observers on."""
        self._set(state, self.at > 0)

    def on_step_end(self, state: TrainState) -> None:
        """Observers off once the step passes ``at`` of the total."""
        if state.step >= self.at * state.total_steps:
            self._set(state, False)


# ----------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------
def _check_common(model: object, ctx: object, n_batches: object) -> None:
    check_model(model)
    check_ctx(ctx)
    check_int("n_batches", n_batches, min_value=1)


def ptq(
    model: nn.Module, ctx: Context, *, bits: int | None = 8, act_bits: int | None = 8, calibrator: str = "minmax",
    weight_calibrator: str = "minmax", per_channel: bool = True, symmetric: bool = True, fold_bn: bool = True,
    keep_first_last: bool = True, layer_bits: LayerBits | None = None, n_batches: int = 4, percentile: float = 99.99,
    bias_correction: bool = False,
) -> nn.Module:
    """Post-training quantization: fold BN, calibrate activations on ``n_batches`` training batches,
    optionally correct the biases for the mean shift of weight rounding, freeze."""
    _check_common(model, ctx, n_batches)
    check_choice("calibrator", calibrator, CALIBRATORS)
    check_float("percentile", percentile, min_value=50.0, max_value=100.0)
    check_type("bias_correction", bias_correction, bool, "True or False")
    q = prepare(model, bits=bits, act_bits=act_bits, per_channel=per_channel, symmetric=symmetric,
                fold_bn=fold_bn, keep_first_last=keep_first_last, layer_bits=layer_bits,
                weight_calibrator=weight_calibrator)
    if any(m.act_bits is not None for m in quant_layers(q).values()):
        calibrate(q, ctx.calibration_batches(n_batches), calibrator, percentile=percentile)
    if bias_correction:
        correct_bias(q, ctx.calibration_batches(n_batches))
    freeze(q)
    return mark(q, "ptq", "low_bit_storage", bits=bits, act_bits=act_bits, calibrator=calibrator,
                bias_correction=bias_correction,
                per_channel=per_channel, keep_first_last=keep_first_last, simulated_compute=True)


def qat(
    model: nn.Module, ctx: Context, *, bits: int | str = "auto", act_bits: int | None | str = "auto",
    quantizer: str = "uniform",
    epochs: int | None = None, lr: float | None = None, calibrator: str = "minmax", per_channel: bool = True,
    fold_bn: bool = True, keep_first_last: bool = True, freeze_observers_at: float = 0.5, n_batches: int = 4,
) -> nn.Module:
    """Quantization-aware training with an STE (``uniform``), learned steps (``lsq``), ``binary`` or ``ternary``.

    ``bits="auto"``: 4 for uniform/LSQ, 1 for binary and 2 for ternary weights (which accept no other bits).
    ``act_bits="auto"``: activations at ``bits`` for uniform/LSQ (W4A4), at 8 for binary/ternary weights.
    ``calibrator`` sets the initial activation ranges; uniform QAT then follows an EMA of the observed
    min/max until ``freeze_observers_at`` of the steps (:class:`ObserverFreeze`), LSQ learns them."""
    _check_common(model, ctx, n_batches)
    check_choice("quantizer", quantizer, QUANTIZERS)
    check_choice("calibrator", calibrator, CALIBRATORS)
    bits = _resolve_bits(bits, quantizer, 4)
    if bits is None:
        raise TypeError("bits must be an int or 'auto', got None")
    if act_bits == "auto":
        act_bits = bits if quantizer in ("uniform", "lsq") else 8
    q = prepare(model, bits=bits, act_bits=act_bits, quantizer=quantizer, per_channel=per_channel,
                fold_bn=fold_bn, keep_first_last=keep_first_last)
    if act_bits is not None:
        calibrate(q, ctx.calibration_batches(n_batches), calibrator)
    ctx.finetune(q, epochs=epochs, lr=lr, callbacks=[ObserverFreeze(freeze_observers_at)])
    freeze(q)
    return mark(q, f"qat_{quantizer}", ("low_bit_storage", "training"), bits=min(m.weight_bits for m in quant_layers(q).values()),
                act_bits=act_bits, quantizer=quantizer, keep_first_last=keep_first_last, simulated_compute=True)


def weight_quantize(model: nn.Module, quantizer: str = "uniform", bits: int | str = "auto", *, per_channel: bool = True,
                    symmetric: bool = True, fold_bn: bool = False, keep_first_last: bool = False) -> nn.Module:
    """Weights only, no data: a frozen copy with every layer's weights on the ``quantizer`` grid
    (``bits="auto"``: 8, binary 1, ternary 2)."""
    if bits is None:
        raise TypeError("bits must be an int or 'auto', got None")
    return freeze(prepare(model, bits=bits, act_bits=None, quantizer=quantizer, per_channel=per_channel,
                          symmetric=symmetric, fold_bn=fold_bn, keep_first_last=keep_first_last))


# ----------------------------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------------------------
def bit_sensitivity(
    model: nn.Module, ctx: Context, *, bits_options: Sequence[int] = (8, 4, 3, 2), split: str = "val",
    act_bits: int | None = None,
) -> pd.DataFrame:
    """Metric change when one layer alone is quantized (weights, PTQ) at each of ``bits_options``."""
    check_model(model)
    check_ctx(ctx)
    if isinstance(bits_options, (str, bytes)) or not isinstance(bits_options, Iterable):
        raise TypeError(f"bits_options must be a sequence of bit widths, got {type(bits_options).__name__}")
    options = sorted({check_bits(b, "bits_options") for b in bits_options}, reverse=True)
    if not options:
        raise ValueError("bits_options must name at least one bit width")
    ref = ctx.score(model, split)
    sign = 1.0 if ctx.task.better(1.0, 0.0) else -1.0
    rows = []
    for name in quantizable_layers(model):
        for b in options:
            q = ptq(model, ctx, bits=None, act_bits=act_bits, layer_bits={name: (b, act_bits)}, n_batches=1)
            score = ctx.score(q, split)
            rows.append(dict(layer=name, bits=b, score=score, drop=sign * (ref - score)))
    return pd.DataFrame(rows)


def layer_units(model: nn.Module, example_input: Tensor, kind: str = "size") -> dict[str, int]:
    """Per-layer cost of one weight bit: params ("size") or MACs ("bitops", at fixed activation bits)."""
    from ..cost.counting import count

    check_choice("kind", kind, ("size", "bitops"))
    df = count(model, example_input).set_index("name")
    col = "params" if kind == "size" else "macs"
    return {n: int(df.loc[n, col]) for n in quantizable_layers(model) if n in df.index}


def allocate_bits(sensitivity: pd.DataFrame, units: Mapping[str, int], average_bits: float) -> dict[str, int]:
    """Greedy mixed precision: lower the layer that loses least per unit saved until the units-weighted
    average of the weight bits is at most ``average_bits``."""
    options, drop = _check_sensitivity(sensitivity)
    check_float("average_bits", average_bits, min_value=float(options[-1]), max_value=float(options[0]))
    layers = _check_units(units, {k[0] for k in drop})
    total = sum(units[n] for n in layers)
    alloc = {n: options[0] for n in layers}
    budget = average_bits * total
    while sum(units[n] * alloc[n] for n in layers) > budget + 1e-9:
        moves = []
        for n in layers:
            i = options.index(alloc[n])
            if i + 1 < len(options):
                lower = options[i + 1]
                cost = drop[(n, lower)] - drop[(n, alloc[n])]
                moves.append(((max(cost, 0.0) + 1e-6) / (units[n] * (alloc[n] - lower)), n, lower))
        if not moves:
            break
        _, n, lower = min(moves)
        alloc[n] = lower
    return _fill_budget(alloc, drop, units, options, budget)


def _check_sensitivity(sensitivity: object) -> tuple[list[int], dict[tuple[str, int], float]]:
    """Bits options (high to low) and {(layer, bits): drop >= 0}; every layer must have every option."""
    check_type("sensitivity", sensitivity, pd.DataFrame, "a DataFrame from bit_sensitivity")
    missing = {"layer", "bits", "drop"} - set(sensitivity.columns)
    if missing or sensitivity.empty:
        raise ValueError(f"sensitivity needs rows with columns layer, bits, drop (missing: {sorted(missing)})")
    if not np.isfinite(pd.to_numeric(sensitivity["drop"], errors="coerce")).all():
        raise ValueError("sensitivity drops must be finite numbers (no NaN or inf)")
    bits = pd.to_numeric(sensitivity["bits"], errors="coerce")
    lo, hi = BITS_RANGE
    if not (np.isfinite(bits) & (bits == np.round(bits)) & (bits >= lo) & (bits <= hi)).all():
        raise ValueError(f"sensitivity bits must be integers in [{lo}, {hi}], got "
                         f"{sorted(set(sensitivity['bits'].tolist()))}")
    options = sorted({int(b) for b in bits}, reverse=True)
    drop = {(str(r.layer), int(r.bits)): max(0.0, float(r.drop)) for r in sensitivity.itertuples()}
    for layer in {k[0] for k in drop}:
        absent = [b for b in options if (layer, b) not in drop]
        if absent:
            raise ValueError(f"sensitivity has no row for layer {layer!r} at bits {absent}")
    return options, drop


def _check_units(units: object, layers: set[str], what: str = "sensitivity") -> list[str]:
    check_type("units", units, Mapping, "a {layer: count} mapping from layer_units")
    shared = [n for n in units if n in layers]
    if not shared:
        raise ValueError(f"units and {what} share no layer names (units: {sorted(units)[:5]}...)")
    missing = sorted(layers - set(units))
    if missing:
        raise ValueError(f"units has no entry for the {what} layers {missing[:5]}; pass units from layer_units "
                         "for the same model")
    for n in shared:
        check_int(f"units[{n!r}]", units[n], min_value=1)
    return shared


def _fill_budget(alloc: dict[str, int], drop: Mapping, units: Mapping[str, int], options: list[int],
                 budget: float) -> dict[str, int]:
    """Raise layers back while the budget allows (the greedy descent can overshoot): best gain per unit first."""
    while True:
        used = sum(units[n] * b for n, b in alloc.items())
        moves = []
        for n, b in alloc.items():
            i = options.index(b)
            if i > 0 and used + units[n] * (options[i - 1] - b) <= budget + 1e-9:
                gain = drop[(n, b)] - drop[(n, options[i - 1])]
                moves.append((-gain / (units[n] * (options[i - 1] - b)), n, options[i - 1]))
        if not moves:
            return alloc
        _, n, higher = min(moves)
        alloc[n] = higher


def average_bits(alloc: Mapping[str, int], units: Mapping[str, int]) -> float:
    """Units-weighted average weight bits of an allocation."""
    check_mapping("alloc", alloc, "a {layer: bits} mapping from allocate_bits")
    if not alloc:
        raise ValueError("alloc is empty: pass the {layer: bits} mapping from allocate_bits")
    _check_units(units, set(alloc), "alloc")
    for n, b in alloc.items():
        check_int(f"alloc[{n!r}]", b, min_value=1)
    total = sum(units[n] for n in alloc)
    return sum(units[n] * b for n, b in alloc.items()) / total


__all__ = [
    "BITS_RANGE", "QUANTIZERS", "CALIBRATORS", "check_bits", "qrange", "qparams", "quantize", "dequantize",
    "fake_quantize", "sqnr_db", "calibrate_range", "round_ste", "sign_ste", "lsq_quantize", "binary_weight",
    "ternary_weight", "QConv2d", "QLinear", "quant_layers", "fold_conv_bn", "fold_batchnorm", "quantizable_layers",
    "prepare", "observe_activations", "calibrate", "correct_bias", "freeze", "ObserverFreeze", "ptq", "qat", "weight_quantize",
    "bit_sensitivity", "layer_units", "allocate_bits", "average_bits",
]
