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
