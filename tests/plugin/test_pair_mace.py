"""pair_style mace against mace-torch's ASE calculator: same model, same numbers."""

from __future__ import annotations

import numpy as np
import pytest
from sample_structures import cobalt_chloride_crystal, isolated_water_and_ion, triclinic_water_box
from tolerances import PLUGIN_FP32_FORCE_EV_A, PLUGIN_FP64_ENERGY_EV, PLUGIN_FP64_FORCE_EV_A, PLUGIN_FP64_STRESS_EV_A3

from umlipft.lammps.singlepoint import lammps_single_point


def reference(atoms, calculator):
    atoms = atoms.copy()
    atoms.calc = calculator
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    stress = atoms.get_stress(voigt=False) if all(atoms.pbc) else np.zeros((3, 3))
    return energy, forces, stress


def assert_matches(result, atoms, calculator, force_tol=PLUGIN_FP64_FORCE_EV_A):
    energy, forces, stress = reference(atoms, calculator)
    assert abs(result.energy - energy) < PLUGIN_FP64_ENERGY_EV
    np.testing.assert_allclose(result.forces, forces, rtol=0, atol=force_tol)
    np.testing.assert_allclose(result.stress, stress, rtol=0, atol=PLUGIN_FP64_STRESS_EV_A3)


def test_registered_and_logged(exported_fp64, aqueous_frame):
    """The plugin really registered (LAMMPS only logs a failed load) and says which graph runs."""
    result = lammps_single_point(aqueous_frame, exported_fp64)
    assert "pair_style mace: model" in result.log
    assert "owned-atom graph with periodic shifts" in result.log


def test_aqueous_frame_fp64_matches_mace_torch(exported_fp64, aqueous_frame, ase_calculators):
    result = lammps_single_point(aqueous_frame, exported_fp64)
    assert_matches(result, aqueous_frame, ase_calculators("float64"))
    # per-atom energies sum to the total; per-atom virials sum to the global virial (-stress V)
    assert abs(result.energies.sum() - result.energy) < PLUGIN_FP64_ENERGY_EV
    volume = aqueous_frame.get_volume()
    np.testing.assert_allclose(result.virials.sum(axis=0), -result.stress * volume, rtol=0,
                               atol=PLUGIN_FP64_STRESS_EV_A3 * volume)


def test_ghost_graph_on_one_rank_matches_owned_graph(exported_fp64):
    atoms = triclinic_water_box()
    owned = lammps_single_point(atoms, exported_fp64, graph="owned")
    ghost = lammps_single_point(atoms, exported_fp64, graph="ghost")
    assert "layer by layer with halo exchange" in ghost.log
    assert abs(owned.energy - ghost.energy) < PLUGIN_FP64_ENERGY_EV
    np.testing.assert_allclose(ghost.forces, owned.forces, rtol=0, atol=PLUGIN_FP64_FORCE_EV_A)
    np.testing.assert_allclose(ghost.stress, owned.stress, rtol=0, atol=PLUGIN_FP64_STRESS_EV_A3)
    np.testing.assert_allclose(ghost.energies, owned.energies, rtol=0, atol=PLUGIN_FP64_ENERGY_EV)


@pytest.mark.parametrize("build", [triclinic_water_box, cobalt_chloride_crystal], ids=["triclinic-water", "CoCl2-small-cell"])
def test_triclinic_and_small_cells(build, exported_fp64, ase_calculators):
    atoms = build()
    assert atoms.cell.lengths().min() < 2 * 6.0  # images of an atom are its own neighbours
    result = lammps_single_point(atoms, exported_fp64)
    assert_matches(result, atoms, ase_calculators("float64"))


def test_isolated_molecule_and_atom_without_neighbours(exported_fp64, ase_calculators):
    atoms = isolated_water_and_ion()
    result = lammps_single_point(atoms, exported_fp64)
    assert_matches(result, atoms, ase_calculators("float64"))
    np.testing.assert_allclose(result.forces[-1], 0.0, atol=PLUGIN_FP64_FORCE_EV_A)


def test_fp32_export_matches_mace_torch_fp32(exported_fp32, ase_calculators):
    atoms = triclinic_water_box()
    result = lammps_single_point(atoms, exported_fp32)
    _, forces, _ = reference(atoms, ase_calculators("float32"))
    np.testing.assert_allclose(result.forces, forces, rtol=0, atol=PLUGIN_FP32_FORCE_EV_A)
