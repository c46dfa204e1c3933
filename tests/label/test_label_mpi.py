"""Labelling in parallel over frames with mpiexec -n 2 (mpi4py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from umlipft.io import read_frames

PROJECT = Path(__file__).resolve().parents[2]


@pytest.mark.mpi
@pytest.mark.slow
def test_mpiexec_two_ranks_split_the_frames(tmp_path: Path) -> None:
    from ase.build import molecule
    from ase.io import write

    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        mpiexec = Path(shutil.which("mpiexec") or "mpiexec")
    frames = []
    for k in range(4):
        atoms = molecule("H2O")
        atoms.set_cell([5.0, 5.0, 5.0])
        atoms.pbc = True
        atoms.center()
        atoms.rattle(0.05, seed=k)
        frames.append(atoms)
    path = tmp_path / "frames.extxyz"
    write(path, frames)
    work = tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=str(PROJECT / "python"))
    result = subprocess.run(
        [str(mpiexec), "-n", "2", sys.executable, "-m", "umlipft.cli", "label", str(path),
         "--calculator", "xtb", "--workdir", str(work), "--threads-per-frame", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [json.loads((work / f"frame_{i:06d}" / "status.json").read_text())["rank"] for i in range(4)]
    assert ranks == [0, 1, 0, 1]  # every rank took every second frame
    labelled = read_frames(tmp_path / "frames-labelled.extxyz")
    assert [a.info["label_index"] for a in labelled] == [0, 1, 2, 3]
    summary = json.loads((tmp_path / "frames-labelled.extxyz.summary.json").read_text())
    assert summary["results"]["ranks"] == 2 and summary["results"]["labelled"] == [0, 1, 2, 3]
