"""Error metrics of a model against reference labels, in the study's conventions.

Energy residual per atom: (E_model - E_ref) / N, in meV/atom; positive means the model's energy
is above the reference. Forces: RMSE over every Cartesian component (eV/Å), overall and per
element. Stress: RMSE over the six independent (Voigt) components, eV/Å^3, ASE sign.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

EV_PER_A3_TO_GPA = 160.21766208


@dataclasses.dataclass(frozen=True)
class FrameError:
    """One frame's errors; the row of the per-frame CSV."""

    index: int
    n_atoms: int
    energy_ref_eV: float
    energy_model_eV: float
    energy_residual_meV_per_atom: float
    force_rmse_eV_per_A: float | None
    stress_rmse_eV_per_A3: float | None
    step: int | None = None
    source: str | None = None


@dataclasses.dataclass(frozen=True)
class ErrorSummary:
    n_frames: int
    n_atoms: int
    energy_residual_mean_meV_per_atom: float
    energy_residual_rmse_meV_per_atom: float
    energy_residual_mae_meV_per_atom: float
    energy_residual_max_abs_meV_per_atom: float
    force_rmse_eV_per_A: float | None
    force_mae_eV_per_A: float | None
    force_rmse_per_element_eV_per_A: dict[str, float]
    stress_rmse_eV_per_A3: float | None
    stress_rmse_GPa: float | None
    n_frames_with_stress: int


def rmse(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    return float(math.sqrt(np.mean(values**2))) if values.size else float("nan")


def energy_residuals_meV_per_atom(e_model: Sequence[float], e_ref: Sequence[float],
                                  n_atoms: Sequence[int]) -> np.ndarray:
    e_model = np.asarray(e_model, dtype=float)
    e_ref = np.asarray(e_ref, dtype=float)
    n = np.asarray(n_atoms, dtype=float)
    return (e_model - e_ref) / n * 1000.0


def voigt6(stress: Any) -> np.ndarray:
    """Six Voigt components (xx yy zz yz xz xy) of a 3x3 or Voigt stress."""
    s = np.asarray(stress, dtype=float)
    if s.size == 6:
        return s.reshape(6)
    s = s.reshape(3, 3)
    return np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


def summarise(frames: Sequence[FrameError], force_diffs: Sequence[np.ndarray],
              symbols: Sequence[Sequence[str]], stress_diffs: Sequence[np.ndarray | None]) -> ErrorSummary:
    """Aggregate per-frame data: ``force_diffs[i]`` is frame i's (N,3) model-minus-reference forces
    (or an empty array when the frame has no reference forces), ``symbols[i]`` its element symbols."""
    residuals = np.array([f.energy_residual_meV_per_atom for f in frames])
    with_forces = [(d, s) for d, s in zip(force_diffs, symbols) if d.size]
    force_rmse = force_mae = None
    per_element: dict[str, float] = {}
    if with_forces:
        all_diffs = np.concatenate([d for d, _ in with_forces])
        all_symbols = np.concatenate([np.asarray(s) for _, s in with_forces])
        force_rmse = rmse(all_diffs)
        force_mae = float(np.mean(np.abs(all_diffs)))
        for element in sorted(set(all_symbols.tolist())):
            per_element[element] = rmse(all_diffs[all_symbols == element])
    stresses = [d for d in stress_diffs if d is not None]
    stress_rmse = rmse(np.concatenate(stresses)) if stresses else None
    return ErrorSummary(
        n_frames=len(frames),
        n_atoms=int(sum(f.n_atoms for f in frames)),
        energy_residual_mean_meV_per_atom=float(residuals.mean()),
        energy_residual_rmse_meV_per_atom=rmse(residuals),
        energy_residual_mae_meV_per_atom=float(np.abs(residuals).mean()),
        energy_residual_max_abs_meV_per_atom=float(np.abs(residuals).max()),
        force_rmse_eV_per_A=force_rmse,
        force_mae_eV_per_A=force_mae,
        force_rmse_per_element_eV_per_A=per_element,
        stress_rmse_eV_per_A3=stress_rmse,
        stress_rmse_GPa=None if stress_rmse is None else stress_rmse * EV_PER_A3_TO_GPA,
        n_frames_with_stress=len(stresses),
    )
