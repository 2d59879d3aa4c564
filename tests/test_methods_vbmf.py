"""Tests for survey_lib.methods.vbmf: EVBMF rank and noise-variance recovery, the paper's threshold, validation."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from survey_lib.methods.vbmf import VBMFResult, evbmf, vbmf_rank

NOISE_STD = 0.1
SIGNAL_CASES = [((64, 48), 5), ((128, 36), 10), ((36, 128), 3)]
SEEDS = [0, 1, 2]


def low_rank_plus_noise(shape: tuple[int, int], rank: int, seed: int, factor: float = 5.0) -> np.ndarray:
    """A rank-``rank`` matrix whose smallest singular value is ``factor * sqrt(max(shape)) * NOISE_STD``, plus noise."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    u, _ = np.linalg.qr(rng.standard_normal((rows, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, rank)))
    s_min = factor * math.sqrt(max(shape)) * NOISE_STD
    signal = (u * (s_min * np.linspace(3.0, 1.0, rank))) @ v.T
    return signal + NOISE_STD * rng.standard_normal(shape)


def paper_kappa(alpha: float) -> float:
    """kappa > 1 solving Phi(sqrt(alpha)*kappa) + Phi(kappa/sqrt(alpha)) = 0, Phi(z) = log(z+1)/z - 1/2 (bisection)."""

    def xi(k: float) -> float:
        return sum(math.log(z + 1.0) / z - 0.5 for z in (math.sqrt(alpha) * k, k / math.sqrt(alpha)))

    lo, hi = 1.0, 10.0
    assert xi(lo) > 0 > xi(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if xi(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def paper_threshold(sigma2: float, shape: tuple[int, int]) -> float:
    """The paper's EVB truncation threshold sigma * sqrt(L + M + sqrt(L*M) * (kappa + 1/kappa))."""
    L, M = sorted(shape)
    kappa = paper_kappa(L / M)
    return math.sqrt(sigma2 * (L + M + math.sqrt(L * M) * (kappa + 1.0 / kappa)))


# ----------------------------------------------------------------------------------------------------------
# recovery on synthetic data
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("shape", "rank"), SIGNAL_CASES)
def test_recovers_rank_and_noise_variance(shape, rank, seed):
    y = low_rank_plus_noise(shape, rank, seed)
    res = evbmf(y)
    assert isinstance(res, VBMFResult)
    assert res.rank == rank
    assert res.sigma2 == pytest.approx(NOISE_STD**2, rel=0.2)
    assert res.singular_values.shape == (min(shape),)
    assert np.all(np.diff(res.singular_values) <= 0)
    assert res.estimates.shape == (rank,)
    assert vbmf_rank(y) == rank


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", [(64, 48), (36, 128), (100, 100)])
def test_pure_noise_keeps_nothing(shape, seed):
    y = NOISE_STD * np.random.default_rng(100 + seed).standard_normal(shape)
    res = evbmf(y)
    assert res.rank <= 1
    assert res.sigma2 == pytest.approx(NOISE_STD**2, rel=0.2)


@pytest.mark.parametrize(("shape", "rank"), SIGNAL_CASES)
def test_known_sigma2_gives_same_rank(shape, rank):
    y = low_rank_plus_noise(shape, rank, seed=7)
    res = evbmf(y, sigma2=NOISE_STD**2)
    assert res.rank == rank == evbmf(y).rank
    assert res.sigma2 == NOISE_STD**2


@pytest.mark.parametrize(("shape", "rank"), SIGNAL_CASES)
def test_transpose_invariance(shape, rank):
    y = low_rank_plus_noise(shape, rank, seed=3)
    a, b = evbmf(y), evbmf(y.T)
    assert a.rank == b.rank == rank
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-9)
    assert a.threshold == pytest.approx(b.threshold, rel=1e-9)
    np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=1e-10)
    np.testing.assert_allclose(a.estimates, b.estimates, rtol=1e-8)


