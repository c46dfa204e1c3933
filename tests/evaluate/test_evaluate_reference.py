"""Evaluation of MACE-MP-0 small on the study's aqueous evaluation frames: the issue's figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tolerances import EVAL_REFERENCE_ENERGY_MEV_PER_ATOM, EVAL_REFERENCE_FORCE_EV_A
from umlipft.evaluate import EvaluateConfig, evaluate


@pytest.mark.slow
def test_reference_figures_and_outputs(small_model_path: Path, aqueous_eval_frames_path: Path,
                                       tmp_path: Path) -> None:
    config = EvaluateConfig(models=(f"U={small_model_path}",), frames=(f"evalU={aqueous_eval_frames_path}",),
                            output_dir=str(tmp_path), dtype="float64")
    result = evaluate(config)
    report = result.report("U", "evalU")
    s = report.summary
    assert s.n_frames == 9 and s.n_atoms == 9 * 170
    assert s.energy_residual_mean_meV_per_atom == pytest.approx(1.96, abs=EVAL_REFERENCE_ENERGY_MEV_PER_ATOM)
    assert s.energy_residual_rmse_meV_per_atom == pytest.approx(2.25, abs=EVAL_REFERENCE_ENERGY_MEV_PER_ATOM)
    assert s.force_rmse_eV_per_A == pytest.approx(0.054, abs=EVAL_REFERENCE_FORCE_EV_A)
    # Per-element RMSEs partition the overall one: their component-weighted mean square is its square.
    from ase.io import read
    counts: dict[str, int] = {}
    for el in read(aqueous_eval_frames_path, 0).get_chemical_symbols():
        counts[el] = counts.get(el, 0) + 1
    assert set(s.force_rmse_per_element_eV_per_A) == set(counts)
    mean_square = sum(counts[el] * v**2 for el, v in s.force_rmse_per_element_eV_per_A.items()) / sum(counts.values())
    assert mean_square == pytest.approx(s.force_rmse_eV_per_A**2, rel=1e-9)
    assert s.n_frames_with_stress == 9 and 0 < s.stress_rmse_eV_per_A3 < 0.01

    # The files say the same as the returned report.
    payload = json.loads(result.json_path.read_text())
    assert payload["reports"][0]["summary"]["energy_residual_rmse_meV_per_atom"] == pytest.approx(
        s.energy_residual_rmse_meV_per_atom)
    rows = list(csv.DictReader(open(result.csv_path)))
    assert len(rows) == 1 and rows[0]["model"] == "U" and rows[0]["frames"] == "evalU"
    assert float(rows[0]["force_rmse_Co_eV_per_A"]) == pytest.approx(s.force_rmse_per_element_eV_per_A["Co"])
    per_frame = list(csv.DictReader(open(tmp_path / "frames__U__evalU.csv")))
    assert [r["source"].rsplit(".", 1)[1] for r in per_frame] == [str(k) for k in range(1100, 2000, 100)]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"
