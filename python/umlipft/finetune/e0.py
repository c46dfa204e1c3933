"""The E0 trap: which per-element reference energies the fine-tuned model starts from.

A MACE model's energy is sum_i E0[Z_i] + (learned interaction energy). MACE-MP-0's E0s are
*fitted* values (H about -3.67 eV, O -7.28, Co -5.58), not isolated-atom DFT energies (H -1.12,
O -1.57, Co -0.82 in the study's VASP setup); the learned part was trained on top of the fitted
values. mace-torch silently replaces the foundation's E0s by the energies of any
``config_type=IsolatedAtom`` frames in the training file, which shifts every frame by
sum_i (E0_iso - E0_fitted): on the study's aqueous frames about +3.5 eV/atom before the first
optimisation step. The fine-tune then spends its budget unlearning the shift, or fails.

Because the E0 term is additive, the starting model's energy on a frame is exactly the
foundation's energy plus sum_i (E0_new[Z_i] - E0_foundation[Z_i]) (mace-torch copies every other
weight of the foundation). So evaluating the foundation on a few training frames predicts the
starting model's error under every E0 choice, before any training; :func:`decide_e0s` does that
and refuses a choice whose starting error is out of bounds, naming the fix.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import InputError
from ..io import reference_energy

if TYPE_CHECKING:
    from ase import Atoms

E0_POLICIES = ("foundation", "isolated-atoms", "estimated")


def is_isolated_atom(atoms: "Atoms") -> bool:
    """mace-torch's own criterion (config_type == IsolatedAtom), plus single-atom frames, which
    are isolated-atom references whatever their tag says."""
    return atoms.info.get("config_type") == "IsolatedAtom" or len(atoms) == 1


def isolated_atom_energies(frames: "Sequence[Atoms]", energy_key: str) -> dict[int, float]:
    energies: dict[int, float] = {}
    for atoms in frames:
        if is_isolated_atom(atoms) and len(atoms) == 1:
            energy = reference_energy(atoms, energy_key)
            if energy is not None:
                energies[int(atoms.numbers[0])] = energy
    return energies


def foundation_head_index(model: Any) -> int:
    """The head mace-torch fine-tunes from (``remove_pt_head`` without ``--foundation_head``):
    the first head that is not ``pt_head``; 0 for a single-head model. A model that is itself
    the result of replay fine-tuning stores ``pt_head`` first, and its pt_head E0s are the
    original foundation's, not those of the head being continued."""
    heads = list(getattr(model, "heads", None) or ["Default"])
    return next((i for i, h in enumerate(heads) if h != "pt_head"), 0)


def foundation_e0s(model: Any) -> dict[int, float]:
    """Per-element E0s of a mace-torch model (of the head fine-tuning continues, see
    :func:`foundation_head_index`)."""
    values = model.atomic_energies_fn.atomic_energies.detach().cpu().double().numpy()
    if values.ndim > 1:
        values = values.reshape(-1, values.shape[-1])[foundation_head_index(model)]
    return {int(z): float(e) for z, e in zip(model.atomic_numbers.tolist(), values)}


@dataclasses.dataclass(frozen=True)
class StartErrors:
    """Predicted energy error (meV/atom) of the starting model on the check frames."""

    mean_meV_per_atom: float
    rmse_meV_per_atom: float


@dataclasses.dataclass(frozen=True)
class E0Decision:
    policy: str
    mace_e0s_argument: str
    e0s_eV: dict[str, float]  # element symbol -> E0 used by the starting model (estimated: corrections applied)
    foundation_e0s_eV: dict[str, float]
    isolated_atom_e0s_eV: dict[str, float]
    isolated_atom_frames_dropped: int
    check_frames: int
    start_errors: dict[str, StartErrors]  # policy -> predicted starting error
    chosen_start_rmse_meV_per_atom: float
    accepted_large_start_error: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _errors(residual_eV: np.ndarray, n_atoms: np.ndarray) -> StartErrors:
    per_atom = residual_eV / n_atoms * 1000.0
    return StartErrors(float(per_atom.mean()), float(np.sqrt(np.mean(per_atom**2))))


