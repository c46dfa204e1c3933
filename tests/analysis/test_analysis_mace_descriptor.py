"""MACE invariant node features: same numbers as mace-torch's own get_descriptors; PCA round trip."""

from __future__ import annotations

import numpy as np
import pytest

from umlipft.analysis.descriptors import MaceDescriptor, MaceSettings, descriptor_from_settings
from umlipft.analysis.pca import DescriptorPCA
from umlipft.errors import InputError


@pytest.fixture(scope="module")
def clusters(test_frame, fit_frames):
    """Two small non-periodic clusters (atoms within 4 Å of Co) of real frames: MACE on 170 atoms
    costs seconds here, these cost a fraction of that."""
    out = []
    for atoms in (test_frame, fit_frames[0]):
        co = int(np.flatnonzero(np.asarray(atoms.get_chemical_symbols()) == "Co")[0])
        d = atoms.get_distances(co, range(len(atoms)), mic=True)
        keep = np.flatnonzero(d < 4.0)
        cluster = atoms[keep]
        cluster.positions = atoms.positions[co] + atoms.get_distances(co, keep, mic=True, vector=True)
        cluster.pbc = False
        cluster.cell = None
        out.append(cluster)
    return out


@pytest.fixture(scope="module")
def mace(small_model_path):
    return MaceDescriptor(MaceSettings(model=str(small_model_path)))


def test_matches_mace_get_descriptors(mace, clusters, small_model_path):
    from mace.calculators import MACECalculator

    ours = mace.compute(clusters)  # both clusters in one graph batch
    calc = MACECalculator(model_paths=str(small_model_path), device="cpu", default_dtype="float64")
    for cluster, x in zip(clusters, ours):
        ref = calc.get_descriptors(cluster, invariants_only=True)
        assert x.shape == (len(cluster), 256)  # 2 layers × 128 scalar channels
        np.testing.assert_allclose(x, ref, rtol=1e-10, atol=1e-12)


def test_pca_on_mace_features_round_trip(mace, clusters, tmp_path):
    feats = mace.compute(clusters)
    x = np.vstack(feats)
    symbols = np.concatenate([c.get_chemical_symbols() for c in clusters])
    model = DescriptorPCA.fit(x, symbols, mace.settings(), n_components=3)
    model.save(tmp_path / "pca")
    loaded = DescriptorPCA.load(tmp_path / "pca")
    # The loaded model rebuilds the descriptor from the stored path and checks the model's hash.
    assert loaded.descriptor_settings["model_sha256"] == mace.config.model_sha256
    again = np.vstack(loaded.descriptor().compute(clusters))
    np.testing.assert_array_equal(again, x)
    assert np.array_equal(loaded.evaluate(again, symbols).q, model.evaluate(x, symbols).q)


def test_other_model_is_refused(mace, tmp_path):
    settings = dict(mace.settings())
    settings["model_sha256"] = "0" * 64
    with pytest.raises(InputError, match="not the model this PCA was fitted with"):
        descriptor_from_settings(settings)
