"""Shared fixtures: the real foundation model and DFT data from ../shared (present in CI too)."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
SMALL_MODEL = SHARED / "models" / "mace-mp-0-small.model"
AQUEOUS = SHARED / "data" / "aqueous-licl-cocl2"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests need ../shared beside the project checkout")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED)


@pytest.fixture(scope="session")
def small_model_path() -> Path:
    return _require(SMALL_MODEL)


@pytest.fixture(scope="session")
def aqueous_dir() -> Path:
    return _require(AQUEOUS)


@pytest.fixture(scope="session")
def aqueous_eval_frames_path(aqueous_dir: Path) -> Path:
    return _require(aqueous_dir / "single_points" / "Evaluations__U__dft.extxyz")


NAIVE_11 = "Finetuning__Naive__Finetuned_Models__11pts__11pt_dataset.xyz"


@pytest.fixture(scope="session")
def watch_training_file(tmp_path_factory, aqueous_dir: Path) -> Path:
    """Three frames of the study's naive 11-point set and its isolated atoms: a watch's training data."""
    from umlipft.io import read_frames, write_frames

    frames = read_frames(aqueous_dir / "training_sets" / NAIVE_11)
    path = tmp_path_factory.mktemp("watch-train") / "train.extxyz"
    write_frames(path, [a for a in frames if len(a) > 1][:3] + [a for a in frames if len(a) == 1])
    return path


@pytest.fixture(scope="session")
def watched_export(tmp_path_factory, small_model_path: Path, watch_training_file: Path) -> Path:
    """MACE-MP-0 small, optimised for the aqueous elements, float64, with a watch fitted on
    watch_training_file."""
    from umlipft.models.export import ExportConfig, export_lammps_model

    out = tmp_path_factory.mktemp("watch-export") / "small-watch-fp64.pt"
    return export_lammps_model(ExportConfig(model=str(small_model_path), output=str(out), dtype="float64",
                                            elements=("H", "Li", "O", "Cl", "Co"), watch=str(watch_training_file)))
