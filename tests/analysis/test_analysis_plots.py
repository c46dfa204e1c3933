"""Every figure renders to PNG, and what it draws is the data it was given."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from umlipft.analysis import plots
from umlipft.analysis.coverage import coverage
from umlipft.analysis.geometry import (Event, PairRule, bond_length_distributions, coordination_series)


def _save_and_check(fig, data, path, caption="test"):
    from matplotlib.image import imread

    plots.save_figure(fig, data, path, caption)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # not a blank canvas
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["caption"] == caption
    return sidecar["data"]


def test_pca_map(tmp_path, global_pca, fit_features):
    x, symbols = fit_features
    scores = global_pca.transform(x, symbols)
    fig, data = plots.plot_pca_map(scores, symbols, global_pca.explained_variance_ratio)
    ax = fig.axes[0]
    by_label = {c.get_label(): c.get_offsets() for c in ax.collections}
    for element in ("H", "O", "Cl"):
        np.testing.assert_array_equal(by_label[element], scores[symbols == element][:, :2])
    assert f"{100 * global_pca.explained_variance_ratio[0]:.1f} %" in ax.get_xlabel()
    saved = _save_and_check(fig, data, tmp_path / "pca.png")
    np.testing.assert_allclose(saved["points"]["O"], scores[symbols == "O"][:, :2])


def test_coverage_panels(tmp_path):
    a = np.array([[0.5, 0.5], [1.5, 0.5], [1.5, 1.5]])
    b = np.array([[0.5, 0.5], [0.5, 1.5]])
    cov = coverage(a, b, bins=2, bounds=(0.0, 2.0, 0.0, 2.0), label_a="naive", label_b="periodic")
    fig, data = plots.plot_coverage({"iteration 1": cov})
    mesh = fig.axes[0].collections[0]
    drawn = np.asarray(mesh.get_array()).reshape(2, 2)  # [y, x]
    expected = np.array([[1, 2], [3, 2]]).T  # [x, y]: both, A only / B only, A only
    np.testing.assert_array_equal(drawn.T, expected)
    assert "66.7 % of naive not in periodic" in fig.axes[0].get_title()
    saved = _save_and_check(fig, data, tmp_path / "coverage.png")
    assert saved["iteration 1"]["categories"] == expected.tolist()


def test_control_chart(tmp_path):
    t = np.arange(6) * 0.5
    q = np.array([[1, 2], [1.5, 2.5], [1.2, 9.0], [1.1, 8.0], [1.0, 3.0], [1.3, 2.0]])
    events = [Event("bond_formed", 2, 1.0, (5, 168), "H-Cl formed", False, True)]
    fig, data = plots.plot_control_chart(t, q, ["H5", "Cl168"], "Q-residual", limits=[2.0, 6.0],
                                         bands=[(0.5, 1.5), (1.0, 4.0)], events=events, xlabel="time (ps)")
    ax = fig.axes[0]
    data_lines = [l for l in ax.lines if l.get_label() in ("H5", "Cl168")]
    for line, k in zip(data_lines, (0, 1)):
        np.testing.assert_array_equal(line.get_xdata(), t)
        np.testing.assert_array_equal(line.get_ydata(), q[:, k])
    horizontal = sorted(l.get_ydata()[0] for l in ax.lines if len(set(l.get_ydata())) == 1
                        and l.get_label().startswith("_"))
    assert horizontal == [2.0, 6.0]
    vertical = [l.get_xdata()[0] for l in ax.lines if l.get_label().startswith("_") and len(set(l.get_xdata())) == 1]
    assert vertical == [1.0]
    saved = _save_and_check(fig, data, tmp_path / "q.png")
    assert saved["series"]["Cl168"]["limit"] == 6.0 and saved["events"][0]["time"] == 1.0


def test_residuals_naive_vs_periodic(tmp_path):
    naive = {"U": [-16.0, -15.5, -17.0], "N-50": [-10.0, -11.0, -10.5]}
    periodic = {"FT1": [-9.0, -8.0], "FT5": [-5.0, -4.8, -4.9]}
    fig, data = plots.plot_residuals(naive, periodic)
    for ax, models in zip(fig.axes, (naive, periodic)):
        means = [c for c in ax.lines if c.get_marker() == "o"]
        drawn = [float(l.get_ydata()[0]) for l in means]
        assert drawn == pytest.approx([np.mean(v) for v in models.values()])
    saved = _save_and_check(fig, data, tmp_path / "residuals.png")
    assert saved["periodic"]["FT5"]["mean"] == pytest.approx(np.mean(periodic["FT5"]))


def test_energy_trajectory(tmp_path):
    t = np.linspace(0, 9, 50)
    e = -800 + np.sin(t)
    fig, data = plots.plot_energy_trajectory(t, e, t[::10], e[::10] + 0.5, {"FT5 on N-50 frames": (t[::10], e[::10] - 0.3)})
    lines = {l.get_label(): l for l in fig.axes[0].lines}
    np.testing.assert_array_equal(lines["DFT"].get_ydata(), e[::10] + 0.5)
    np.testing.assert_array_equal(lines["FT5 on N-50 frames"].get_ydata(), e[::10] - 0.3)
    _save_and_check(fig, data, tmp_path / "energy.png")


def test_force_parity_rmse(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (20, 3))
    pred = ref + rng.normal(0, 0.1, ref.shape)
    symbols = ["O"] * 10 + ["H"] * 10
    fig, data = plots.plot_force_parity(ref, pred, symbols)
    titles = {ax.get_title().split(":")[0]: ax.get_title() for ax in fig.axes}
    for element, rows in (("O", slice(0, 10)), ("H", slice(10, 20))):
        rmse = np.sqrt(np.mean((pred[rows] - ref[rows]) ** 2))
        shown = float(re.search(r"RMSE (\d+) meV", titles[element]).group(1))
        assert shown == round(1000 * rmse)
        assert data[element]["rmse_eV_A"] == pytest.approx(rmse)
    _save_and_check(fig, data, tmp_path / "parity.png")


def test_bond_histograms_and_coordination(tmp_path, fit_frames, test_frame):
    rules = [PairRule.parse("O-H:1.25"), PairRule.parse("H-Cl:1.6")]
    datasets = {"U": bond_length_distributions(fit_frames, rules),
                "naive": bond_length_distributions([test_frame], rules)}
    fig, data = plots.plot_bond_histograms(datasets)
    steps = [p for p in fig.axes[0].patches]
    np.testing.assert_allclose(steps[0].get_data().values, datasets["U"]["O-H"].density)
    assert "no pairs" in fig.axes[1].texts[0].get_text()  # no H-Cl bond in water
    _save_and_check(fig, data, tmp_path / "bonds.png")

    series = coordination_series(fit_frames, [PairRule.parse("Co-O:2.6")])
    fig, data = plots.plot_coordination(np.arange(3.0), series)
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), series.counts[:, 0])
    _save_and_check(fig, data, tmp_path / "coordination.png")


@pytest.mark.parametrize("span_ps, unit, last", [(0.02, "fs", 20.0), (40.0, "ps", 40.0), (9000.0, "ns", 9.0)])
def test_time_axis_picks_the_unit_of_the_span(span_ps, unit, last):
    values, label, scale = plots.time_axis(np.linspace(0.0, span_ps, 5))
    assert label == f"time ({unit})" and values[-1] == pytest.approx(last)
    assert values[-1] * scale == pytest.approx(span_ps)


def test_energy_trajectory_of_a_short_run_in_fs_with_event_times(tmp_path):
    t_ps = np.linspace(0.0, 0.02, 5)  # a 20-fs run
    events = [Event("bond_formed", 2, 0.01, (5, 168), "H-Cl formed", False, True)]
    fig, data = plots.plot_energy_trajectory(t_ps, -800 + t_ps, t_ps[::2], -800 + t_ps[::2], events=events)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "time (fs)"
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [0, 5, 10, 15, 20])
    assert data["events"] == [{"time": pytest.approx(10.0), "label": "H-Cl formed"}]
    _save_and_check(fig, data, tmp_path / "energy.png")
