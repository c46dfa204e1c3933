"""VASP and Quantum ESPRESSO: input generation only (the codes are not installed here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from umlipft.errors import InputError
from umlipft.io import read_frames
from umlipft.label.calculators import write_espresso_inputs, write_vasp_inputs
from umlipft.label.config import EspressoConfig, LabelConfig, VaspConfig
from umlipft.label.core import label_frames

ELEMENTS = ("H", "Li", "O", "Cl", "Co")
ZVAL = {"H": 1, "Li": 1, "O": 6, "Cl": 7, "Co": 9}


def _potcar_library(root: Path) -> Path:
    """A POTCAR folder layout with header-only files (the real ones are licensed), named as
    ASE's 'recommended' setups expect (Li_sv, ...)."""
    from ase.calculators.vasp.setups import setups_defaults

    for el in ELEMENTS:
        folder = root / "potpaw_PBE" / f"{el}{setups_defaults['recommended'].get(el, '')}"
        folder.mkdir(parents=True)
        (folder / "POTCAR").write_text(
            f"  PAW_PBE {el} 01Jan2000\n  {ZVAL[el]}.0000000000000000\n parameters from PSCTR are:\n"
            f"   VRHFIN ={el}: s p\n   TITEL  = PAW_PBE {el} 01Jan2000\n"
            f"   ZVAL   =    {ZVAL[el]}.000    mass and valenz\n   ENMAX  =  400.000\n End of Dataset\n"
        )
    return root


@pytest.fixture(scope="module")
def frame(aqueous_eval_frames_path: Path):
    return read_frames(aqueous_eval_frames_path, index="0")[0]


def test_vasp_inputs_reproduce_the_study_reference(frame, tmp_path: Path) -> None:
    pp = _potcar_library(tmp_path / "pp")
    files = write_vasp_inputs(frame, VaspConfig(pp_path=pp), tmp_path / "vasp")
    assert all(f.is_file() for f in files)
    incar = {line.split("=")[0].strip().upper(): line.split("=", 1)[1].strip()
             for line in (tmp_path / "vasp" / "INCAR").read_text().splitlines() if "=" in line}
    assert incar["ISPIN"] == "2" and float(incar["NUPDOWN"]) == 3.0
    assert incar["LDAU"].upper().startswith(".TRUE") and incar["LDAUTYPE"] == "2"
    # U = 5.76 eV on Co's d shell only, in POSCAR's species order
    species = (tmp_path / "vasp" / "POSCAR").read_text().splitlines()[5].split()
    u = dict(zip(species, incar["LDAUU"].split()))
    lmap = dict(zip(species, incar["LDAUL"].split()))
    assert float(u["Co"]) == pytest.approx(5.76) and all(float(u[s]) == 0 for s in species if s != "Co")
    assert lmap["Co"] == "2" and lmap["O"] == "-1"
    assert float(incar["ENCUT"]) == 520.0 and incar["IBRION"] == "-1" and incar["NSW"] == "0"
    assert "Gamma" in (tmp_path / "vasp" / "KPOINTS").read_text() or "G" in (tmp_path / "vasp" / "KPOINTS").read_text().splitlines()[2]
    potcar = (tmp_path / "vasp" / "POTCAR").read_text()
    assert potcar.count("End of Dataset") == len(species)
    poscar_atoms = read_frames(tmp_path / "vasp" / "POSCAR")[0]
    assert sorted(poscar_atoms.get_chemical_symbols()) == sorted(frame.get_chemical_symbols())


def test_vasp_preflight_names_what_is_missing(frame, tmp_path: Path) -> None:
    from ase.io import write

    path = tmp_path / "f.extxyz"
    write(path, [frame])
    pp = tmp_path / "pp"
    (pp / "potpaw_PBE" / "H").mkdir(parents=True)
    with pytest.raises(InputError, match="no POTCAR for"):
        label_frames(LabelConfig(frames=path, calculator="vasp", vasp=VaspConfig(pp_path=pp, command="vasp_std")))
    pp_full = _potcar_library(tmp_path / "pp2")
    with pytest.raises(InputError, match="VASP has no command"):
        label_frames(LabelConfig(frames=path, calculator="vasp", vasp=VaspConfig(pp_path=pp_full)))
    assert not (tmp_path / "f-labelled-label").exists()


def test_espresso_input_has_spin_u_forces_and_stress(frame, tmp_path: Path) -> None:
    cfg = EspressoConfig(pseudopotentials={el: f"{el}.pbe-n-kjpaw_psl.1.0.0.UPF" for el in ELEMENTS},
                         hubbard_u_eV={"Co": 5.76})
    (pwi,) = write_espresso_inputs(frame, cfg, tmp_path / "qe")
    text = pwi.read_text()
    for needle in ("tprnfor", "tstress", "nspin", "tot_magnetization", "ecutwfc", "ecutrho",
                   "HUBBARD (ortho-atomic)", "U Co-3d 5.76", "Co.pbe-n-kjpaw_psl.1.0.0.UPF",
                   "starting_magnetization"):
        assert needle in text, needle
    assert "tot_magnetization = 3" in text
    with pytest.raises(InputError, match="no file for Cl, Co, Li, O"):
        write_espresso_inputs(frame, EspressoConfig(pseudopotentials={"H": "H.UPF"}), tmp_path / "qe2")
