"""A NaN or Inf in positions, cells, energies, forces or stresses is refused where frames are
read, naming the file, the frame and the atom, so that it never reaches training or evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import assert_message, run_umlipft, write_water_frames

from umlipft.errors import InputError
from umlipft.io import read_frames, reference_forces, sha256_file
from umlipft.label.core import attempts, frame_dir

CELL = 'Lattice="5.0 0.0 0.0 0.0 5.0 0.0 0.0 0.0 5.0"'
GOOD = ("O 2.50 2.50 2.60 0.10 0.00 0.00", "H 3.26 2.50 2.00 0.00 0.20 0.00", "H 1.74 2.50 2.00 0.00 0.00 0.30")


def _extxyz(path: Path, second_frame: tuple[str, ...], header: str = "") -> Path:
    """Two labelled water frames written by hand; the second one's lines (and extra header keys) vary."""
    frames = []
    for lines, extra in ((GOOD, ""), (second_frame, header)):
        frames.append("\n".join([
            "3", f'{CELL} Properties=species:S:1:pos:R:3:REF_forces:R:3 REF_energy=-5.07 '
                 f'REF_stress="0.001 0 0 0 0.001 0 0 0 0.001" {extra}pbc="T T T"', *lines]))
    path.write_text("\n".join(frames) + "\n")
    return path


def test_one_nan_force_is_refused_naming_file_frame_and_atom(tmp_path: Path) -> None:
    path = _extxyz(tmp_path / "labelled.extxyz", (GOOD[0], "H 3.26 2.50 2.00 0.00 NaN 0.00", GOOD[2]))
    with pytest.raises(InputError, match=r"labelled\.extxyz: frame 1, atom 1: REF_forces is nan"):
        read_frames(path)
    assert len(read_frames(path, index="0")) == 1  # the clean frame alone still reads


@pytest.mark.parametrize("lines, header, what", [
    ((GOOD[0], GOOD[1], "H inf 2.50 2.00 0.00 0.00 0.30"), "", "atom 2: position is inf"),
    (GOOD, "energy=nan ", "energy is nan"),                       # plain keys: ASE's calculator
    (GOOD, 'REF_stress="0.001 0 0 0 nan 0 0 0 0.001" ', "REF_stress is nan"),
    (GOOD, 'dft_forces_scale=1.0 md_energy=-inf ', "md_energy is -inf"),
])
def test_every_non_finite_quantity_is_refused(tmp_path: Path, lines, header: str, what: str) -> None:
    path = _extxyz(tmp_path / "frames.extxyz", lines, header)
    with pytest.raises(InputError, match=f"frame 1, {what}"):
        read_frames(path)


def test_a_non_finite_cell_is_refused(tmp_path: Path) -> None:
    path = _extxyz(tmp_path / "frames.extxyz", GOOD)
    text = path.read_text().split("\n")
    text[6] = text[6].replace(CELL, 'Lattice="5.0 0.0 0.0 0.0 nan 0.0 0.0 0.0 5.0"', 1)
    path.write_text("\n".join(text))
    with pytest.raises(InputError, match="frame 1, cell is nan"):
        read_frames(path)


def test_frames_made_in_memory_are_checked_where_labels_are_taken() -> None:
    from ase.build import molecule

    atoms = molecule("H2O")
    atoms.arrays["REF_forces"] = np.zeros((3, 3))
    atoms.arrays["REF_forces"][2, 0] = np.inf
    with pytest.raises(InputError, match="REF_forces, atom 2"):
        reference_forces(atoms)


def test_evaluate_refuses_a_nan_force_with_a_message(tmp_path: Path, small_model_path: Path) -> None:
    path = _extxyz(tmp_path / "labelled.extxyz", (GOOD[0], "H 3.26 2.50 2.00 0.00 NaN 0.00", GOOD[2]))
    done = run_umlipft("evaluate", "--model", small_model_path, path, "-o", tmp_path / "eval")
    assert_message(done, path, "frame 1, atom 1", "REF_forces")
    assert not (tmp_path / "eval").exists()


def test_label_resume_relabels_a_result_with_a_nan_force(tmp_path: Path) -> None:
    frames = write_water_frames(tmp_path / "frames.extxyz", 2)
    work = tmp_path / "work"
    args = ("label", frames, "--calculator", "xtb", "--workdir", work, "--threads-per-frame", "1")
    assert run_umlipft(*args).returncode == 0
    # A result that reads fine and matches the hash its worker recorded, but holds a NaN:
    result = frame_dir(work, 0) / "result.extxyz"
    lines = result.read_text().splitlines()
    fields = lines[3].split()
    fields[-1] = "nan"
    lines[3] = " ".join(fields)
    result.write_text("\n".join(lines) + "\n")
    status = frame_dir(work, 0) / "status.json"
    status.write_text(json.dumps({**json.loads(status.read_text()), "result_sha256": sha256_file(result)}))

    done = run_umlipft(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "frame 0, atom 1" in done.stderr and "relabelling" in done.stderr
    assert attempts(work, 0) == 2 and attempts(work, 1) == 1
    assert all(np.isfinite(a.arrays["REF_forces"]).all() for a in read_frames(tmp_path / "frames-labelled.extxyz"))
