"""The adaptive workflow driven by the in-run extrapolation watch, end to end with real LAMMPS
(compute mace/q, watch.in), xTB and mace-torch, at the tiny workflow's sizes.

Segment 0 runs with U (no watch); AD1's export carries a watch fitted on AD1's two training
frames, and segment 1 runs with it until the watch fires. The frames labelled are the flagged
ones and those before the halt; AD2 is trained on them, and segment 2 continues the SAME
trajectory from the halted state with AD2. (With two training frames an element's halting limit
is fitted on two atoms' Q, so the watch fires early here: a measured property of the tiny data,
checked below, not of the study's.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tolerances import WORKFLOW_CONTINUITY_POSITION_A, WORKFLOW_CONTINUITY_VELOCITY

from umlipft.io import read_frames
from umlipft.workflows.config import load_workflow_config
from umlipft.workflows.runner import run_workflow

from tiny_workflow import TINY


def _wrapped_delta(a: np.ndarray, b: np.ndarray, cell: np.ndarray) -> np.ndarray:
    frac = np.linalg.solve(cell.T, (a - b).T).T
    frac -= np.round(frac)
    return frac @ cell


def test_adaptive_watch_settings_are_checked_with_the_plan() -> None:
    from umlipft.errors import ConfigError, PlanError
    from umlipft.workflows.plan import check_plan

    with pytest.raises(PlanError, match="adaptive.watch_every must be at least 1"):
        load_workflow_config(profile="quick", overrides={"adaptive": {"watch_every": 0}})
    with pytest.raises(PlanError, match="could never stop one"):
        load_workflow_config(profile="quick", overrides={"adaptive": {"watch_every": 25, "watch_patience": 2}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) chunk_steps"):  # the post-hoc chunks are gone
        load_workflow_config(profile="quick", overrides={"adaptive": {"chunk_steps": 20}})
    plan = check_plan(("adaptive",), load_workflow_config(profile="quick",
                                                          overrides={"finetune": {"export_watch": False}}))
    assert any("finetune.export_watch is false" in p for p in plan.problems)
    plan = check_plan(("periodic", "adaptive"), load_workflow_config(profile="quick"))
    assert any("watched segments" in w and "NVT" in w for w in plan.warnings)
    assert any("extrapolation watch" in line for line in plan.text().splitlines())


@pytest.mark.slow
def test_adaptive_labels_around_the_halt_and_continues_the_trajectory(tmp_path: Path, small_model_path: Path) -> None:
    from umlipft.report.workflow import build_workflow_report
    from umlipft.workflows.judge import adaptive_iterations
    from umlipft.workflows.state import WorkflowState
    from umlipft.workflows.strategies import run_adaptive

    yaml = tmp_path / "tiny.yaml"
    yaml.write_text(TINY.format(model=small_model_path))
    root = tmp_path / "wf"
    # Three segments, stopped once the third has run: it continues from the second's halt.
    config3 = load_workflow_config(yaml, overrides={"iterations": 3})
    outcome = run_workflow(("adaptive",), config3, root, judge=False, until="adaptive/seg-02/md")
    assert not outcome.finished
    state = json.loads((root / "state.json").read_text())["stages"]
    seg0, seg1, seg2 = (state[f"adaptive/seg-{i:02d}/md"]["result"] for i in range(3))
    assert "watch" not in seg0  # U has no training data: segment 0 is periodic's
    assert "adaptive/seg-00/extract" in state

    # The watch fired in segment 1: recorded by umlipft md, a finished run shorter than asked.
    watch = seg1["watch"][0]
    assert watch["halted"], watch
    halt = watch["halted_at_step"]
    md = config3.md
    ad = config3.adaptive
    assert ad.watch_every * ad.watch_patience <= halt < md.segment_steps and halt % ad.watch_every == 0
    assert watch["flagged_steps"][-1] == halt and watch["fired_atoms"]
    summary = json.loads((root / seg1["directories"][0] / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["results"]["watch"] == watch
    flagged = read_frames(root / seg1["flagged"][0])
    assert [int(a.info["step"]) for a in flagged] == watch["flagged_steps"]

    # Labelled: the flagged frames, newest first, then the dumped frames before the halt, up to
    # frames_per_segment; never step 0 (segment 0's last state) nor a step twice.
    select = state["adaptive/seg-01/select"]["result"]
    candidates = [s for s in reversed(watch["flagged_steps"]) if s > 0]
    candidates += [s for s in range(halt, 0, -md.dump_every) if s not in candidates]
    assert select["steps"] == sorted(candidates[:config3.frames_per_segment])
    assert select["halted_at_step"] == halt
    labelled = read_frames(root / state["adaptive/seg-01/label"]["result"]["labelled"])
    assert [int(a.info["step"]) for a in labelled] == select["steps"]
    by_step = {int(a.info["step"]): a for a in flagged}
    for atoms in labelled:
        step = int(atoms.info["step"])
        assert atoms.info["selection"] == ("watch-flagged" if step in by_step else "before-halt")
        assert "REF_energy" in atoms.info and atoms.info["iteration"] == 1
        if step in by_step:  # the flagged frame itself, with its Q columns
            np.testing.assert_allclose(atoms.positions, by_step[step].positions, atol=1e-6)
            assert atoms.arrays["watch_halt_ratio"].max() > 1.0
        assert atoms.info["run_time_ps"] == pytest.approx((md.segment_steps + step) * md.timestep_fs / 1000.0)
    # AD2 was trained on segment 0's frames and these
    ft2 = state["adaptive/ft-02"]["result"]
    assert ft2["n_frames"] == state["adaptive/seg-00/label"]["result"]["n_labelled"] + len(labelled)

    # Segment 2 continues the same trajectory from the halted state, with AD2 and its watch.
    final1 = read_frames(root / seg1["finals"][0])[-1]
    assert int(final1.info["step"]) == halt
    first2 = read_frames(root / seg2["trajectories"][0])[0]
    cell = final1.cell.array
    np.testing.assert_allclose(first2.cell.array, cell, atol=1e-6)
    assert np.abs(_wrapped_delta(first2.positions, final1.positions, cell)).max() < WORKFLOW_CONTINUITY_POSITION_A
    np.testing.assert_allclose(first2.get_velocities(), final1.get_velocities(), rtol=0,
                               atol=WORKFLOW_CONTINUITY_VELOCITY)
    cfg2 = json.loads((root / seg2["directories"][0] / "md-config.json").read_text())["config"]
    assert cfg2["model"].endswith("export/AD2/AD2-lammps-float32.pt")
    assert cfg2["continue_from"].endswith(seg1["directories"][0]) and cfg2["ensemble"] == "nvt"
    assert cfg2["watch_every"] == ad.watch_every and "watch" in seg2

    # Rerun (two iterations, the tiny default): every stage reused, none run again.
    config2 = load_workflow_config(yaml)
    run_workflow(("adaptive",), config2, root, judge=False)
    after = json.loads((root / "state.json").read_text())["stages"]
    assert all(after[name]["attempts"] == entry["attempts"] == 1 for name, entry in state.items())
    # The report's per-iteration table: when the watch fired, which atoms, the labels used.
    result = run_adaptive(WorkflowState(root), config2)
    iterations = adaptive_iterations(result)
    assert [it["watched"] for it in iterations] == [False, True]
    it1 = iterations[1]
    assert it1["halted"] and it1["halted_at_step"] == halt and it1["selection"] == "watch"
    assert it1["halted_at_ps"] == pytest.approx((md.segment_steps + halt) * md.timestep_fs / 1000.0)
    assert it1["labels"] == len(labelled) and it1["labels_cumulative"] == ft2["n_frames"]
    assert it1["fired_atoms"] == watch["fired_atoms"][:len(it1["fired_atoms"])] and it1["trained"] == "AD2"
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"setup": {}, "verdict": {"rows": []}, "self_consistent": {},
                                                    "adaptive": iterations}))
    html = build_workflow_report(folder).read_text()
    first = watch["fired_atoms"][0]
    assert f"step {halt} of the segment" in html and f"{first['element']} {first['id']} (" in html
