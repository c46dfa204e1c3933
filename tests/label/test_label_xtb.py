"""umlipft label with GFN2-xTB (tblite): labels, ASE stress sign, failures, restart guards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from umlipft.errors import InputError, StateError
from umlipft.io import read_frames
from umlipft.label.config import LabelConfig, XtbConfig
from umlipft.label.core import attempts, label_frames


def water_pair(seed: int):
    from ase.build import molecule

    a = molecule("H2O")
    b = molecule("H2O")
    b.translate([2.7, 0.3, 0.4])
    atoms = a + b
    atoms.set_cell([6.0, 6.5, 7.0])
    atoms.pbc = True
    atoms.center()
    atoms.rattle(0.03, seed=seed)
    return atoms


def strained_energy(atoms, i: int, j: int, h: float) -> float:
    from tblite.ase import TBLite

    strained = atoms.copy()
    eps = np.eye(3)
    eps[i, j] += h / 2
    eps[j, i] += h / 2
    strained.set_cell(atoms.cell.array @ eps, scale_atoms=True)
    strained.calc = TBLite(method="GFN2-xTB", verbosity=0)
    return strained.get_potential_energy()


def test_labels_match_tblite_and_stress_has_ase_sign(tmp_path: Path) -> None:
    from ase.io import write
    from tblite.ase import TBLite

    frames_path = tmp_path / "frames.extxyz"
    frame = water_pair(0)
    frame.info["source_index"] = 42  # provenance from extraction must survive labelling
    write(frames_path, [frame])
    report = label_frames(LabelConfig(frames=frames_path, calculator="xtb"))
    assert report.complete and report.labelled == [0]
    out = read_frames(report.output)[0]
    assert out.info["source_index"] == 42

    direct = read_frames(frames_path)[0]  # the positions as stored (8 decimals), not in memory
    direct.calc = TBLite(method="GFN2-xTB", verbosity=0)
    # same code, same structure: only SCF convergence noise may differ
    assert out.info["REF_energy"] == pytest.approx(direct.get_potential_energy(), abs=1e-6)
    assert np.allclose(out.arrays["REF_forces"], direct.get_forces(), atol=1e-5)
    stress = np.asarray(out.info["REF_stress"], dtype=float).reshape(3, 3)
    # ASE convention: sigma_ij = (1/V) dE/d(eps_ij); positive = the box wants to shrink
    h, volume = 1e-4, frame.get_volume()
    for i, j in ((0, 0), (2, 2), (0, 1)):
        fd = (strained_energy(frame, i, j, h) - strained_energy(frame, i, j, -h)) / (2 * h * volume)
        assert stress[i, j] == pytest.approx(fd, abs=2e-6)
    assert np.abs(stress).max() > 1e-4  # the check above is not trivially 0 == 0
    summary = json.loads(Path(str(report.output) + ".summary.json").read_text())
    assert summary["driver"] == "label" and summary["results"]["labelled"] == [0]


def test_failing_frame_is_recorded_skipped_and_not_rerun(tmp_path: Path) -> None:
    from ase.io import write

    broken = water_pair(1)
    broken.positions[1] = broken.positions[0]  # two atoms on one spot: xTB refuses it
    frames_path = tmp_path / "frames.extxyz"
    write(frames_path, [water_pair(0), broken, water_pair(2)])
    config = LabelConfig(frames=frames_path, calculator="xtb", workdir=tmp_path / "work")
    report = label_frames(config)
    assert report.labelled == [0, 2]
    assert list(report.failed) == [1] and "Too close" in report.failed[1]
    assert [a.info["label_index"] for a in read_frames(report.output)] == [0, 2]
    failed = json.loads((tmp_path / "work" / "failed.json").read_text())
    assert "Too close" in failed["1"]

    again = label_frames(config)
    assert again.reused == [0, 2] and again.labelled == [] and list(again.failed) == [1]
    assert [attempts(tmp_path / "work", i) for i in range(3)] == [1, 1, 1]
    retried = label_frames(config.replace(retry_failed=True))
    assert list(retried.failed) == [1] and attempts(tmp_path / "work", 1) == 2


def test_bad_input_fails_before_any_work(tmp_path: Path) -> None:
    from ase import Atoms
    from ase.io import write

    uranium = Atoms("UO2", positions=[(0, 0, 0), (1.8, 0, 0), (-1.8, 0, 0)], cell=[8, 8, 8], pbc=True)
    path = tmp_path / "u.extxyz"
    write(path, [water_pair(0), uranium])
    work = tmp_path / "work"
    with pytest.raises(InputError, match="no parameters for U"):
        label_frames(LabelConfig(frames=path, calculator="xtb", workdir=work))
    assert not work.exists()
    with pytest.raises(InputError, match="does not exist"):
        label_frames(LabelConfig(frames=tmp_path / "nope.extxyz", calculator="xtb"))
    truncated = tmp_path / "cut.extxyz"
    truncated.write_text("6\nLattice=\"6 0 0 0 6 0 0 0 6\" Properties=species:S:1:pos:R:3 pbc=\"T T T\"\nO 0 0 0\n")
    with pytest.raises(InputError, match="cannot read"):
        label_frames(LabelConfig(frames=truncated, calculator="xtb"))
    with pytest.raises(InputError, match="multiplicity 2 is impossible"):
        label_frames(LabelConfig(frames=path.with_name("w.extxyz") if False else _one(tmp_path),
                                 calculator="xtb", xtb=XtbConfig(multiplicity=2)))


def _one(tmp_path: Path) -> Path:
    from ase.io import write

    path = tmp_path / "one.extxyz"
    write(path, [water_pair(3)])
    return path


def test_changed_frames_or_settings_cannot_reuse_a_workdir(tmp_path: Path) -> None:
    from ase.io import write

    path = tmp_path / "frames.extxyz"
    write(path, [water_pair(0)])
    config = LabelConfig(frames=path, calculator="xtb", workdir=tmp_path / "work")
    label_frames(config)
    with pytest.raises(StateError, match="different calculator settings"):
        label_frames(config.replace(xtb=XtbConfig(electronic_temperature_K=500.0)))
    write(path, [water_pair(5)])
    with pytest.raises(StateError, match="different frames"):
        label_frames(config)


def test_config_yaml_nested_sections_and_unknown_keys(tmp_path: Path) -> None:
    from umlipft.errors import ConfigError

    good = tmp_path / "label.yaml"
    good.write_text("calculator: cp2k\nprocesses: 2\ncp2k:\n  cutoff_Ry: 300\n  hubbard_u_eV: {Co: 5.76}\n")
    cfg = LabelConfig.from_yaml(good, frames="x.extxyz")
    assert cfg.cp2k.cutoff_Ry == 300.0 and cfg.cp2k.hubbard_u_eV == {"Co": 5.76} and cfg.processes == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("calculator: cp2k\ncp2k:\n  cutof_Ry: 300\n")
    with pytest.raises(ConfigError, match="cutof_Ry"):
        LabelConfig.from_yaml(bad, frames="x.extxyz")
