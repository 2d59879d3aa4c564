"""Empirical variational Bayesian matrix factorization (EVBMF): a rank chosen from the data alone.

Model: ``Y = B A^T + E`` with Gaussian priors on the columns of ``A`` and ``B`` and i.i.d. Gaussian noise
of variance ``sigma2``. Nakajima, Sugiyama, Babacan & Tomioka (JMLR 2013, "Global analytic solution of
fully-observed variational Bayesian matrix factorization") solve the empirical-Bayes version (prior
variances fitted too) in closed form: the solution is a shrunk truncated SVD that keeps exactly the
singular values above a threshold ``sigma * sqrt(M * x_lower)`` that depends only on the shape and on the
noise variance. When the noise variance is unknown it is estimated by minimising the (1-D) free energy
over ``sigma2``, so the rank needs no hand-tuned energy fraction or tolerance. Kim et al. (ICLR 2016)
use it to pick the two Tucker-2 ranks of a conv kernel ``[C_out, C_in, kh, kw]``: the ranks of its mode-0
(``C_out x C_in*kh*kw``) and mode-1 (``C_in x C_out*kh*kw``) unfoldings; the small spatial modes are not
decomposed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq, minimize_scalar

from .._validate import check_finite, check_float, check_int, check_type

__all__ = ["VBMFResult", "evbmf", "vbmf_rank"]

# Lower end of the noise-variance search, relative to its upper bound ||Y||^2 / (L*M): reached only by
# (numerically) noise-free low-rank matrices, whose free energy keeps falling as sigma2 -> 0.
_SIGMA2_FLOOR = 1e-12
_GRID_POINTS = 200  # log-spaced coarse search before the bounded Brent refinement


@dataclass(frozen=True, eq=False)
class VBMFResult:
    """EVBMF of one matrix: the rank kept, the noise variance, the threshold and the shrunk singular values."""

    rank: int
    sigma2: float
    threshold: float
    singular_values: np.ndarray
    estimates: np.ndarray


def evbmf(matrix: Any, sigma2: float | None = None, max_rank: int | None = None) -> VBMFResult:
    """EVBMF of a 2-D tensor/array: keep the singular values above the EVB threshold (sigma2 estimated if None)."""
    y = _as_matrix(matrix)
    if y.shape[0] > y.shape[1]:
        y = y.T  # the analytic solution is stated for L <= M
    L, M = y.shape
    H = L if max_rank is None else check_int("max_rank", max_rank, min_value=1, max_value=L)
    if sigma2 is not None:
        sigma2 = check_float("sigma2", sigma2)
        if sigma2 <= 0.0:
            raise ValueError(f"sigma2={sigma2!r} is out of range; accepted: sigma2 > 0 (a noise variance), "
                             "or None to estimate it")
    alpha = L / M
    x_lower = _x_lower(alpha)

    scale = float(np.max(np.abs(y)))
    if scale == 0.0:  # all zeros: nothing to keep, and no noise to estimate
        noise = 0.0 if sigma2 is None else sigma2
        return _result(0, noise, math.sqrt(M * noise * x_lower), np.zeros(L), np.zeros(0))

    # Work on Y / max|Y| (EVBMF is scale-equivariant: sigma2 scales by scale**2) to avoid over/underflow.
    s = np.linalg.svd(y / scale, compute_uv=False)
    if sigma2 is None:
        s2 = _estimate_sigma2(s, L, M, H, x_lower)
        noise = s2 * scale**2
    else:
        s2 = (sigma2 / scale) / scale
        noise = sigma2
    thr = math.sqrt(M * s2 * x_lower)
    rank = int(np.count_nonzero(s[:H] > thr))
    g = s[:rank]
    # Shrunk EVB estimate of each kept singular value (Nakajima et al. 2013, the EVB solution for gamma >= threshold).
    r = (L + M) * s2 / g**2
    disc = np.maximum((1.0 - r) ** 2 - 4.0 * L * M * s2**2 / g**4, 0.0)
    est = g / 2.0 * (1.0 - r + np.sqrt(disc))
    return _result(rank, noise, thr * scale, s * scale, est * scale)


def vbmf_rank(matrix: Any, sigma2: float | None = None, max_rank: int | None = None) -> int:
    """The rank EVBMF keeps for ``matrix`` (see :func:`evbmf`)."""
    return evbmf(matrix, sigma2=sigma2, max_rank=max_rank).rank


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _as_matrix(matrix: Any) -> np.ndarray:
    """Validate ``matrix`` (2-D, non-empty, real, finite) and return it as a float64 numpy array."""
    check_type("matrix", matrix, (torch.Tensor, np.ndarray), "a 2-D torch.Tensor or numpy.ndarray of real numbers")
    if isinstance(matrix, torch.Tensor):
        if matrix.is_complex() or matrix.dtype == torch.bool:
            raise TypeError(f"matrix must hold real numbers (a float or integer dtype), got {matrix.dtype}")
        t = matrix.detach().to(device="cpu", dtype=torch.float64)
    else:
        if matrix.dtype.kind not in "fiu":
            raise TypeError(f"matrix must hold real numbers (a float or integer dtype), got dtype {matrix.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float64))
    if t.dim() != 2:
        raise ValueError(f"matrix must be 2-D (rows x columns), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"matrix must not be empty, got shape {tuple(t.shape)}")
    check_finite("matrix", t)
    return t.numpy()


def _tau_lower(alpha: float) -> float:
    """The zero of psi1(tau) = log(tau+1) + alpha*log(tau/alpha+1) - tau for 0 < alpha <= 1 (tau_lower > sqrt(alpha)).

    Equivalently the zero of Phi(tau) + Phi(tau/alpha), Phi(z) = log(z+1)/z - 1/2 (the paper's kappa is
    tau_lower / sqrt(alpha); 2.5129 at alpha = 1). Phi is decreasing, Phi(2) > 0 > Phi(3), so [2*alpha, 3]
    brackets the unique root.
    """
    return float(brentq(lambda t: math.log1p(t) + alpha * math.log1p(t / alpha) - t, 2.0 * alpha, 3.0,
                        xtol=1e-14, rtol=1e-14))


def _x_lower(alpha: float) -> float:
    """The EVB threshold on x = gamma**2 / (M*sigma2): (1 + tau_lower) * (1 + alpha / tau_lower)."""
    tau = _tau_lower(alpha)
    return (1.0 + tau) * (1.0 + alpha / tau)


def _free_energy(sigma2: float, s: np.ndarray, total: float, L: int, M: int, H: int, x_lower: float) -> float:
    """2F/M as a function of sigma2, up to a constant (s: all L singular values; only the first H may be kept)."""
    alpha = L / M
    x = s[:H] ** 2 / (M * sigma2)
    x = x[x > x_lower]
    b = x - (1.0 + alpha)
    tau = 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))
    psi1 = np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau  # < 0 above the threshold, 0 at it
    return total / (M * sigma2) + L * math.log(sigma2) + float(psi1.sum())


def _estimate_sigma2(s: np.ndarray, L: int, M: int, H: int, x_lower: float) -> float:
    """The noise variance minimising the EVB free energy (global over a log grid, then refined by Brent)."""
    total = float(np.sum(s**2))
    upper = total / (L * M)  # beyond it the free energy only grows
    h_bar = math.ceil(L / (1.0 + L / M)) - 1  # no EVB solution keeps more components (Nakajima et al.)
    if H >= h_bar:
        lower = max(s[h_bar] ** 2 / (M * x_lower), float(np.mean(s[h_bar:] ** 2)) / M)
    else:  # a max_rank below h_bar voids that bound: search down to the floor
        lower = 0.0
    lower = max(lower, upper * _SIGMA2_FLOOR)
    if lower >= upper:  # e.g. a single row or column: everything is noise
        return upper

    def objective(log_s2: float) -> float:
        return _free_energy(math.exp(log_s2), s, total, L, M, H, x_lower)

    grid = np.linspace(math.log(lower), math.log(upper), _GRID_POINTS)
    values = np.array([objective(t) for t in grid])
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, _GRID_POINTS - 1)]
    res = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    best = float(res.x) if res.fun <= values[i] else float(grid[i])
    return min(max(math.exp(best), lower), upper)


def _result(rank: int, sigma2: float, threshold: float, s: np.ndarray, est: np.ndarray) -> VBMFResult:
    s = np.array(s, dtype=np.float64)
    est = np.array(est, dtype=np.float64)
    s.setflags(write=False)
    est.setflags(write=False)
    return VBMFResult(rank=rank, sigma2=float(sigma2), threshold=float(threshold), singular_values=s, estimates=est)
