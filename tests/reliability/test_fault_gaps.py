"""The fault campaign's bad inputs not covered elsewhere in tests/reliability, on the commands
that lacked them: a NaN label given to ``umlipft finetune`` (case 2: it trained a NaN model and
exited 0), two fine-tunes on one output directory (case 5, for label and md in test_locks.py),
and outputs that cannot be written for ``finetune`` and ``workflow`` (case 8, for the other
commands in test_messages.py)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from reliability_helpers import assert_message, run_umlipft, umlipft_command, umlipft_env

from umlipft.lock import lock_file_for

CELL = 'Lattice="6.0 0.0 0.0 0.0 6.0 0.0 0.0 0.0 6.0"'
WATER = ("O 2.50 2.50 2.60 0.10 0.00 0.00", "H 3.26 2.50 2.00 0.00 0.20 0.00", "H 1.74 2.50 2.00 0.00 0.00 0.30")


def _labelled(path: Path, frames: int, bad: tuple[int, int] | None = None) -> Path:
    """``frames`` labelled water frames; ``bad`` = (frame, atom) whose y force is NaN."""
    blocks = []
    for k in range(frames):
        lines = [line.replace("2.50 2.60", f"2.50 {2.60 + 0.02 * k:.2f}") for line in WATER]
        if bad is not None and bad[0] == k:
            fields = lines[bad[1]].split()
            fields[5] = "NaN"
            lines[bad[1]] = " ".join(fields)
        blocks.append("\n".join(["3", f'{CELL} Properties=species:S:1:pos:R:3:REF_forces:R:3 '
                                      f'REF_energy={-14.2 - 0.01 * k:.2f} pbc="T T T"', *lines]))
    path.write_text("\n".join(blocks) + "\n")
    return path


def test_a_nan_label_is_refused_by_finetune_before_training(tmp_path: Path, small_model_path: Path) -> None:
    train = _labelled(tmp_path / "train.extxyz", 3, bad=(2, 1))
    out = tmp_path / "out"
    done = run_umlipft("finetune", "--foundation", small_model_path, "--train", train, "-o", out, "--epochs", "1",
                       "--e0s", "foundation")
    assert_message(done, train, "frame 2, atom 1", "REF_forces is nan")
    assert not list(out.glob("*.model")) and not (out / "mace").exists()


def test_a_second_finetune_on_one_output_is_refused(tmp_path: Path, small_model_path: Path) -> None:
    train = _labelled(tmp_path / "train.extxyz", 3)
    out = tmp_path / "out"
    args = ("finetune", "--foundation", small_model_path, "--train", train, "-o", out, "--epochs", "50",
            "--e0s", "foundation", "--accept-large-start-error", "--no-export")
    first = subprocess.Popen(umlipft_command(*args), env=umlipft_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not lock_file_for(out).exists():
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first fine-tune never took its output"
            time.sleep(0.05)
        second = run_umlipft(*args)
        assert first.poll() is None, "the first fine-tune ended before the second was refused"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    assert "Traceback" not in second.stderr and str(out) in second.stderr and f"PID {first.pid}" in second.stderr


@pytest.mark.parametrize("command", ["finetune", "workflow"])
def test_an_output_under_a_file_is_a_message(command: str, tmp_path: Path, small_model_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    train = _labelled(tmp_path / "train.extxyz", 3)
    args = {"finetune": ("finetune", "--foundation", small_model_path, "--train", train, "-o", blocker / "out",
                         "--epochs", "1", "--e0s", "foundation"),
            "workflow": ("workflow", "periodic", "--profile", "quick", "-o", blocker / "wf")}[command]
    done = run_umlipft(*args)
    assert_message(done, blocker, "is a file, not a directory", "choose another output location")
