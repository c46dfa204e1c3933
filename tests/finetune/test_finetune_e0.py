"""The E0 trap, on the study's aqueous training sets (which carry IsolatedAtom frames)."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import numpy as np
import pytest
from ase.io import read

from tolerances import FINETUNE_MAX_START_ERROR_MEV_PER_ATOM
from umlipft.errors import InputError
from umlipft.evaluate.predict import ModelEvaluator
from umlipft.finetune import FinetuneConfig, decide_e0s, finetune, foundation_e0s, isolated_atom_energies
from umlipft.finetune.e0 import ANCHORED, check_e0_policy, default_e0_policy, e0_policy_needs_isolated_atoms
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


# --------------------------------------------------------------------------------------------
# Labels from another code (xTB here, CP2K in the study profile): the anchored policy


def cluster(name: str, n: int, seed: int, spacing: float):
    """n copies of a small molecule on a cubic grid, randomly oriented and rattled (non-periodic)."""
    from ase import Atoms
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    k = int(np.ceil(n ** (1 / 3)))
    atoms = Atoms()
    for point in [(i, j, m) for i in range(k) for j in range(k) for m in range(k)][:n]:
        mol = molecule(name)
        mol.rotate(rng.uniform(0, 360), rng.normal(size=3))
        mol.translate(np.array(point) * spacing)
        atoms += mol
    atoms.rattle(0.05, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def xtb_labelled(tmp_path_factory: pytest.TempPathFactory, small_model_path: Path, foundation):
    """Water clusters and, of another H:O ratio, hydrogen peroxide clusters, labelled with GFN2-xTB
    through umlipft label, the labeller's isolated H and O atoms, and the foundation's energies."""
    from umlipft.label import LabelConfig, label_frames
    from umlipft.label.isolated import IsolatedAtomsConfig, label_isolated_atoms

    tmp = tmp_path_factory.mktemp("xtb-e0")
    water = [cluster("H2O", 8, seed, 3.0) for seed in range(3)]
    peroxide = [cluster("H2O2", 4, 10 + seed, 3.5) for seed in range(2)]
    raw = write_frames(tmp / "frames.extxyz", water + peroxide)
    report = label_frames(LabelConfig(frames=raw, calculator="xtb", output=tmp / "labelled.extxyz"))
    assert report.complete, report.failed
    labelled = read(report.output, ":")
    iso = label_isolated_atoms(IsolatedAtomsConfig(calculator="xtb"), ["H", "O"], tmp / "isolated")
    evaluator = ModelEvaluator(small_model_path, dtype="float32", loaded=copy.deepcopy(foundation))
    energies = [p.energy_eV for p in evaluator.predict(labelled)]
    train_path = write_frames(tmp / "water.extxyz", labelled[:3])
    return {"water": (labelled[:3], energies[:3]), "peroxide": (labelled[3:], energies[3:]),
            "isolated": isolated_atom_energies(read(iso.output, ":"), "REF_energy"),
            "isolated_file": iso.output, "train_file": Path(train_path)}


def start_error_meV_per_atom(frames, energies, decision, foundation_e0) -> np.ndarray:
    """(E_model - E_ref)/N of the starting model with this decision's E0s, on any frames."""
    from ase.data import atomic_numbers

    out = []
    for atoms, energy in zip(frames, energies):
        shift = sum(decision.e0s_eV[s] - foundation_e0[atomic_numbers[s]] for s in atoms.get_chemical_symbols())
        out.append((energy + shift - atoms.info["REF_energy"]) / len(atoms) * 1000)
    return np.array(out)


