"""The study's self-consistent residual: PotEng of a model's own MD against DFT on its frames."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from umlipft.cli import main
from umlipft.errors import InputError
from umlipft.evaluate import self_consistent_residual
from umlipft.evaluate.thermo import read_thermo_table


def test_residual_from_study_log(aqueous_dir: Path, aqueous_eval_frames_path: Path) -> None:
    log = aqueous_dir / "md_logs" / "Evaluations__U__md__run_info.txt"
    report = self_consistent_residual(log, aqueous_eval_frames_path)
    assert report.n_frames == 9
    # Frame u.1100 is step 1,100,000; its row of the log, read by hand:
    # "1100000  290.20929  -824.24964 ..." and REF_energy=-824.61521484, 170 atoms.
    first = report.per_frame[0]
    assert first.step == 1_100_000
    assert first.pot_eng_eV == pytest.approx(-824.24964)
    assert first.residual_meV_per_atom == pytest.approx((-824.24964 + 824.61521484) / 170 * 1000)
    assert [r.step for r in report.per_frame] == list(range(1_100_000, 2_000_000, 100_000))
    assert report.residual_mean_meV_per_atom == pytest.approx(5.504, abs=1e-3)
    assert report.residual_rmse_meV_per_atom == pytest.approx(5.641, abs=1e-3)


def test_wrong_dump_interval_is_refused(aqueous_dir: Path, aqueous_eval_frames_path: Path) -> None:
    log = aqueous_dir / "md_logs" / "Evaluations__U__md__run_info.txt"
    with pytest.raises(InputError, match="does not list"):
        self_consistent_residual(log, aqueous_eval_frames_path, dump_every_steps=5000)


def test_lammps_log_with_two_runs_and_warnings(tmp_path: Path) -> None:
    log = tmp_path / "log.lammps"
    log.write_text(
        "LAMMPS (29 Aug 2024)\nunits metal\n"
        "   Step          Temp          PotEng         Volume\n"
        "         0   300           -10.5          100.0\n"
        "WARNING: something harmless (src/fix_nh.cpp:123)\n"
        "       100   290           -10.25         100.5\n"
        "Loop time of 1.2 on 1 procs for 100 steps with 3 atoms\n\n"
        "   Step          Temp          PotEng         Volume\n"
        "       100   290           -10.25         100.5\n"
        "       200   280           -10.0          101.0\n"
        "Loop time of 1.1 on 1 procs for 100 steps with 3 atoms\n")
    table = read_thermo_table(log)
    assert table["Step"] == [0, 100, 200]
    assert table["PotEng"] == [-10.5, -10.25, -10.0]
    bad = tmp_path / "no_poteng.log"
    bad.write_text("Step Temp\n0 300\n")
    with pytest.raises(InputError, match="no PotEng"):
        read_thermo_table(bad)


def test_cli_self_consistent_only(aqueous_dir: Path, aqueous_eval_frames_path: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    log = aqueous_dir / "md_logs" / "Evaluations__U__md__run_info.txt"
    rc = main(["evaluate", str(aqueous_eval_frames_path), "--md-log", str(log), "-o", str(tmp_path)])
    assert rc == 0
    assert "self-consistent residual (9 frames): mean +5.50" in capsys.readouterr().out
    payload = json.loads((tmp_path / "evaluation.json").read_text())
    assert payload["reports"] == [] and payload["self_consistent"]["n_frames"] == 9
    assert len(list(csv.DictReader(open(tmp_path / "self_consistent.csv")))) == 9
    # No model and no log: one clear error, exit status 1.
    assert main(["evaluate", str(aqueous_eval_frames_path), "-o", str(tmp_path)]) == 1
    assert "nothing to do" in capsys.readouterr().err
