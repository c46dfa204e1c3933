"""PCA, Q-residual and T² against a direct numpy computation; save/load round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tolerances import PCA_DIRECT_REL, PCA_RANDOMIZED_REL

from umlipft.analysis.pca import DescriptorPCA
from umlipft.errors import InputError


def _direct(x_fit: np.ndarray, x_new: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Q and T² from the definitions, with numpy alone: the eigenvectors of the Gram matrix
    (n × n, cheaper than an SVD of n × 5,740) give the loadings P = Xcᵀu/sqrt(eigenvalue)."""
    mu = x_fit.mean(axis=0)
    xc = x_fit - mu
    w, u = np.linalg.eigh(xc @ xc.T)
    top = np.argsort(w)[::-1][:k]
    p = xc.T @ u[:, top] / np.sqrt(w[top])
    lam = w[top] / (x_fit.shape[0] - 1)
    r = x_new - mu
    e = r - r @ p @ p.T
    return np.sum(e * e, axis=1), np.sum((r @ p) ** 2 / lam, axis=1)


@pytest.mark.parametrize("solver,tol", [("auto", PCA_DIRECT_REL), ("randomized", PCA_RANDOMIZED_REL)])
def test_q_and_t2_match_numpy_global(fit_features, soap, test_frame, solver, tol):
    x, symbols = fit_features
    model = DescriptorPCA.fit(x, symbols, soap.settings(), n_components=5, svd_solver=solver)
    x_new = soap.compute([test_frame])[0]
    ev = model.evaluate(x_new, test_frame.get_chemical_symbols())
    q_ref, t2_ref = _direct(x, x_new, 5)
    np.testing.assert_allclose(ev.q, q_ref, rtol=tol)
    np.testing.assert_allclose(ev.t2, t2_ref, rtol=tol)
    # The Q of new atoms is not trivially small: the comparison is of real residuals.
    assert np.median(ev.q) > 1e-3 * np.median(np.sum((x_new - x.mean(0)) ** 2, axis=1))


def test_q_and_t2_match_numpy_per_element(fit_features, element_pca, test_frame, soap):
    x, symbols = fit_features
    x_new = soap.compute([test_frame])[0]
    new_symbols = np.asarray(test_frame.get_chemical_symbols())
    ev = element_pca.evaluate(x_new, new_symbols)
    for element in ("H", "O"):
        q_ref, t2_ref = _direct(x[symbols == element], x_new[new_symbols == element], 5)
        np.testing.assert_allclose(ev.q[new_symbols == element], q_ref, rtol=PCA_DIRECT_REL)
        np.testing.assert_allclose(ev.t2[new_symbols == element], t2_ref, rtol=PCA_DIRECT_REL)
    # 3 fitted frames hold 3 Li, 3 Co, 9 Cl: too few for 5 components except Cl; those atoms get NaN.
    assert set(element_pca.skipped) == {"Li", "Co"}
    assert np.isnan(ev.q[new_symbols == "Li"]).all()
    assert np.isfinite(ev.q[new_symbols == "Cl"]).all()


def test_explained_variance_ratio_is_sklearn_and_pooled(global_pca, element_pca, fit_features):
    x, symbols = fit_features
    evr = global_pca.explained_variance_ratio
    total = np.var(x, axis=0, ddof=1).sum()
    lam = global_pca.groups["all"].explained_variance
    np.testing.assert_allclose(evr, lam / total, rtol=1e-10)
    assert all(a >= b for a, b in zip(evr, evr[1:]))
    # Pooled per-element ratio: Σ_e n_e λ_e,j / Σ_e n_e total_e over the fitted groups.
    groups = element_pca.groups
    num = sum(g.n_samples * g.explained_variance for g in groups.values())
    den = sum(g.n_samples * np.var(x[symbols == e], axis=0, ddof=1).sum() for e, g in groups.items())
    np.testing.assert_allclose(element_pca.explained_variance_ratio, num / den, rtol=1e-10)


@pytest.mark.parametrize("which", ["global_pca", "element_pca"])
def test_save_load_round_trip_identical(request, which, tmp_path, test_frame):
    model = request.getfixturevalue(which)
    model.save(tmp_path / "pca")
    loaded = DescriptorPCA.load(tmp_path / "pca")
    # The descriptor is rebuilt from the saved settings alone.
    x_orig = model.descriptor().compute([test_frame])[0]
    x_loaded = loaded.descriptor().compute([test_frame])[0]
    assert np.array_equal(x_orig, x_loaded)
    symbols = test_frame.get_chemical_symbols()
    a, b = model.evaluate(x_orig, symbols), loaded.evaluate(x_loaded, symbols)
    for field in ("scores", "q", "t2"):
        assert np.array_equal(getattr(a, field), getattr(b, field), equal_nan=True), field
    assert model.limits(0.01, 2.0) == loaded.limits(0.01, 2.0)
    assert loaded.explained_variance_ratio == model.explained_variance_ratio
    doc = json.loads((tmp_path / "pca" / "pca.json").read_text())
    assert doc["descriptor"]["r_cut_A"] == 5.0 and doc["descriptor"]["n_max"] == 8
    assert doc["descriptor"]["l_max"] == 6 and doc["descriptor"]["sigma_A"] == 0.375


def test_study_soap_defaults(soap):
    s = soap.settings()
    assert (s["r_cut_A"], s["n_max"], s["l_max"], s["sigma_A"], s["periodic"]) == (5.0, 8, 6, 0.375, True)
    assert s["species"] == ["H", "Li", "O", "Cl", "Co"]
    # DScribe's inner-crossover SOAP width for 5 species: (5·8)(5·8+1)/2 · (l_max+1).
    assert soap.n_features == 40 * 41 // 2 * 7


def test_errors_are_explained(global_pca, tmp_path, test_frame):
    with pytest.raises(InputError, match="not a PCA directory"):
        DescriptorPCA.load(tmp_path)
    with pytest.raises(InputError, match="shape"):
        global_pca.evaluate(np.zeros((3, 7)), ["H", "H", "O"])
    frame = test_frame.copy()
    frame[0].symbol = "Na"
    with pytest.raises(InputError, match="Na"):
        global_pca.descriptor().compute([frame])


def test_fit_files_skips_isolated_atom_frames(aqueous_dir, tmp_path):
    """The authors' training sets hold isolated atoms (H, Li, C, O, Cl, Co in vacuum boxes):
    they are dropped, so C does not enter the SOAP species of an aqueous PCA."""
    from umlipft.analysis.pca import PCAConfig, fit_pca_files
    from umlipft.io import read_frames, write_frames

    frames = read_frames(aqueous_dir / "training_sets" / "Finetuning__Periodic__FT1__model__ft_dataset.xyz")
    isolated = [a for a in frames if a.info.get("config_type") == "IsolatedAtom"]
    assert "C" in {a.get_chemical_symbols()[0] for a in isolated}
    path = tmp_path / "set.extxyz"
    write_frames(path, isolated + [a for a in frames if len(a) > 1][:1])
    model, feats = fit_pca_files([path], PCAConfig(components=3))
    assert model.descriptor_settings["species"] == ["H", "Li", "O", "Cl", "Co"]
    assert feats.symbols.size == 170
