"""``umlipft finetune`` under ``kill -9`` at seeded random moments, and with its finished outputs
damaged.

A killed fine-tune is trained again from epoch 1 (mace-torch cannot continue one exactly), so
each rerun of the chain is a whole run up to the next kill. A moment is drawn on the timeline of
an uninterrupted run and replayed on the attempt's own journal (inputs read, mace-torch started,
each of its metrics records, result.json written) plus the rest of the delay; an attempt that
ends before its moment (faster than the reference) is checked like a chain's end and that part
of the run is tried again at another moment in a new directory. Proven from the driver's
journal (``mace/umlipft-train.log``: one ``$`` line per training started, a ``# umlipft: earlier
training cleared (N epochs had run)`` line per interrupted one) and mace-torch's metrics
records: no training that had validated all its epochs, and no finished fine-tune, is trained
again, and every chain's model is the uninterrupted run's.

The foundation is conftest's tiny_foundation: a two-layer MACE with 8 channels that mace-torch
builds (seeded) for H and O; the driver and mace-torch's training are the same as with MACE-MP-0,
at about a third of the CPU time (measured 22 s against 45-60 s for MACE-MP-0 small), which ten
restarted trainings need. Four 6-atom water frames labelled by that model plus a fixed
perturbation, 2 epochs, float64, no LAMMPS export (the export is its own stage in the
workflows; the reuse of a finished one is checked below).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from kill_trials import Tally, finish_tally, run_chain, run_reference
from reliability_helpers import assert_message, run_umlipft, umlipft_command, umlipft_env

from tolerances import FINETUNE_KILL_PREDICTION_EV, FINETUNE_RESTART_WEIGHT_ABS
from umlipft.io import write_frames

TRIALS = 10
SEED = 1303
EPOCHS = 2
NAME = "finetuned"


def _water_pair(seed: int):
    from ase import Atoms
    from ase.build import molecule

    atoms = Atoms(cell=[6.0, 6.0, 6.0], pbc=True)
    for shift in ([1.5, 1.5, 1.5], [4.5, 4.0, 4.2]):
        water = molecule("H2O")
        water.translate(shift)
        atoms += water
    atoms.rattle(0.08, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def data(tiny_foundation: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(foundation, training frames)."""
    from umlipft.evaluate.predict import ModelEvaluator

    folder = tmp_path_factory.mktemp("kill-finetune")
    foundation = tiny_foundation
    frames = [_water_pair(seed) for seed in range(4)]
    rng = np.random.default_rng(0)
    for atoms, p in zip(frames, ModelEvaluator(foundation, dtype="float64").predict(frames)):
        atoms.info["REF_energy"] = p.energy_eV + 0.01 * len(atoms)
        atoms.arrays["REF_forces"] = p.forces_eV_per_A + rng.normal(0.0, 0.05, p.forces_eV_per_A.shape)
    return foundation, Path(write_frames(folder / "water.extxyz", frames))


