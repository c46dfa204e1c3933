"""Fixtures of the reliability tests: where the fault-injection tallies go, the LAMMPS export
and the water box the MD trials run with, and a small MACE foundation for the trainings."""

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


@pytest.fixture(scope="session")
def tiny_foundation(small_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer MACE with 8 channels for H and O, built (seeded) by mace-torch with MACE-MP-0
    small's E0s: the fine-tune and workflow kill trials restart trainings ten times, and MACE-MP-0
    small took 45-60 CPU s a tiny fine-tune here (building and evaluating the model), this one
    about a third of that. The driver and mace-torch's training are the same."""
    return _tiny_foundation(small_model_path, tmp_path_factory.mktemp("tiny-foundation") / "tiny-HO.model")


def _tiny_foundation(small_model_path: Path, path: Path) -> Path:
    """A small ScaleShiftMACE for H and O with MACE-MP-0 small's E0s, built by mace-torch."""
    import mace  # noqa: F401 - sets up e3nn's constants loading under torch's weights_only default
    import torch
    from e3nn import o3
    from mace import modules

    from umlipft.models.foundation import load_mace_model

    small = load_mace_model(small_model_path, dtype="float64")
    numbers = [1, 8]
    index = [small.atomic_numbers.tolist().index(z) for z in numbers]
    e0 = small.atomic_energies_fn.atomic_energies.detach().view(-1)[index].numpy().astype(float)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = modules.ScaleShiftMACE(
            r_max=4.0, num_bessel=4, num_polynomial_cutoff=5, max_ell=1,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            num_interactions=2, num_elements=2, hidden_irreps=o3.Irreps("8x0e"), MLP_irreps=o3.Irreps("8x0e"),
            atomic_energies=e0, avg_num_neighbors=10.0, atomic_numbers=numbers, correlation=2,
            gate=torch.nn.functional.silu, radial_MLP=[8, 8], radial_type="bessel",
            atomic_inter_scale=0.5, atomic_inter_shift=0.0)
    finally:
        torch.set_default_dtype(previous)
    torch.save(model, path)
    return path
