"""Energy conservation in NVE: forces are the exact gradient of the energy the model reports."""

from __future__ import annotations

import numpy as np
import pytest
from sample_structures import cobalt_chloride_crystal
from tolerances import PLUGIN_NVE_DRIFT_EV_PER_ATOM

from umlipft.lammps import open_lammps, write_lammps_data


STEPS = 200


@pytest.mark.slow
def test_nve_conserves_energy(tmp_path, exported_fp64):
    atoms = cobalt_chloride_crystal()
    data = write_lammps_data(tmp_path / "crystal.data", atoms, ["Co", "Cl"])
    lmp = open_lammps()
    try:
        lmp.commands_list([
            "units metal", "atom_style atomic", f"read_data {data}",
            "pair_style mace", f"pair_coeff * * {exported_fp64} Co Cl",
            
            "timestep 0.0005",
            "velocity all create 300.0 4928459 mom yes rot no dist gaussian",
            "fix nve all nve",
            "thermo_style custom step temp pe etotal",
            "run 0",
        ])
        etot = [lmp.get_thermo("etotal")]
        for _ in range(STEPS // 10):
            lmp.command("run 10 pre no post no")
            etot.append(lmp.get_thermo("etotal"))
        etot = np.array(etot)
        temperature = lmp.get_thermo("temp")
    finally:
        lmp.close()
    assert temperature > 50.0  # the atoms really moved
    drift = np.abs(etot - etot[0]).max() / len(atoms)
    print(f"NVE: max |E_tot - E_tot(0)| = {drift:.2e} eV/atom over {STEPS} steps at T = {temperature:.0f} K")
    assert drift < PLUGIN_NVE_DRIFT_EV_PER_ATOM, f"total energy wandered by {drift:.2e} eV/atom"
