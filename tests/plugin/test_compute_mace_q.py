"""compute mace/q and lammps_inputs/watch.in: the in-run extrapolation watch (issue 15).

The per-atom Q of LAMMPS, from the node features of its own force calls, must equal what
``umlipft analyze q --descriptor mace`` computes afterwards on the dumped frames; the watch
input must stop a run that leaves the training data and let an in-distribution one finish.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sample_structures import hcl_at
from tolerances import WATCH_LAMMPS_VS_ANALYZE_Q_REL

from umlipft.cli import main
from umlipft.io import write_frames
from umlipft.lammps import lammps_environment, lmp_executable, write_lammps_data
from umlipft.lammps.data import read_lammps_dump

ELEMENTS = ["Li", "Co", "Cl", "O", "H"]
pytestmark = pytest.mark.slow


def lmp(workdir: Path, script: str, ranks: int = 1, *args: str) -> subprocess.CompletedProcess:
    path = workdir / f"in.{abs(hash(script)) % 10**8}"
    path.write_text(script)
    command = [str(lmp_executable()), "-in", str(path), "-log", "none", *args]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks)] + command
    return subprocess.run(command, cwd=workdir, env=lammps_environment(), capture_output=True, text=True,
                          timeout=900)


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2])
def test_q_in_lammps_equals_analyze_q_on_the_dumped_frames(ranks: int, tmp_path: Path, watched_export: Path,
                                                             watch_training_file: Path, small_model_path: Path,
                                                             aqueous_frame) -> None:
    data = write_lammps_data(tmp_path / "start.data", aqueous_frame, ELEMENTS)
    done = lmp(tmp_path, f"""
