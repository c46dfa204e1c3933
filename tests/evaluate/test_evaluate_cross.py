"""Cross-evaluation: every model on every frame set, with a second model whose difference from
the first is known exactly (one E0 shifted), so the matrix entries can be checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tolerances import EVAL_E0_SHIFT_FP32_MEV_PER_ATOM, EVAL_FP32_FORCE_RMSE_REL
from umlipft.errors import InputError
from umlipft.evaluate import cross_evaluate, evaluate_model
from umlipft.io import write_frames
from umlipft.models import load_mace_model

H_SHIFT_EV = 0.05


@pytest.fixture(scope="module")
def shifted_model(small_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    model = load_mace_model(small_model_path)
    index = model.atomic_numbers.tolist().index(1)
    with torch.no_grad():
        model.atomic_energies_fn.atomic_energies[..., index] += H_SHIFT_EV
    path = tmp_path_factory.mktemp("models") / "shiftedH.model"
    torch.save(model, path)
    return path


@pytest.mark.slow
def test_cross_evaluation_matrix(small_model_path: Path, shifted_model: Path, aqueous_dir: Path,
                                 tmp_path: Path) -> None:
    from ase.io import read

    sp = aqueous_dir / "single_points"
    sets = {}
    for name, fname in (("periodicFT1", "Evaluations__Periodic__FT1__dft.extxyz"),
                        ("naive11", "Evaluations__Naive__N-11pts__dft.extxyz")):
        sets[name] = write_frames(tmp_path / f"{name}.extxyz", read(sp / fname, index="0:1"))
    # float32: a third of float64's time, and the matrix's bookkeeping is what is tested here
    # (float64 agreement with the reference figures is test_evaluate_reference's).
    reports = cross_evaluate({"U": small_model_path, "shifted": shifted_model}, sets, dtype="float32")
    assert [(r.model, r.frames) for r in reports] == [
        ("U", "periodicFT1"), ("U", "naive11"), ("shifted", "periodicFT1"), ("shifted", "naive11")]
    by = {(r.model, r.frames): r for r in reports}
    for name, path in sets.items():
        atoms = read(path)
        n_h = int(np.count_nonzero(atoms.numbers == 1))
        a, b = by[("U", name)], by[("shifted", name)]
        expected = H_SHIFT_EV * n_h / len(atoms) * 1000
        assert (b.summary.energy_residual_mean_meV_per_atom - a.summary.energy_residual_mean_meV_per_atom
                == pytest.approx(expected, abs=EVAL_E0_SHIFT_FP32_MEV_PER_ATOM))
        assert b.summary.force_rmse_eV_per_A == pytest.approx(a.summary.force_rmse_eV_per_A, rel=EVAL_FP32_FORCE_RMSE_REL)
        assert a.dtype == b.dtype == "float32"
    # The two frame sets come from different trajectories: the matrix is not one number repeated.
    assert by[("U", "periodicFT1")].per_frame[0].energy_ref_eV != by[("U", "naive11")].per_frame[0].energy_ref_eV


def test_bad_inputs_fail_before_work(small_model_path: Path, aqueous_eval_frames_path: Path, tmp_path: Path) -> None:
    from ase.build import molecule
    from ase.io import read

    with pytest.raises(InputError, match="does not exist"):
        evaluate_model(small_model_path, tmp_path / "missing.extxyz")
    unlabelled = tmp_path / "unlabelled.extxyz"
    write_frames(unlabelled, [molecule("H2O")])
    with pytest.raises(InputError, match="frame 0 has no REF_energy"):
        evaluate_model(small_model_path, unlabelled)
    truncated = tmp_path / "truncated.extxyz"
    truncated.write_text("".join(open(aqueous_eval_frames_path).readlines()[:60]))
    with pytest.raises(InputError, match="cannot read"):
        evaluate_model(small_model_path, truncated)
    # Polonium is one of the five elements MACE-MP-0 was never trained on.
    atoms = read(aqueous_eval_frames_path, 0)
    atoms.numbers[0] = 84
    polonium = tmp_path / "po.extxyz"
    write_frames(polonium, [atoms])
    with pytest.raises(InputError, match="contains Po"):
        evaluate_model(small_model_path, polonium)
