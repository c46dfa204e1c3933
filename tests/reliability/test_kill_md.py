"""``umlipft md`` under ``kill -9`` at seeded random moments: one chain of ten kills of the whole
process group (the driver and its ``lmp``), then a rerun to completion, against an uninterrupted
run. Proven from the run's own records: every attempt's LAMMPS log starts at the newest complete
restart file the kill left (no step before it computed again, no finished run started again),
and thermo.csv, trajectory.extxyz and final.extxyz equal the uninterrupted run's, every row and
frame once. Eight waters (24 atoms), 100 steps of 0.5 fs, float64."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from kill_trials import Tally, finish_tally, run_chain, run_reference
from reliability_helpers import umlipft_command, umlipft_env

from tolerances import MD_RESUME_POSITION_A, MD_RESUME_THERMO_REL
from umlipft.io import read_frames

STEPS, THERMO, DUMP, RESTART = 100, 5, 10, 10
TRIALS = 10
SEED = 1302
THERMO_ROW = re.compile(rb"^\s*(\d+)\s+[-+0-9.eE]+\s")


@pytest.fixture(scope="module")
def inputs(water_box: Path, water_export_fp64: Path) -> tuple[Path, Path]:
    """(start structure, fp64 LAMMPS export for H and O)."""
    return water_box, water_export_fp64


def _args(structure: Path, model: Path, run: Path, steps: int = STEPS) -> list:
    return ["md", structure, "--model", model, "--ensemble", "nvt", "--seed", "3", "--no-progress", "-o", run,
            "--steps", str(steps), "--thermo-every", str(THERMO), "--dump-every", str(DUMP),
            "--restart-every", str(RESTART)]


def _logs(run: Path) -> list[Path]:
    return sorted(run.glob("log.lammps.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))


def _steps_logged(log: Path) -> list[int]:
    """Thermo steps of one LAMMPS log (complete lines only)."""
    try:
        data = log.read_bytes()
    except OSError:
        return []
    return [int(m.group(1)) for line in data.split(b"\n")[:-1] for m in [THERMO_ROW.match(line)] if m]


def _progress(run: Path) -> float:
    """The journal's progress: the last thermo step of the newest attempt's log, +1 once LAMMPS
    wrote the final data file, +1 once the run's summary is written."""
    logs = _logs(run)
    steps = _steps_logged(logs[-1]) if logs else []
    return float(steps[-1] if steps else 0) + (run / "md.final.data").is_file() + (run / "summary.json").is_file()


def _state(run: Path) -> dict:
    """What a rerun will find: attempts so far, the newest complete restart file, whether
    LAMMPS or the whole run finished."""
    restarts = {}
    for path in run.glob("md.restart.*"):
        restarts[int(path.name.rsplit(".", 1)[1])] = path.stat().st_size
    largest = max(restarts.values(), default=0)
    complete = [step for step, size in restarts.items() if size == largest and size > 0]
    return {"logs": len(_logs(run)), "restart": max(complete, default=None),
            "lammps_done": (run / "md.final.data").is_file(), "finished": (run / "summary.json").is_file()}


def _thermo(path: Path) -> np.ndarray:
    return np.genfromtxt(path, delimiter=",", names=True)


