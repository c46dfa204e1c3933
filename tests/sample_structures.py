"""Small structures that exercise the plugin's geometry cases."""

from __future__ import annotations

import numpy as np


def triclinic_water_box(seed: int = 7):
    """8 water molecules in a skewed 6.2 Å cell: triclinic and smaller than 2 r_max."""
    from ase import Atoms
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    cell = np.array([[6.2, 0.0, 0.0], [1.3, 6.0, 0.0], [-0.9, 0.7, 6.4]])
    atoms = Atoms(cell=cell, pbc=True)
    for frac in np.array(np.meshgrid([0.25, 0.75], [0.25, 0.75], [0.25, 0.75])).T.reshape(-1, 3):
        water = molecule("H2O")
        water.rotate(rng.uniform(0, 360), rng.normal(size=3))
        water.translate(frac @ cell)
        atoms += water
    atoms.rattle(0.05, seed=seed)
    return atoms


def cobalt_chloride_crystal():
    """CoCl2 in the CdCl2-type R-3m cell (9 atoms, hexagonal axes, a = 3.544 Å)."""
    from ase.spacegroup import crystal

    return crystal(["Co", "Cl"], basis=[(0, 0, 0), (0, 0, 0.2578)], spacegroup=166,
                   cellpar=[3.544, 3.544, 17.43, 90, 90, 120])


def isolated_water_and_ion():
    """A water molecule and, 12 Å away, a Li atom with no neighbour inside r_max; no periodicity."""
    from ase import Atoms
    from ase.build import molecule

    atoms = molecule("H2O")
    atoms += Atoms("Li", positions=[[12.0, 0.0, 0.0]])
    atoms.set_cell([30.0, 30.0, 30.0])
    atoms.center()
    atoms.pbc = False
    return atoms


def hcl_at(atoms, distance_A: float = 1.3):
    """The study's failure mode: the H nearest to the first Cl moved along their line to
    ``distance_A`` of it (HCl forms). Returns (new atoms, index of the H, index of the Cl)."""
    atoms = atoms.copy()
    symbols = np.asarray(atoms.get_chemical_symbols())
    cl = int(np.flatnonzero(symbols == "Cl")[0])
    hydrogens = np.flatnonzero(symbols == "H")
    h = int(hydrogens[np.argmin(atoms.get_distances(cl, hydrogens, mic=True))])
    v = atoms.get_distance(cl, h, mic=True, vector=True)
    atoms.positions[h] = atoms.positions[cl] + v / np.linalg.norm(v) * distance_A
    return atoms, h, cl
