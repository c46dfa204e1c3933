"""Several MPI ranks (ghost graph, layer-by-layer halo exchange) reproduce one rank (owned graph).

One LAMMPS input holds every case, separated by ``clear``, so each rank count starts LAMMPS
and libtorch once. Each case writes its energy, global virial and per-atom forces, energies and
virials; every rank count must give one rank's numbers to PLUGIN_HALO_EV (float64).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tolerances import PLUGIN_HALO_DRIFT_EV_PER_ATOM, PLUGIN_HALO_EV, PLUGIN_HALO_FP32, PLUGIN_HALO_POSITION_A

from umlipft.lammps import lammps_environment, lmp_executable, write_lammps_data

ELEMENTS = ["Li", "Co", "Cl", "O", "H"]
NKTV2P = 1.6021765e6  # LAMMPS metal units: pressure x volume (bar A^3) per eV
pytestmark = [pytest.mark.mpi, pytest.mark.slow]


def water_box(molecules_per_side: int = 3, spacing: float = 3.1, seed: int = 5):
    """Liquid-density water on a jittered grid, randomly oriented: a box below 2 r_max."""
    from ase import Atoms
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    box = molecules_per_side * spacing
    atoms = Atoms(cell=[box] * 3, pbc=True)
    for i in range(molecules_per_side):
        for j in range(molecules_per_side):
            for k in range(molecules_per_side):
                water = molecule("H2O")
                water.rotate(rng.uniform(0, 360), rng.normal(size=3))
                water.translate((np.array([i, j, k]) + 0.5) * spacing + rng.uniform(-0.2, 0.2, 3))
                atoms += water
    atoms.wrap()
    return atoms


def sheared(atoms, tilt: float = 0.18):
    """The same structure in a triclinic cell (positions follow the cell)."""
    cell = atoms.cell.array.copy()
    cell[1] += tilt * cell[0]
    cell[2] += 0.5 * tilt * cell[0] - 0.7 * tilt * cell[1] / np.linalg.norm(cell[1]) * np.linalg.norm(cell[0])
    out = atoms.copy()
    out.set_cell(cell, scale_atoms=True)
    return out


def cluster_with_lone_atom(frame):
    """A non-periodic piece of the solution plus a Li atom 12 A from everything (no neighbours)."""
    from ase import Atom

    centre = frame.cell.array.sum(0) / 2
    distances = np.linalg.norm(frame.positions - centre, axis=1)
    cluster = frame[distances < 7.0]
    cluster.pbc = False
    cluster.positions -= cluster.positions.min(axis=0) - 1.0
    cluster.append(Atom("Li", cluster.positions.max(axis=0) + 12.0))
    cluster.cell = np.diag(cluster.positions.max(axis=0) + 1.0)  # LAMMPS shrink-wraps it (boundary s)
    return cluster


def case_block(name: str, workdir: Path, data: Path, model: Path, boundary: str, pair: list[str]) -> str:
    pair_lines = "\n".join(pair).format(model=model, elements=" ".join(ELEMENTS))
    return f"""
