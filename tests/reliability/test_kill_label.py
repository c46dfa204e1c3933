"""``umlipft label`` under ``kill -9`` at seeded random moments, and with its finished outputs
damaged: every frame is labelled once (the journal: each frame's ``attempts.log``, one line per
worker start), the labels equal an uninterrupted run's, and a changed result is found.

Ten water frames (3 atoms, xTB, one thread: ~0.6 s a frame) in one chain of ten kills."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from kill_trials import Tally, finish_tally, run_chain, run_reference
from reliability_helpers import run_umlipft, umlipft_command, umlipft_env, write_water_frames

from tolerances import LABEL_RESUME_ENERGY_EV, LABEL_RESUME_FORCE_EV_A
from umlipft.io import read_frames, sha256_file
from umlipft.label.core import attempts, frame_dir

N_FRAMES = 10
TRIALS = 10
SEED = 1301


def _args(frames: Path, run: Path) -> tuple:
    return ("label", frames, "--calculator", "xtb", "--workdir", run / "work", "-o", run / "labelled.extxyz",
            "--threads-per-frame", "1")


def _done(run: Path) -> float:
    """The journal's progress: frames with a result, +1 once the run's summary is written."""
    summary = run / "labelled.extxyz.summary.json"
    return float(sum(1 for _ in (run / "work").glob("frame_*/result.extxyz")) + summary.is_file())


def _frames_state(run: Path) -> list[tuple[int, str | None]]:
    """Per frame: (worker starts, hash of its result or None)."""
    work = run / "work"
    out = []
    for i in range(N_FRAMES):
        result = frame_dir(work, i) / "result.extxyz"
        out.append((attempts(work, i), sha256_file(result) if result.is_file() else None))
    return out


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_water_frames(tmp_path_factory.mktemp("kill-label") / "frames.extxyz", N_FRAMES)


@pytest.fixture(scope="module")
def reference(frames: Path):
    """An uninterrupted labelling: its labels and the times its frames finished."""
    run = frames.parent / "reference"
    run.mkdir()
    ref = run_reference(umlipft_command(*_args(frames, run)), lambda: _done(run), run / "console.log",
                        env=umlipft_env(), timeout_s=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert [a for a, _ in _frames_state(run)] == [1] * N_FRAMES
    return run, ref


def _compare(run: Path, reference_run: Path) -> tuple[int, bool]:
    """(reference frames missing from ``run``'s output, whether any label differs)."""
    want = read_frames(reference_run / "labelled.extxyz")
    path = run / "labelled.extxyz"
    have = read_frames(path) if path.is_file() else []
    have_by_index = {int(a.info["label_index"]): a for a in have}
    lost = sum(1 for a in want if int(a.info["label_index"]) not in have_by_index)
    wrong = len(have) != len(have_by_index) or lost > 0
    for a in want:
        b = have_by_index.get(int(a.info["label_index"]))
        if b is None:
            continue
        wrong |= not (np.array_equal(a.numbers, b.numbers) and np.allclose(a.positions, b.positions, rtol=0, atol=1e-8)
                      and abs(a.info["REF_energy"] - b.info["REF_energy"]) <= LABEL_RESUME_ENERGY_EV
                      and np.abs(a.arrays["REF_forces"] - b.arrays["REF_forces"]).max() <= LABEL_RESUME_FORCE_EV_A)
    return lost, wrong


def _repeated(run: Path, killed: list) -> int:
    """Finished frames labelled again in ``run``: a frame with a result at a kill must keep its
    attempt count and its result's bytes, and every other worker start must be one that a kill
    interrupted (the frame had no result yet and its attempt count had grown since the last kill)."""
    final = _frames_state(run)
    repeated = 0
    for i in range(N_FRAMES):
        seen_done = [t.snapshot[i] for t in killed if t.snapshot[i][1] is not None]
        if seen_done and final[i] != seen_done[0]:
            repeated += 1
        before, interrupted = 0, 0
        for t in killed:
            count, result = t.snapshot[i]
            interrupted += result is None and count > before
            before = count
        repeated += max(0, final[i][0] - 1 - interrupted)
    return repeated


@pytest.mark.slow
def test_label_survives_kill_9_at_random_moments(frames: Path, reference, fault_tally_file: Path,
                                                 tmp_path: Path) -> None:
    reference_run, ref = reference
    tally = Tally("label", f"umlipft label FRAMES --calculator xtb ({N_FRAMES} water frames)", SEED,
                  reference_s=ref.seconds)
    problems: list[str] = []

    def close(run: Path, code: int | None, console: str, attempts: list) -> None:
        killed = [t for t in attempts if t.killed]
        repeated = _repeated(run, killed)
        lost, wrong = _compare(run, reference_run)
        tally.repeated_work += repeated
        tally.frames_lost += lost
        tally.silent_wrong += int(code == 0 and wrong)
        if code == 0 and not wrong and not repeated and not any(t.orphans for t in killed):
            tally.survived += len(killed)
        if code != 0 or wrong or repeated:
            problems.append(f"{run}: exit {code}, {lost} frames lost, labels differ: {wrong}, {repeated} repeated; "
                            f"{_frames_state(run)}, {[t.snapshot for t in killed]}\n{console[-2000:]}")

    def directory(k: int) -> Path:
        (tmp_path / f"chain-{k}").mkdir()
        return tmp_path / f"chain-{k}"

    trials = run_chain(lambda run: umlipft_command(*_args(frames, run)), ref, TRIALS, SEED, directory,
                       lambda run: (lambda: _done(run)), _frames_state, close, tmp_path / "console.log",
                       env=umlipft_env(), timeout_s=600)
    killed = finish_tally(tally, trials, fault_tally_file, progress_key="frames_done")

    assert tally.trials == TRIALS
    assert not tally.orphans, [t.orphans for t in killed]
    assert not problems, problems


# ------------------------------------------------------------------------------ damaged outputs
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "edit":  # one digit of a force changed: same size, other content
        lines = data.decode().splitlines(keepends=True)
        fields = lines[3].split()
        last = fields[-1]
        fields[-1] = last[:-1] + ("1" if last[-1] != "1" else "2")
        lines[3] = " ".join(fields) + "\n"
        path.write_bytes("".join(lines).encode())
        assert path.stat().st_size != len(data) or path.read_bytes() != data
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncate", "edit", "delete"])
def test_a_damaged_frame_result_is_found_and_relabelled(frames: Path, reference, tmp_path: Path, how: str) -> None:
    """A finished frame's result.extxyz cut, edited or removed: the rerun says so and labels that
    frame, and only that frame, again."""
    reference_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    work = run / "work"
    result = frame_dir(work, 3) / "result.extxyz"
    _damage(result, how)
    done = run_umlipft(*_args(frames, run))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and str(result) in done.stderr and "relabelling" in done.stderr, done.stderr
    assert [attempts(work, i) for i in range(N_FRAMES)] == [1, 1, 1, 2, 1, 1, 1, 1, 1, 1]
    assert _compare(run, reference_run) == (0, False)


@pytest.mark.parametrize("how", ["truncate", "edit", "delete"])
def test_a_damaged_labelled_file_is_written_again_from_the_frames(frames: Path, reference, tmp_path: Path,
                                                                   how: str) -> None:
    """The labelled file is rebuilt from the per-frame results on every run: a damaged copy is
    replaced by the original bytes, with no frame labelled again."""
    reference_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    labelled = run / "labelled.extxyz"
    original = labelled.read_bytes()
    _damage(labelled, how)
    done = run_umlipft(*_args(frames, run))
    assert done.returncode == 0, done.stderr[-2000:]
    assert labelled.read_bytes() == original
    assert [attempts(run / "work", i) for i in range(N_FRAMES)] == [1] * N_FRAMES
