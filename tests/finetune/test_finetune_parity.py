"""``umlipft finetune`` trains exactly as ``mace_run_train`` by hand with the same settings.

Both train MACE-MP-0 small for 2 epochs on the same 5 shared DFT frames (no stress, as in the
parity check of issue 13), with mace-torch's own 10 % validation split on the by-hand side and
the driver's split on the other. Every validation record mace-torch writes (before training and
after each epoch) must agree: the initial one only if both validate on the same frame, the later
ones only if both trained on the same frames in the same order with the same optimiser,
scheduler, EMA, loss and E0s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ase.io import read

from tolerances import FINETUNE_PARITY_REL
from umlipft.finetune import FinetuneConfig, finetune
from umlipft.io import write_frames

SETTINGS = {"epochs": 2, "lr": 0.005, "batch_size": 2, "dtype": "float32", "seed": 1}


def _eval_records(metrics_file: Path) -> list[dict]:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return [r for r in records if r["mode"] == "eval"]


@pytest.mark.slow
def test_finetune_matches_mace_run_train_with_the_same_settings(small_model_path: Path, aqueous_dir: Path,
                                                                tmp_path: Path) -> None:
    frames = read(aqueous_dir / "single_points" / "Finetuning__Periodic__U__dft.extxyz", ":5")
    for atoms in frames:
        del atoms.info["REF_stress"]  # the parity case had no stress in the data
    source = write_frames(tmp_path / "frames.extxyz", frames)

    config = FinetuneConfig(train_file=str(source), foundation=str(small_model_path), e0s="foundation",
                            output_dir=str(tmp_path / "umlipft"), export=False, e0_check_frames=1, **SETTINGS)
    result = finetune(config)
    assert (result.n_train, result.n_valid, result.valid_is_train) == (4, 1, False)

    plain = tmp_path / "plain"
    done = subprocess.run(
        [sys.executable, "-m", "mace.cli.run_train", "--name", "plain", "--work_dir", str(plain),
         "--train_file", str(source), "--valid_fraction", "0.1", "--foundation_model", str(small_model_path),
         "--E0s", "foundation", "--energy_key", "REF_energy", "--forces_key", "REF_forces",
         "--energy_weight", "1", "--forces_weight", "10", "--ema", "--ema_decay", "0.99",
         "--lr", str(SETTINGS["lr"]), "--batch_size", str(SETTINGS["batch_size"]),
         "--max_num_epochs", str(SETTINGS["epochs"]), "--default_dtype", SETTINGS["dtype"],
         "--seed", str(SETTINGS["seed"]), "--device", "cpu"],
        capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ours = _eval_records(Path(config.output_dir) / "mace" / "results" / "finetuned_run-1_train.txt")
    theirs = _eval_records(plain / "results" / "plain_run-1_train.txt")
    assert [r["epoch"] for r in ours] == [r["epoch"] for r in theirs] == [None, 0, 1]
    for a, b in zip(ours, theirs):
        for key in ("loss", "rmse_e_per_atom", "rmse_f"):
            assert a[key] == pytest.approx(b[key], rel=FINETUNE_PARITY_REL), (a["epoch"], key)
    # The model written is mace-torch's (the epoch of lowest validation loss), and the result
    # reports that epoch's validation errors.
    best = min(ours[1:], key=lambda r: r["loss"])
    assert result.model_epoch == best["epoch"] + 1
    assert result.final_valid_rmse_e_meV_per_atom == pytest.approx(best["rmse_e_per_atom"] * 1000)
