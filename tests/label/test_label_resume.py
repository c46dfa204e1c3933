"""A labelling run killed with SIGKILL midway resumes without relabelling finished frames."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from umlipft.io import read_frames
from umlipft.label.config import LabelConfig
from umlipft.label.core import attempts, frame_dir, label_frames

PROJECT = Path(__file__).resolve().parents[2]


def _frames(path: Path, n: int) -> None:
    from ase.build import molecule
    from ase.io import write

    frames = []
    for k in range(n):
        atoms = molecule("H2O") + molecule("H2O")
        atoms.positions[3:] += [2.8, 0.2, 0.3]
        atoms.set_cell([6.0, 6.0, 6.5])
        atoms.pbc = True
        atoms.center()
        atoms.rattle(0.03, seed=k)
        frames.append(atoms)
    write(path, frames)


@pytest.mark.slow
def test_sigkill_midway_then_resume(tmp_path: Path) -> None:
    frames_path = tmp_path / "frames.extxyz"
    n = 5
    _frames(frames_path, n)
    work = tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=str(PROJECT / "python"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "umlipft.cli", "label", str(frames_path), "--calculator", "xtb",
         "--workdir", str(work), "--threads-per-frame", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    first = frame_dir(work, 0) / "result.extxyz"
    deadline = time.monotonic() + 120
    while not first.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no frame finished in 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no cleanup at all, like a node failure
    proc.wait()
    done_at_kill = {i for i in range(n) if (frame_dir(work, i) / "result.extxyz").exists()}
    assert 0 in done_at_kill and len(done_at_kill) < n
    # the frame that was running died with its parent (no orphan finishing behind our back)
    time.sleep(3.0)
    assert {i for i in range(n) if (frame_dir(work, i) / "result.extxyz").exists()} == done_at_kill
    assert not (tmp_path / "frames-labelled.extxyz").exists()  # nothing half-written to trust
    first_mtime = first.stat().st_mtime_ns

    report = label_frames(LabelConfig(frames=frames_path, calculator="xtb", workdir=work, threads_per_frame=1))
    assert set(report.reused) == done_at_kill
    assert set(report.labelled) == set(range(n)) - done_at_kill
    assert report.complete and not report.failed
    for i in done_at_kill:
        assert attempts(work, i) == 1  # finished frames were not started again
    assert first.stat().st_mtime_ns == first_mtime
    labelled = read_frames(report.output)
    assert [a.info["label_index"] for a in labelled] == list(range(n))
    assert all("REF_energy" in a.info and "REF_stress" in a.info for a in labelled)
