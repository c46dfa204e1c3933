"""Two MPI ranks (ghost-shell graph) reproduce one rank (owned-atom graph)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tolerances import PLUGIN_MPI_EV

from umlipft.lammps import lammps_environment, lmp_executable, write_lammps_data

ELEMENTS = ["Li", "Co", "Cl", "O", "H"]


def run_lmp(workdir: Path, data: Path, model: Path, ranks: int) -> tuple[float, np.ndarray, str]:
    tag = f"np{ranks}"
    script = workdir / f"in.{tag}"
    script.write_text(f"""
units metal
atom_style atomic
read_data {data}
pair_style mace
pair_coeff * * {model} {' '.join(ELEMENTS)}
thermo_style custom step pe press
dump forces all custom 1 {workdir}/{tag}.forces id fx fy fz
dump_modify forces sort id format float %.17g
run 0
print "POTENTIAL_ENERGY $(pe:%.17g)"
""")
    command = [str(lmp_executable()), "-in", str(script), "-log", str(workdir / f"{tag}.log")]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks)] + command
    done = subprocess.run(command, cwd=workdir, env=lammps_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    energy = float(done.stdout.split("POTENTIAL_ENERGY")[1].split()[0])
    forces = np.loadtxt(workdir / f"{tag}.forces", skiprows=9)[:, 1:]
    return energy, forces, done.stdout


@pytest.mark.mpi
@pytest.mark.slow
def test_two_ranks_match_one_rank(tmp_path, aqueous_frame, exported_fp64):
    data = write_lammps_data(tmp_path / "aqueous.data", aqueous_frame, ELEMENTS)
    e1, f1, log1 = run_lmp(tmp_path, data, exported_fp64, 1)
    e2, f2, log2 = run_lmp(tmp_path, data, exported_fp64, 2)
    assert "owned-atom graph" in log1
    assert "owned + ghost graph on 2 MPI rank(s)" in log2
    assert abs(e1 - e2) < PLUGIN_MPI_EV
    np.testing.assert_allclose(f2, f1, rtol=0, atol=PLUGIN_MPI_EV)
