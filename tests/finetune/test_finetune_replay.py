"""Multi-head replay fine-tuning, end to end: mace-torch trains a user head and a pt_head on the
user's replay frames (nothing downloaded), and the user's head is what LAMMPS gets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.io import read

from sample_structures import cobalt_chloride_crystal, triclinic_water_box
from tolerances import FINETUNE_MAX_START_ERROR_MEV_PER_ATOM, PLUGIN_FP32_FORCE_EV_A
from umlipft.finetune import FinetuneConfig, FinetuneResult, finetune
from umlipft.io import write_frames
from umlipft.models import load_mace_model, read_export_metadata


def _replay_frames(small_model_path: Path):
    """Replay data at the foundation's level of theory: small structures (a triclinic water box,
    the CoCl2 crystal, rock-salt LiCl) labelled by MACE-MP-0 itself, i.e. the pseudo-labels that
    mace-torch's own --pseudolabel_replay makes. They stand in for an MPtrj subset, which needs a
    download; they are small so that replaying them costs little. (They are not reference data
    for the new frames, which stay the study's DFT frames.)"""
    from ase.build import bulk

    from umlipft.evaluate.predict import ModelEvaluator

    structures = [triclinic_water_box(), cobalt_chloride_crystal(), bulk("LiCl", "rocksalt", a=5.13, cubic=True)]
    for atoms in structures:
        atoms.rattle(0.03, seed=3)
    predictions = ModelEvaluator(small_model_path, dtype="float32").predict(structures)
    for atoms, p in zip(structures, predictions):
        atoms.info["REF_energy"] = p.energy_eV
        atoms.arrays["REF_forces"] = p.forces_eV_per_A
        atoms.info["REF_stress"] = p.stress_eV_per_A3
    return structures


@pytest.fixture(scope="module")
def replay_finetuned(small_model_path: Path, tiny_finetune_data: tuple[Path, Path],
                     tmp_path_factory: pytest.TempPathFactory) -> tuple[FinetuneConfig, FinetuneResult]:
    train, valid = tiny_finetune_data
    tmp = tmp_path_factory.mktemp("replay")
    replay = write_frames(tmp / "replay.extxyz", _replay_frames(small_model_path))
    config = FinetuneConfig(train_file=str(train), valid_file=str(valid), replay_file=str(replay),
                            foundation=str(small_model_path), output_dir=str(tmp / "out"), epochs=1,
                            dtype="float32", export_dtype="float32", e0_check_frames=1)
    return config, finetune(config)


@pytest.mark.slow
def test_replay_finetune_trains_two_heads_and_exports_the_users(
        replay_finetuned: tuple[FinetuneConfig, FinetuneResult]) -> None:
    from umlipft.evaluate.predict import ModelEvaluator
    from umlipft.lammps.singlepoint import lammps_single_point

    config, result = replay_finetuned
    out = Path(config.output_dir)
    assert result.mode == "replay" and result.n_train == 2 and result.n_valid == 1 and result.n_replay == 3
    assert len(result.epoch_times_s) == 1 and result.final_valid_rmse_e_meV_per_atom is not None
    # The user's head starts from the foundation (E0 trap defused here too) and is what the
    # driver follows: its validation lines, not pt_head's.
    assert result.e0["policy"] == "foundation" and result.e0["isolated_atom_frames_dropped"] == 6
    assert result.initial_valid_rmse_e_meV_per_atom is not None
    assert result.initial_valid_rmse_e_meV_per_atom < FINETUNE_MAX_START_ERROR_MEV_PER_ATOM

    # mace-torch really ran multi-head replay on the user's replay file: nothing downloaded.
    log = (out / "mace" / "umlipft-train.log").read_text()
    assert "Using heads: ['Default', 'pt_head']" in log and "UniversalLoss" in log
    assert "Total number of configurations in pretraining: train=3" in log
    assert "Downloading" not in log and "mp_traj_combined" not in log
    assert "Initial: head: pt_head" in log and "Epoch 0: head: pt_head" in log
    # The new frames carry the study's 10x weight; the replay frames weigh 1.
    assert [a.info["config_weight"] for a in read(out / "data" / "train.extxyz", ":")] == [10.0, 10.0]
    assert all("config_weight" not in a.info for a in read(out / "data" / "replay.extxyz", ":"))

    model = load_mace_model(result.model_path)
    assert list(model.heads) == ["pt_head", "Default"]
    assert sorted(model.atomic_numbers.tolist()) == [1, 3, 8, 17, 27]
    e0 = model.atomic_energies_fn.atomic_energies.detach()
    assert tuple(e0.shape) == (2, 5)  # one E0 row per head, both the foundation's
    assert e0[1, 0].item() == pytest.approx(result.e0["foundation_e0s_eV"]["H"], abs=1e-5)

    meta = read_export_metadata(result.lammps_model_path)
    assert meta["head"] == "Default" and meta["heads"] == ["pt_head", "Default"]
    assert meta["atomic_numbers"] == [1, 3, 8, 17, 27] and meta["dtype"] == "float32"

    # The export runs in LAMMPS and is the user's head: it matches mace-torch's Default head, and
    # not pt_head, which one epoch has already moved apart (measured: 4e-3 eV, 5e-4 eV/Å here).
    atoms = triclinic_water_box()
    lmp = lammps_single_point(atoms, result.lammps_model_path, ["H", "O"])
    assert np.isfinite(lmp.energy) and np.all(np.isfinite(lmp.forces)) and np.all(lmp.forces != 0)
    diffs = {}
    for head in ("Default", "pt_head"):
        (p,) = ModelEvaluator(result.model_path, dtype="float32", head=head).predict([atoms])
        diffs[head] = (abs(p.energy_eV - lmp.energy), np.abs(p.forces_eV_per_A - lmp.forces).max())
    assert diffs["Default"][1] < PLUGIN_FP32_FORCE_EV_A
    assert diffs["pt_head"][0] > 10 * max(diffs["Default"][0], 1e-5)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert "--pt_train_file" in summary["results"]["mace_arguments"]