units metal
atom_style atomic
read_data {data}
pair_style mace
pair_coeff * * {watched_export} {' '.join(ELEMENTS)}
compute q all mace/q
velocity all create 300 7
timestep 0.0005
fix md all nve
dump d all custom 5 frames.dump id type element x y z c_q[1] c_q[2] c_q[3] c_q[4]
dump_modify d element {' '.join(ELEMENTS)} sort id format float %.17g
run 10
""", ranks)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    frames = read_lammps_dump(tmp_path / "frames.dump")
    assert len(frames) == 3
    blocks = (tmp_path / "frames.dump").read_text().split("ITEM: TIMESTEP")[1:]
    lammps_q = [np.loadtxt(block.splitlines()[9:], usecols=(6, 7, 8)) for block in blocks]
    judged = write_frames(tmp_path / "dumped.extxyz", frames)
    assert main(["analyze", "pca", "--fit", str(watch_training_file), "--descriptor", "mace", "--model",
                 str(small_model_path), "-o", str(tmp_path / "pca")]) == 0
    assert main(["analyze", "q", "--pca", str(tmp_path / "pca"), str(judged), "-o", str(tmp_path / "q")]) == 0
    summary = json.loads((tmp_path / "q" / "q_results.json").read_text())
    q_ref, t2_ref = np.load(tmp_path / "q" / "q.npy"), np.load(tmp_path / "q" / "t2.npy")
    limit = np.asarray([summary["limits"][s]["q_limit"] for s in summary["symbols"]])
    for k, got in enumerate(lammps_q):
        np.testing.assert_allclose(got[:, 0], q_ref[k], rtol=WATCH_LAMMPS_VS_ANALYZE_Q_REL, atol=0)
        np.testing.assert_allclose(got[:, 1], q_ref[k] / limit, rtol=WATCH_LAMMPS_VS_ANALYZE_Q_REL, atol=0)
        np.testing.assert_allclose(got[:, 2], t2_ref[k], rtol=WATCH_LAMMPS_VS_ANALYZE_Q_REL, atol=0)


def watch_run(workdir: Path, atoms, model: Path, steps: int = 40) -> tuple[subprocess.CompletedProcess, Path]:
    from umlipft.lammps import input_script

    data = write_lammps_data(workdir / "start.data", atoms, ELEMENTS)
    command = [str(lmp_executable()), "-in", str(input_script("watch")), "-log", "none",
               "-var", "model", str(model), "-var", "data", str(data), "-var", "elements", " ".join(ELEMENTS),
               "-var", "steps", str(steps), "-var", "thermo_every", "10", "-var", "dump_every", "10",
               "-var", "output", str(workdir / "md"), "-var", "watch_every", "10", "-var", "watch_patience", "2"]
    done = subprocess.run(command, cwd=workdir, env=lammps_environment(), capture_output=True, text=True,
                          timeout=900)
    return done, workdir / "md.flagged.lammpstrj"


def test_watch_in_stops_a_run_outside_the_data_and_keeps_its_frames(tmp_path: Path, watched_export: Path,
                                                                    aqueous_frame) -> None:
    structure, h, _ = hcl_at(aqueous_frame)
    h_id = h + 1  # LAMMPS atom IDs follow the order, from 1
    steps = 80
    done, flagged = watch_run(tmp_path, structure, watched_export, steps)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The H vibrates about the Cl: the statistic may dip below 1 at a check, and the run stops at
    # the second check in a row above it (patience 2), well before the end.
    halted = re.search(r"Fix halt condition for fix-id watch_halt met on step (\d+)", done.stdout)
    assert halted, done.stdout[-3000:]
    assert 20 <= int(halted.group(1)) < steps
    blocks = flagged.read_text().split("ITEM: TIMESTEP")[1:]
    assert len(blocks) >= 2
    for block in blocks:
        rows = np.loadtxt(block.splitlines()[9:], usecols=(0, 9))  # id, Q over the halting limit
        assert len(rows) == len(aqueous_frame)
        assert rows[:, 1].max() > 1.0
        worst = int(rows[np.argmax(rows[:, 1]), 0])
        positions = np.loadtxt(block.splitlines()[9:], usecols=(3, 4, 5))
        assert worst == h_id or np.linalg.norm(positions[worst - 1] - positions[h_id - 1]) < 2.5


def test_watch_in_lets_an_in_distribution_run_finish(tmp_path: Path, watched_export: Path, aqueous_frame) -> None:
    done, flagged = watch_run(tmp_path, aqueous_frame, watched_export)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Fix halt condition" not in done.stdout
    assert "Loop time of" in done.stdout and "for 40 steps" in done.stdout
    assert not flagged.exists() or flagged.read_text().strip() == ""


def watched_single_point(workdir: Path, model: Path, atoms) -> subprocess.CompletedProcess:
    """run 0 of ``atoms`` with compute mace/q in the thermo output."""
    data = write_lammps_data(workdir / "start.data", atoms, ELEMENTS)
    return lmp(workdir, f"""
units metal
atom_style atomic
read_data {data}
pair_style mace
pair_coeff * * {model} {' '.join(ELEMENTS)}
compute q all mace/q
thermo_style custom step pe c_q
run 0
""")


def test_a_model_without_a_watch_is_refused_naming_watch(tmp_path: Path, exported_fast_fp64: Path,
                                                         aqueous_frame) -> None:
    done = watched_single_point(tmp_path, exported_fast_fp64, aqueous_frame)
    assert done.returncode != 0
    assert "has no watch" in done.stdout and "--watch TRAIN.extxyz" in done.stdout


def test_a_watch_fitted_for_other_elements_is_refused(tmp_path: Path, watched_export: Path, aqueous_frame) -> None:
    import torch

    from umlipft.models.kernels import load_kernels

    load_kernels()
    extra = {"umlipft.json": "", "umlipft_watch.json": ""}
    module = torch.jit.load(str(watched_export), _extra_files=extra)
    watch = json.loads(extra["umlipft_watch.json"])
    del watch["elements"]["Co"]
    edited = tmp_path / "no-co.pt"
    torch.jit.save(module, str(edited), _extra_files={"umlipft.json": extra["umlipft.json"],
                                                      "umlipft_watch.json": json.dumps(watch)})
    done = watched_single_point(tmp_path, edited, aqueous_frame)
    assert done.returncode != 0
    assert "atom type 2 is Co" in done.stdout and "refit the watch" in done.stdout
