"""Each bad input stops LAMMPS with one message that names the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from sample_structures import triclinic_water_box

from umlipft.lammps import open_lammps, write_lammps_data


@pytest.fixture()
def water_data(tmp_path: Path) -> Path:
    return write_lammps_data(tmp_path / "water.data", triclinic_water_box(), ["O", "H"])


def run_input(lines: list[str]) -> None:
    lmp = open_lammps()
    try:
        lmp.commands_list(lines)
    finally:
        lmp.close()


def setup_lines(data: Path, units: str = "metal") -> list[str]:
    return [f"units {units}", "atom_style atomic", "atom_modify map array", f"read_data {data}"]


def expect_error(lines: list[str], *fragments: str) -> str:
    with pytest.raises(Exception) as info:
        run_input(lines)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_model_file(water_data, tmp_path):
    expect_error(setup_lines(water_data) + ["pair_style mace", f"pair_coeff * * {tmp_path}/nope.pt O H"],
                 "cannot open model file", "umlipft export")


def test_foreign_model_file(water_data, small_model_path):
    # the raw mace-torch .model is a pickle, not an export
    expect_error(setup_lines(water_data) + ["pair_style mace", f"pair_coeff * * {small_model_path} O H"],
                 "not a TorchScript model file", "umlipft export")


def test_torchscript_without_metadata(water_data, tmp_path):
    import torch

    path = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    expect_error(setup_lines(water_data) + ["pair_style mace", f"pair_coeff * * {path} O H"],
                 "was not written by umlipft export", "umlipft export")


def test_element_not_covered(water_data, exported_fp64):
    expect_error(setup_lines(water_data) + ["pair_style mace", f"pair_coeff * * {exported_fp64} O Rn"],
                 "element Rn (atom type 2) is not covered", "NULL")


def test_not_an_element(water_data, exported_fp64):
    expect_error(setup_lines(water_data) + ["pair_style mace", f"pair_coeff * * {exported_fp64} O Hx"],
                 "'Hx' (atom type 2) is not an element symbol")


def test_wrong_number_of_elements(water_data, exported_fp64):
    expect_error(setup_lines(water_data) + ["pair_style mace", f"pair_coeff * * {exported_fp64} O"],
                 "needs one element per atom type", "1 element(s) for 2 atom type(s)")


def test_units_other_than_metal(water_data, exported_fp64):
    expect_error(setup_lines(water_data, units="real") + ["pair_style mace", f"pair_coeff * * {exported_fp64} O H", "run 0"],
                 "requires 'units metal'", "units real")


def test_type_left_unmapped(water_data, exported_fp64):
    expect_error(setup_lines(water_data) + ["pair_style mace", f"pair_coeff * * {exported_fp64} O NULL", "run 0"],
                 "atom type 2 is mapped to NULL", "hybrid/overlay")


def test_unknown_pair_style_keyword(water_data):
    expect_error(setup_lines(water_data) + ["pair_style mace fast"], "unknown keyword 'fast'")


def test_cuda_device_without_cuda_libtorch(water_data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU; the message is for CPU-only builds")
    expect_error(setup_lines(water_data) + ["pair_style mace device cuda"],
                 "device cuda requested", "CUDA libtorch")


def test_overlapping_atoms_give_non_finite_forces(water_data, exported_fp64):
    # min_distance (test_pair_mace_watchdog.py) refuses this first unless turned off
    lines = setup_lines(water_data) + [
        "pair_style mace min_distance 0", f"pair_coeff * * {exported_fp64} O H",
        "set atom 5 x $(x[4]) y $(y[4]) z $(z[4])",
        "run 0",
    ]
    expect_error(lines, "non-finite energy or force", "overlapping atoms")


def test_nan_position_between_neighbour_list_builds(water_data, exported_fp64):
    """Between rebuilds LAMMPS itself never looks at coordinates; the pair style does."""
    import numpy as np

    lmp = open_lammps()
    try:
        lmp.commands_list(setup_lines(water_data) + [
            "pair_style mace", f"pair_coeff * * {exported_fp64} O H", "run 0"])
        lmp.numpy.extract_atom("x")[4, 0] = np.nan
        with pytest.raises(Exception) as info:
            lmp.command("run 1 pre no post no")
    finally:
        lmp.close()
    assert "non-finite (NaN or infinite) atom position" in str(info.value)
    assert "atom ID 5" in str(info.value)


def test_null_type_under_hybrid_overlay_is_accepted(water_data, exported_fp64):
    """NULL is valid when another style covers the type: here a zero LJ on H-H."""
    run_input(setup_lines(water_data) + [
        "pair_style hybrid/overlay mace lj/cut 3.0",
        f"pair_coeff * * mace {exported_fp64} O NULL",
        "pair_coeff * * lj/cut 0.0 1.0",
        "run 0",
    ])


def test_kernel_failure_inside_the_model_reports_its_cause(water_data, small_model_path, tmp_path):
    """An error raised inside a compiled kernel reaches the LAMMPS message, not just 'TorchScript failed'."""
    import os
    import subprocess

    from umlipft.lammps import lmp_executable
    from umlipft.models.export import ExportConfig, export_lammps_model

    model = export_lammps_model(ExportConfig(model=str(small_model_path), output=str(tmp_path / "oh.pt"),
                                             dtype="float32", elements=("O", "H")))
    script = tmp_path / "in.bad"
    script.write_text("\n".join(setup_lines(water_data) + ["pair_style mace", f"pair_coeff * * {model} O H",
                                                           "run 0", ""]))
    proc = subprocess.run([str(lmp_executable()), "-in", str(script), "-log", "none"], cwd=tmp_path,
                          env={**os.environ, "UMLIPFT_KERNEL_ISA": "sse9"},
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert "the model failed at step 0: UMLIPFT_KERNEL_ISA='sse9' is not one of generic, avx2, avx512" in (
        proc.stdout + proc.stderr)
