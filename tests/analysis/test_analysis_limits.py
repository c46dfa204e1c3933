"""Control limits: false-alarm rates on samples of the fitted Gaussian, and known special cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2
from tolerances import CONTROL_LIMIT_BINOMIAL_SIGMAS, CONTROL_LIMIT_REL

from umlipft.analysis.stats import (empirical_band, hotelling_t2_limit, jackson_mudholkar_limit,
                                    liu_tang_zhang_limit, quadratic_form_moments)

N_SAMPLES = 12000


def _gaussian_like(x: np.ndarray, n: int, seed: int):
    """Samples of N(mean(x), cov(x, ddof=1)) in chunks: mean + z·(x − mean)/sqrt(m − 1) has exactly
    that covariance without forming the 5,740 × 5,740 matrix."""
    rng = np.random.default_rng(seed)
    mu = x.mean(axis=0)
    xc = (x - mu) / np.sqrt(x.shape[0] - 1)
    for start in range(0, n, 2000):
        yield mu + rng.standard_normal((min(2000, n - start), x.shape[0])) @ xc


def _check_rate(rate: float, alpha: float, n: int) -> None:
    allowed = CONTROL_LIMIT_REL * alpha + CONTROL_LIMIT_BINOMIAL_SIGMAS * np.sqrt(alpha * (1 - alpha) / n)
    assert abs(rate - alpha) <= allowed, f"false-alarm rate {rate:.4f} for alpha {alpha} (allowed ±{allowed:.4f})"


@pytest.mark.parametrize("element", ["O", "H"])
def test_jackson_mudholkar_false_alarms_per_element_pca(element_pca, fit_features, element):
    x, symbols = fit_features
    xe = x[symbols == element]
    q = np.concatenate([element_pca.evaluate(s, np.full(len(s), element)).q
                        for s in _gaussian_like(xe, N_SAMPLES, seed=11)])
    for alpha in (0.05, 0.01):
        limit = element_pca.limits(alpha)[element]
        assert limit.q_limit_method == "jackson-mudholkar"
        _check_rate(float(np.mean(q > limit.q_limit)), alpha, q.size)


def test_global_pca_limits_false_alarms(global_pca, fit_features):
    """The global JM limit on the global Gaussian, and the per-element (non-central) limit of O."""
    x, symbols = fit_features
    q_all = np.concatenate([global_pca.evaluate(s, np.full(len(s), "O")).q
                            for s in _gaussian_like(x, N_SAMPLES, seed=5)])
    xo = x[symbols == "O"]
    q_o = np.concatenate([global_pca.evaluate(s, np.full(len(s), "O")).q
                          for s in _gaussian_like(xo, N_SAMPLES, seed=6)])
    for alpha in (0.05, 0.01):
        limit = global_pca.global_q_limit(alpha)
        assert limit.method == "jackson-mudholkar"
        _check_rate(float(np.mean(q_all > limit.value)), alpha, q_all.size)
        element = global_pca.limits(alpha)["O"]
        assert element.q_limit_method == "liu-tang-zhang"
        _check_rate(float(np.mean(q_o > element.q_limit)), alpha, q_o.size)


def test_t2_on_fitted_gaussian_follows_chi2(element_pca, fit_features):
    """Sampled from the fitted Gaussian, T² is exactly χ²_k; the F limit (for new observations
    with estimated parameters) sits a little above χ²_k's quantile."""
    x, symbols = fit_features
    xo = x[symbols == "O"]
    t2 = np.concatenate([element_pca.evaluate(s, np.full(len(s), "O")).t2
                         for s in _gaussian_like(xo, N_SAMPLES, seed=7)])
    for alpha in (0.05, 0.01):
        limit = element_pca.limits(alpha)["O"].t2_limit
        assert limit > chi2.ppf(1 - alpha, 5)
        expected = float(chi2.sf(limit, 5))
        sigma = np.sqrt(expected * (1 - expected) / t2.size)
        assert abs(np.mean(t2 > limit) - expected) <= CONTROL_LIMIT_BINOMIAL_SIGMAS * sigma


def test_t2_f_limit_is_exact_for_new_observations():
    """Fit on n Gaussian rows, test new rows: over many fits the F limit's rate is alpha."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(3)
    d, k, n, alpha = 6, 3, 30, 0.05
    scale = np.diag([3.0, 2.0, 1.5, 0.3, 0.2, 0.1])
    flags, total = 0, 0
    for _ in range(400):
        fit = rng.standard_normal((n, d)) @ scale
        new = rng.standard_normal((50, d)) @ scale
        p = PCA(n_components=k, svd_solver="full").fit(fit)
        t2 = np.sum(((new - p.mean_) @ p.components_.T) ** 2 / p.explained_variance_, axis=1)
        flags += int(np.sum(t2 > hotelling_t2_limit(k, n, alpha)))
        total += t2.size
    # The components are estimated too, so the rate is near (not exactly) alpha.
    _check_rate(flags / total, alpha, total)


def test_jm_equal_eigenvalues_is_scaled_chi2():
    """m equal residual eigenvalues λ: Q = λ·χ²_m exactly, and JM (h0 = 1/3) is Wilson-Hilferty."""
    lam, m = 0.7, 40
    theta = (m * lam, m * lam**2, m * lam**3)
    for alpha in (0.05, 0.01, 0.001):
        exact = lam * chi2.ppf(1 - alpha, m)
        assert jackson_mudholkar_limit(theta, alpha).value == pytest.approx(exact, rel=5e-3)


def test_ltz_central_chi2_and_moments_from_residuals():
    rng = np.random.default_rng(0)
    # Residuals with a known covariance S and mean m: moments by the formula and by brute force.
    r = rng.standard_normal((300, 8)) @ np.diag([2, 1, 1, 0.5, 0.5, 0.2, 0.1, 0.1]) + 0.3
    theta = quadratic_form_moments(r)
    m, s = r.mean(axis=0), np.cov(r, rowvar=False)
    ref = [np.trace(np.linalg.matrix_power(s, i)) + i * m @ np.linalg.matrix_power(s, i - 1) @ m
           for i in (1, 2, 3, 4)]
    np.testing.assert_allclose(theta, ref, rtol=1e-10)
    # Central, equal eigenvalues: LTZ is exact (a scaled χ²).
    lam, k = 0.5, 12
    theta_c = (k * lam, k * lam**2, k * lam**3, k * lam**4)
    assert liu_tang_zhang_limit(theta_c, 0.01).value == pytest.approx(lam * chi2.ppf(0.99, k), rel=1e-9)


def test_empirical_band():
    values = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    mean, std, lo, hi = empirical_band(values, 2.0)
    assert mean == 2.5 and std == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert (lo, hi) == (pytest.approx(2.5 - 2 * std), pytest.approx(2.5 + 2 * std))


def test_stored_band_is_training_mean_and_std(element_pca, fit_features):
    x, symbols = fit_features
    ev = element_pca.evaluate(x, symbols)
    lim = element_pca.limits(0.01, k_sigma=2.0)["H"]
    qh = ev.q[symbols == "H"]
    assert lim.q_mean == pytest.approx(qh.mean(), rel=1e-12)
    assert lim.q_band_high == pytest.approx(qh.mean() + 2 * qh.std(ddof=1), rel=1e-12)