def decide_e0s(*, policy: str, frames: "Sequence[Atoms]", foundation_energies_eV: Sequence[float],
               foundation_e0: dict[int, float], isolated: dict[int, float], energy_key: str,
               max_start_error_meV_per_atom: float, accept_large_start_error: bool,
               isolated_frames_dropped: int) -> E0Decision:
    """Predict the starting error for every E0 policy on ``frames`` (labelled, non-isolated) whose
    foundation energies are given, and return the decision for ``policy`` or raise InputError."""
    from ase.data import chemical_symbols

    if policy not in E0_POLICIES:
        raise InputError(f"e0s must be one of {', '.join(E0_POLICIES)}, got {policy!r}")
    zs = sorted({int(z) for atoms in frames for z in atoms.numbers})
    counts = np.array([[np.count_nonzero(atoms.numbers == z) for z in zs] for atoms in frames], dtype=float)
    n_atoms = counts.sum(axis=1)
    e_found = np.asarray(foundation_energies_eV, dtype=float)
    e_ref = np.array([reference_energy(a, energy_key) for a in frames], dtype=float)
    base = e_found - e_ref

    errors: dict[str, StartErrors] = {"foundation": _errors(base, n_atoms)}
    missing = [z for z in zs if z not in isolated]
    if isolated and not missing:
        shift = counts @ np.array([isolated[z] - foundation_e0[z] for z in zs])
        errors["isolated-atoms"] = _errors(base + shift, n_atoms)
    # Least-squares per-element corrections (what mace-torch's E0s=estimated fits, here on the
    # check frames); with one composition the system is rank 1 and lstsq takes the min-norm one.
    correction, *_ = np.linalg.lstsq(counts, -base, rcond=None)
    errors["estimated"] = _errors(base + counts @ correction, n_atoms)

    if policy == "isolated-atoms":
        if not isolated:
            raise InputError(
                "e0s: isolated-atoms needs config_type=IsolatedAtom frames (one atom each, with a "
                "reference energy) in the training file; there are none. Use e0s: foundation")
        if missing:
            raise InputError(
                "e0s: isolated-atoms, but the training file has no IsolatedAtom frame for "
                f"{', '.join(chemical_symbols[z] for z in missing)}; add them or use e0s: foundation")

    chosen = errors[policy]
    if abs(chosen.rmse_meV_per_atom) > max_start_error_meV_per_atom and not accept_large_start_error:
        best = min(errors, key=lambda p: errors[p].rmse_meV_per_atom)
        table = "; ".join(f"{p}: {e.rmse_meV_per_atom:.1f}" for p, e in errors.items())
        reason = (
            f"with e0s: {policy} the starting model's energy error on {len(frames)} training frames "
            f"would be {chosen.rmse_meV_per_atom:.1f} meV/atom (RMSE of (E_model - E_ref)/N), above "
            f"max_start_error_meV_per_atom = {max_start_error_meV_per_atom:g}. Predicted starting "
            f"errors (meV/atom) by E0 choice: {table}."
        )
        if policy == "isolated-atoms":
            reason += (
                " MACE-MP-0's E0s are fitted values, not isolated-atom DFT energies; replacing them "
                "with the isolated-atom energies shifts every energy the foundation learned on top of them.")
        elif policy == "foundation":
            reason += (
                " The reference energies are on a different absolute scale from the foundation's "
                "training data (another code, functional or pseudopotentials).")
        fix = (f" Fix: use e0s: {best} (--e0s {best})" if best != policy else " Fix: check the reference labels")
        fix += ", or pass --accept-large-start-error to train from this start anyway."
        raise InputError(reason + fix)

    if policy == "foundation":
        e0s, argument = dict(foundation_e0), "foundation"
    elif policy == "isolated-atoms":
        e0s = dict(isolated)
        # An explicit dict: mace-torch then uses exactly these values for every element.
        argument = "{" + ", ".join(f"{z}: {isolated[z]!r}" for z in zs) + "}"
    else:
        e0s = {z: foundation_e0[z] + float(c) for z, c in zip(zs, correction)}
        argument = "estimated"
    return E0Decision(
        policy=policy,
        mace_e0s_argument=argument,
        e0s_eV={chemical_symbols[z]: e0s[z] for z in zs},
        foundation_e0s_eV={chemical_symbols[z]: foundation_e0[z] for z in zs},
        isolated_atom_e0s_eV={chemical_symbols[z]: e for z, e in sorted(isolated.items())},
        isolated_atom_frames_dropped=isolated_frames_dropped,
        check_frames=len(frames),
        start_errors=errors,
        chosen_start_rmse_meV_per_atom=chosen.rmse_meV_per_atom,
        accepted_large_start_error=abs(chosen.rmse_meV_per_atom) > max_start_error_meV_per_atom,
    )
