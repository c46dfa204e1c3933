"""Isolated-atom energies with the labeller's own settings: spin, reuse, recomputation, CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from umlipft.errors import InputError
from umlipft.io import read_frames
from umlipft.label.calculators import multiplicity
from umlipft.label.config import Cp2kConfig, XtbConfig
from umlipft.label.core import attempts, fingerprint
from umlipft.label.isolated import IsolatedAtomsConfig, isolated_code_config, label_isolated_atoms

HAVE_CP2K = any(shutil.which(n) for n in ("cp2k_shell", "cp2k_shell.psmp", "cp2k.psmp", "cp2k.ssmp"))


def tblite_atom(symbol: str, mult: int) -> float:
    """A lone atom straight through tblite (molecular mode), the reference for the labels."""
    from ase import Atoms
    from tblite.ase import TBLite

    atoms = Atoms(symbol, positions=[[0.0, 0.0, 0.0]])
    atoms.calc = TBLite(method="GFN2-xTB", multiplicity=mult, verbosity=0)
    return atoms.get_potential_energy()


def attempts_of(report) -> dict[str, int]:
    return {el: attempts(run / "label", 0) for el, run in report.run_dirs.items()}


def test_xtb_isolated_atoms_spin_reuse_and_recompute(tmp_path: Path) -> None:
    from umlipft.finetune.e0 import isolated_atom_energies

    work = tmp_path / "iso"
    settings = IsolatedAtomsConfig(calculator="xtb")
    first = label_isolated_atoms(settings, ["Cl", "O", "H", "Li"], work)
    # Hund's-rule ground states (ase.data), not the condensed-frame rule that makes O a singlet
    assert first.multiplicities == {"H": 2, "Li": 2, "O": 3, "Cl": 2}
    assert sorted(first.computed) == ["Cl", "H", "Li", "O"] and first.reused == []
    for el, energy in first.energies_eV.items():
        assert math.isfinite(energy)
        assert energy == pytest.approx(tblite_atom(el, first.multiplicities[el]), abs=1e-6)
    # the multiplicity reached the code: O's triplet and singlet energies differ
    assert abs(first.energies_eV["O"] - tblite_atom("O", 1)) > 1e-2
    frames = read_frames(first.output)
    assert [a.get_chemical_symbols() for a in frames] == [["H"], ["Li"], ["O"], ["Cl"]]
    assert all(a.info["config_type"] == "IsolatedAtom" and a.info["label_calculator"] == "xtb" for a in frames)
    assert not any(a.pbc.any() for a in frames)  # xTB's molecular mode, no periodic images
    # the fine-tune reads them as it reads any IsolatedAtom frames
    assert isolated_atom_energies(frames, "REF_energy") == pytest.approx({1: first.energies_eV["H"],
                                                                         3: first.energies_eV["Li"],
                                                                         8: first.energies_eV["O"],
                                                                         17: first.energies_eV["Cl"]})
    assert attempts_of(first) == {"H": 1, "Li": 1, "O": 1, "Cl": 1}
    summary = json.loads(first.summary.read_text())
    assert summary["elements"]["O"]["settings"]["multiplicity"] == 3
    assert summary["elements"]["O"]["settings"]["code_config"]["method"] == "GFN2-xTB"

    again = label_isolated_atoms(settings, ["H", "O", "Li", "Cl"], work)
    assert again.computed == [] and sorted(again.reused) == ["Cl", "H", "Li", "O"]
    assert attempts_of(again) == {"H": 1, "Li": 1, "O": 1, "Cl": 1}  # no worker started
    assert again.energies_eV == first.energies_eV

    # A changed setting recomputes, in its own directory; the old results stay for reuse.
    hot = settings.replace(xtb=settings.xtb.replace(electronic_temperature_K=1000.0))
    changed = label_isolated_atoms(hot, ["H", "O"], work)
    assert sorted(changed.computed) == ["H", "O"]
    assert all(changed.run_dirs[el] != first.run_dirs[el] for el in ("H", "O"))
    assert attempts_of(changed) == {"H": 1, "O": 1} and attempts_of(first)["O"] == 1
    assert json.loads((changed.run_dirs["O"] / "settings.json").read_text())[
        "code_config"]["electronic_temperature_K"] == 1000.0
    # the combined file now holds what this call asked for
    assert [a.get_chemical_symbols()[0] for a in read_frames(changed.output)] == ["H", "O"]

    # A new element computes only that element.
    more = label_isolated_atoms(settings, ["H", "O", "Li", "Cl", "C"], work)
    assert more.computed == ["C"] and more.multiplicities["C"] == 3


def test_frame_multiplicity_is_per_frame_and_isolated_runs_are_neutral(tmp_path: Path) -> None:
    from ase.build import molecule

    water = molecule("H2O")
    cfg = XtbConfig()
    assert multiplicity(water, cfg) == 1  # condensed-frame rule unchanged
    before = fingerprint(water)
    water.info["source"] = "somewhere"
    assert fingerprint(water) == before  # other info keys do not touch a frame's identity
    water.info["label_multiplicity"] = 3
    assert multiplicity(water, cfg) == 3 and multiplicity(water, XtbConfig(multiplicity=1)) == 3
    assert fingerprint(water) != before  # a frame's own spin changes its label: it must not be reused
    # Isolated atoms are neutral with their own spin whatever the frames' charge and spin rules.
    charged = IsolatedAtomsConfig(xtb=XtbConfig(charge=-1, multiplicity=2, unpaired_electrons={"O": 2}))
    assert isolated_code_config(charged) == isolated_code_config(IsolatedAtomsConfig())
    # An impossible spin is refused before any calculation starts.
    with pytest.raises(InputError, match="multiplicity 2 is impossible with 8 electrons"):
        label_isolated_atoms(IsolatedAtomsConfig(), ["O"], tmp_path / "iso", multiplicities={"O": 2})
    assert not list(tmp_path.glob("iso/runs/*/label/frame_*/attempts.log"))
    with pytest.raises(InputError, match="unknown element"):
        label_isolated_atoms(IsolatedAtomsConfig(), ["O", "Xx"], tmp_path / "iso")


def test_cli_isolated_atoms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ase.build import molecule
    from ase.io import write

    from umlipft.cli import main

    out = tmp_path / "iso"
    frames = tmp_path / "frames.extxyz"
    write(frames, [molecule("H2O")])
    # the elements of FRAMES, with the settings of a labelling YAML (its frames: key is for frames)
    config = tmp_path / "label.yaml"
    config.write_text(f"frames: {frames}\ncalculator: xtb\nxtb:\n  accuracy: 0.5\n")
    assert main(["label", "--isolated-atoms", str(frames), "--config", str(config), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "H  multiplicity 2" in printed and "O  multiplicity 3" in printed and "computed" in printed
    summary = json.loads((out / "isolated_atoms.json").read_text())
    assert summary["code_config"]["accuracy"] == 0.5 and sorted(summary["elements"]) == ["H", "O"]
    assert main(["label", "--isolated-atoms", "--elements", "O", "H", "--config", str(config),
                 "-o", str(out)]) == 0
    assert "computed" not in capsys.readouterr().out  # same settings: both reused
    assert main(["label", "--isolated-atoms", "--elements", "O", "--charge", "1", "-o", str(out)]) == 1
    assert "--charge does not apply with --isolated-atoms" in capsys.readouterr().err
    assert main(["label", "--calculator", "xtb"]) == 1
    assert "FRAMES is required" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CP2K, reason="CP2K is not installed (scripts/install-system-packages.sh)")
def test_cp2k_isolated_h_and_o(tmp_path: Path) -> None:
    # a small box and low cutoffs keep this short; spin, neutrality and reuse do not depend on them
    settings = IsolatedAtomsConfig(calculator="cp2k", box_A=6.0, threads_per_frame=2,
                                   cp2k=Cp2kConfig(cutoff_Ry=200.0, rel_cutoff_Ry=40.0, charge=1))
    report = label_isolated_atoms(settings, ["O", "H"], tmp_path / "iso")
    assert report.multiplicities == {"H": 2, "O": 3}
    inp = {el: (run / "label" / "frame_000000" / "cp2k.inp").read_text() for el, run in report.run_dirs.items()}
    assert "MULTIPLICITY 3" in inp["O"] and "MULTIPLICITY 2" in inp["H"]
    assert all("UNRESTRICTED_KOHN_SHAM ON" in text for text in inp.values())
    assert all("CHARGE" not in text or "CHARGE 0" in text for text in inp.values())  # neutral atoms
    assert all("STRESS_TENSOR" not in text for text in inp.values())  # no stress for an atom
    assert all("PERIODIC XYZ" in text for text in inp.values())  # GPW in a periodic box, as the frames
    # GTH valence energies: H about -0.46 Ha in this basis (-0.50 in a complete one), O about -15.9 Ha
    assert -13.7 < report.energies_eV["H"] < -12.0
    assert -440.0 < report.energies_eV["O"] < -425.0
    assert np.isfinite(list(report.energies_eV.values())).all()
    again = label_isolated_atoms(settings, ["H", "O"], tmp_path / "iso")
    assert again.computed == [] and attempts_of(again) == {"H": 1, "O": 1}
