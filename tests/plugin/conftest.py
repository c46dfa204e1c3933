"""Structures and exported models shared by the plugin tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def exported_fp64(small_model_path: Path, tmp_path_factory) -> Path:
    from umlipft.models.export import ExportConfig, export_lammps_model

    out = tmp_path_factory.mktemp("export") / "small-fp64.pt"
    return export_lammps_model(ExportConfig(model=str(small_model_path), output=str(out), dtype="float64"))


@pytest.fixture(scope="session")
def exported_fast_fp64(small_model_path: Path, tmp_path_factory) -> Path:
    """The optimised export (elements restricted, compiled kernels): what every run uses."""
    from umlipft.models.export import ExportConfig, export_lammps_model

    out = tmp_path_factory.mktemp("export") / "small-fast-fp64.pt"
    return export_lammps_model(ExportConfig(model=str(small_model_path), output=str(out), dtype="float64",
                                            elements=("H", "Li", "O", "Cl", "Co")))


@pytest.fixture(scope="session")
def exported_fast_fp32(small_model_path: Path, tmp_path_factory) -> Path:
    from umlipft.models.export import ExportConfig, export_lammps_model

    out = tmp_path_factory.mktemp("export") / "small-fast-fp32.pt"
    return export_lammps_model(ExportConfig(model=str(small_model_path), output=str(out), dtype="float32",
                                            elements=("H", "Li", "O", "Cl", "Co")))


@pytest.fixture(scope="session")
def exported_fp32(small_model_path: Path, tmp_path_factory) -> Path:
    from umlipft.models.export import ExportConfig, export_lammps_model

    out = tmp_path_factory.mktemp("export") / "small-fp32.pt"
    return export_lammps_model(ExportConfig(model=str(small_model_path), output=str(out), dtype="float32"))


@pytest.fixture(scope="session")
def ase_calculators(small_model_path: Path):
    """mace-torch's own ASE calculator, the reference the plugin must reproduce."""
    from mace.calculators import MACECalculator

    cache = {}

    def get(dtype: str):
        if dtype not in cache:
            cache[dtype] = MACECalculator(model_paths=str(small_model_path), device="cpu", default_dtype=dtype)
        return cache[dtype]

    return get


@pytest.fixture(scope="session")
def aqueous_frame(aqueous_eval_frames_path: Path):
    from ase.io import read

    return read(aqueous_eval_frames_path, 0)
