"""Workflow state, configuration and batch scripts: fast tests without MD or training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from umlipft.errors import ConfigError, StateError
from umlipft.workflows.config import load_workflow_config
from umlipft.workflows.state import WorkflowState

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _write(folder: Path, text: str) -> dict:
    (folder / "out.txt").write_text(text)
    return {"text": text}


def test_finished_stage_is_not_rerun_and_changed_settings_are_refused(tmp_path: Path) -> None:
    calls = []

    def stage(folder: Path, value: int) -> dict:
        calls.append(value)
        return _write(folder, str(value))

    state = WorkflowState(tmp_path)
    state.run("a", {"x": 1}, lambda f: stage(f, 1))
    state.run("b", {"y": 2}, lambda f: stage(f, 2), deps=["a"])
    again = WorkflowState(tmp_path)
    assert again.run("a", {"x": 1}, lambda f: stage(f, 10)) == {"text": "1"}
    assert again.run("b", {"y": 2}, lambda f: stage(f, 20), deps=["a"]) == {"text": "2"}
    assert calls == [1, 2]
    with pytest.raises(StateError, match=r"stage a finished with other settings \(changed: x\).*--from a"):
        WorkflowState(tmp_path).run("a", {"x": 3}, lambda f: stage(f, 3))
    # --from a: a and everything after it run again (b through its dependency on a).
    redo = WorkflowState(tmp_path, from_stage="a")
    assert not (tmp_path / "b").exists()
    redo.run("a", {"x": 3}, lambda f: stage(f, 3))
    redo.run("b", {"y": 2}, lambda f: stage(f, 4), deps=["a"])
    assert calls == [1, 2, 3, 4]
    assert json.loads((tmp_path / "state.json").read_text())["order"] == ["a", "b"]


def test_interrupted_stage_resumes_in_its_folder_or_restarts_when_inputs_changed(tmp_path: Path) -> None:
    def crash(folder: Path) -> dict:
        (folder / "partial").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        WorkflowState(tmp_path).run("s", {"x": 1}, crash)
    seen = {}

    def resume(folder: Path) -> dict:
        seen["partial"] = (folder / "partial").is_file()
        return {}

    WorkflowState(tmp_path).run("s", {"x": 1}, resume)
    assert seen["partial"]  # same inputs: the library finds its partial work
    with pytest.raises(KeyboardInterrupt):
        WorkflowState(tmp_path, from_stage="s").run("s", {"x": 1}, crash)
    WorkflowState(tmp_path).run("s", {"x": 2}, resume)
    assert not seen["partial"]  # other inputs: started afresh


def test_from_unknown_stage_and_until(tmp_path: Path) -> None:
    state = WorkflowState(tmp_path, until="a")
    state.run("a", {}, lambda f: {})
    assert state.reached_until
    with pytest.raises(StateError, match="no such stage"):
        WorkflowState(tmp_path, from_stage="zzz")


def test_profiles_examples_and_config_errors(tmp_path: Path) -> None:
    quick = load_workflow_config(EXAMPLES / "workflow-quick.yaml")
    assert quick.profile == "quick" and quick.label.calculator == "xtb" and quick.md.dtype == "float32"
    assert quick.finetune.start_from == "universal" and quick.subsets() == (5, 10)
    assert (quick.selection, quick.finetune.e0s, quick.finetune.energy_weight) == ("stride", "auto", 100.0)
    assert quick == load_workflow_config(profile="quick").replace(seed=2026)  # the example is the profile
    study = load_workflow_config(EXAMPLES / "workflow-study.yaml")
    assert study.subsets() == (10, 21, 31, 40, 50)
    # the authors' protocol (examples/WORKFLOWS.md): MACE-MP-0b small, 11 frames on a fixed stride,
    # new 300 K velocities at each segment start, the labeller's E0s
    assert (study.foundation, study.frames_per_segment, study.selection) == ("small-0b", 11, "stride")
    assert (study.md.segment_velocities, study.finetune.e0s, study.label.calculator) == ("create", "auto", "cp2k")
    assert study.md.segment_steps * study.md.timestep_fs == 1e6  # 1 ns
    assert (study.evaluation.test_steps + study.evaluation.long_steps) * study.md.timestep_fs == 9e6  # 9 ns
    bad = tmp_path / "bad.yaml"
    bad.write_text("md: {segment_step: 10}\n")
    with pytest.raises(ConfigError, match="unknown key.*segment_step"):
        load_workflow_config(bad)
    bad.write_text("frames_per_segment: 50\n")
    with pytest.raises(ConfigError, match="second half of a segment holds only"):
        load_workflow_config(bad)
    bad.write_text("finetune: {start_from: yesterday}\n")
    with pytest.raises(ConfigError, match="start_from"):
        load_workflow_config(bad)
