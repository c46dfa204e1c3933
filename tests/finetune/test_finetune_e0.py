"""The E0 trap, on the study's aqueous training sets (which carry IsolatedAtom frames)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from ase.io import read

from tolerances import FINETUNE_MAX_START_ERROR_MEV_PER_ATOM
from umlipft.errors import InputError
from umlipft.evaluate.predict import ModelEvaluator
from umlipft.finetune import FinetuneConfig, decide_e0s, finetune, foundation_e0s, isolated_atom_energies
from umlipft.io import write_frames
from umlipft.models import load_mace_model

TRAINING_SETS = ("Finetuning__Naive__Finetuned_Models__11pts__11pt_dataset.xyz",
                 "Finetuning__Periodic__FT2__model__ft_dataset.xyz")


@pytest.fixture(scope="module")
def foundation(small_model_path: Path):
    return load_mace_model(small_model_path)


@pytest.fixture(scope="module")
def checked(aqueous_dir: Path, small_model_path: Path, foundation) -> dict[str, tuple[list, list, list[float]]]:
    """Per training set: (all frames, 2 check frames, the foundation's energies on them). The
    foundation is evaluated once per frame (float32, as the driver's own check), for all tests."""
    evaluator = ModelEvaluator(small_model_path, dtype="float32", loaded=copy.deepcopy(foundation))
    out = {}
    for name in TRAINING_SETS:
        frames = read(aqueous_dir / "training_sets" / name, ":")
        check = [a for a in frames if len(a) > 1][:2]
        out[name] = (frames, check, [p.energy_eV for p in evaluator.predict(check)])
    return out


@pytest.mark.parametrize("name", TRAINING_SETS)
def test_isolated_atom_e0s_would_wreck_the_start(name: str, foundation, checked) -> None:
    frames, check, energies = checked[name]
    isolated = isolated_atom_energies(frames, "REF_energy")
    assert isolated[1] == pytest.approx(-1.1172191) and isolated[27] == pytest.approx(-0.8173899)
    e0_found = foundation_e0s(foundation)
    # MACE-MP-0's E0s are fitted values, far from isolated-atom DFT energies.
    assert e0_found[1] == pytest.approx(-3.667, abs=1e-3) and e0_found[8] == pytest.approx(-7.285, abs=1e-3)
    decision = decide_e0s(policy="foundation", frames=check, foundation_energies_eV=energies,
                          foundation_e0=e0_found, isolated=isolated, energy_key="REF_energy",
                          max_start_error_meV_per_atom=100.0, accept_large_start_error=False,
                          isolated_frames_dropped=6)
    assert decision.mace_e0s_argument == "foundation"
    assert decision.chosen_start_rmse_meV_per_atom < FINETUNE_MAX_START_ERROR_MEV_PER_ATOM
    # The predicted isolated-atom start is the foundation error plus sum_i dE0(Z_i)/N, by hand:
    counts = {z: int(np.count_nonzero(check[0].numbers == z)) for z in set(check[0].numbers.tolist())}
    shift = sum(n * (isolated[z] - e0_found[z]) for z, n in counts.items()) / len(check[0]) * 1000
    assert shift > 3000
    iso = decision.start_errors["isolated-atoms"]
    assert iso.mean_meV_per_atom == pytest.approx(decision.start_errors["foundation"].mean_meV_per_atom + shift,
                                                  rel=1e-6)
    with pytest.raises(InputError, match=r"fitted values.*Fix: use e0s: (foundation|estimated)"):
        decide_e0s(policy="isolated-atoms", frames=check, foundation_energies_eV=energies,
                   foundation_e0=e0_found, isolated=isolated, energy_key="REF_energy",
                   max_start_error_meV_per_atom=100.0, accept_large_start_error=False,
                   isolated_frames_dropped=6)
    accepted = decide_e0s(policy="isolated-atoms", frames=check, foundation_energies_eV=energies,
                          foundation_e0=e0_found, isolated=isolated, energy_key="REF_energy",
                          max_start_error_meV_per_atom=100.0, accept_large_start_error=True,
                          isolated_frames_dropped=6)
    assert accepted.accepted_large_start_error and accepted.mace_e0s_argument.startswith("{1: -1.1172191")


def test_labels_on_another_scale_suggest_estimated(foundation, checked) -> None:
    # Labels from another code sit on another absolute scale; here every O carries -2 eV extra.
    _, check, energies = checked[TRAINING_SETS[1]]
    frames = [a.copy() for a in check]
    for atoms in frames:
        atoms.info["REF_energy"] -= 2.0 * np.count_nonzero(atoms.numbers == 8)
    kwargs = dict(frames=frames, foundation_energies_eV=energies, foundation_e0=foundation_e0s(foundation),
                  isolated={}, energy_key="REF_energy", max_start_error_meV_per_atom=100.0,
                  accept_large_start_error=False, isolated_frames_dropped=0)
    with pytest.raises(InputError, match="different absolute scale.*Fix: use e0s: estimated"):
        decide_e0s(policy="foundation", **kwargs)
    estimated = decide_e0s(policy="estimated", **kwargs)
    assert estimated.chosen_start_rmse_meV_per_atom < FINETUNE_MAX_START_ERROR_MEV_PER_ATOM


def test_driver_refuses_isolated_atom_e0s_before_training(small_model_path: Path, aqueous_dir: Path,
                                                          tmp_path: Path) -> None:
    train = aqueous_dir / "training_sets" / "Finetuning__Periodic__FT1__model__ft_dataset.xyz"
    out = tmp_path / "out"
    config = FinetuneConfig(train_file=str(train), foundation=str(small_model_path), output_dir=str(out),
                            e0s="isolated-atoms", e0_check_frames=1)
    with pytest.raises(InputError, match="isolated-atom energies shifts"):
        finetune(config)
    assert not out.exists()  # refused before anything was written or trained


def test_bad_training_input_fails_before_work(small_model_path: Path, aqueous_dir: Path, tmp_path: Path) -> None:
    from ase.build import molecule

    out = tmp_path / "out"
    base = dict(foundation=str(small_model_path), output_dir=str(out))
    with pytest.raises(InputError, match="does not exist"):
        finetune(FinetuneConfig(train_file=str(tmp_path / "nope.xyz"), **base))
    water = molecule("H2O", vacuum=5.0)
    unlabelled = write_frames(tmp_path / "unlabelled.extxyz", [water, water])
    with pytest.raises(InputError, match="frame 0 has no REF_energy"):
        finetune(FinetuneConfig(train_file=str(unlabelled), **base))
    atoms = read(aqueous_dir / "training_sets" / "Finetuning__Periodic__FT1__model__U_raw.xyz", 0)
    atoms.numbers[0] = 84  # Po: not among MACE-MP-0's elements
    polonium = write_frames(tmp_path / "po.extxyz", [atoms])
    with pytest.raises(InputError, match="contains Po"):
        finetune(FinetuneConfig(train_file=str(polonium), **base))
    assert not out.exists()