def test_anchored_e0s_fit_other_code_labels_and_transfer(foundation, xtb_labelled) -> None:
    frames, energies = xtb_labelled["water"]
    assert {a.info["label_calculator"] for a in frames} == {"xtb"}
    e0_found = foundation_e0s(foundation)
    kwargs = dict(frames=frames, foundation_energies_eV=energies, foundation_e0=e0_found,
                  isolated=xtb_labelled["isolated"], energy_key="REF_energy", max_start_error_meV_per_atom=100.0,
                  accept_large_start_error=False, isolated_frames_dropped=0, labeller="xtb")
    anchored = decide_e0s(policy="auto", **kwargs)
    assert anchored.policy == ANCHORED and anchored.requested_policy == "auto"
    assert "labels from xtb" in anchored.reason
    assert anchored.chosen_start_rmse_meV_per_atom < 50.0
    assert anchored.start_errors["foundation"].rmse_meV_per_atom > 10_000  # another absolute scale
    # E0 = the labeller's isolated-atom energy + the fitted correction, passed to mace-torch as is
    for el, z in (("H", 1), ("O", 8)):
        assert anchored.e0s_eV[el] == pytest.approx(xtb_labelled["isolated"][z] + anchored.corrections_eV[el])
    assert ast.literal_eval(anchored.mace_e0s_argument) == pytest.approx({1: anchored.e0s_eV["H"],
                                                                         8: anchored.e0s_eV["O"]})
    estimated = decide_e0s(policy="estimated", **kwargs)
    # Both fits meet the water frames equally well; the anchored one moves the E0s far less...
    assert estimated.chosen_start_rmse_meV_per_atom == pytest.approx(anchored.chosen_start_rmse_meV_per_atom,
                                                                     abs=1e-3)
    assert np.linalg.norm(list(anchored.corrections_eV.values())) < 0.25 * np.linalg.norm(
        list(estimated.corrections_eV.values()))
    # ...so it transfers to a composition it never saw (H2O2) an order of magnitude better.
    other, other_energies = xtb_labelled["peroxide"]
    err_anchored = np.abs(start_error_meV_per_atom(other, other_energies, anchored, e0_found)).max()
    err_estimated = np.abs(start_error_meV_per_atom(other, other_energies, estimated, e0_found)).min()
    assert err_anchored < 0.2 * err_estimated
    with pytest.raises(InputError, match=r"isolated-atoms-fitted: \d.*different absolute scale.*"
                                         r"Fix: use e0s: isolated-atoms-fitted"):
        decide_e0s(policy="foundation", **kwargs)
    # Without the labeller's isolated atoms the anchored policy says how to get them.
    with pytest.raises(InputError, match="umlipft label --isolated-atoms --elements H O --calculator xtb"):
        decide_e0s(policy="auto", **{**kwargs, "isolated": {}})


def test_auto_resolution_and_policy_checks(foundation, checked) -> None:
    assert default_e0_policy("vasp")[0] == "foundation"
    for code in ("cp2k", "espresso", "xtb"):
        policy, why = default_e0_policy(code)
        assert policy == ANCHORED and code in why and e0_policy_needs_isolated_atoms("auto", code)
    assert default_e0_policy(None)[0] == "auto" and not e0_policy_needs_isolated_atoms("auto", "vasp")
    with pytest.raises(InputError, match="unknown labeller"):
        default_e0_policy("gaussian")

    # Labeller unknown (the study's VASP files carry no label_calculator): decided from the data.
    frames, check, energies = checked[TRAINING_SETS[1]]
    isolated = isolated_atom_energies(frames, "REF_energy")
    kwargs = dict(foundation_energies_eV=energies, foundation_e0=foundation_e0s(foundation),
                  energy_key="REF_energy", max_start_error_meV_per_atom=100.0, accept_large_start_error=False,
                  isolated_frames_dropped=6)
    same_scale = decide_e0s(policy="auto", frames=check, isolated=isolated, **kwargs)
    assert same_scale.policy == "foundation" and "labeller unknown" in same_scale.reason
    assert set(same_scale.start_errors) == {"foundation", "isolated-atoms", ANCHORED, "estimated"}
    shifted = [a.copy() for a in check]
    for atoms in shifted:  # another code's scale: every O 2 eV lower
        atoms.info["REF_energy"] -= 2.0 * np.count_nonzero(atoms.numbers == 8)
    shifted_iso = {**isolated, 8: isolated[8] - 2.0}
    assert decide_e0s(policy="auto", frames=shifted, isolated=shifted_iso, **kwargs).policy == ANCHORED
    no_iso = decide_e0s(policy="auto", frames=shifted, isolated={}, **kwargs)
    assert no_iso.policy == "estimated" and "no isolated-atom energies" in no_iso.reason
    assert no_iso.start_errors_unavailable[ANCHORED].startswith("no isolated-atom energy for")
    assert decide_e0s(policy="auto", frames=check, isolated=isolated, labeller="vasp", **kwargs).policy == "foundation"

    # What `umlipft workflow --check` refuses before anything runs.
    assert any("1e5 meV/atom" in p and ANCHORED in p for p in check_e0_policy("foundation", "cp2k"))
    assert check_e0_policy("foundation", "xtb") and check_e0_policy("foundation", "espresso")
    assert any("fitted values" in p for p in check_e0_policy("isolated-atoms", "vasp"))
    for policy, code in (("foundation", "vasp"), (ANCHORED, "cp2k"), (ANCHORED, "vasp"), ("estimated", "xtb"),
                         ("auto", "cp2k")):
        assert check_e0_policy(policy, code) == [], (policy, code)
    # a foundation that is itself a fine-tune on CP2K labels is on CP2K's scale
    assert check_e0_policy("foundation", "cp2k", foundation_labeller="cp2k") == []
    assert check_e0_policy("bogus", "cp2k") and check_e0_policy("auto", "gaussian")


