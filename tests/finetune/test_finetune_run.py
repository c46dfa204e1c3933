"""A real 1-epoch fine-tune of MACE-MP-0 small through mace-torch, exported for pair_style mace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.io import read

from tolerances import FINETUNE_MAX_START_ERROR_MEV_PER_ATOM
from umlipft.cli import main
from umlipft.errors import StateError
from umlipft.finetune import FinetuneConfig, FinetuneResult, finetune
from umlipft.models import load_mace_model, read_export_metadata


@pytest.fixture(scope="module")
def finetuned(small_model_path: Path, tiny_finetune_data: tuple[Path, Path],
              tmp_path_factory: pytest.TempPathFactory) -> tuple[FinetuneConfig, FinetuneResult]:
    # Two frames of the study's own FT1 training set plus its isolated-atom frames: the E0 trap
    # is armed, and the default must defuse it.
    train, valid = tiny_finetune_data
    tmp = tmp_path_factory.mktemp("finetune")
    # float32 training: a quarter of the float64 time, and the test is about the pipeline.
    config = FinetuneConfig(train_file=str(train), valid_file=str(valid), foundation=str(small_model_path),
                            output_dir=str(tmp / "out"), epochs=1, dtype="float32", e0_check_frames=2)
    return config, finetune(config)


@pytest.mark.slow
def test_one_epoch_finetune_writes_model_and_export(finetuned: tuple[FinetuneConfig, FinetuneResult]) -> None:
    config, result = finetuned
    assert result.model_path.is_file() and result.lammps_model_path is not None
    assert result.n_train == 2 and result.n_valid == 1 and result.n_replay == 0 and result.mode == "naive"
    assert result.epochs == 1 and len(result.epoch_times_s) == 1
    # The model is mace-torch's checkpoint of epoch 1, and its validation errors are reported.
    assert result.model_epoch == 1 and not result.valid_is_train
    assert result.final_valid_rmse_e_meV_per_atom is not None and result.final_valid_rmse_f_meV_per_A is not None
    model = load_mace_model(result.model_path)
    assert sorted(model.atomic_numbers.tolist()) == [1, 3, 8, 17, 27]
    meta = read_export_metadata(result.lammps_model_path)
    assert meta["atomic_numbers"] == [1, 3, 8, 17, 27] and meta["head"] == "Default"
    assert meta["r_max"] == pytest.approx(6.0)
    # It carries the extrapolation watch, fitted on the frames trained on (isolated atoms dropped).
    from umlipft.models.watch import read_watch

    assert meta["watch"] is True and meta["watch_file"] == "umlipft_watch.json"
    watch = read_watch(result.lammps_model_path)
    assert Path(watch["training_file"]) == Path(config.output_dir) / "data" / "train.extxyz"
    assert sum(e["n_train_atoms"] for e in watch["elements"].values()) == 2 * 170
    # The export runs in LAMMPS (its agreement with mace-torch is the plugin tests' subject).
    from sample_structures import triclinic_water_box
    from umlipft.lammps.singlepoint import lammps_single_point

    lmp = lammps_single_point(triclinic_water_box(), result.lammps_model_path, ["H", "O"])
    assert np.isfinite(lmp.energy) and np.all(np.isfinite(lmp.forces))
    # E0 trap defused: the starting model mace-torch itself built and evaluated (its "Initial"
    # validation line) has the foundation's error, not the isolated-atom shift of ~3600 meV/atom.
    assert result.e0["policy"] == "foundation" and result.e0["isolated_atom_frames_dropped"] == 6
    assert result.initial_valid_rmse_e_meV_per_atom is not None
    assert result.initial_valid_rmse_e_meV_per_atom < FINETUNE_MAX_START_ERROR_MEV_PER_ATOM
    assert result.e0["start_errors"]["isolated-atoms"]["rmse_meV_per_atom"] > 1000
    trained_e0 = model.atomic_energies_fn.atomic_energies.detach().reshape(-1).tolist()
    assert trained_e0[0] == pytest.approx(result.e0["foundation_e0s_eV"]["H"], abs=1e-5)
    prepared = read(Path(config.output_dir) / "data" / "train.extxyz", ":")
    assert all(len(a) > 1 and "REF_energy" in a.info for a in prepared)
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["seed"] == 123
    assert summary["results"]["resumed_from_epoch"] is None and "--restart_latest" not in summary["results"]["mace_arguments"]


@pytest.mark.slow
def test_rerun_of_finished_finetune_does_nothing(finetuned: tuple[FinetuneConfig, FinetuneResult],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config, result = finetuned
    mtime = result.model_path.stat().st_mtime_ns
    again = finetune(config)
    assert again.skipped and again.model_path == result.model_path
    assert result.model_path.stat().st_mtime_ns == mtime
    # The CLI says so too, with the same request spelled as flags.
    rc = main(["finetune", "--foundation", config.foundation, "--train", config.train_file,
               "--valid", str(config.valid_file), "-o", config.output_dir, "--epochs", "1", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert rc == 0 and "nothing to do" in out and "on 1 validation frames" in out


@pytest.mark.slow
def test_different_request_in_same_output_is_refused(finetuned: tuple[FinetuneConfig, FinetuneResult]) -> None:
    config, _ = finetuned
    with pytest.raises(StateError, match="lr"):
        finetune(config.replace(lr=5e-4))
