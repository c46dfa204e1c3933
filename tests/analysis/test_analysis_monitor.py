"""Streamed Q/T² over a trajectory file: same numbers as evaluating in memory, any batch size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from umlipft.analysis.monitor import NpyRowWriter, QConfig, analyze_trajectory, load_result
from umlipft.errors import InputError
from umlipft.io import read_frames, write_frames


@pytest.fixture(scope="module")
def short_traj(tmp_path_factory, naive1_path):
    path = tmp_path_factory.mktemp("traj") / "traj.extxyz"
    write_frames(path, read_frames(naive1_path, index=":3"))
    return path


def test_streamed_equals_in_memory_for_any_batch(global_pca, short_traj, tmp_path, soap):
    frames = read_frames(short_traj)
    symbols = frames[0].get_chemical_symbols()
    expected = [global_pca.evaluate(x, symbols) for x in soap.compute(frames)]
    for batch in (1, 2):
        result = analyze_trajectory(global_pca, short_traj, tmp_path / f"b{batch}",
                                    QConfig(batch_frames=batch, alpha=0.05))
        q, t2 = result.load(mmap=False)
        assert q.shape == t2.shape == (3, 170)
        assert np.array_equal(q, np.vstack([e.q for e in expected]))
        assert np.array_equal(t2, np.vstack([e.t2 for e in expected]))
        scores = np.load(result.scores_path)
        np.testing.assert_array_equal(scores, np.stack([e.scores for e in expected]).astype(np.float32))
    # The summary's flags are the arrays compared with the limits it states.
    summary = load_result(tmp_path / "b1").summary
    limits = {e: v["q_limit"] for e, v in summary["limits"].items()}
    sym = np.asarray(summary["symbols"])
    over = q > np.array([limits[s] for s in sym])
    assert summary["per_frame"]["q_flags"] == over.sum(axis=1).tolist()
    assert summary["atoms"]["q_flag_frames"] == over.sum(axis=0).tolist()
    o = sym == "O"
    assert summary["per_element"]["O"]["q_flag_fraction"] == pytest.approx(over[:, o].mean())
    json.dumps(summary)  # plain JSON, no NaN


def test_row_writer_round_trip(tmp_path):
    rows = np.arange(35, dtype=np.float64).reshape(7, 5)
    writer = NpyRowWriter(tmp_path / "x.npy", (5,), np.float64)
    for chunk in (rows[:3], rows[3:4], rows[4:]):
        writer.append(chunk)
    writer.close()
    assert np.array_equal(np.load(tmp_path / "x.npy"), rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_truncated_and_reordered_trajectories_are_refused(global_pca, short_traj, tmp_path):
    text = short_traj.read_text().splitlines()
    cut = tmp_path / "cut.extxyz"
    cut.write_text("\n".join(text[: 172 + 100]) + "\n")  # frame 1 stops after 100 atoms
    with pytest.raises(InputError, match="truncated"):
        analyze_trajectory(global_pca, cut, tmp_path / "out")
    frames = read_frames(short_traj)
    swapped = tmp_path / "swapped.extxyz"
    write_frames(swapped, [frames[0], frames[1][::-1]])
    with pytest.raises(InputError, match="same order"):
        analyze_trajectory(global_pca, swapped, tmp_path / "out2")
    assert not list((tmp_path / "out2").glob("*.npy"))


def test_own_band_of_a_known_series():
    from umlipft.analysis.monitor import own_band

    q = np.array([1.0, 3.0, 2.0, 6.0, 3.0])  # mean 3, sample variance (4+0+1+9+0)/4 = 3.5
    band = own_band(q, 2.0)
    assert band["mean"] == pytest.approx(3.0)
    assert band["std"] == pytest.approx(np.sqrt(3.5))
    assert (band["low"], band["high"]) == (pytest.approx(3.0 - 2 * np.sqrt(3.5)), pytest.approx(3.0 + 2 * np.sqrt(3.5)))


def test_q_plot_draws_each_atoms_own_band_and_the_training_limits_apart(global_pca, short_traj, tmp_path):
    from umlipft.analysis.monitor import plot_tracked

    result = analyze_trajectory(global_pca, short_traj, tmp_path / "q",
                                QConfig(frame_interval_ps=0.02, track=(1, 112, 120)))
    q, _ = result.load(mmap=False)
    fig, data = plot_tracked(result, "q")
    limits = result.summary["limits"]
    for i, label in zip((1, 112, 120), ("Co1", "Cl112", "O120")):
        series = q[:, i]
        mean, std = series.mean(), series.std(ddof=1)  # the atom's own Q(t), not the training set's
        assert data["series"][label]["band"] == [pytest.approx(mean - 2 * std), pytest.approx(mean + 2 * std)]
        assert result.summary["tracked"][label]["own_band"]["high"] == pytest.approx(mean + 2 * std)
        symbol = label.rstrip("0123456789")
        assert data["series"][label]["limit"] == limits[symbol]["q_limit"]
        assert "training-set Q limit" in data["series"][label]["limit_label"]
        assert data["series"][label]["band"] != [limits[symbol]["q_band_low"], limits[symbol]["q_band_high"]]
    # The legend names the bands and the limits separately.
    legend = [t.get_text() for t in fig.legends[0].get_texts()] if fig.legends else \
        [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "Co1 (shaded: own mean ± 2σ over the run)" in legend
    assert any(t.startswith("Cl training-set Q limit") for t in legend)
    assert data["time_axis"] == "time (fs)"  # 3 frames 20 fs apart
    np.testing.assert_allclose(data["times"], [0.0, 20.0, 40.0])
