"""Helpers of the reliability tests: the real ``umlipft`` command in a subprocess, small periodic
water frames that xTB labels in well under a second each, and the check of a failure message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def umlipft_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "umlipft.cli", *map(str, args)]


def umlipft_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(PROJECT / "python"))


def run_umlipft(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``umlipft ARGS...`` to completion (text output captured)."""
    return subprocess.run(umlipft_command(*args), cwd=cwd, env=umlipft_env(), capture_output=True,
                          text=True, timeout=timeout)


def write_water_frames(path: Path, n: int) -> Path:
    """``n`` rattled water molecules in a periodic 5 Å box (3 atoms: xTB takes ~0.3 s each)."""
    from ase.build import molecule
    from ase.io import write

    frames = []
    for k in range(n):
        atoms = molecule("H2O")
        atoms.set_cell([5.0, 5.0, 5.0])
        atoms.pbc = True
        atoms.center()
        atoms.rattle(0.05, seed=k)
        frames.append(atoms)
    write(path, frames)
    return path


def assert_message(done: subprocess.CompletedProcess, *needles: str | Path) -> None:
    """A failed command that says why in one message, without a Python traceback."""
    assert done.returncode != 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for needle in needles:
        assert str(needle) in done.stderr, f"{needle!r} not in: {done.stderr[-2000:]}"
