"""umlipft md: real LAMMPS runs through the plugin on a 9-atom CoCl2 crystal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sample_structures import cobalt_chloride_crystal

from umlipft.errors import ConfigError, InputError, StateError
from umlipft.io import read_frames
from umlipft.md import MDConfig, run_md


@pytest.fixture(scope="module")
def crystal_file(tmp_path_factory) -> Path:
    from ase.io import write

    path = tmp_path_factory.mktemp("md") / "cocl2.extxyz"
    write(path, cobalt_chloride_crystal().repeat((2, 2, 1)))
    return path


@pytest.fixture(scope="module")
def exported_small_fp64(small_model_path, tmp_path_factory) -> Path:
    from umlipft.models.export import ExportConfig, export_lammps_model

    out = tmp_path_factory.mktemp("md-model") / "small-fp64.pt"
    return export_lammps_model(ExportConfig(model=str(small_model_path), output=str(out), dtype="float64"))


def same_positions_under_pbc(a, b, tol: float = 1e-6) -> bool:
    """write_data wraps atoms into the box while dumps keep them where they are."""
    from ase.geometry import find_mic

    vectors, _ = find_mic(a.positions - b.positions, a.cell, pbc=True)
    return bool(np.abs(vectors).max() < tol)


def base_config(tmp_path: Path, crystal_file: Path, model: Path, **changes) -> MDConfig:
    values = dict(output=str(tmp_path / "run"), structure=(str(crystal_file),), model=str(model),
                  ensemble="nvt", steps=20, thermo_every=5, dump_every=5, seed=11)
    values.update(changes)
    return MDConfig.from_dict(values)


def test_run_writes_trajectory_thermo_and_final(tmp_path, crystal_file, exported_small_fp64):
    config = base_config(tmp_path, crystal_file, exported_small_fp64)
    (result,) = run_md(config, progress=False)
    frames = read_frames(result.trajectory)
    assert [f.info["step"] for f in frames] == [0, 5, 10, 15, 20]
    assert frames[2].info["time_ps"] == pytest.approx(10 * 0.0005)
    assert sorted(set(frames[0].get_chemical_symbols())) == ["Cl", "Co"]
    assert "md_energy" in frames[-1].info
    thermo = np.genfromtxt(result.thermo, delimiter=",", names=True)
    assert list(thermo["Step"]) == [0, 5, 10, 15, 20]
    final = read_frames(result.final)[0]
    assert same_positions_under_pbc(final, frames[-1])
    assert np.abs(final.get_velocities()).max() > 0
    # a finished run is not rerun
    mtime = result.trajectory.stat().st_mtime_ns
    run_md(config, progress=False)
    assert result.trajectory.stat().st_mtime_ns == mtime


def test_continuation_keeps_positions_velocities_and_box(tmp_path, crystal_file, exported_small_fp64):
    first = base_config(tmp_path, crystal_file, exported_small_fp64, output=str(tmp_path / "seg1"), ensemble="npt")
    (seg1,) = run_md(first, progress=False)
    second = MDConfig.from_dict({**first.to_dict(), "output": str(tmp_path / "seg2"), "structure": [],
                                 "continue_from": str(tmp_path / "seg1")})
    (seg2,) = run_md(second, progress=False)
    last = read_frames(seg1.final)[0]
    start = read_frames(seg2.trajectory)[0]
    assert same_positions_under_pbc(start, last)
    np.testing.assert_allclose(start.get_velocities(), last.get_velocities(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(start.cell.array, last.cell.array, atol=1e-6)


def test_bad_input_fails_before_any_md(tmp_path, crystal_file, exported_small_fp64):
    with pytest.raises(ConfigError, match="restart_every"):
        base_config(tmp_path, crystal_file, exported_small_fp64, restart_every=7)
    with pytest.raises(InputError, match="does not exist"):
        run_md(base_config(tmp_path, tmp_path / "missing.xyz", exported_small_fp64), progress=False)
    with pytest.raises(InputError, match="does not cover Og"):
        run_md(base_config(tmp_path, crystal_file, exported_small_fp64, output=str(tmp_path / "og"),
                           elements=("Co", "Cl", "Og")), progress=False)
    run_dir = tmp_path / "changed"
    config = base_config(tmp_path, crystal_file, exported_small_fp64, output=str(run_dir), steps=5)
    run_md(config, progress=False)
    with pytest.raises(StateError, match="temperature_K"):
        run_md(config.replace(temperature_K=400.0), progress=False)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_trajectory(tmp_path, crystal_file, exported_small_fp64):
    common = ["--model", str(exported_small_fp64), "--ensemble", "nvt", "--steps", "60", "--thermo-every", "10",
              "--dump-every", "10", "--restart-every", "10", "--seed", "3", "--no-progress", str(crystal_file)]
    umlipft = [sys.executable, "-m", "umlipft.cli", "md"]
    reference = tmp_path / "reference"
    subprocess.run(umlipft + common + ["-o", str(reference)], check=True, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(umlipft + common + ["-o", str(killed)], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(killed.glob("md.restart.2*")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    subprocess.run(umlipft + common + ["-o", str(killed)], check=True, capture_output=True)

    expected = read_frames(reference / "trajectory.extxyz")
    resumed = read_frames(killed / "trajectory.extxyz")
    assert [f.info["step"] for f in resumed] == [f.info["step"] for f in expected]
    for a, b in zip(resumed, expected):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-8)
        np.testing.assert_allclose(a.get_velocities(), b.get_velocities(), atol=1e-8)


def mpiexec_replicas(ranks: int, out: Path, crystal_file: Path, model: Path) -> Path:
    from umlipft.lammps import lammps_environment

    mpiexec = Path(sys.executable).parent / "mpiexec"
    command = [str(mpiexec), "-n", str(ranks), sys.executable, "-m", "umlipft.cli", "md", "--replicas", "2",
               "--model", str(model), "--ensemble", "nvt", "--steps", "10",
               "--thermo-every", "5", "--dump-every", "5", "-o", str(out), str(crystal_file)]
    done = subprocess.run(command, capture_output=True, text=True, env=lammps_environment(), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def one_rank_per_replica(tmp_path_factory, crystal_file, exported_small_fp64) -> Path:
    return mpiexec_replicas(2, tmp_path_factory.mktemp("ens1") / "ens", crystal_file, exported_small_fp64)


@pytest.mark.mpi
@pytest.mark.slow
def test_two_replicas_under_mpiexec(one_rank_per_replica):
    first = read_frames(one_rank_per_replica / "replica-000" / "trajectory.extxyz")
    second = read_frames(one_rank_per_replica / "replica-001" / "trajectory.extxyz")
    assert len(first) == len(second) == 3
    # different seeds: same start, different velocities, so the trajectories part ways
    np.testing.assert_allclose(first[0].positions, second[0].positions, atol=1e-8)
    assert np.abs(first[-1].positions - second[-1].positions).max() > 1e-4


@pytest.mark.mpi
@pytest.mark.slow
def test_two_ranks_per_replica_follow_one_rank_per_replica(tmp_path, one_rank_per_replica, crystal_file,
                                                           exported_small_fp64):
    """mpiexec -n 4 --replicas 2: each replica on 2 ranks exchanging halos, the same
    trajectories as one rank per replica."""
    two = mpiexec_replicas(4, tmp_path / "ens", crystal_file, exported_small_fp64)
    for replica in ("replica-000", "replica-001"):
        log = "".join(path.read_text() for path in (two / replica).glob("log.lammps.*"))
        assert "owned + ghost graph on 2 MPI rank(s), layer by layer with halo exchange" in log
        split = read_frames(two / replica / "trajectory.extxyz")
        whole = read_frames(one_rank_per_replica / replica / "trajectory.extxyz")
        assert len(split) == len(whole) == 3
        for a, b in zip(split, whole):
            assert same_positions_under_pbc(a, b, tol=1e-6)
