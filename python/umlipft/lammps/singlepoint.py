"""Energy, forces, stress, per-atom energies and virials of one structure through pair_style mace.

This is the plugin seen from Python: the tests check it against mace-torch, and evaluation
can use it to score exported models exactly as MD will run them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .data import write_lammps_data
from .session import open_lammps

if TYPE_CHECKING:
    from ase import Atoms


@dataclass(frozen=True)
class LammpsResults:
    energy: float              # eV
    forces: np.ndarray         # (N, 3) eV/Å, ASE frame and atom order
    stress: np.ndarray         # (3, 3) eV/Å^3, ASE sign (positive = tensile); zero if not periodic
    energies: np.ndarray       # (N,) eV, per-atom energies (compute pe/atom)
    virials: np.ndarray        # (N, 3, 3) eV, per-atom virials (compute stress/atom), ASE frame
    log: str


def default_elements(atoms: "Atoms") -> list[str]:
    from ase.data import atomic_numbers

    return sorted(set(atoms.get_chemical_symbols()), key=lambda s: atomic_numbers[s])


def lammps_single_point(atoms: "Atoms", model: str | Path, elements: Sequence[str] | None = None,
                        graph: str = "auto") -> LammpsResults:
    from ase.calculators.lammps import Prism
    from ase.units import bar
    from lammps import LMP_STYLE_ATOM, LMP_STYLE_GLOBAL, LMP_TYPE_ARRAY, LMP_TYPE_VECTOR

    elements = list(elements) if elements else default_elements(atoms)
    prism = Prism(atoms.get_cell())
    with tempfile.TemporaryDirectory(prefix="umlipft-sp-") as tmp:
        data = Path(tmp) / "structure.data"
        log = Path(tmp) / "log.lammps"
        write_lammps_data(data, atoms, elements)
        lmp = open_lammps(("-screen", "none", "-log", str(log)))
        try:
            boundary = " ".join("p" if periodic else "f" for periodic in atoms.pbc)
            lmp.commands_list([
                "units metal",
                "atom_style atomic",
                "atom_modify map array sort 0 0.0",
                f"boundary {boundary}",
                f"read_data {data}",
                f"pair_style mace graph {graph}",
                f"pair_coeff * * {model} {' '.join(elements)}",
                "compute atom_pe all pe/atom",
                "compute atom_stress all stress/atom NULL virial",
                "thermo_style custom step pe",
                "run 0",
            ])
            energy = float(lmp.get_thermo("pe"))
            nlocal = lmp.extract_global("nlocal")
            ids = np.array(lmp.numpy.extract_atom("id")[:nlocal])
            order = np.argsort(ids)
            forces = np.array(lmp.numpy.extract_atom("f")[:nlocal])[order]
            energies = np.array(lmp.numpy.extract_compute("atom_pe", LMP_STYLE_ATOM, LMP_TYPE_VECTOR)[:nlocal])[order]
            stress6 = np.array(lmp.numpy.extract_compute("atom_stress", LMP_STYLE_ATOM, LMP_TYPE_ARRAY)[:nlocal])[order]
            pressure = np.array(lmp.numpy.extract_compute("thermo_press", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR))
        finally:
            lmp.close()
        log_text = log.read_text() if log.exists() else ""

    # compute stress/atom reports -(per-atom virial) in bar*Å^3; no velocities, so no kinetic part.
    virials_lmp = -_voigt_to_full(stress6) * bar
    virials = np.array([prism.tensor2_to_ase(v) for v in virials_lmp])
    if all(atoms.pbc):
        stress = -prism.tensor2_to_ase(_voigt_to_full(pressure[None, :])[0]) * bar
    else:
        stress = np.zeros((3, 3))
    return LammpsResults(energy=energy, forces=prism.vector_to_ase(forces), stress=stress,
                         energies=energies, virials=virials, log=log_text)


def _voigt_to_full(v: np.ndarray) -> np.ndarray:
    """LAMMPS order xx, yy, zz, xy, xz, yz -> symmetric 3x3 tensors."""
    full = np.empty((len(v), 3, 3))
    full[:, 0, 0], full[:, 1, 1], full[:, 2, 2] = v[:, 0], v[:, 1], v[:, 2]
    full[:, 0, 1] = full[:, 1, 0] = v[:, 3]
    full[:, 0, 2] = full[:, 2, 0] = v[:, 4]
    full[:, 1, 2] = full[:, 2, 1] = v[:, 5]
    return full
