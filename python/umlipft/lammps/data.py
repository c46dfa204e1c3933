"""Structures in and out of LAMMPS: data files for read_data and dumps back to ASE Atoms."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import InputError
from ..io import atomic_path

if TYPE_CHECKING:
    from ase import Atoms


def write_lammps_data(path: str | Path, atoms: "Atoms", elements: Sequence[str]) -> Path:
    """Write ``atoms`` as a LAMMPS data file (atom_style atomic, metal units).

    Atom type k is ``elements[k-1]``, the order pair_coeff lists them in. Triclinic cells are
    rotated into LAMMPS' lower-triangular form by ASE; velocities are written when the atoms
    carry momenta, so a run can continue another one.
    """
    from ase.io import write

    missing = sorted(set(atoms.get_chemical_symbols()) - set(elements))
    if missing:
        raise InputError(
            f"the structure contains {', '.join(missing)} but the element list is "
            f"{' '.join(elements)}; add them to the element list"
        )
    has_velocities = bool(atoms.has("momenta"))
    path = Path(path)
    with atomic_path(path) as tmp:
        # parallel=False: under mpiexec ASE would write from world rank 0 only.
        write(tmp, atoms, format="lammps-data", specorder=list(elements), masses=True,
              units="metal", atom_style="atomic", velocities=has_velocities, parallel=False)
    return path


def read_lammps_dump(path: str | Path, index: str | int = ":") -> "list[Atoms]":
    """Read a LAMMPS text dump with an ``element`` column into Atoms (Å, velocities in ASE units)."""
    from ase.io import read

    path = Path(path)
    if not path.is_file():
        raise InputError(f"LAMMPS dump {path} does not exist")
    frames = read(path, index=index, format="lammps-dump-text", units="metal", parallel=False)
    return frames if isinstance(frames, list) else [frames]
