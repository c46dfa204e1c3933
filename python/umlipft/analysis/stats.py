"""Control limits for per-atom Q-residuals and Hotelling T² (multivariate statistical process control).

Conventions: ``alpha`` is the false-alarm probability (0.01 gives the 99 % limit). Eigenvalues
are variances with ddof=1, as scikit-learn's ``PCA.explained_variance_``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha (false-alarm probability) must be between 0 and 1, got {alpha}")


@dataclass(frozen=True)
class QLimit:
    value: float
    method: str  # "jackson-mudholkar"; "box" where JM's power transform degenerates


def jackson_mudholkar_limit(theta: tuple[float, float, float] | np.ndarray | list, alpha: float) -> QLimit:
    """Upper control limit of Q (Jackson & Mudholkar 1979).

    ``theta`` = (θ1, θ2, θ3), θi = Σ_{j>k} λ_jⁱ over the residual (discarded) eigenvalues (see
    :func:`quadratic_form_moments` for the per-element generalisation). JM treat (Q/θ1)^h0,
    h0 = 1 − 2θ1θ3/(3θ2²), as normal with mean 1 + θ2h0(h0 − 1)/θ1² and standard deviation
    sqrt(2θ2h0²)/θ1, so
        Q_α = θ1 [1 + θ2 h0 (h0 − 1)/θ1² ± c_α sqrt(2 θ2 h0²)/θ1]^(1/h0).
    The textbook formula has "+" because it assumes h0 > 0. Descriptor spectra (one dominant
    eigenvalue over a long tail, as SOAP's) often give h0 < 0; then the power is decreasing, the
    upper quantile of Q is the lower quantile of (Q/θ1)^h0, and the sign is "−". On Gaussian
    samples of the aqueous SOAP data this keeps the false-alarm rate near alpha where Box's
    g·χ²_h is off by a factor of two at alpha = 0.01; Box remains the fallback when h0 = 0 or the
    bracket is not positive.
    """
    from scipy.stats import chi2, norm

    _check_alpha(alpha)
    theta1, theta2, theta3 = (float(t) for t in list(theta)[:3])
    if theta1 <= 0.0 or theta2 <= 0.0:
        # The k components already span the data: any residual is outside the model.
        return QLimit(0.0, "zero-residual")
    h0 = 1.0 - 2.0 * theta1 * theta3 / (3.0 * theta2**2)
    c_alpha = float(norm.ppf(1.0 - alpha))
    spread = c_alpha * math.sqrt(2.0 * theta2 * h0**2) / theta1
    base = 1.0 + theta2 * h0 * (h0 - 1.0) / theta1**2 + (spread if h0 > 0 else -spread)
    if abs(h0) < 1e-9 or base <= 0.0:
        # Box (1954): g·χ²_h with the same mean and variance as Q.
        g, h = theta2 / theta1, theta1**2 / theta2
        return QLimit(float(g * chi2.ppf(1.0 - alpha, h)), "box")
    return QLimit(theta1 * base ** (1.0 / h0), "jackson-mudholkar")


def hotelling_t2_limit(n_components: int, n_samples: int, alpha: float) -> float:
    """Upper limit of T² for a NEW observation, PCA fitted on ``n_samples`` rows.

    T²_α = k (n−1)(n+1) / (n (n−k)) · F_{1−α}(k, n−k).
    """
    from scipy.stats import f

    _check_alpha(alpha)
    k, n = int(n_components), int(n_samples)
    if n <= k:
        raise InputError(f"the T² limit needs more fitted samples ({n}) than components ({k})")
    return float(k * (n - 1) * (n + 1) / (n * (n - k)) * f.ppf(1.0 - alpha, k, n - k))


def empirical_band(values: np.ndarray, k_sigma: float) -> tuple[float, float, float, float]:
    """(mean, std, mean − kσ, mean + kσ) of the finite values (std with ddof=1).

    Over one tracked atom's own Q(t) along a trajectory this is the study's band (see
    :func:`umlipft.analysis.monitor.own_band`); over an element's training-set Q it is a
    training-set band, which the study did not draw."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan, math.nan, math.nan)
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return mean, std, mean - k_sigma * std, mean + k_sigma * std


def liu_tang_zhang_limit(theta: Sequence[float], alpha: float) -> QLimit:
    """Upper α-quantile of a non-central Gaussian quadratic form (Liu, Tang & Zhang 2009).

    Matches mean, variance, skewness and kurtosis of Q (from θ1..θ4, see
    :func:`quadratic_form_moments`) with a non-central χ². Used for one element under a global
    PCA, where the element's residuals have a non-zero mean and Jackson-Mudholkar's moment
    expansion (exact for the centred case only) misplaces the tail: on the aqueous SOAP data it gave
    0.5 % false alarms at alpha = 1 % where this gives 1.0 %.
    """
    from scipy.stats import chi2, ncx2

    _check_alpha(alpha)
    c1, c2, c3, c4 = (float(t) for t in theta)
    if c1 <= 0.0 or c2 <= 0.0 or c3 <= 0.0:
        return QLimit(0.0, "zero-residual")
    s1, s2 = c3 / c2**1.5, c4 / c2**2
    if s1**2 > s2:
        a = 1.0 / (s1 - math.sqrt(s1**2 - s2))
        delta = s1 * a**3 - a**2
        dof = a**2 - 2.0 * delta
    else:
        a, delta, dof = 1.0 / s1, 0.0, c2**3 / c3**2
    quantile = ncx2.ppf(1.0 - alpha, dof, delta) if delta > 0 else chi2.ppf(1.0 - alpha, dof)
    value = (quantile - (dof + delta)) / (math.sqrt(2.0) * a) * math.sqrt(2.0 * c2) + c1
    return QLimit(float(value), "liu-tang-zhang")


def quadratic_form_moments(residuals: np.ndarray) -> tuple[float, float, float, float]:
    """θ1..θ4 for the Q limits from the training residuals r = (x − μ)(I − PPᵀ) of one group.

    Q = ||r||² is a quadratic form of a Gaussian r ~ N(m, S). Its cumulants are
    κ_i = 2^(i−1) (i−1)! [tr(Sⁱ) + i mᵀS^(i−1)m], so with JM's κ1 = θ1, κ2 = 2θ2, κ3 = 8θ3:
        θ1 = tr S + mᵀm,   θ2 = tr S² + 2 mᵀSm,   θ3 = tr S³ + 3 mᵀS²m,  θ4 = tr S⁴ + 4 mᵀS³m.
    For the atoms a PCA was fitted on m = 0 and θi = Σ_{j>k} λ_jⁱ, the textbook definition; for one
    element under a global PCA m ≠ 0 (the element's atoms sit away from the global mean), which is
    what makes a per-element limit of a global PCA meaningful. tr(Sⁱ) is taken on the smaller of
    the Gram matrices (m × m with m = min(n, d)), never diagonalising.
    """
    r = np.asarray(residuals, dtype=np.float64)
    n, d = r.shape
    if n < 2:
        raise InputError("Q-limit moments need at least two training atoms")
    m = r.mean(axis=0)
    rc = r - m
    gram = (rc @ rc.T if n <= d else rc.T @ rc) / (n - 1)
    tr1 = float(np.trace(gram))
    tr2 = float(np.sum(gram * gram))  # tr(G²) = ||G||_F² for symmetric G
    gram2 = gram @ gram
    tr3 = float(np.sum(gram2 * gram))  # tr(G³) = Σ_ij (G²)_ij G_ji
    tr4 = float(np.sum(gram2 * gram2))  # tr(G⁴) = ||G²||_F²
    s_m = rc.T @ (rc @ m) / (n - 1)  # S m without forming S (d × d)
    s2_m = rc.T @ (rc @ s_m) / (n - 1)
    theta = (tr1 + float(m @ m), tr2 + 2.0 * float(m @ s_m), tr3 + 3.0 * float(s_m @ s_m),
             tr4 + 4.0 * float(s_m @ s2_m))
    return tuple(max(t, 0.0) for t in theta)  # type: ignore[return-value]


def quantile_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Edges of ``n_bins`` bins holding (nearly) equal numbers of the finite ``values``; repeated
    quantiles (ties) merge, so fewer bins may come back. The last edge is the maximum, included."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise InputError("no finite values to bin")
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, max(1, int(n_bins)) + 1)))
    if edges.size == 1:  # all values equal: one narrow bin around them
        pad = max(abs(float(edges[0])) * 1e-6, 1e-9)
        edges = np.array([edges[0] - pad, edges[0] + pad])
    return edges


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value for ``edges``: half-open [e_i, e_i+1), the last bin closed; -1 outside."""
    values = np.asarray(values, dtype=float)
    index = np.searchsorted(edges, values, side="right") - 1
    index[values == edges[-1]] = edges.size - 2
    index[(values < edges[0]) | (values > edges[-1]) | ~np.isfinite(values)] = -1
    return index
