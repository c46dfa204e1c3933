"""The study profile's path with CP2K labels, on the smallest box that exercises it: the plan
passes the check, the labeller's isolated-atom energies are computed once, and the first
periodic segment goes from MD to a fine-tuned model without the E0 guard refusing (with the
foundation's E0s it would: CP2K's GTH energies are on another absolute scale)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tolerances import CP2K_STUDY_MAX_START_ERROR_MEV_PER_ATOM
from umlipft.workflows.config import load_workflow_config
from umlipft.workflows.plan import check_plan
from umlipft.workflows.runner import run_workflow

pytestmark = pytest.mark.slow

# The study profile with only the sizes cut: LiCl in 2 waters (Li, Cl, O, H: every kind of atom
# of the aqueous box but Co, whose open-shell CP2K atom alone takes minutes), 10 MD steps,
# 2 frames on the study's fixed stride, CP2K at a low cutoff, 1 epoch on the CPU, the plain export
# (the optimised one is tested elsewhere and costs more than 10 MD steps save).
STUDY_SHAPED = """\
profile: study
foundation: {model}
iterations: 1
frames_per_segment: 2
naive_subsets: [2]
system: {{system: aqueous, n_water: 2, n_cocl2: 0, seed: 3}}
md: {{segment_steps: 10, dump_every: 5, thermo_every: 5, restart_every: 0, optimized_export: false}}
label:
  calculator: cp2k
  cp2k: {{cutoff_Ry: 200, rel_cutoff_Ry: 30, max_scf: 40}}
  isolated_atom_box_A: 6.0
finetune: {{epochs: 1, batch_size: 1, device: cpu}}
evaluation: {{test_steps: 10, test_frames: 2, long_steps: 10, long_label_every: 5}}
adaptive: {{watch_every: 5, watch_patience: 2}}
"""


def test_study_profile_with_cp2k_reaches_a_fine_tuned_model(tmp_path: Path, small_model_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(STUDY_SHAPED.format(model=small_model_path))
    config = load_workflow_config(path)
    assert (config.selection, config.md.segment_velocities, config.finetune.e0s) == ("stride", "create", "auto")

    plan = check_plan(("periodic",), config)
    assert plan.ok, plan.problems
    assert plan.e0_policy == "isolated-atoms-fitted" and plan.e0_isolated_atoms

    directory = tmp_path / "wf"
    outcome = run_workflow(("periodic",), config, directory, until="periodic/ft-01", judge=False, log=None)
    assert not outcome.finished  # stopped after the fine-tune, as asked
    state = json.loads((directory / "state.json").read_text())["stages"]
    for stage in ("periodic/seg-00/md", "periodic/seg-00/extract", "periodic/seg-00/label", "e0/isolated-atoms",
                  "periodic/ft-01"):
        assert state[stage]["status"] == "done", stage

    isolated = state["e0/isolated-atoms"]["result"]
    assert sorted(isolated["energies_eV"]) == ["Cl", "H", "Li", "O"]
    assert isolated["multiplicities"] == {"H": 2, "Li": 2, "O": 3, "Cl": 2}

    extract = state["periodic/seg-00/extract"]["result"]
    assert extract["n_frames"] == 2 and extract["steps"] == [5, 10]  # the fixed stride over the second half

    ft = state["periodic/ft-01"]["result"]
    assert ft["e0_policy"] == "isolated-atoms-fitted"
    assert ft["mode"] == "naive"  # no replay file configured: plain fine-tuning, and it says so
    assert abs(ft["e0_predicted_start_rmse_meV_per_atom"]) < CP2K_STUDY_MAX_START_ERROR_MEV_PER_ATOM
    assert (directory / ft["model"]).is_file()
    summary = json.loads((directory / ft["model"]).with_name("summary.json").read_text())
    assert "isolated-atoms-fitted" in json.dumps(summary)

    # A rerun reuses everything: no isolated atom, frame or training is redone.
    run_workflow(("periodic",), config, directory, until="periodic/ft-01", judge=False, log=None)
    journal = [json.loads(line) for line in (directory / "journal.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "isolated_atoms_call" for e in journal) == 1
    assert sum(e["event"] == "finetune_call" for e in journal) == 1
