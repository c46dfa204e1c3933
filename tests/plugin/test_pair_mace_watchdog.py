"""pair_style mace's safety checks: atom pairs closer than min_distance at the start of a run,
and the force watchdog (max_force) during dynamics, each naming the atoms and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from sample_structures import triclinic_water_box

from umlipft.lammps import open_lammps, write_lammps_data


@pytest.fixture()
def water_data(tmp_path: Path) -> Path:
    return write_lammps_data(tmp_path / "water.data", triclinic_water_box(), ["O", "H"])


@pytest.fixture()
def overlapping_data(tmp_path: Path) -> Path:
    """The water box with H atom 5 moved 0.2 Å from O atom 4: the fault campaign's overlap."""
    atoms = triclinic_water_box()
    atoms.positions[4] = atoms.positions[3] + [0.2, 0.0, 0.0]
    return write_lammps_data(tmp_path / "overlap.data", atoms, ["O", "H"])


def run_lines(data: Path, pair_style: str, model: Path, *commands: str) -> float:
    """Run the commands; the potential energy at the end."""
    lmp = open_lammps(["-log", "none", "-screen", "none"])
    try:
        lmp.commands_list(["units metal", "atom_style atomic", "atom_modify map array", f"read_data {data}",
                           pair_style, f"pair_coeff * * {model} O H", *commands])
        return float(lmp.get_thermo("pe"))
    finally:
        lmp.close()


def error_of(*args) -> str:
    with pytest.raises(Exception) as info:
        run_lines(*args)
    return str(info.value)


def test_overlapping_atoms_are_refused_at_the_start_naming_them(overlapping_data, exported_fp64):
    message = error_of(overlapping_data, "pair_style mace", exported_fp64, "run 0")
    assert "atoms 4 and 5 are 0.200 A apart at step 0" in message, message
    assert "1 pair(s) closer than min_distance 0.5 A" in message
    assert "min_distance" in message and "0 turns the check off" in message


def test_min_distance_keyword_sets_and_turns_off_the_check(overlapping_data, exported_fp64):
    message = error_of(overlapping_data, "pair_style mace min_distance 0.25", exported_fp64, "run 0")
    assert "closer than min_distance 0.25 A" in message, message
    # Below the pair's distance, or off: a single point goes through (any force is allowed there).
    assert abs(run_lines(overlapping_data, "pair_style mace min_distance 0.15", exported_fp64, "run 0")) < 1e6
    run_lines(overlapping_data, "pair_style mace min_distance off", exported_fp64, "run 0")


@pytest.mark.parametrize("keywords, fragment", [
    ("min_distance -0.5", "'min_distance -0.5' is not a limit"),
    ("max_force abc", "'max_force abc' is not a limit"),
    ("max_force", "keyword 'max_force' needs a value"),
])
def test_bad_limits_name_the_keyword(water_data, keywords, fragment):
    lmp = open_lammps(["-log", "none", "-screen", "none"])
    try:
        with pytest.raises(Exception) as info:
            lmp.commands_list(["units metal", "atom_style atomic", f"read_data {water_data}",
                               f"pair_style mace {keywords}"])
    finally:
        lmp.close()
    assert fragment in str(info.value), str(info.value)


def test_overlap_let_through_is_stopped_before_the_first_step(overlapping_data, exported_fp64):
    """The setup forces give the first kick: with the distance check off, the watchdog stops the
    run at step 0 instead of a run that flings atoms out at millions of kelvin."""
    message = error_of(overlapping_data, "pair_style mace min_distance 0", exported_fp64,
                       "velocity all create 300 5", "timestep 0.0005", "fix 1 all nve", "run 5")
    assert "watchdog" in message and "at step 0 exceeds max_force 50 eV/A" in message, message
    assert "0.200 A away" in message
    assert "atom 4 (O)" in message and "atom 5 (H)" in message


def test_too_long_timestep_is_stopped_naming_step_atom_and_cause(water_data, exported_fp64):
    """A 5 fs step with hydrogen blows up within a few steps: stopped at the step it happens."""
    message = error_of(water_data, "pair_style mace", exported_fp64,
                       "velocity all create 300 5 mom yes rot no", "timestep 0.005", "fix 1 all nve", "run 20")
    assert "pair_style mace: watchdog: a force of" in message, message
    step = int(message.split(" at step ")[1].split()[0])
    assert 0 < step < 20
    assert "(H)" in message and "closest neighbour" in message
    assert "timestep too large" in message and "max_force" in message


def test_max_force_off_lets_the_same_run_go_on(water_data, exported_fp64):
    # The step the watchdog stops above; without it this run ends in LAMMPS' "Lost atoms" by step 3.
    run_lines(water_data, "pair_style mace max_force 0", exported_fp64,
              "velocity all create 300 5 mom yes rot no", "timestep 0.005", "fix 1 all nve", "run 1")
