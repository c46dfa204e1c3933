"""CP2K labelling (Debian's cp2k, cp2k_shell through ASE) and the Co(II) input defaults."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from umlipft.errors import InputError
from umlipft.io import read_frames
from umlipft.label.calculators import cp2k_command, cp2k_input_template, cp2k_preflight, multiplicity
from umlipft.label.config import Cp2kConfig, LabelConfig
from umlipft.label.core import label_frames

HAVE_CP2K = any(shutil.which(n) for n in ("cp2k_shell", "cp2k_shell.psmp", "cp2k.psmp", "cp2k.ssmp"))


def test_cobalt_defaults_spin_u_and_d3(aqueous_eval_frames_path: Path) -> None:
    frame = read_frames(aqueous_eval_frames_path, index="0")[0]  # Li Co Cl3 (H2O)55
    cfg = Cp2kConfig(hubbard_u_eV={"Co": 5.76})
    # 631 electrons, high-spin d7 Co(II): S = 3/2
    assert int(frame.numbers.sum()) == 631
    assert multiplicity(frame, cfg) == 4
    text = cp2k_input_template(frame, cfg)
    assert "TYPE DFTD3" in text and "REFERENCE_FUNCTIONAL PBE" in text
    assert "&KIND Co" in text and "U_MINUS_J [eV] 5.76" in text and "PLUS_U_METHOD MULLIKEN" in text
    assert "&KIND" not in cp2k_input_template(frame, Cp2kConfig())  # +U is optional, off by default
    # water alone is closed shell; an extra electron makes a doublet
    from ase.build import molecule

    water = molecule("H2O")
    assert multiplicity(water, cfg) == 1
    assert multiplicity(water, Cp2kConfig(charge=-1)) == 2


@pytest.mark.skipif(not HAVE_CP2K, reason="CP2K is not installed (scripts/install-system-packages.sh)")
def test_cp2k_knows_elements_and_refuses_unknown_ones() -> None:
    assert cp2k_command(Cp2kConfig()).split()[0] in ("cp2k_shell", "cp2k_shell.psmp", "cp2k.psmp", "cp2k.ssmp",
                                                     "cp2k_shell.ssmp", "cp2k", "cp2k.popt", "cp2k.sopt",
                                                     "cp2k_shell.popt", "cp2k_shell.sopt")
    cp2k_preflight(Cp2kConfig(), ["H", "Li", "C", "N", "O", "Cl", "Co"])
    with pytest.raises(InputError, match="no DZVP-MOLOPT-SR-GTH for U"):
        cp2k_preflight(Cp2kConfig(), ["O", "U"])


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CP2K, reason="CP2K is not installed (scripts/install-system-packages.sh)")
def test_cp2k_labels_one_water_molecule(tmp_path: Path) -> None:
    from ase.build import molecule
    from ase.io import write

    water = molecule("H2O")
    water.set_cell([6.0, 6.0, 6.0])
    water.pbc = True
    water.center()
    path = tmp_path / "water.extxyz"
    write(path, [water])
    # modest cutoffs keep this at a few seconds; the physics checks below hold at any cutoff
    config = LabelConfig(frames=path, calculator="cp2k",
                         cp2k=Cp2kConfig(cutoff_Ry=250.0, rel_cutoff_Ry=40.0), threads_per_frame=2)
    report = label_frames(config)
    assert report.complete, report.failed
    out = read_frames(report.output)[0]
    # PBE/GTH valence energy of water is about -17.2 Ha = -468 eV (D3 adds < 0.01 eV)
    assert -472.0 < out.info["REF_energy"] < -464.0
    forces = out.arrays["REF_forces"]
    # Newton's third law up to the real-space grid's egg-box error, which at 250 Ry is about
    # 0.06 eV/Å along the molecule's axis; across the mirror plane it cancels exactly
    assert np.abs(forces.sum(axis=0)[:2]).max() < 1e-3
    assert abs(forces.sum(axis=0)[2]) < 0.1
    assert forces[1] == pytest.approx(forces[2] * [1, -1, 1], abs=0.02)  # mirror y -> -y (H at ±y)
    assert np.linalg.norm(forces) > 0.01  # ASE's geometry is not exactly the PBE minimum
    stress = np.asarray(out.info["REF_stress"], dtype=float).reshape(3, 3)
    assert np.allclose(stress, stress.T) and np.isfinite(stress).all()
    inp = (report.workdir / "frame_000000" / "cp2k.inp").read_text()
    assert "DZVP-MOLOPT-SR-GTH" in inp and "GTH-PBE" in inp and "DFTD3" in inp
    assert "UNRESTRICTED_KOHN_SHAM" not in inp  # closed shell
    assert "STRESS_TENSOR ANALYTICAL" in inp
