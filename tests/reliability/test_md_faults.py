"""Faults of ``umlipft md`` found by the fault campaign: a finished run's output damaged before it
is reused, a run killed with SIGKILL and resumed, and atoms that overlap at the start or during
the run. Each ends in a complete run or in one message naming the file or atoms and the fix."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import assert_message, run_umlipft, umlipft_command, umlipft_env
from sample_structures import cobalt_chloride_crystal, triclinic_water_box

from umlipft.io import read_frames


@pytest.fixture(scope="module")
def model(small_model_path: Path, tmp_path_factory) -> Path:
    from umlipft.models.export import ExportConfig, export_lammps_model

    out = tmp_path_factory.mktemp("md-faults-model") / "small-fp64.pt"
    return export_lammps_model(ExportConfig(model=str(small_model_path), output=str(out), dtype="float64"))


@pytest.fixture(scope="module")
def crystal(tmp_path_factory) -> Path:
    from ase.io import write

    path = tmp_path_factory.mktemp("md-faults") / "cocl2.extxyz"
    write(path, cobalt_chloride_crystal().repeat((2, 2, 1)))
    return path


@pytest.fixture(scope="module")
def overlapping_water(tmp_path_factory) -> Path:
    """Eight waters with H atom 5 placed 0.2 Å from O atom 4."""
    from ase.io import write

    atoms = triclinic_water_box()
    atoms.positions[4] = atoms.positions[3] + [0.2, 0.0, 0.0]
    path = tmp_path_factory.mktemp("md-faults") / "overlap.extxyz"
    write(path, atoms)
    return path


def md_args(structure: Path, model: Path, output: Path, *extra: str) -> list:
    return ["md", structure, "--model", model, "--ensemble", "nvt", "--seed", "3", "--no-progress",
            "-o", output, *extra]


def thermo_table(path: Path) -> np.ndarray:
    return np.genfromtxt(path, delimiter=",", names=True)


# ------------------------------------------------------------------ a finished run's outputs changed


@pytest.mark.slow
def test_finished_run_with_a_damaged_output_is_not_reused(tmp_path, crystal, model):
    """Case 3: a truncated trajectory.extxyz was reported as a complete run (exit 0)."""
    run_dir = tmp_path / "run"
    args = md_args(crystal, model, run_dir, "--steps", "20", "--thermo-every", "5", "--dump-every", "5")
    done = run_umlipft(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    trajectory = run_dir / "trajectory.extxyz"
    intact = trajectory.read_bytes()
    assert len(read_frames(trajectory)) == 5

    # 2 of 5 frames, cut in the middle of a line, as a full disk or a bad copy leaves it
    cut = intact[: intact.index(b"\n", len(intact) // 2) - 7]
    trajectory.write_bytes(cut)
    refused = run_umlipft(*args)
    assert_message(refused, trajectory, "of the 5 frames the run wrote", "cut off", f"delete {run_dir}")
    assert trajectory.read_bytes() == cut  # nothing was overwritten or "repaired"

    # Same size and frame count, other content: the recorded hash tells.
    trajectory.write_bytes(intact)
    thermo = run_dir / "thermo.csv"
    table = thermo.read_bytes()
    thermo.write_bytes(table.replace(b"\n5,", b"\n6,", 1))
    assert_message(run_umlipft(*args), thermo, "differs from what the run wrote")

    # Put back, the run is reused as it is.
    thermo.write_bytes(table)
    assert run_umlipft(*args).returncode == 0


# ------------------------------------------------------------------ kill -9 and resume


def _wait_for_thermo_step(log: Path, step: int, process: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before step {step} could be reached")
        if log.is_file() and any(line.split()[:1] == [str(step)] for line in log.read_text().splitlines()):
            return
        time.sleep(0.1)
    pytest.fail(f"step {step} not reached in {timeout} s")


@pytest.mark.slow
def test_killed_and_resumed_run_keeps_every_thermo_row_and_frame_once(tmp_path, crystal, model):
    """Case 6: after kill -9 and resume, thermo.csv held only the resumed attempt's rows."""
    common = ["--steps", "60", "--thermo-every", "5", "--dump-every", "10", "--restart-every", "10"]
    reference = tmp_path / "reference"
    done = run_umlipft(*md_args(crystal, model, reference, *common), timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(umlipft_command(*md_args(crystal, model, killed, *common)), env=umlipft_env(),
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Step 25 is logged after restart file 20 is complete: the resume starts from 20 (or later).
        _wait_for_thermo_step(killed / "log.lammps.0", 25, process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    resumed = run_umlipft(*md_args(crystal, model, killed, *common), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (killed / "log.lammps.1").is_file()  # it did resume in a second attempt

    want, have = thermo_table(reference / "thermo.csv"), thermo_table(killed / "thermo.csv")
    assert list(have["Step"]) == list(want["Step"]) == list(range(0, 61, 5))
    for name in ("Temp", "PotEng", "TotEng"):
        np.testing.assert_allclose(have[name], want[name], rtol=1e-6)
    expected = read_frames(reference / "trajectory.extxyz")
    frames = read_frames(killed / "trajectory.extxyz")
    assert [f.info["step"] for f in frames] == [f.info["step"] for f in expected] == list(range(0, 61, 10))
    for a, b in zip(frames, expected):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-8)


def test_thermo_of_a_killed_attempt_is_joined_with_the_resumed_one(tmp_path):
    """The same on logs: the killed log has no 'Loop time' line and ends in a cut line."""
    from umlipft.md.run import read_thermo

    header = "   Step          Time           Temp          PotEng\n"
    killed = tmp_path / "log.lammps.0"
    killed.write_text("LAMMPS (29 Aug 2024)\n" + header
                      + "".join(f"{s:10d} {s * 0.0005:.4f} 300 -148.3\n" for s in range(0, 30, 5))
                      + "WARNING: something (src/x.cpp:1)\n" + "        30   0.015   301 -14")
    resumed = tmp_path / "log.lammps.1"
    resumed.write_text(header + "".join(f"{s:10d} {s * 0.0005:.4f} 299 -148.2\n" for s in range(20, 45, 5))
                       + "Loop time of 1.0 on 1 procs for 20 steps with 36 atoms\n")
    rows = read_thermo([killed, resumed])
    assert [r["Step"] for r in rows] == list(range(0, 45, 5))
    assert [r["Temp"] for r in rows] == [300] * 4 + [299] * 5  # from step 20 on: the resumed attempt


# ------------------------------------------------------------------ overlapping atoms, blow-ups


def test_overlapping_start_structure_is_refused_before_lammps(tmp_path, overlapping_water, model):
    """Case 4: atoms 0.1-0.3 Å apart ran to the end with exit 0 (T peaked at 4e6 K)."""
    run_dir = tmp_path / "run"
    refused = run_umlipft(*md_args(overlapping_water, model, run_dir, "--steps", "10"))
    assert_message(refused, overlapping_water, "atoms 4 (O) and 5 (H) are 0.200 Å apart",
                   "min_distance_A = 0.5", "--min-distance-A")
    assert not list(run_dir.glob("log.lammps*"))  # LAMMPS never started


@pytest.mark.slow
def test_overlap_let_through_is_stopped_by_the_force_watchdog(tmp_path, overlapping_water, model):
    run_dir = tmp_path / "run"
    stopped = run_umlipft(*md_args(overlapping_water, model, run_dir, "--steps", "10", "--min-distance-A", "0.1"))
    assert_message(stopped, "force watchdog stopped the run", "at step 0 exceeds max_force 50 eV/A",
                   "atom 4 (O)", "atom 5 (H)", "0.200 A away", "timestep", "--max-force-eV-A")
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_temperature_blowup_is_stopped_by_the_watchdog(tmp_path, overlapping_water, model):
    run_dir = tmp_path / "run"
    stopped = run_umlipft(*md_args(overlapping_water, model, run_dir, "--steps", "10", "--min-distance-A", "0.1",
                                   "--max-force-eV-A", "0"))
    assert_message(stopped, "temperature watchdog stopped the run at step 1", "times temperature_K (300 K)",
                   "watchdog_temperature_factor = 10", "timestep", "--watchdog-temperature-factor")
    assert not (run_dir / "summary.json").exists()
