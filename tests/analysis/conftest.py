"""Fixtures of the analysis tests: a few real aqueous frames, their SOAP features and fitted PCAs.

Session-scoped because SOAP of the study's settings (5,740 features) and a PCA fit cost seconds
on the 2-core test machines; every test reads them and none modifies them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def periodic_u_path(aqueous_dir: Path) -> Path:
    return aqueous_dir / "single_points" / "Finetuning__Periodic__U__dft.extxyz"


@pytest.fixture(scope="session")
def naive1_path(aqueous_dir: Path) -> Path:
    return aqueous_dir / "single_points" / "Finetuning__Naive__Model_U__dft__1.extxyz"


@pytest.fixture(scope="session")
def fit_frames(periodic_u_path: Path):
    from umlipft.io import read_frames

    return read_frames(periodic_u_path, index=":3")


@pytest.fixture(scope="session")
def soap(fit_frames):
    from umlipft.analysis.descriptors import make_descriptor

    return make_descriptor("soap", fit_frames)


@pytest.fixture(scope="session")
def fit_features(fit_frames, soap) -> tuple[np.ndarray, np.ndarray]:
    x = np.vstack(soap.compute(fit_frames))
    symbols = np.concatenate([a.get_chemical_symbols() for a in fit_frames])
    return x, symbols


@pytest.fixture(scope="session")
def global_pca(fit_features, soap):
    from umlipft.analysis.pca import DescriptorPCA

    x, symbols = fit_features
    return DescriptorPCA.fit(x, symbols, soap.settings(), n_components=5, per_element=False)


@pytest.fixture(scope="session")
def element_pca(fit_features, soap):
    from umlipft.analysis.pca import DescriptorPCA

    x, symbols = fit_features
    return DescriptorPCA.fit(x, symbols, soap.settings(), n_components=5, per_element=True)


@pytest.fixture(scope="session")
def test_frame(naive1_path: Path):
    """A frame from another trajectory (the naive workflow), not used in any fit."""
    from umlipft.io import read_frames

    return read_frames(naive1_path, index=0)[0]