def test_conv_kernel_channel_unfoldings():
    """Kim et al.: ranks of the mode-0 / mode-1 unfoldings of a Tucker-2 kernel [C_out, C_in, 3, 3] plus noise."""
    g = torch.Generator().manual_seed(0)
    c_out, c_in, r0, r1 = 64, 32, 6, 4
    core = 3.0 * torch.randn(r0, r1, 3, 3, generator=g, dtype=torch.float64)
    u0 = torch.linalg.qr(torch.randn(c_out, r0, generator=g, dtype=torch.float64))[0]
    u1 = torch.linalg.qr(torch.randn(c_in, r1, generator=g, dtype=torch.float64))[0]
    kernel = torch.einsum("abhw,oa,ib->oihw", core, u0, u1)
    kernel = (kernel + 0.01 * torch.randn(kernel.shape, generator=g, dtype=torch.float64)).float()
    assert vbmf_rank(kernel.reshape(c_out, -1)) == r0
    assert vbmf_rank(kernel.transpose(0, 1).reshape(c_in, -1)) == r1


# ----------------------------------------------------------------------------------------------------------
# cross-checks against the paper's closed forms
# ----------------------------------------------------------------------------------------------------------


def test_paper_kappa_at_square_shape():
    assert paper_kappa(1.0) == pytest.approx(2.5129, abs=1e-4)  # the constant quoted by Nakajima et al.


@pytest.mark.parametrize("shape", [(64, 48), (36, 128), (50, 50), (10, 500), (3, 7)])
def test_threshold_matches_paper_closed_form(shape):
    y = low_rank_plus_noise(shape, 1, seed=0)
    given = evbmf(y, sigma2=0.02)
    assert given.threshold == pytest.approx(paper_threshold(0.02, shape), rel=1e-9)
    est = evbmf(y)
    assert est.threshold == pytest.approx(paper_threshold(est.sigma2, shape), rel=1e-9)
    # the threshold lies above the Marchenko-Pastur edge of pure noise, sigma * (sqrt(L) + sqrt(M))
    assert est.threshold > math.sqrt(est.sigma2) * (math.sqrt(shape[0]) + math.sqrt(shape[1]))
    assert est.rank == int(np.sum(est.singular_values > est.threshold))


@pytest.mark.parametrize(("shape", "rank"), SIGNAL_CASES)
def test_estimates_are_shrunk_singular_values(shape, rank):
    res = evbmf(low_rank_plus_noise(shape, rank, seed=5))
    kept = res.singular_values[: res.rank]
    assert np.all(res.estimates > 0)
    assert np.all(res.estimates < kept)
    # shrinkage shrinks as the signal grows: the relative estimate rises with the singular value
    assert np.all(np.diff(res.estimates / kept) <= 1e-12)


@pytest.mark.parametrize(("shape", "rank"), SIGNAL_CASES + [((64, 48), 0)])
def test_sigma2_is_stationary_point_of_free_energy(shape, rank):
    """At the EVB optimum d F / d sigma2 = 0 reads L*M*sigma2 = ||Y||^2 - sum_h gamma_h * gamma_hat_h."""
    if rank:
        y = low_rank_plus_noise(shape, rank, seed=11)
    else:
        y = NOISE_STD * np.random.default_rng(11).standard_normal(shape)
    res = evbmf(y)
    assert res.rank == rank
    fit = float(np.sum(res.singular_values[: res.rank] * res.estimates))
    assert res.sigma2 == pytest.approx((np.sum(y**2) - fit) / y.size, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# options, input kinds and edge cases
# ----------------------------------------------------------------------------------------------------------


def test_max_rank_caps_the_rank():
    y = low_rank_plus_noise((64, 48), 5, seed=0)
    assert evbmf(y, max_rank=3).rank == 3
    assert evbmf(y, sigma2=NOISE_STD**2, max_rank=3).rank == 3
    assert evbmf(y, max_rank=48).rank == 5
    assert evbmf(y, max_rank=1).estimates.shape == (1,)


def test_torch_and_numpy_inputs_agree():
    y = low_rank_plus_noise((36, 128), 3, seed=1)
    a = evbmf(y)
    b = evbmf(torch.from_numpy(y).requires_grad_(True))
    c = evbmf(y.astype(np.float32))
    assert a.rank == b.rank == c.rank == 3
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-12)
    assert a.sigma2 == pytest.approx(c.sigma2, rel=1e-4)
    assert evbmf(np.arange(12).reshape(3, 4)).rank >= 0  # integer dtype accepted
    assert evbmf(y[::-1, ::2]).rank == 3  # non-contiguous views accepted


@pytest.mark.parametrize("scale", [1e-100, 1e-3, 1e3, 1e100])
def test_scale_equivariance(scale):
    y = low_rank_plus_noise((64, 48), 5, seed=2)
    ref, res = evbmf(y), evbmf(y * scale)
    assert res.rank == ref.rank == 5
    assert res.sigma2 == pytest.approx(ref.sigma2 * scale**2, rel=1e-6)
    assert res.threshold == pytest.approx(ref.threshold * scale, rel=1e-6)


