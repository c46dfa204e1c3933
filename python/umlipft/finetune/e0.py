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

Labels from another code (CP2K's valence-only GTH energies, xTB, another pseudopotential set)
sit on another absolute scale: the foundation's E0s start ~1e5 meV/atom off. ``estimated`` fits
per-element corrections to the whole offset; with one composition that fit is rank 1, so the
per-element split of tens of eV per atom is arbitrary and does not transfer to another
composition. ``isolated-atoms-fitted`` anchors each E0 to the labeller's own isolated-atom
energy (``umlipft label --isolated-atoms``, same code and settings) and fits only the remainder,
E0[Z] = E_iso[Z] + delta[Z] (minimum-norm least squares on the check frames): the code's offset
is then exact per element, and only the binding-energy difference (a few eV/atom) is split.
``auto`` picks per labeller (:func:`default_e0_policy`) and records why.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import InputError
from ..io import reference_energy

if TYPE_CHECKING:
    from ase import Atoms

# The anchored policy: the labeller's isolated-atom energies plus a fitted per-element correction.
ANCHORED = "isolated-atoms-fitted"
# Concrete policies, in the order the guard prefers them when several would pass (the first
# transfers best to compositions the check frames lack: foundation keeps MACE-MP's E0s; the
# anchored one only re-splits binding energies; estimated re-splits the codes' whole offset).
E0_CHOICES = ("foundation", ANCHORED, "estimated", "isolated-atoms")
E0_POLICIES = ("auto", *E0_CHOICES)
# Labellers whose absolute energies are not those MACE-MP-0 learned (VASP PBE(+U) PAW totals).
_OTHER_SCALE = {
    "cp2k": "CP2K's GTH pseudopotential energies are valence-only, on another absolute scale than "
            "the VASP PAW totals MACE-MP-0 was trained on (about 1e5 meV/atom apart)",
    "espresso": "Quantum ESPRESSO's total energies depend on its pseudopotential set and are on another "
                "absolute scale than the VASP PAW totals MACE-MP-0 was trained on",
    "xtb": "GFN-xTB energies are tight-binding energies on their own scale, not the VASP PAW totals "
           "MACE-MP-0 was trained on (tens of eV per atom apart)",
}
LABELLERS = ("vasp", *_OTHER_SCALE)


def default_e0_policy(calculator: str | None) -> tuple[str, str]:
    """(policy, why) that ``e0s: auto`` resolves to for labels from ``calculator``.

    ``None`` (labeller unknown, e.g. a user's file) returns ``("auto", why)``: the choice then
    depends on the training data and is made by :func:`decide_e0s` (foundation if its predicted
    start error passes the guard, else the anchored policy if there are isolated-atom energies
    for every element, else estimated). An unknown calculator name raises InputError.
    """
    if calculator is None:
        return "auto", ("labeller unknown: chosen from the data (foundation if its predicted start error "
                        f"passes the guard, else {ANCHORED} with isolated-atom energies for every element, "
                        "else estimated)")
    name = calculator.lower()
    if name == "vasp":
        return "foundation", ("labels from VASP: MACE-MP-0 was trained on VASP PBE(+U) total energies, the "
                              "same absolute scale, so its fitted E0s carry over to any composition")
    if name in _OTHER_SCALE:
        return ANCHORED, (f"labels from {name}: {_OTHER_SCALE[name]}; E0s = the labeller's own isolated-atom "
                          "energies + a per-element correction fitted on the training frames")
    raise InputError(f"unknown labeller {calculator!r}; known: {', '.join(LABELLERS)}")


def e0_policy_needs_isolated_atoms(policy: str, calculator: str | None) -> bool:
    """True when ``policy`` (``auto`` resolved for ``calculator``) needs the labeller's
    isolated-atom energies (``umlipft label --isolated-atoms``)."""
    if policy == "auto":
        policy = default_e0_policy(calculator)[0]
    return policy in (ANCHORED, "isolated-atoms")


def check_e0_policy(policy: str, calculator: str, *, foundation_labeller: str | None = "vasp") -> list[str]:
    """Problems of fine-tuning with E0 ``policy`` on labels from ``calculator`` (empty: none).

    ``foundation_labeller`` is the code whose absolute energies the foundation's E0s follow:
    ``vasp`` for MACE-MP-0; for a model that is itself a fine-tune on ``calculator``'s labels
    (a workflow's ``start_from: previous``) pass ``calculator``; ``None`` skips the scale check.
    """
    problems: list[str] = []
    if policy not in E0_POLICIES:
        return [f"e0s must be one of {', '.join(E0_POLICIES)}, got {policy!r}"]
    name = (calculator or "").lower()
    if name not in LABELLERS:
        return [f"unknown labeller {calculator!r}; known: {', '.join(LABELLERS)}"]
    if policy == "foundation" and foundation_labeller is not None and name != foundation_labeller.lower():
        why = _OTHER_SCALE.get(name, f"labels from {name} are on another absolute scale than the foundation's")
        problems.append(
            f"e0s: foundation with labels from {name}: {why}; the E0 guard would refuse the first fine-tune. "
            f"Use e0s: {ANCHORED} (or auto), which needs the labeller's isolated-atom energies")
    if policy == "isolated-atoms":
        problems.append(
            "e0s: isolated-atoms replaces the foundation's E0s (MACE-MP-0's are fitted values, not "
            "isolated-atom energies) while keeping everything it learned on top of them: every energy "
            f"shifts by eV per atom. Use e0s: {ANCHORED}, which fits a per-element correction on top")
    return problems


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
    policy: str  # the policy used (auto resolved)
    mace_e0s_argument: str
    e0s_eV: dict[str, float]  # element symbol -> E0 used by the starting model (fits: corrections applied)
    foundation_e0s_eV: dict[str, float]
    isolated_atom_e0s_eV: dict[str, float]
    isolated_atom_frames_dropped: int
    check_frames: int
    start_errors: dict[str, StartErrors]  # policy -> predicted starting error
    chosen_start_rmse_meV_per_atom: float
    accepted_large_start_error: bool
    requested_policy: str = ""  # as configured (auto or a policy)
    reason: str = ""  # why this policy (auto's resolution, or 'set in the configuration')
    labeller: str | None = None  # code of the reference labels, when known
    corrections_eV: dict[str, float] = dataclasses.field(default_factory=dict)  # fitted part of E0 (fits only)
    start_errors_unavailable: dict[str, str] = dataclasses.field(default_factory=dict)  # policy -> why not

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _errors(residual_eV: np.ndarray, n_atoms: np.ndarray) -> StartErrors:
    per_atom = residual_eV / n_atoms * 1000.0
    return StartErrors(float(per_atom.mean()), float(np.sqrt(np.mean(per_atom**2))))


def _preferred(errors: dict[str, StartErrors], limit: float) -> str:
    """The first policy (in E0_CHOICES order) whose predicted start passes the guard; if none
    does, the one with the smallest error. The two fits reach the same minimum on the check
    frames, so the error alone cannot rank them; what they do elsewhere can (see E0_CHOICES)."""
    passing = [p for p in E0_CHOICES if p in errors and errors[p].rmse_meV_per_atom <= limit]
    if passing:
        return passing[0]
    return min(errors, key=lambda p: errors[p].rmse_meV_per_atom)


def _isolated_hint(labeller: str | None, missing: Sequence[str]) -> str:
    code = labeller or "CODE"
    elements = " ".join(missing) if missing else "EL ..."
    return (f"compute them with the labeller's own settings: umlipft label --isolated-atoms --elements {elements} "
            f"--calculator {code} -o DIR, then pass isolated_atoms_file: DIR/isolated_atoms.extxyz "
            "(--isolated-atoms-file) or append its frames to the training file")


def decide_e0s(*, policy: str, frames: "Sequence[Atoms]", foundation_energies_eV: Sequence[float],
               foundation_e0: dict[int, float], isolated: dict[int, float], energy_key: str,
               max_start_error_meV_per_atom: float, accept_large_start_error: bool,
               isolated_frames_dropped: int, labeller: str | None = None) -> E0Decision:
    """Predict the starting error for every E0 policy on ``frames`` (labelled, non-isolated) whose
    foundation energies are given, and return the decision for ``policy`` or raise InputError.

    ``policy: auto`` resolves with :func:`default_e0_policy` for a known ``labeller``, else from
    the data (see there); the decision records the resolved policy and why.
    """
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
    unavailable: dict[str, str] = {}
    missing = [chemical_symbols[z] for z in zs if z not in isolated]
    corrections: dict[str, np.ndarray] = {}
    if not missing:
        shifted = base + counts @ np.array([isolated[z] - foundation_e0[z] for z in zs])
        errors["isolated-atoms"] = _errors(shifted, n_atoms)
        # Anchored: E0 = E_iso + delta, delta the min-norm least-squares correction. The code's
        # absolute offset is in E_iso; delta only carries the binding-energy difference, so with
        # one composition (rank 1) only a few eV/atom are split arbitrarily among the elements.
        corrections[ANCHORED], *_ = np.linalg.lstsq(counts, -shifted, rcond=None)
        errors[ANCHORED] = _errors(shifted + counts @ corrections[ANCHORED], n_atoms)
    else:
        why = f"no isolated-atom energy for {', '.join(missing)}"
        unavailable["isolated-atoms"] = unavailable[ANCHORED] = why
    # Least-squares per-element corrections (what mace-torch's E0s=estimated fits, here on the
    # check frames); with one composition the system is rank 1 and lstsq takes the min-norm one.
    corrections["estimated"], *_ = np.linalg.lstsq(counts, -base, rcond=None)
    errors["estimated"] = _errors(base + counts @ corrections["estimated"], n_atoms)
    limit = max_start_error_meV_per_atom

    requested = policy
    if policy == "auto":
        policy, reason = default_e0_policy(labeller)
        if policy == "auto":
            found = errors["foundation"].rmse_meV_per_atom
            if found <= limit:
                policy, reason = "foundation", (
                    f"labeller unknown; the foundation's E0s predict a start error of {found:.1f} meV/atom "
                    f"(<= {limit:g}): the labels are on the foundation's absolute scale")
            elif not missing:
                policy, reason = ANCHORED, (
                    f"labeller unknown; the foundation's E0s predict {found:.1f} meV/atom (> {limit:g}): the "
                    "labels are on another absolute scale, and there are isolated-atom energies for every element")
            else:
                policy, reason = "estimated", (
                    f"labeller unknown; the foundation's E0s predict {found:.1f} meV/atom (> {limit:g}) and "
                    f"there are no isolated-atom energies for {', '.join(missing)}")
        reason = "e0s: auto: " + reason
    else:
        reason = f"e0s: {policy} set in the configuration"

    if policy in ("isolated-atoms", ANCHORED) and missing:
        if not isolated:
            raise InputError(
                f"{reason}, which needs the labeller's isolated-atom energies (config_type=IsolatedAtom "
                "frames, one atom each, with a reference energy); there are none: "
                + _isolated_hint(labeller, missing) + ". Or set e0s: estimated")
        raise InputError(
            f"{reason}, but there is no isolated-atom energy for {', '.join(missing)}: "
            + _isolated_hint(labeller, missing))

    chosen = errors[policy]
    if abs(chosen.rmse_meV_per_atom) > limit and not accept_large_start_error:
        best = _preferred(errors, limit)
        table = "; ".join([f"{p}: {e.rmse_meV_per_atom:.1f}" for p, e in errors.items()]
                          + [f"{p}: n/a ({why})" for p, why in unavailable.items()])
        message = (
            f"with e0s: {policy} the starting model's energy error on {len(frames)} training frames "
            f"would be {chosen.rmse_meV_per_atom:.1f} meV/atom (RMSE of (E_model - E_ref)/N), above "
            f"max_start_error_meV_per_atom = {limit:g}. Predicted starting "
            f"errors (meV/atom) by E0 choice: {table}."
        )
        if requested == "auto":
            message += f" ({reason}.)"
        if policy == "isolated-atoms":
            message += (
                " MACE-MP-0's E0s are fitted values, not isolated-atom DFT energies; replacing them "
                "with the isolated-atom energies shifts every energy the foundation learned on top of them.")
        elif policy == "foundation":
            message += (
                " The reference energies are on a different absolute scale from the foundation's "
                "training data (another code, functional or pseudopotentials).")
        fix = (f" Fix: use e0s: {best} (--e0s {best})" if best != policy else " Fix: check the reference labels")
        if ANCHORED in unavailable and policy != "estimated":
            fix += (f"; for a model that transfers to other compositions use e0s: {ANCHORED} and "
                    + _isolated_hint(labeller, missing))
        fix += "; or pass --accept-large-start-error to train from this start anyway."
        raise InputError(message + fix)

    fitted: dict[int, float] = {}
    if policy == "foundation":
        e0s, argument = dict(foundation_e0), "foundation"
    elif policy in ("isolated-atoms", ANCHORED):
        if policy == ANCHORED:
            fitted = {z: float(c) for z, c in zip(zs, corrections[ANCHORED])}
        e0s = {z: isolated[z] + fitted.get(z, 0.0) for z in zs}
        # An explicit dict: mace-torch then uses exactly these values for every element.
        argument = "{" + ", ".join(f"{z}: {e0s[z]!r}" for z in zs) + "}"
    else:
        fitted = {z: float(c) for z, c in zip(zs, corrections["estimated"])}
        e0s = {z: foundation_e0[z] + fitted[z] for z in zs}
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
        accepted_large_start_error=abs(chosen.rmse_meV_per_atom) > limit,
        requested_policy=requested,
        reason=reason,
        labeller=labeller,
        corrections_eV={chemical_symbols[z]: c for z, c in fitted.items()},
        start_errors_unavailable=unavailable,
    )
