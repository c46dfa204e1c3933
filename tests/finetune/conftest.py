"""Data shared by the fine-tuning tests: a few frames of the study's own training sets."""

from __future__ import annotations

from pathlib import Path

import pytest

FT1_TRAINING_SET = "Finetuning__Periodic__FT1__model__ft_dataset.xyz"


@pytest.fixture(scope="session")
def ft1_frames(aqueous_dir: Path):
    """(regular frames, IsolatedAtom frames) of the periodic workflow's FT1 training set."""
    from ase.io import read

    frames = read(aqueous_dir / "training_sets" / FT1_TRAINING_SET, ":")
    regular = [a for a in frames if len(a) > 1]
    isolated = [a for a in frames if a.info.get("config_type") == "IsolatedAtom"]
    assert len(isolated) == 6 and len(regular) >= 3
    return regular, isolated


@pytest.fixture(scope="session")
def tiny_finetune_data(ft1_frames, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, valid) files: 2 shared DFT frames plus the 6 IsolatedAtom frames (the E0 trap is
    armed, the driver's default must defuse it) and a third shared frame to validate on.

    An explicit 1-frame validation file, not the driver's fallback of validating on the training
    frames: mace-torch evaluates the validation set before training (the start guard), after
    every epoch and at the end, so one 170-atom frame instead of two saves a third of a 1-epoch
    fine-tune's evaluation time, and the start guard then judges a frame not trained on.
    """
    from umlipft.io import write_frames

    regular, isolated = ft1_frames
    tmp = tmp_path_factory.mktemp("tiny-finetune-data")
    train = write_frames(tmp / "train.extxyz", regular[:2] + isolated)
    valid = write_frames(tmp / "valid.extxyz", regular[2:3])
    return Path(train), Path(valid)
