"""Fixtures of the reliability tests: where the fault-injection tallies go, and the LAMMPS
export the MD trials run with."""

from __future__ import annotations

from pathlib import Path

import pytest
from kill_trials import tally_path


@pytest.fixture(scope="session")
def fault_tally_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The JSON the kill trials write their tallies to (scripts/fault_injection_table.py reads it)."""
    return tally_path(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def water_export_fp64(small_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MACE-MP-0 small exported for H and O, float64 (the optimised export every run uses)."""
    from umlipft.models.export import ExportConfig, export_lammps_model

    out = tmp_path_factory.mktemp("water-export") / "small-HO-fp64.pt"
    return Path(export_lammps_model(ExportConfig(model=str(small_model_path), output=str(out), dtype="float64",
                                                 elements=("H", "O"))))


@pytest.fixture(scope="session")
def water_box(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight waters in a triclinic box (24 atoms)."""
    from ase.io import write
    from sample_structures import triclinic_water_box

    path = tmp_path_factory.mktemp("water-box") / "water.extxyz"
    write(path, triclinic_water_box())
    return path