clear
units metal
atom_style atomic
boundary {boundary}
read_data {data}
{pair_lines}
compute pe_atom all pe/atom
compute virial_atom all stress/atom NULL virial
compute virial all pressure NULL virial
variable vol equal vol
thermo_style custom step pe c_virial[1] c_virial[2] c_virial[3] c_virial[4] c_virial[5] c_virial[6] v_vol
thermo_modify format float %.17g
dump d all custom 1 {workdir}/{{tag}}.{name}.dump id fx fy fz c_pe_atom c_virial_atom[*]
dump_modify d sort id format float %.17g
run 0
print "CASE {name} $(pe:%.17g) $(c_virial[1]:%.17g) $(c_virial[2]:%.17g) $(c_virial[3]:%.17g) $(c_virial[4]:%.17g) $(c_virial[5]:%.17g) $(c_virial[6]:%.17g) $(vol:%.17g)"
undump d
"""


MACE_ONLY = ["pair_style mace{style_args}", "pair_coeff * * {model} {elements}"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory, aqueous_frame) -> tuple[Path, dict[str, tuple[Path, str, list[str]]]]:
    from ase import Atoms

    workdir = tmp_path_factory.mktemp("halo")
    frame = aqueous_frame.copy()
    small = water_box()
    argon = Atoms("Ar3", positions=[[1.0, 1.0, 1.0], [4.5, 6.0, 2.0], [7.5, 3.0, 8.0]])
    mixed = small.copy() + argon
    built = {
        "orthogonal": (write_lammps_data(workdir / "orthogonal.data", frame, ELEMENTS), "p p p", MACE_ONLY),
        "triclinic": (write_lammps_data(workdir / "triclinic.data", sheared(frame), ELEMENTS), "p p p", MACE_ONLY),
        "small_box": (write_lammps_data(workdir / "small.data", small, ELEMENTS), "p p p", MACE_ONLY),
        "non_periodic": (write_lammps_data(workdir / "cluster.data", cluster_with_lone_atom(frame), ELEMENTS),
                         "s s s", MACE_ONLY),
        "hybrid_null": (write_lammps_data(workdir / "mixed.data", mixed, ELEMENTS + ["Ar"]), "p p p",
                        ["pair_style hybrid/overlay mace{style_args} lj/cut 6.0",
                         "pair_coeff * * mace {model} {elements} NULL",
                         "pair_coeff * * lj/cut 0.0 1.0", "pair_coeff * 6 lj/cut 0.01 1.2"]),
    }
    return workdir, built


def run_cases(workdir: Path, built: dict, model: Path, ranks: int, style_args: str = "") -> dict:
    tag = f"np{ranks}{style_args.replace(' ', '_')}"
    text = "".join(case_block(name, workdir, data, model, boundary,
                              [line.replace("{style_args}", style_args) for line in pair]).replace("{tag}", tag)
                   for name, (data, boundary, pair) in built.items())
    script = workdir / f"in.{tag}"
    script.write_text(text)
    command = [str(lmp_executable()), "-in", str(script), "-log", str(workdir / f"{tag}.log")]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks)] + command
    done = subprocess.run(command, cwd=workdir, env=lammps_environment(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {}
    for name in built:
        values = [float(v) for v in re.search(rf"^CASE {name} (.*)$", done.stdout, re.M).group(1).split()]
        energy, pressure, volume = values[0], np.array(values[1:7]), values[7]
        per_atom = np.loadtxt(workdir / f"{tag}.{name}.dump", skiprows=9)
        results[name] = {
            "energy": energy,
            "virial": pressure * volume / NKTV2P,
            "forces": per_atom[:, 1:4],
            "atom_energy": per_atom[:, 4],
            "atom_virial": per_atom[:, 5:11] / NKTV2P,
        }
    return {"log": done.stdout, "cases": results}


def assert_same(got: dict, want: dict, label: str) -> None:
    for name, expected in want.items():
        actual = got[name]
        assert abs(actual["energy"] - expected["energy"]) < PLUGIN_HALO_EV, (label, name, "energy")
        for key in ("virial", "forces", "atom_energy", "atom_virial"):
            deviation = float(np.abs(actual[key] - expected[key]).max())
            assert deviation < PLUGIN_HALO_EV, f"{label}: {name} {key} differs by {deviation:.3g}"


@pytest.fixture(scope="module")
def one_rank(cases, exported_fast_fp64) -> dict:
    workdir, built = cases
    return run_cases(workdir, built, exported_fast_fp64, 1)


def test_one_rank_runs_the_owned_graph_and_reports_its_nodes(one_rank) -> None:
    log = one_rank["log"]
    assert "owned-atom graph with periodic shifts (1 MPI rank)" in log
    assert "nodes per rank (min/avg/max) on 1 rank(s): owned 170/170.0/170, ghost 0/0.0/0" in log


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 8])
def test_ghost_graph_on_n_ranks_equals_one_rank(ranks: int, cases, one_rank, exported_fast_fp64) -> None:
    workdir, built = cases
    got = run_cases(workdir, built, exported_fast_fp64, ranks, style_args=" graph ghost")
    assert f"owned + ghost graph on {ranks} MPI rank(s), layer by layer with halo exchange" in got["log"]
    counts = re.findall(r"nodes per rank \(min/avg/max\) on (\d+) rank\(s\): owned (\S+), ghost (\S+)", got["log"])
    assert counts and all(int(n) == ranks for n, _, _ in counts)
    # Owned atoms add up to the system, whatever the split (170 in the aqueous frame).
    assert "(170 owned in all)" in got["log"]
    assert_same(got["cases"], one_rank["cases"], f"{ranks} rank(s)")


def test_plain_export_matches_across_ranks_too(cases, exported_fp64) -> None:
    workdir, built = cases
    subset = {name: built[name] for name in ("orthogonal", "small_box")}
    want = run_cases(workdir, subset, exported_fp64, 1)
    got = run_cases(workdir, subset, exported_fp64, 2)
    assert_same(got["cases"], want["cases"], "plain export, 2 ranks")


def test_float32_optimised_export_on_two_ranks_equals_one_rank(cases, exported_fast_fp32) -> None:
    workdir, built = cases
    subset = {name: built[name] for name in ("orthogonal", "triclinic", "small_box")}
    want = run_cases(workdir, subset, exported_fast_fp32, 1)["cases"]
    got = run_cases(workdir, subset, exported_fast_fp32, 2)["cases"]
    for name, expected in want.items():
        for key, tolerance in PLUGIN_HALO_FP32.items():
            deviation = float(np.abs(np.asarray(got[name][key]) - np.asarray(expected[key])).max())
            assert deviation < tolerance, f"float32, 2 ranks: {name} {key} differs by {deviation:.3g}"


def test_newton_off_is_refused_on_several_ranks(cases, exported_fast_fp64) -> None:
    workdir, built = cases
    data = built["small_box"][0]
    script = workdir / "in.newton"
    script.write_text(f"""