def _compare(run: Path, reference: Path) -> tuple[int, list[str]]:
    """(reference rows and frames missing from ``run``, what differs)."""
    lost, diffs = 0, []
    if not (run / "thermo.csv").is_file() or not (run / "trajectory.extxyz").is_file():
        return STEPS // THERMO + 1 + STEPS // DUMP + 1, ["outputs missing"]
    want, have = _thermo(reference / "thermo.csv"), _thermo(run / "thermo.csv")
    lost += len(set(want["Step"]) - set(have["Step"]))
    if list(have["Step"]) != list(want["Step"]):
        diffs.append(f"thermo steps {list(have['Step'])}")
    else:
        for name in want.dtype.names:
            if not np.allclose(have[name], want[name], rtol=MD_RESUME_THERMO_REL, atol=0):
                diffs.append(f"thermo {name}: {np.abs(have[name] - want[name]).max()}")
    expected, frames = read_frames(reference / "trajectory.extxyz"), read_frames(run / "trajectory.extxyz")
    steps = [f.info["step"] for f in frames]
    lost += len({f.info["step"] for f in expected} - set(steps))
    if steps != [f.info["step"] for f in expected]:
        diffs.append(f"trajectory steps {steps}")
    else:
        for a, b in zip(frames, expected):
            if np.abs(a.positions - b.positions).max() > MD_RESUME_POSITION_A:
                diffs.append(f"positions at step {a.info['step']}")
    final_a, final_b = read_frames(run / "final.extxyz")[0], read_frames(reference / "final.extxyz")[0]
    if np.abs(final_a.positions - final_b.positions).max() > MD_RESUME_POSITION_A:
        diffs.append("final.extxyz positions")
    return lost, diffs


def _repeated(run: Path, killed: list) -> list[str]:
    """Attempts that computed again what a kill had left done: each attempt that started LAMMPS
    wrote log.lammps.K (K = the logs before it); its first step must be the newest complete
    restart file the last kill left (step 0 without one), and no LAMMPS may start once the run had
    finished."""
    repeated = []
    for k, log in enumerate(_logs(run)[1:], start=1):
        before = [t.snapshot for t in killed if t.snapshot["logs"] == k][-1]
        first = (_steps_logged(log) or [None])[0]
        if first is None:
            continue  # killed while LAMMPS started: no step computed
        expected = STEPS if before["lammps_done"] and before["restart"] is None else before["restart"] or 0
        if before["finished"] or first != expected:
            repeated.append(f"{log.name} starts at step {first}, the newest restart was {before}")
    return repeated


@pytest.mark.slow
def test_md_survives_kill_9_at_random_moments(inputs, fault_tally_file: Path, tmp_path: Path) -> None:
    structure, model = inputs
    reference = tmp_path / "reference"
    ref = run_reference(umlipft_command(*_args(structure, model, reference)), lambda: _progress(reference),
                        tmp_path / "reference.log", env=umlipft_env(), timeout_s=900)
    assert ref.returncode == 0, ref.stderr[-2000:]
    tally = Tally("md", f"umlipft md (24 atoms, {STEPS} steps, restart every {RESTART})", SEED,
                  reference_s=ref.seconds)
    problems: list[str] = []

    def close(run: Path, code: int | None, console: str, attempts: list) -> None:
        killed = [t for t in attempts if t.killed]
        repeated = _repeated(run, killed)
        logs = _logs(run)
        lost, diffs = _compare(run, reference)
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        if summary.get("results", {}).get("attempts") != len(logs):
            diffs.append(f"summary.json records {summary.get('results', {}).get('attempts')} attempts, "
                         f"{len(logs)} logs")
        tally.repeated_work += len(repeated)
        tally.frames_lost += lost
        tally.silent_wrong += int(code == 0 and bool(diffs))
        tally.notes.append(f"{run.name}: {len(logs)} LAMMPS attempts, resumed at steps "
                           f"{[(_steps_logged(log) or [None])[0] for log in logs[1:]]}")
        if code == 0 and not diffs and not repeated and not any(t.orphans for t in killed):
            tally.survived += len(killed)
        else:
            problems.append(f"{run}: exit {code}; {repeated}; {diffs}; {lost} lost\n{console[-3000:]}")

    trials = run_chain(lambda run: umlipft_command(*_args(structure, model, run)), ref, TRIALS, SEED,
                       lambda k: tmp_path / f"chain-{k}", lambda run: (lambda: _progress(run)), _state, close,
                       tmp_path / "chain.log", env=umlipft_env(), timeout_s=900)
    killed = finish_tally(tally, trials, fault_tally_file, lambda t: t.snapshot)

    assert tally.trials == TRIALS
    assert not tally.orphans, [t.orphans for t in killed]
    assert not problems, problems
