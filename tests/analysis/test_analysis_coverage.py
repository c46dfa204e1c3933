"""The "A not in B" definition of umlipft.analysis.coverage, on hand-made and real scores."""

from __future__ import annotations

import numpy as np
import pytest

from umlipft.analysis.coverage import coverage, coverage_by_element
from umlipft.errors import InputError


def test_hand_computed_two_by_two_grid():
    # Bounds 0..2 in both axes, 2×2 cells of side 1: cells are [x, y] in {0,1}².
    a = np.array([[0.5, 0.5], [0.6, 0.4], [1.5, 0.5], [1.5, 1.5]])
    b = np.array([[0.5, 0.5], [0.5, 1.5]])
    cov = coverage(a, b, bins=2, bounds=(0.0, 2.0, 0.0, 2.0))
    assert cov.count_a.tolist() == [[2, 0], [1, 1]]
    assert cov.count_b.tolist() == [[1, 1], [0, 0]]
    assert cov.a_not_in_b.tolist() == [[False, False], [True, True]]
    assert cov.b_not_in_a.tolist() == [[False, True], [False, False]]
    assert cov.a_points_not_in_b.tolist() == [False, False, True, True]
    assert cov.b_points_not_in_a.tolist() == [False, True]
    info = cov.to_dict()
    assert info["fraction_atoms_a_not_in_b"] == 0.5 and info["cells_a_not_in_b"] == 2
    # min_count=2: only the cell with two A atoms is covered by A, none by B.
    strict = coverage(a, b, bins=2, bounds=(0.0, 2.0, 0.0, 2.0), min_count=2)
    assert strict.a_not_in_b.tolist() == [[True, False], [False, False]]
    assert strict.a_points_not_in_b.tolist() == [True, True, False, False]


def test_planted_cluster_is_exactly_a_not_in_b():
    rng = np.random.default_rng(0)
    shared = rng.normal(0.0, 1.0, (400, 5))
    island = rng.normal(0.0, 0.2, (30, 5)) + np.array([8.0, 8.0, 0, 0, 0])
    a = np.vstack([shared, island])
    b = shared + rng.normal(0.0, 1e-3, shared.shape)  # same region, not the same points
    cov = coverage(a, b, bins=20)
    # Every island atom is "A not in B"; of the shared atoms only those alone in a cell can be.
    assert cov.a_points_not_in_b[400:].all()
    assert cov.a_points_not_in_b[:400].sum() <= 3
    assert coverage(a, a, bins=20).a_points_not_in_b.sum() == 0
    # Atoms without a PCA (NaN scores) cover nothing and are never "not in B".
    nan = np.vstack([a, np.full((2, 5), np.nan)])
    assert coverage(nan, b, bins=20).a_points_not_in_b[-2:].tolist() == [False, False]


def test_real_data_by_element(global_pca, fit_features, test_frame, soap):
    x, symbols = fit_features
    sa = global_pca.transform(x, symbols)
    xb = soap.compute([test_frame])[0]
    sb = global_pca.transform(xb, test_frame.get_chemical_symbols())
    per = coverage_by_element(sa, symbols, sb, test_frame.get_chemical_symbols(), bins=15,
                              label_a="periodic U", label_b="naive 1")
    assert set(per) == {"H", "Li", "O", "Cl", "Co"}
    assert per["O"].to_dict()["atoms_a"] == 165 and per["O"].to_dict()["atoms_b"] == 55
    for cov in per.values():
        # Every atom of A is in a covered cell; "not in B" atoms are exactly those in A-only cells.
        assert cov.count_a.sum() == cov.a_points_not_in_b.size
        assert 0 <= cov.to_dict()["fraction_atoms_a_not_in_b"] <= 1


def test_bad_input():
    with pytest.raises(InputError):
        coverage(np.zeros((3, 1)), np.zeros((3, 1)))
    with pytest.raises(InputError):
        coverage(np.zeros((3, 2)), np.zeros((3, 2)), bins=0)


def test_new_frames_are_found_by_content_wherever_they_sit(periodic_u_path, tmp_path):
    from umlipft.analysis.frames import frame_fingerprint, new_frames
    from umlipft.io import read_frames, write_frames

    pool = read_frames(periodic_u_path, index=":6")
    earlier = [pool[4], pool[1]]
    later = [pool[0], pool[1], pool[3], pool[4]]  # written in pool order: new ones not at the end
    path = write_frames(tmp_path / "later.extxyz", later)
    reread = read_frames(path)
    assert [frame_fingerprint(a) for a in new_frames(reread, earlier)] == \
        [frame_fingerprint(pool[0]), frame_fingerprint(pool[3])]
    moved = pool[2].copy()
    moved.positions[7] += 1e-3
    assert frame_fingerprint(moved) != frame_fingerprint(pool[2])
    assert len({frame_fingerprint(a) for a in pool}) == 6
