"""umlipft build: composition, density, no overlaps, seeds, molecule templates, output formats."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from umlipft.build import BuildConfig, build_system, min_intermolecular_distance
from umlipft.build.molecules import template
from umlipft.errors import ConfigError
from umlipft.io import read_frames

# Bond-length ranges (Å) for organic molecules: covalent values from standard tables, wide
# enough for the xTB minimum, narrow enough to catch a mistyped coordinate.
BOND_RANGES_A = {
    ("C", "H"): (1.07, 1.11), ("C", "C"): (1.49, 1.57), ("C", "N"): (1.45, 1.52),
    ("C", "O"): (1.18, 1.45), ("H", "O"): (0.94, 1.00),
}
VALENCE = {"C": 4, "N": 4, "H": 1}  # N is the quaternary ammonium of choline


def _bonds(atoms):
    from ase.neighborlist import NeighborList, natural_cutoffs

    nl = NeighborList(natural_cutoffs(atoms), self_interaction=False, bothways=False)
    nl.update(atoms)
    return [(i, j) for i in range(len(atoms)) for j in nl.get_neighbors(i)[0]]


@pytest.mark.parametrize("name, formula, n_bonds", [("choline", "C5H14NO", 20), ("citric_acid", "C6H8O7", 20)])
def test_templates_have_chemical_bonds_and_lengths(name: str, formula: str, n_bonds: int) -> None:
    atoms = template(name)
    assert atoms.get_chemical_formula(mode="hill") == formula
    bonds = _bonds(atoms)
    # A tree-shaped molecule of 21 atoms has exactly 20 bonds: no ring, nothing missing.
    assert len(bonds) == n_bonds
    degree = Counter()
    symbols = atoms.get_chemical_symbols()
    for i, j in bonds:
        degree[i] += 1
        degree[j] += 1
        lo, hi = BOND_RANGES_A[tuple(sorted((symbols[i], symbols[j])))]
        assert lo <= atoms.get_distance(i, j) <= hi, (symbols[i], symbols[j], atoms.get_distance(i, j))
    carboxyl_carbons = 3 if name == "citric_acid" else 0  # sp2: bonded to three atoms
    assert sum(1 for i, s in enumerate(symbols) if s == "C" and degree[i] == 3) == carboxyl_carbons
    for i, s in enumerate(symbols):
        if s in VALENCE and not (s == "C" and degree[i] == 3 and carboxyl_carbons):
            assert degree[i] == VALENCE[s], (i, s, degree[i])
        if s == "O":
            assert degree[i] in (1, 2)
    # Citric acid: three C=O (1.18-1.23 Å) for three carboxyl groups
    if name == "citric_acid":
        short_co = [1 for i, j in bonds if {symbols[i], symbols[j]} == {"C", "O"} and atoms.get_distance(i, j) < 1.25]
        assert len(short_co) == 3


def test_templates_are_xtb_minima() -> None:
    from tblite.ase import TBLite

    for name, charge in (("choline", 1), ("citric_acid", 0)):
        atoms = template(name)
        atoms.calc = TBLite(method="GFN2-xTB", charge=charge, verbosity=0)
        assert np.abs(atoms.get_forces()).max() < 0.05, name


def _check_box(atoms, density: float) -> None:
    assert atoms.pbc.all()
    lengths = atoms.cell.lengths()
    assert np.allclose(lengths, lengths[0])
    scaled = atoms.get_scaled_positions(wrap=False)
    assert (scaled >= 0).all() and (scaled <= 1).all()
    assert atoms.info["density_g_cm3"] == pytest.approx(density, rel=1e-9)
    mass_g = atoms.get_masses().sum() / 6.02214076e23
    assert mass_g / (atoms.get_volume() * 1e-24) == pytest.approx(density, rel=1e-6)
    assert min_intermolecular_distance(atoms) > 1.5


def test_aqueous_default_is_the_study_system() -> None:
    atoms = build_system(BuildConfig(system="aqueous", seed=3))
    assert len(atoms) == 170
    assert Counter(atoms.get_chemical_symbols()) == {"H": 110, "O": 55, "Cl": 3, "Li": 1, "Co": 1}
    _check_box(atoms, 1.0)
    # every water is intact after packing (rigid-body moves only)
    for mol in set(atoms.arrays["mol_id"]):
        idx = np.flatnonzero(atoms.arrays["mol_id"] == mol)
        if len(idx) == 3:
            d = atoms.get_distances(idx[0], idx[1:], mic=True)
            assert np.allclose(d, 0.9686, atol=2e-3)


def test_des_default_is_the_study_system() -> None:
    atoms = build_system(BuildConfig(system="des", seed=0))
    assert len(atoms) == 197
    assert Counter(atoms.get_chemical_symbols()) == {"H": 90, "C": 51, "O": 45, "N": 3, "Cl": 6, "Li": 1, "Co": 1}
    _check_box(atoms, 1.2)
    assert 13.0 < atoms.cell.lengths()[0] < 15.0  # the study's box size
    sizes = Counter(Counter(atoms.arrays["mol_id"].tolist()).values())
    assert sizes == {21: 9, 1: 8}  # 3 choline + 6 citric acid, 8 ions


def test_seed_gives_different_reproducible_structures() -> None:
    cfg = BuildConfig(system="aqueous", n_water=20, density_g_cm3=1.05, seed=7)
    a, b = build_system(cfg), build_system(cfg)
    c = build_system(cfg.replace(seed=8))
    assert np.allclose(a.positions, b.positions)
    assert not np.allclose(a.positions, c.positions)
    _check_box(c, 1.05)


def test_impossible_densities_are_refused_before_packing() -> None:
    with pytest.raises(ConfigError, match="impossible"):
        build_system(BuildConfig(system="des", density_g_cm3=4.0))
    # one citric acid at 2.4 g/cm3 needs a box smaller than the molecule
    with pytest.raises(ConfigError, match="cannot hold"):
        build_system(BuildConfig(system="des", n_choline_chloride=0, n_citric_acid=1, n_licl=0,
                                 n_cocl2=0, density_g_cm3=2.4))
    with pytest.raises(ConfigError, match="unknown key"):
        BuildConfig.from_dict({"system": "des", "densty_g_cm3": 1.2})


def test_cli_writes_poscar_and_lammps_data_with_summary(tmp_path: Path) -> None:
    from umlipft.cli import main

    poscar = tmp_path / "POSCAR"
    assert main(["build", "aqueous", "--n-water", "10", "--seed", "2", "-o", str(poscar)]) == 0
    atoms = read_frames(poscar)[0]
    assert Counter(atoms.get_chemical_symbols()) == {"H": 20, "O": 10, "Cl": 3, "Li": 1, "Co": 1}
    assert (tmp_path / "POSCAR.summary.json").is_file()

    yaml_file = tmp_path / "build.yaml"
    yaml_file.write_text("n_water: 10\ndensity_g_cm3: 1.1\nseed: 4\n")
    data = tmp_path / "box.data"
    assert main(["build", "aqueous", "--config", str(yaml_file), "--density-g-cm3", "0.9",
                 "-o", str(data)]) == 0
    back = read_frames(data, format="lammps-data")[0]
    assert len(back) == 35
    density = back.get_masses().sum() / 6.02214076e23 / (back.get_volume() * 1e-24)
    assert density == pytest.approx(0.9, rel=1e-4)  # the flag overrode the YAML's 1.1