def test_driver_anchored_e0s_need_and_take_isolated_atoms(small_model_path: Path, xtb_labelled,
                                                          tmp_path: Path) -> None:
    base = dict(train_file=str(xtb_labelled["train_file"]), foundation=str(small_model_path), e0_check_frames=3)
    assert FinetuneConfig(**base).e0s == "auto"
    out = tmp_path / "refused"
    with pytest.raises(InputError, match="labels from xtb.*umlipft label --isolated-atoms --elements H O"):
        finetune(FinetuneConfig(output_dir=str(out), **base))
    with pytest.raises(InputError, match="labeller: vasp, but the training frames say .* xtb"):
        finetune(FinetuneConfig(output_dir=str(out), labeller="vasp", **base))
    with pytest.raises(InputError, match="different absolute scale"):
        finetune(FinetuneConfig(output_dir=str(out), e0s="foundation", **base))
    assert not out.exists()  # refused before anything was written or trained


@pytest.mark.slow
def test_driver_records_anchored_e0s(small_model_path: Path, xtb_labelled, tmp_path: Path) -> None:
    import json

    from umlipft.models import load_mace_model

    out = tmp_path / "out"
    result = finetune(FinetuneConfig(train_file=str(xtb_labelled["train_file"]), foundation=str(small_model_path),
                                     isolated_atoms_file=str(xtb_labelled["isolated_file"]), output_dir=str(out),
                                     epochs=1, batch_size=1, e0_check_frames=3, export=False, dtype="float32"))
    e0 = result.e0
    assert e0["policy"] == ANCHORED and e0["requested_policy"] == "auto" and "xtb" in e0["reason"]
    assert e0["labeller"] == "xtb" and set(e0["start_errors"]) == {"foundation", "isolated-atoms", ANCHORED,
                                                                   "estimated"}
    assert e0["chosen_start_rmse_meV_per_atom"] < 50.0
    # mace-torch's own starting model agrees with the prediction (its second guard passed)
    assert result.initial_valid_rmse_e_meV_per_atom < 50.0
    summary = json.loads((out / "summary.json").read_text())["results"]
    assert summary["e0_policy"] == ANCHORED and summary["e0_reason"] == e0["reason"]
    assert summary["e0"]["e0s_eV"] == e0["e0s_eV"]
    model = load_mace_model(result.model_path)
    trained = dict(zip(model.atomic_numbers.tolist(),
                       model.atomic_energies_fn.atomic_energies.detach().reshape(-1).tolist()))
    assert trained[1] == pytest.approx(e0["e0s_eV"]["H"], abs=1e-4)
    assert trained[8] == pytest.approx(e0["e0s_eV"]["O"], abs=1e-4)