def test_all_zeros_gives_rank_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = evbmf(np.zeros((20, 30)))
        given = evbmf(torch.zeros(30, 20), sigma2=0.5)
    assert res.rank == given.rank == 0
    assert res.sigma2 == 0.0 and res.threshold == 0.0
    assert given.sigma2 == 0.5 and math.isfinite(given.threshold) and given.threshold > 0
    for r in (res, given):
        assert r.estimates.shape == (0,)
        np.testing.assert_array_equal(r.singular_values, np.zeros(20))


def test_single_row_and_exact_low_rank():
    rng = np.random.default_rng(0)
    # one row: noise and signal cannot be told apart, EVB keeps nothing
    assert evbmf(rng.standard_normal((1, 50))).rank == 0
    # noise-free rank 3: every signal component is kept, the noise variance is ~0
    exact = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = evbmf(exact)
    assert res.rank == 3
    assert res.sigma2 < 1e-9 * np.mean(exact**2)


def test_result_is_frozen_and_read_only():
    res = evbmf(low_rank_plus_noise((64, 48), 5, seed=0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.rank = 1
    with pytest.raises(ValueError):
        res.singular_values[0] = 0.0


def test_deterministic():
    y = low_rank_plus_noise((128, 36), 10, seed=4)
    a, b = evbmf(y), evbmf(y.copy())
    assert (a.rank, a.sigma2, a.threshold) == (b.rank, b.sigma2, b.threshold)


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------

GOOD = np.ones((4, 5))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"matrix": [[1.0, 2.0], [3.0, 4.0]]}, TypeError, "matrix must be a 2-D torch.Tensor or numpy.ndarray"),
        ({"matrix": "abc"}, TypeError, "matrix"),
        ({"matrix": torch.ones(3, 3, dtype=torch.complex64)}, TypeError, "matrix must hold real numbers"),
        ({"matrix": np.ones((3, 3), dtype=bool)}, TypeError, "matrix must hold real numbers"),
        ({"matrix": np.array([["a", "b"]])}, TypeError, "matrix must hold real numbers"),
        ({"matrix": np.ones(5)}, ValueError, r"matrix must be 2-D .*\(5,\)"),
        ({"matrix": torch.ones(2, 3, 4)}, ValueError, r"matrix must be 2-D .*\(2, 3, 4\)"),
        ({"matrix": np.ones((0, 4))}, ValueError, r"matrix must not be empty.*\(0, 4\)"),
        ({"matrix": np.array([[1.0, np.nan], [0.0, 1.0]])}, ValueError, "matrix must be finite"),
        ({"matrix": torch.tensor([[1.0, float("inf")]])}, ValueError, "matrix must be finite"),
        ({"matrix": GOOD, "sigma2": "0.1"}, TypeError, "sigma2 must be a number"),
        ({"matrix": GOOD, "sigma2": True}, TypeError, "sigma2 must be a number"),
        ({"matrix": GOOD, "sigma2": 0.0}, ValueError, r"sigma2=0.0 is out of range; accepted: sigma2 > 0"),
        ({"matrix": GOOD, "sigma2": -1.0}, ValueError, r"sigma2=-1.0 is out of range"),
        ({"matrix": GOOD, "sigma2": float("nan")}, ValueError, "sigma2 must be a finite number"),
        ({"matrix": GOOD, "sigma2": float("inf")}, ValueError, "sigma2 must be a finite number"),
        ({"matrix": GOOD, "max_rank": 2.0}, TypeError, "max_rank must be an int"),
        ({"matrix": GOOD, "max_rank": True}, TypeError, "max_rank must be an int"),
        ({"matrix": GOOD, "max_rank": 0}, ValueError, r"max_rank=0 is out of range; accepted: 1 <= max_rank <= 4"),
        ({"matrix": GOOD.T, "max_rank": 5}, ValueError, r"max_rank=5 is out of range; accepted: 1 <= max_rank <= 4"),
    ],
)
def test_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        evbmf(**kwargs)
    with pytest.raises(error, match=match):
        vbmf_rank(**kwargs)


def test_numpy_integer_parameters_accepted():
    y = low_rank_plus_noise((64, 48), 5, seed=0)
    assert evbmf(y, sigma2=np.float64(0.01), max_rank=np.int64(10)).rank == 5
