"""``umlipft workflow`` under ``kill -9`` at seeded random moments, and with a finished stage's
outputs damaged.

The tiny workflow of tests/workflows/tiny_workflow.py, periodic, up to the first fine-tuned
model's export (``--until export/FT1 --no-judge``: one stage of every kind: start, export, md,
extract, label, finetune, export), on pure water (6 molecules) with conftest's tiny MACE as the
foundation, so that a run is a minute of CPU, not four (MACE-MP-0 small and xTB on the LiCl/CoCl2
box: 80 CPU s and 220 s of wall time here). One chain of ten kills of the whole process group
against an uninterrupted run. Proven from the workflow's records: a stage done at a kill keeps
its attempt count (state.json), no labelled frame is labelled again (the frames' attempts.log,
journal.jsonl's label calls), no training that had finished is trained again (journal.jsonl's
finetune calls and returns, mace-torch's metrics records), and every stage's outputs equal the
uninterrupted run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from kill_trials import Tally, finish_tally, run_chain, run_reference
from reliability_helpers import assert_message, run_umlipft, umlipft_command, umlipft_env

from tolerances import (FINETUNE_KILL_PREDICTION_EV, LABEL_RESUME_ENERGY_EV, LABEL_RESUME_FORCE_EV_A,
                        WORKFLOW_CONTINUITY_POSITION_A)
from umlipft.io import read_frames

TRIALS = 10
SEED = 1304
UNTIL = "export/FT1"
MD, LABEL, FT = "periodic/seg-00/md", "periodic/seg-00/label", "periodic/ft-01"


def _config_text(foundation: Path) -> str:
    """tiny_workflow.TINY on water alone, without its adaptive section (not run here)."""
    from tiny_workflow import TINY

    lines = [line for line in TINY.format(model=foundation).splitlines() if not line.startswith("adaptive:")]
    lines = [("system: {system: aqueous, n_water: 6, n_licl: 0, n_cocl2: 0}" if line.startswith("system:")
              else line) for line in lines]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def config(tiny_foundation: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflows"))
    path = tmp_path_factory.mktemp("kill-workflow") / "tiny.yaml"
    path.write_text(_config_text(tiny_foundation))
    return path


def _args(config: Path, root: Path) -> list:
    return ["workflow", "periodic", "--config", config, "-o", root, "--until", UNTIL, "--no-judge"]


def _events(root: Path) -> list[dict]:
    try:
        text = (root / "journal.jsonl").read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # the line being written at the kill
    return out


def _progress(root: Path) -> float:
    """The journal's progress: 1000 per finished stage, plus the running stages' own progress
    (MD thermo rows, labelled frames, mace-torch's metrics records), +1000 once the workflow's
    summary is written."""
    done = sum(1 for e in _events(root) if e["event"] == "stage_done")
    inner = 0
    for log in root.glob("periodic/seg-00/md/md/log.lammps.*"):
        inner += log.read_bytes().count(b"\n") // 50
    inner += 10 * sum(1 for _ in root.glob("periodic/seg-00/label/work/frame_*/result.extxyz"))
    metrics = root / FT / "model" / "mace" / "results"
    for path in metrics.glob("*_train.txt"):
        inner += path.read_bytes().count(b"\n")
    return 1000.0 * done + min(inner, 999) + 1000.0 * (root / "summary.json").is_file()


def _snapshot(root: Path) -> dict:
    """What a rerun finds: each stage's status and attempts, each frame's worker starts and
    result, and whether the fine-tune's training had validated every epoch."""
    from umlipft.label.core import attempts

    try:
        stages = json.loads((root / "state.json").read_text())["stages"]
    except (FileNotFoundError, ValueError):
        stages = {}
    work = root / LABEL / "work"
    frames = {p.name: (attempts(work, int(p.name.split("_")[1])), (p / "result.extxyz").is_file())
              for p in sorted(work.glob("frame_*"))}
    metrics = list((root / FT / "model" / "mace" / "results").glob("*_train.txt"))
    validated = 0
    if metrics:
        for line in metrics[0].read_text(errors="replace").splitlines():
            try:
                validated += json.loads(line).get("mode") == "eval" and json.loads(line).get("epoch") is not None
            except ValueError:
                pass
    return {"stages": {k: (v["status"], v.get("attempts")) for k, v in stages.items()}, "frames": frames,
            "ft_validated": validated, "ft_model": (root / FT / "model" / "mace" / "FT1.model").is_file(),
            "ft_result": (root / FT / "model" / "result.json").is_file()}


def _repeated(root: Path, killed: list) -> list[str]:
    """Finished work done again, from the records (see the module's docstring)."""
    from umlipft.workflows.runner import counts

    problems = []
    final = _snapshot(root)
    for t in killed:
        for name, (status, count) in t.snapshot["stages"].items():
            if status == "done" and final["stages"].get(name) != (status, count):
                problems.append(f"stage {name}, done at trial {t.moment.trial}, ran again: {final['stages'].get(name)}")
    for frame, (count, result) in final["frames"].items():
        done_at = [t.snapshot["frames"][frame] for t in killed if t.snapshot["frames"].get(frame, (0, False))[1]]
        if done_at and done_at[0][0] != count:
            problems.append(f"{frame} labelled again after it had a result: {done_at[0][0]} -> {count} attempts")
    for stage, calls in counts(root)["labelled_by_call"].items():
        flat = [i for call in calls for i in call]
        if len(flat) != len(set(flat)):
            problems.append(f"{stage}: a frame labelled by two calls: {calls}")
    returns = [e for e in _events(root) if e["event"] == "finetune_return" and e["stage"] == FT]
    trained = [e for e in returns if e["epochs_run"] > 0]
    if len(trained) > 1:
        problems.append(f"{FT} trained {len(trained)} times to the end")
    # mace-torch had validated every epoch (1) and written its model, the driver not yet its result
    complete = [t for t in killed if t.snapshot["ft_validated"] >= 1 and t.snapshot["ft_model"]
                and not t.snapshot["ft_result"]]
    if complete and trained:
        problems.append(f"{FT}: its training had finished (trial {complete[0].moment.trial}) and was trained again")
    return problems


def _result(root: Path, stage: str) -> dict:
    return json.loads((root / "state.json").read_text())["stages"][stage]["result"]


def _compare(root: Path, reference: Path) -> tuple[int, list[str]]:
    """(reference frames and rows missing from ``root``'s outputs, what differs)."""
    lost, diffs = 0, []
    try:
        ours = {s: _result(root, s) for s in (MD, LABEL, FT)}
    except (FileNotFoundError, KeyError):
        return 0, ["stages not finished"]
    theirs = {s: _result(reference, s) for s in (MD, LABEL, FT)}
    a, b = read_frames(root / ours[MD]["trajectories"][0]), read_frames(reference / theirs[MD]["trajectories"][0])
    lost += max(0, len(b) - len(a))
    if len(a) != len(b) or any(np.abs(x.positions - y.positions).max() > WORKFLOW_CONTINUITY_POSITION_A
                               for x, y in zip(a, b)):
        diffs.append("trajectory")
    rows_a = (root / ours[MD]["thermo"][0]).read_text().splitlines()
    rows_b = (reference / theirs[MD]["thermo"][0]).read_text().splitlines()
    lost += max(0, len(rows_b) - len(rows_a))
    if len(rows_a) != len(rows_b):
        diffs.append("thermo rows")
    a, b = read_frames(root / ours[LABEL]["labelled"]), read_frames(reference / theirs[LABEL]["labelled"])
    lost += max(0, len(b) - len(a))
    if len(a) != len(b) or any(abs(x.info["REF_energy"] - y.info["REF_energy"]) > LABEL_RESUME_ENERGY_EV
                               or np.abs(x.arrays["REF_forces"] - y.arrays["REF_forces"]).max()
                               > LABEL_RESUME_FORCE_EV_A for x, y in zip(a, b)):
        diffs.append("labels")
    from umlipft.evaluate.predict import ModelEvaluator

    frames = read_frames(reference / theirs[LABEL]["labelled"])
    p = ModelEvaluator(root / ours[FT]["model"], dtype="float64").predict(frames)
    q = ModelEvaluator(reference / theirs[FT]["model"], dtype="float64").predict(frames)
    worst = max(max(abs(x.energy_eV - y.energy_eV), float(np.abs(x.forces_eV_per_A - y.forces_eV_per_A).max()))
                for x, y in zip(p, q))
    if worst > FINETUNE_KILL_PREDICTION_EV:
        diffs.append(f"FT1 predictions differ by {worst}")
    return lost, diffs


@pytest.fixture(scope="module")
def reference(config: Path):
    root = config.parent / "reference"
    ref = run_reference(umlipft_command(*_args(config, root)), lambda: _progress(root), config.parent / "reference.log",
                        env=umlipft_env(), timeout_s=1200)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return root, ref


@pytest.mark.slow
def test_workflow_survives_kill_9_at_random_moments(config: Path, reference, fault_tally_file: Path,
                                                    tmp_path: Path) -> None:
    reference_root, ref = reference
    tally = Tally("workflow", f"umlipft workflow periodic --until {UNTIL} (tiny, water, tiny MACE)", SEED,
                  reference_s=ref.seconds)
    problems: list[str] = []

    def close(root: Path, code: int | None, console: str, attempts: list) -> None:
        killed = [t for t in attempts if t.killed]
        repeated = _repeated(root, killed) if (root / "state.json").is_file() else []
        lost, diffs = _compare(root, reference_root) if code == 0 else (0, [])
        tally.repeated_work += len(repeated)
        tally.frames_lost += lost
        tally.silent_wrong += int(code == 0 and bool(diffs))
        if code == 0 and not diffs and not repeated and not any(t.orphans for t in killed):
            tally.survived += len(killed)
        else:
            problems.append(f"{root}: exit {code}; {repeated}; {diffs}; {lost} lost\n{console[-3000:]}")

    trials = run_chain(lambda root: umlipft_command(*_args(config, root)), ref, TRIALS, SEED,
                       lambda k: tmp_path / f"chain-{k}", lambda root: (lambda: _progress(root)), _snapshot, close,
                       tmp_path / "console.log", env=umlipft_env(), timeout_s=1200)
    killed = finish_tally(tally, trials, fault_tally_file,
                          lambda t: {"running": [n for n, (s, _) in t.snapshot["stages"].items() if s != "done"]})

    assert tally.trials == TRIALS
    assert not tally.orphans, [t.orphans for t in killed]
    assert not problems, problems


def test_a_stage_killed_after_its_training_finished_is_not_trained_again(config: Path, reference,
                                                                        tmp_path: Path) -> None:
    """What a kill leaves between mace-torch's last epoch and the fine-tune's result.json (mace-torch
    then compiles the model and evaluates every frame again): the stage running, its training's
    metrics complete and mace/FT1.model written. The stage removed the fine-tune's folder and
    trained it all again (found by reading, after the fine-tune kill trials found the same in the
    driver); now the driver uses that model, the uninterrupted training's."""
    reference_root, _ = reference
    root = tmp_path / "wf"
    shutil.copytree(reference_root, root)
    state = json.loads((root / "state.json").read_text())
    entry = state["stages"][FT]
    entry["status"] = "running"
    for key in ("result", "outputs", "wall_s"):
        entry.pop(key, None)
    state["stages"].pop(UNTIL)
    state["order"].remove(UNTIL)
    (root / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    shutil.rmtree(root / UNTIL)
    for name in ("result.json", "summary.json", "FT1.model"):
        (root / FT / "model" / name).unlink()
    (root / "summary.json").unlink()
    request = root / FT / "model" / "request.json"  # the copy stands where the original ran
    request.write_text(request.read_text().replace(str(reference_root), str(root)))
    done = run_umlipft(*_args(config, root), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    returns = [e for e in _events(root) if e["event"] == "finetune_return"]
    assert returns[-1]["epochs_run"] == 0, returns  # not trained again
    assert _compare(root, reference_root) == (0, [])


# ------------------------------------------------------------------------------ damaged outputs
@pytest.mark.parametrize("stage, key", [(MD, "trajectories"), (FT, "model")])
@pytest.mark.parametrize("how", ["truncate", "edit", "delete"])
def test_a_damaged_output_of_a_finished_stage_is_refused(config: Path, reference, tmp_path: Path, stage: str,
                                                         key: str, how: str) -> None:
    """The md and finetune stages' outputs (the label stage's: tests/workflows/
    test_workflow_verified_resume.py): the rerun stops naming the file, what changed and
    ``--from STAGE``, and runs nothing."""
    reference_root, _ = reference
    root = tmp_path / "wf"
    shutil.copytree(reference_root, root)
    result = _result(root, stage)
    path = root / (result[key][0] if isinstance(result[key], list) else result[key])
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "edit":
        changed = bytearray(data)
        changed[len(changed) // 2] ^= 0x01
        path.write_bytes(bytes(changed))
    else:
        path.unlink()
    before = (root / "journal.jsonl").read_text()
    done = run_umlipft(*_args(config, root))
    what = {"truncate": "changed size", "edit": "changed content", "delete": "is missing"}[how]
    assert_message(done, path, what, f"--from {stage}")
    assert (root / "journal.jsonl").read_text() == before  # no stage ran
