"""Timesteps of 5-20 fs with hydrogen (issue 13, case 4: such runs ended in LAMMPS' generic "Lost
atoms"). ``umlipft md`` refuses more than 5 fs before LAMMPS starts; at 5 fs, which it allows,
and in a raw ``lmp`` run of the packaged input at 10-20 fs, the plugin's watchdog stops the run
naming the step, the atom and the timestep as the likely cause. (5 fs in LAMMPS commands, NVE,
is tests/plugin/test_pair_mace_watchdog.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from reliability_helpers import assert_message, run_umlipft

WATER = ["--ensemble", "nvt", "--seed", "3", "--no-progress", "--thermo-every", "1", "--dump-every", "10"]


@pytest.mark.parametrize("timestep", ["5.5", "10", "20"])
def test_umlipft_md_refuses_a_timestep_above_5_fs(water_box: Path, tmp_path: Path, timestep: str) -> None:
    run_dir = tmp_path / "run"
    done = run_umlipft("md", water_box, "--model", "small", "--timestep-fs", timestep, "--steps", "20", "-o", run_dir,
                       *WATER)
    assert_message(done, "timestep_fs must be within 0.05-5.0 fs", f"got {float(timestep)}")
    assert not run_dir.exists() or not list(run_dir.glob("log.lammps*"))


@pytest.mark.slow
def test_umlipft_md_at_5_fs_is_stopped_by_the_watchdog(water_box: Path, water_export_fp64: Path,
                                                        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_umlipft("md", water_box, "--model", water_export_fp64, "--timestep-fs", "5", "--steps", "200",
                       "-o", run_dir, *WATER, timeout=900)
    assert_message(done, "watchdog stopped the run", "timestep")
    assert "Lost atoms" not in done.stderr and "Out of range atoms" not in done.stderr
    assert not (run_dir / "summary.json").exists()


# At 20 fs the first step's drift from the setup forces (1-5 eV/Å on H: 1/2 F/m dt^2 = 2-10 Å)
# throws atoms beyond the box before any watchdog looks: max_force checks forces (below 50 eV/Å
# at step 0) and fix halt runs at the end of a step, after LAMMPS has lost the atoms while
# rebuilding its neighbour lists ("Lost atoms: original 24 current 22" at step 1). Not fixed here:
# it needs a displacement check in pair_style mace (being rewritten) or the inputs.
TWENTY_FS_LOST = pytest.mark.xfail(strict=True, reason="20 fs: atoms lost at step 1, before the watchdogs look")


@pytest.mark.slow
@pytest.mark.parametrize("timestep", ["10", pytest.param("20", marks=TWENTY_FS_LOST)])
def test_raw_lmp_at_10_to_20_fs_is_stopped_by_the_watchdog(water_box: Path, water_export_fp64: Path,
                                                          tmp_path: Path, timestep: str) -> None:
    """The packaged nvt.in run by hand (README: "LAMMPS by hand"), its safety settings left at
    their defaults."""
    from umlipft.io import read_frames
    from umlipft.lammps import input_script, lammps_environment, lmp_executable, write_lammps_data

    data = write_lammps_data(tmp_path / "water.data", read_frames(water_box)[0], ["H", "O"])
    command = [str(lmp_executable()), "-in", str(input_script("nvt")), "-log", str(tmp_path / "log.lammps"),
               "-var", "model", str(water_export_fp64), "-var", "data", str(data), "-var", "elements", "H O",
               "-var", "timestep_fs", timestep, "-var", "steps", "200", "-var", "thermo_every", "1",
               "-var", "dump_every", "50", "-var", "output", str(tmp_path / "md")]
    done = subprocess.run(command, cwd=tmp_path, env=lammps_environment(), capture_output=True, text=True,
                          timeout=900)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text[-2000:]
    assert "Lost atoms" not in text and "Out of range atoms" not in text, text[-2000:]
    assert "pair_style mace: watchdog" in text or "Fix halt condition for fix-id watchdog_temperature" in text, \
        text[-2000:]
    if "pair_style mace: watchdog" in text:
        assert "timestep too large" in text and "(H)" in text, text[-2000:]
