"""The CLI contract: analyze pca|q|coverage|bonds|coordination|events, and report, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from umlipft.cli import main
from umlipft.io import read_frames, write_frames


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory, periodic_u_path, naive1_path):
    root = tmp_path_factory.mktemp("sets")
    a, b = root / "periodic.extxyz", root / "naive.extxyz"
    write_frames(a, read_frames(periodic_u_path, index=":2"))
    write_frames(b, read_frames(naive1_path, index=":3"))
    return a, b


def test_pca_then_q_then_report(small_sets, tmp_path, capsys):
    a, b = small_sets
    pca_dir, out_json = tmp_path / "pca", tmp_path / "pca.json"
    assert main(["analyze", "pca", "--fit", str(a), str(b), "--descriptor", "soap", "--components", "5",
                 "-o", str(pca_dir), "--json", str(out_json)]) == 0
    doc = json.loads(out_json.read_text())
    evr = doc["explained_variance_ratio"]
    assert isinstance(evr, list) and len(evr) == 5 and 0 < sum(evr) < 1
    from umlipft.analysis.pca import DescriptorPCA

    model = DescriptorPCA.load(pca_dir)
    assert model.explained_variance_ratio == evr
    assert json.loads((pca_dir / "summary.json").read_text())["driver"] == "analyze pca"

    events_json = tmp_path / "events.json"
    assert main(["analyze", "events", str(b), "--json", str(events_json), "--frame-interval-ps", "50"]) == 0
    q_dir = tmp_path / "q"
    assert main(["analyze", "q", "--pca", str(pca_dir), str(b), "-o", str(q_dir), "--alpha", "0.05",
                 "--events", str(events_json), "--track", "0", "1"]) == 0
    q = np.load(q_dir / "q.npy")
    frames = read_frames(b)
    expected = model.evaluate(model.descriptor().compute(frames[2:3])[0], frames[2].get_chemical_symbols()).q
    np.testing.assert_array_equal(q[2], expected)
    shown = json.loads((q_dir / "q_timeseries.json").read_text())["data"]
    assert list(shown["series"]) == ["Li0", "Co1"]
    np.testing.assert_array_equal(shown["series"]["Co1"]["values"], q[:, 1])

    assert main(["analyze", "coverage", "--pca", str(pca_dir), "--a", str(b), "--b", str(a),
                 "--labels", "naive", "periodic", "--by-element", "-o", str(tmp_path / "cov")]) == 0
    assert main(["analyze", "bonds", str(a), str(b), "--pair", "O-H:1.25", "-o", str(tmp_path / "bonds")]) == 0
    assert main(["analyze", "coordination", str(b), "-o", str(tmp_path / "coord")]) == 0
    assert main(["report", str(tmp_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    for name in ("pca_map.png", "q_timeseries.png", "t2_timeseries.png", "coverage.png", "bond_lengths.png",
                 "coordination.png"):
        assert name in html
    out = capsys.readouterr().out
    assert "CoCl1 -> CoCl2" in out  # the real coordination change of this trajectory


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["analyze", "q", "--pca", str(tmp_path), str(tmp_path / "x.xyz"), "-o", str(tmp_path / "o")]) == 1
    assert "not a PCA directory" in capsys.readouterr().err
    assert main(["analyze", "bonds", str(tmp_path / "missing.xyz")]) == 1
    assert main(["analyze", "pca", "--fit", str(tmp_path / "m.xyz"), "--descriptor", "mace", "-o",
                 str(tmp_path / "p")]) == 1
    assert "model" in capsys.readouterr().err
