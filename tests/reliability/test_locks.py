"""One run per output directory: a second identical command is refused (exit 2, naming the
holder's PID) instead of redoing the work beside the first; kill -9 of the holder frees it."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from reliability_helpers import run_umlipft, umlipft_command, umlipft_env, write_water_frames

from umlipft.label.core import attempts
from umlipft.lock import OutputLockedError, holders, lock_file_for, output_lock, workflow_lock


def _start(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(umlipft_command(*args), env=umlipft_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``path`` exists: the first run is at work."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the first run ended early: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _assert_refused(done: subprocess.CompletedProcess, directory: Path, pid: int) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert str(directory) in done.stderr and f"PID {pid}" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one message


def test_second_label_on_one_workdir_is_refused_and_kill_9_frees_it(tmp_path: Path) -> None:
    n = 8
    frames = write_water_frames(tmp_path / "frames.extxyz", n)
    work = tmp_path / "work"
    args = ("label", frames, "--calculator", "xtb", "--workdir", work, "--threads-per-frame", "1")
    first = _start(*args)
    try:
        _wait_for(work / "frame_000000" / "attempts.log", first)
        second = run_umlipft(*args)
        _assert_refused(second, work, first.pid)
    finally:
        first.send_signal(signal.SIGKILL)  # the holder only: its workers die with it (PDEATHSIG)
        first.wait()

    resumed = run_umlipft(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    counts = [attempts(work, i) for i in range(n)]
    # Every frame ran once, except at most the one the killed run was labelling; the refused
    # run started none (without the lock it labelled every frame a second time).
    assert all(c >= 1 for c in counts) and sum(counts) <= n + 1, counts
    assert not lock_file_for(work).exists()  # removed by the run that finished


def test_second_md_on_one_directory_is_refused_and_kill_9_frees_it(tmp_path: Path, small_model_path: Path) -> None:
    # The first run holds its directory from the start; exporting the .model for LAMMPS keeps it
    # busy for tens of seconds, long enough to meet the second run.
    structure = write_water_frames(tmp_path / "water.extxyz", 1)
    run_dir = tmp_path / "md"
    args = ("md", structure, "--model", small_model_path, "--steps", "10", "-o", run_dir, "--no-progress")
    first = _start(*args)
    try:
        _wait_for(run_dir / "md-config.json", first)
        second = run_umlipft(*args)
        _assert_refused(second, run_dir, first.pid)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.pid in [h["pid"] for h in holders(run_dir)]  # the file outlives its holder ...
    with output_lock(run_dir, "md"):  # ... but not the lock: the kernel released it
        assert holders(run_dir)[-1]["pid"] != first.pid


def test_a_process_takes_its_own_lock_again_and_threads_share_it(tmp_path: Path) -> None:
    # The workflow holds its directory and runs drivers (in threads) that lock their outputs;
    # a driver must not be refused by the lock of its own process.
    directory = tmp_path / "run"
    refused = []
    with output_lock(directory, "workflow"):
        def nested() -> None:
            try:
                with output_lock(directory, "md"), output_lock(directory / "md", "md"):
                    pass
            except OutputLockedError as err:
                refused.append(err)

        threads = [threading.Thread(target=nested) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        other = subprocess.run([sys.executable, "-c", "import sys\nfrom umlipft.lock import output_lock\n"
                                f"with output_lock({str(directory)!r}, 'x'): sys.exit(0)"],
                               capture_output=True, text=True)
        assert lock_file_for(directory).exists()  # still held after the nested releases
    assert not refused
    assert other.returncode != 0 and "OutputLockedError" in other.stderr
    assert not directory.exists()  # made for the lock and left empty: removed again


@pytest.mark.parametrize("first, second, refused", [
    (None, None, True),                                  # two plain runs of one workflow
    (["naive/traj-00"], ["naive/traj-01"], False),       # parallel branch jobs
    (["naive/traj-00"], ["naive/traj-00"], True),        # a job beside its own resubmission
    (None, ["naive/traj-00"], True),                     # a branch job beside a plain run
    (["naive/traj-00"], None, True),
])
def test_workflow_lock_lets_only_parallel_branch_jobs_share_a_directory(tmp_path: Path, first, second,
                                                                        refused: bool) -> None:
    directory = tmp_path / "wf"
    code = ("import sys\nfrom umlipft.lock import workflow_lock, OutputLockedError\n"
            f"try:\n    with workflow_lock({str(directory)!r}, {second!r}): pass\n"
            "except OutputLockedError as err:\n    print(err); sys.exit(2)\n")
    with workflow_lock(directory, first):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == (2 if refused else 0), done.stdout + done.stderr
    if refused:
        assert "is in use by umlipft workflow" in done.stdout