def _args(data: tuple[Path, Path], out: Path, *extra: str) -> list:
    foundation, train = data
    return ["finetune", "--foundation", foundation, "--train", train, "-o", out, "--epochs", str(EPOCHS),
            "--batch-size", "1", "--lr", "0.002", "--dtype", "float64", "--e0s", "foundation", "--seed", "5",
            "--no-export", *extra]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("kill-finetune-reference") / "out"
    ref = run_reference(umlipft_command(*_args(data, out)), _progress(out), out.parent / "console.log",
                        env=umlipft_env(), timeout_s=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return out, ref


def _journal(out: Path) -> dict:
    """What the fine-tune's records say: trainings started, interrupted ones cleared (with the
    epochs they had validated), epochs validated by the current training, whether it finished."""
    log = out / "mace" / "umlipft-train.log"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    cleared = [int(line.split("(")[1].split()[0]) for line in lines if line.startswith("# umlipft: earlier training cleared")]
    metrics = out / "mace" / "results" / f"{NAME}_run-5_train.txt"
    validated = 0
    if metrics.is_file():
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                record_ = json.loads(line)
            except ValueError:
                continue  # the line being written at the kill
            validated += record_.get("mode") == "eval" and record_.get("epoch") is not None
    return {"started": sum(line.startswith("$ ") for line in lines), "cleared": cleared, "validated": validated,
            "finished": (out / "result.json").is_file()}


def _progress(out: Path) -> Callable[[], float]:
    """The journal's progress of the attempt that starts now (a killed fine-tune starts over):
    +1 once it wrote request.json (inputs read, E0s decided), +1 once it started mace-torch (a
    ``$`` line), +1 per record mace-torch wrote since, +1 once result.json is written."""
    t0 = time.time()
    log = out / "mace" / "umlipft-train.log"
    metrics = out / "mace" / "results" / f"{NAME}_run-5_train.txt"

    def written(path: Path) -> bool:
        try:
            return path.stat().st_mtime >= t0
        except FileNotFoundError:
            return False

    def starts() -> int:
        try:
            return sum(line.startswith(b"$ ") for line in log.read_bytes().splitlines())
        except FileNotFoundError:
            return 0

    before = starts()

    def progress() -> float:
        value = float(written(out / "request.json")) + float(written(out / "result.json"))
        if starts() > before:
            value += 1.0 + (metrics.read_bytes().count(b"\n") if metrics.is_file() else 0)
        return value

    return progress


def _predictions(model: Path, frames: Path) -> tuple[np.ndarray, np.ndarray]:
    from umlipft.evaluate.predict import ModelEvaluator
    from umlipft.io import read_frames

    out = ModelEvaluator(model, dtype="float64").predict(read_frames(frames))
    return np.array([p.energy_eV for p in out]), np.concatenate([p.forces_eV_per_A for p in out])


def _weights(model: Path) -> dict[str, np.ndarray]:
    from umlipft.models import load_mace_model

    loaded = load_mace_model(model, dtype="float64")
    return {k: v.detach().numpy().copy() for k, v in loaded.state_dict().items() if v.is_floating_point()}


def _same_model(out: Path, reference_out: Path, frames: Path) -> list[str]:
    model = out / f"{NAME}.model"
    if not model.is_file() or not (out / "result.json").is_file():
        return ["no finished model"]
    diffs = []
    ours, theirs = _weights(model), _weights(reference_out / f"{NAME}.model")
    worst = max(float(np.abs(ours[k] - theirs[k]).max(initial=0.0)) for k in theirs) if ours.keys() == theirs.keys() else np.inf
    if worst > FINETUNE_RESTART_WEIGHT_ABS:
        diffs.append(f"weights differ by {worst}")
    (e1, f1), (e2, f2) = _predictions(model, frames), _predictions(reference_out / f"{NAME}.model", frames)
    if max(np.abs(e1 - e2).max(), np.abs(f1 - f2).max()) > FINETUNE_KILL_PREDICTION_EV:
        diffs.append(f"predictions differ by {max(np.abs(e1 - e2).max(), np.abs(f1 - f2).max())}")
    result = json.loads((out / "result.json").read_text())
    if result["model_epoch"] != json.loads((reference_out / "result.json").read_text())["model_epoch"]:
        diffs.append("model epoch")
    return diffs


@pytest.mark.slow
def test_finetune_survives_kill_9_at_random_moments(data, reference, fault_tally_file: Path, tmp_path: Path) -> None:
    reference_out, ref = reference
    tally = Tally("finetune", f"umlipft finetune (tiny MACE, 4 frames, {EPOCHS} epochs)", SEED, reference_s=ref.seconds)
    problems: list[str] = []

    def close(out: Path, code: int | None, console: str, attempts: list) -> None:
        """A chain that ended: its model against the reference's; its journal for repeated work
        (a training cleared by a rerun after it had validated every epoch was finished work, and
        so is any training started after result.json was written)."""
        killed = [t for t in attempts if t.killed]
        different = _same_model(out, reference_out, data[1]) if code == 0 else []
        journal = _journal(out)
        repeated = [f"a training that had run all {EPOCHS} epochs was trained again"
                    for n in journal["cleared"] if n >= EPOCHS]
        repeated += [f"trial {b.moment.trial}: trained again after it had finished"
                     for a, b in zip(killed, killed[1:]) if a.snapshot["finished"]
                     and b.snapshot["started"] != a.snapshot["started"]]
        tally.repeated_work += len(repeated)
        tally.silent_wrong += int(code == 0 and bool(different))
        if code == 0 and not different and not repeated and not any(t.orphans for t in killed):
            tally.survived += len(killed)
        else:
            problems.append(f"{out}: exit {code}; {different}; {repeated}; {journal}\n{console[-3000:]}")

    trials = run_chain(lambda out: umlipft_command(*_args(data, out)), ref, TRIALS, SEED,
                       lambda k: tmp_path / f"chain-{k}", _progress, _journal, close, tmp_path / "console.log",
                       env=umlipft_env(), timeout_s=900)
    killed = finish_tally(tally, trials, fault_tally_file, lambda t: t.snapshot,
                          ended_early=" (chain closed, that part tried again in a new directory)")

    assert tally.trials == TRIALS, [(t.moment, t.returncode) for t in trials]
    assert not tally.orphans, [t.orphans for t in killed]
    assert not problems, problems


def test_a_training_killed_after_its_last_epoch_is_not_trained_again(data, reference, tmp_path: Path) -> None:
    """What a kill leaves between mace-torch's last epoch and the driver's result.json (mace-torch
    then compiles the model and evaluates every frame once more: seconds to minutes): every epoch
    validated, mace/NAME.model written, no result. The rerun trained it all again (found by the
    kill trials); it now uses that model, which is the uninterrupted run's."""
    reference_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(reference_out, out)
    for name in ("result.json", "summary.json", f"{NAME}.model"):
        (out / name).unlink()
    done = run_umlipft(*_args(data, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ran all 2 epochs and mace-torch wrote its model" in done.stderr
    journal = _journal(out)
    assert journal["started"] == 1 and journal["cleared"] == [] and journal["finished"]
    assert _same_model(out, reference_out, data[1]) == []
    # Cut by the kill while mace-torch wrote it: trained again, from epoch 1.
    for name in ("result.json", "summary.json", f"{NAME}.model"):
        (out / name).unlink()
    trained = out / "mace" / f"{NAME}.model"
    trained.write_bytes(trained.read_bytes()[:1000])
    done = run_umlipft(*_args(data, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _journal(out)["started"] == 2 and _same_model(out, reference_out, data[1]) == []


# ------------------------------------------------------------------------------ damaged outputs
@pytest.mark.parametrize("how", ["truncate", "edit", "delete"])
def test_a_damaged_model_of_a_finished_finetune_is_refused(data, reference, tmp_path: Path, how: str) -> None:
    """Before: a cut or edited NAME.model was handed on as the finished model (exit 0), a deleted
    one trained again as if interrupted."""
    reference_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(reference_out, out)
    model = out / f"{NAME}.model"
    original = model.read_bytes()
    if how == "truncate":
        model.write_bytes(original[: len(original) // 2])
    elif how == "edit":
        changed = bytearray(original)
        changed[len(changed) // 2] ^= 0xFF
        model.write_bytes(bytes(changed))
    else:
        model.unlink()
    done = run_umlipft(*_args(data, out))
    what = {"truncate": "bytes instead of", "edit": "differs from what the fine-tune wrote", "delete": "is missing"}[how]
    assert_message(done, model, what, f"delete {out}")
    assert _journal(out)["started"] == 1  # nothing trained again
    model.write_bytes(original)  # put back, it is reused as it is
    again = run_umlipft(*_args(data, out))
    assert again.returncode == 0 and "already holds this finished fine-tune" in again.stdout, again.stderr[-2000:]
