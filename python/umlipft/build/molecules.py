"""Molecule templates for the study's two systems.

Water comes from ``ase.build.molecule``. Choline and citric acid are not in ASE's g2 set and
PubChem is not reachable offline, so their coordinates are stored here: they were built from
standard bond lengths and tetrahedral/trigonal angles, then relaxed with GFN2-xTB (tblite,
gas phase, fmax 0.005 eV/Å; choline with charge +1). The tests check every bond length and the
bonded graph against the chemical formula, so a typo here cannot go unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ase import Atoms

# Choline cation, (CH3)3N+-CH2-CH2-OH, C5H14NO+, in the gauche O-C-C-N conformer xTB finds.
_CHOLINE: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("N", (0.2409, -0.5517, -0.5073)),
    ("C", (0.9234, 0.4725, 0.3392)),
    ("C", (1.2710, -1.3122, -1.2405)),
    ("C", (-0.6472, 0.1098, -1.4847)),
    ("C", (-0.5546, -1.4825, 0.3127)),
    ("C", (0.0886, 1.0620, 1.4829)),
    ("O", (-1.1380, 1.5497, 0.9915)),
    ("H", (-1.5400, 2.1421, 1.6351)),
    ("H", (1.8798, -1.8938, -0.5502)),
    ("H", (1.9193, -0.6348, -1.7936)),
    ("H", (0.7986, -1.9937, -1.9460)),
    ("H", (-1.3468, 0.7578, -0.9607)),
    ("H", (-1.1996, -0.6379, -2.0497)),
    ("H", (-0.0607, 0.7102, -2.1773)),
    ("H", (0.0609, -1.9133, 1.1004)),
    ("H", (-0.9361, -2.2886, -0.3112)),
    ("H", (-1.3989, -0.9571, 0.7538)),
    ("H", (1.2349, 1.2834, -0.3219)),
    ("H", (1.8118, 0.0216, 0.7853)),
    ("H", (0.6907, 1.8686, 1.9180)),
    ("H", (-0.0830, 0.3121, 2.2668)),
)

# Citric acid, HOOC-CH2-C(OH)(COOH)-CH2-COOH, C6H8O7, neutral (as in the study's DES).
_CITRIC_ACID: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("C", (0.0000, 0.3030, -0.3361)),
    ("C", (-1.2600, 1.1891, -0.2219)),
    ("C", (1.2601, 1.1892, -0.2220)),
    ("C", (-2.4995, 0.3311, -0.1255)),
    ("O", (-2.6435, -0.5773, 0.6474)),
    ("O", (-3.4392, 0.7039, -0.9925)),
    ("H", (-4.2217, 0.1335, -0.9205)),
    ("C", (2.4996, 0.3311, -0.1254)),
    ("O", (2.6435, -0.5776, 0.6473)),
    ("O", (3.4392, 0.7039, -0.9924)),
    ("H", (4.2217, 0.1337, -0.9204)),
    ("O", (-0.0000, -0.3712, -1.5627)),
    ("H", (-0.0002, -1.3255, -1.3665)),
    ("C", (-0.0002, -0.7517, 0.7842)),
    ("O", (-0.0001, -1.9250, 0.5264)),
    ("O", (0.0001, -0.2330, 1.9984)),
    ("H", (0.0001, -0.9423, 2.6607)),
    ("H", (-1.3314, 1.8308, -1.0987)),
    ("H", (-1.1966, 1.7923, 0.6844)),
    ("H", (1.1966, 1.7922, 0.6845)),
    ("H", (1.3313, 1.8310, -1.0988)),
)


@dataclass(frozen=True)
class Species:
    """One kind of molecule or ion the builder can place."""

    name: str
    charge: int  # formal charge, e; the builder checks the whole box is neutral


SPECIES: dict[str, Species] = {
    "water": Species("water", 0),
    "choline": Species("choline", +1),
    "citric_acid": Species("citric_acid", 0),
    "Li": Species("Li", +1),
    "Co": Species("Co", +2),
    "Cl": Species("Cl", -1),
}


def template(name: str) -> "Atoms":
    """A fresh copy of the named molecule or ion, centred on its centre of mass."""
    from ase import Atoms
    from ase.build import molecule

    if name == "water":
        atoms = molecule("H2O")
    elif name == "choline":
        atoms = Atoms([s for s, _ in _CHOLINE], positions=[p for _, p in _CHOLINE])
    elif name == "citric_acid":
        atoms = Atoms([s for s, _ in _CITRIC_ACID], positions=[p for _, p in _CITRIC_ACID])
    elif name in ("Li", "Co", "Cl"):
        atoms = Atoms(name, positions=[(0.0, 0.0, 0.0)])
    else:
        raise KeyError(f"no template for {name!r}; known: {', '.join(SPECIES)}")
    atoms.positions -= atoms.get_center_of_mass()
    return atoms