units metal
atom_style atomic
newton off
read_data {data}
pair_style mace
pair_coeff * * {exported_fast_fp64} {' '.join(ELEMENTS)}
run 0
""")
    command = [str(Path(sys.executable).parent / "mpiexec"), "-n", "2", str(lmp_executable()), "-in", str(script),
               "-log", "none"]
    done = subprocess.run(command, cwd=workdir, env=lammps_environment(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "requires 'newton on'" in done.stdout + done.stderr


# ----------------------------------------------------------------------------- dynamics

DYNAMICS = """
units metal
atom_style atomic
read_data {data}
pair_style mace
pair_coeff * * {model} {elements}
neighbor 0.3 bin
neigh_modify every 1 delay 0 check yes
timestep 0.0005
velocity all create 600 4 mom yes rot yes dist gaussian
# A drift of the whole box (8 A/ps along each axis) carries atoms across every rank boundary.
velocity all set 8 8 8 sum yes units box
{fix}
compute rank all property/atom proc
thermo_style custom step pe ke etotal vol
thermo_modify format float %.17g
thermo 50
run 0
print "START $(etotal:%.17g)"
dump early all custom 10 {tag}.early.dump id x y z
dump_modify early sort id format float %.17g
dump owners all custom {steps} {tag}.owners.dump id c_rank
dump_modify owners sort id
run 50
undump early
run {rest}
print "END $(etotal:%.17g) $(vol:%.17g)"
"""


def run_dynamics(workdir: Path, data: Path, model: Path, ranks: int, fix: str, steps: int) -> dict:
    tag = f"dyn{ranks}{'npt' if 'npt' in fix else 'nve'}"
    script = workdir / f"in.{tag}"
    script.write_text(DYNAMICS.format(data=data, model=model, elements=" ".join(ELEMENTS), tag=tag, steps=steps,
                                      rest=steps - 50, fix=fix))
    command = [str(lmp_executable()), "-in", str(script), "-log", str(workdir / f"{tag}.log")]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks)] + command
    done = subprocess.run(command, cwd=workdir, env=lammps_environment(), capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    start = float(done.stdout.split("START ")[1].split()[0])
    final, volume = (float(v) for v in done.stdout.split("END ")[1].split()[:2])

    def frames(path: Path) -> list[np.ndarray]:
        return [np.loadtxt(block.splitlines()[9:]) for block in path.read_text().split("ITEM: TIMESTEP")[1:]]

    positions = np.array([frame[:, 1:4] for frame in frames(workdir / f"{tag}.early.dump")])
    owners = [frame[:, 1] for frame in frames(workdir / f"{tag}.owners.dump")]
    return {"positions": positions, "drift": final - start, "volume": volume, "owners": owners,
            "rebuilds": sum(int(n) for n in re.findall(r"Neighbor list builds = (\d+)", done.stdout))}


DYNAMICS_BOX_SIDE = 2  # water molecules per side: 24 atoms in a 6.2 A box, smaller than the cutoff
NVE_STEPS = 200


@pytest.fixture(scope="module")
def dynamics_box(cases) -> Path:
    workdir, _ = cases
    return write_lammps_data(workdir / "dynamics.data", water_box(DYNAMICS_BOX_SIDE), ELEMENTS)


@pytest.fixture(scope="module")
def one_rank_nve(cases, dynamics_box, exported_fast_fp64) -> dict:
    return run_dynamics(cases[0], dynamics_box, exported_fast_fp64, 1, "fix md all nve", NVE_STEPS)


@pytest.mark.parametrize("ranks", [2, 4])
def test_nve_on_n_ranks_follows_one_rank(ranks: int, cases, dynamics_box, one_rank_nve, exported_fast_fp64) -> None:
    workdir, _ = cases
    want = one_rank_nve
    got = run_dynamics(workdir, dynamics_box, exported_fast_fp64, ranks, "fix md all nve", NVE_STEPS)
    assert got["rebuilds"] > 5
    moved = int((got["owners"][0] != got["owners"][-1]).sum())
    assert moved > 0, "no atom changed rank: the test does not exercise migration"
    deviation = float(np.abs(got["positions"] - want["positions"]).max())
    assert deviation < PLUGIN_HALO_POSITION_A, f"{ranks} ranks left one rank's trajectory by {deviation:.3g} A"
    atoms = want["positions"].shape[1]
    assert abs(got["drift"] - want["drift"]) / atoms < PLUGIN_HALO_DRIFT_EV_PER_ATOM


def test_npt_with_a_changing_box_on_two_ranks_follows_one_rank(cases, dynamics_box, exported_fast_fp64) -> None:
    workdir, _ = cases
    fix = "fix md all npt temp 600 600 0.05 iso 1000 1000 0.2"
    want = run_dynamics(workdir, dynamics_box, exported_fast_fp64, 1, fix, 100)
    got = run_dynamics(workdir, dynamics_box, exported_fast_fp64, 2, fix, 100)
    start_volume = (DYNAMICS_BOX_SIDE * 3.1) ** 3  # water_box()
    assert got["volume"] == pytest.approx(want["volume"], rel=1e-9)
    assert abs(got["volume"] - start_volume) > 1e-3, "the barostat did not move the box"
    deviation = float(np.abs(got["positions"] - want["positions"]).max())
    assert deviation < PLUGIN_HALO_POSITION_A
