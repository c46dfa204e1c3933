"""Control limits for per-atom Q-residuals and Hotelling T² (multivariate statistical process control).

Conventions: ``alpha`` is the false-alarm probability (0.01 gives the 99 % limit). Eigenvalues
are variances with ddof=1, as scikit-learn's ``PCA.explained_variance_``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha (false-alarm probability) must be between 0 and 1, got {alpha}")


@dataclass(frozen=True)
class QLimit:
    value: float
    method: str  # "jackson-mudholkar", or "box" when h0 <= 0 makes Jackson-Mudholkar undefined


def jackson_mudholkar_limit(theta: tuple[float, float, float] | np.ndarray, alpha: float) -> QLimit:
    """Upper control limit of Q (Jackson & Mudholkar 1979).

    ``theta`` = (θ1, θ2, θ3), θi = Σ_{j>k} λ_j^i over the residual (discarded) eigenvalues.
    Q_α = θ1 [c_α sqrt(2 θ2 h0²)/θ1 + 1 + θ2 h0 (h0 − 1)/θ1²]^(1/h0), h0 = 1 − 2θ1θ3/(3θ2²).
    """
    from scipy.stats import chi2, norm

    _check_alpha(alpha)
    theta1, theta2, theta3 = (float(t) for t in theta)
    if theta1 <= 0.0 or theta2 <= 0.0:
        # The k components already span the data: any residual is outside the model.
        return QLimit(0.0, "zero-residual")
    h0 = 1.0 - 2.0 * theta1 * theta3 / (3.0 * theta2**2)
    if h0 <= 0.0:
        # The expansion needs h0 > 0; Box's g·χ²_h (same mean and variance) is the standard fallback.
        g, h = theta2 / theta1, theta1**2 / theta2
        return QLimit(float(g * chi2.ppf(1.0 - alpha, h)), "box")
    c_alpha = float(norm.ppf(1.0 - alpha))
    base = c_alpha * math.sqrt(2.0 * theta2 * h0**2) / theta1 + 1.0 + theta2 * h0 * (h0 - 1.0) / theta1**2
    if base <= 0.0:
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
    """(mean, std, mean − kσ, mean + kσ) of finite values: the band the study drew around Q."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan, math.nan, math.nan)
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return mean, std, mean - k_sigma * std, mean + k_sigma * std


def residual_moments(centred: np.ndarray, explained_variance: np.ndarray) -> tuple[float, float, float]:
    """θ1..θ3 of the discarded eigenvalues without diagonalising the covariance.

    θi = tr(Cⁱ) − Σ_{j≤k} λ_jⁱ with C = XᵀX/(n−1). tr(Cⁱ) equals the trace of the same power of
    the smaller Gram matrix XXᵀ/(n−1), so the cost is one m×m product with m = min(n, d).
    """
    x = np.asarray(centred, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise InputError("residual moments need at least two samples")
    gram = (x @ x.T if n <= d else x.T @ x) / (n - 1)
    tr1 = float(np.trace(gram))
    tr2 = float(np.sum(gram * gram))  # symmetric: tr(G²) = ||G||_F²
    tr3 = float(np.sum((gram @ gram) * gram))  # tr(G³) = Σ_ij (G²)_ij G_ji, G symmetric
    lam = np.asarray(explained_variance, dtype=np.float64)
    theta = (tr1 - float(np.sum(lam)), tr2 - float(np.sum(lam**2)), tr3 - float(np.sum(lam**3)))
    # Rounding can leave tiny negatives when the k components capture everything.
    scale = (abs(tr1), abs(tr2), abs(tr3))
    return tuple(max(t, 0.0) if abs(t) > 1e-12 * s else 0.0 for t, s in zip(theta, scale))  # type: ignore[return-value]
