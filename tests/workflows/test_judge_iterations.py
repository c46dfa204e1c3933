"""The frames each iteration adds, as the coverage maps use them: naive subsets are written in
pool order by the real pool stage, so a subset's new frames are not the end of its file."""

from __future__ import annotations

from pathlib import Path

from umlipft.analysis.frames import frame_fingerprint
from umlipft.io import read_frames, write_frames
from umlipft.workflows.config import load_workflow_config
from umlipft.workflows.judge import iteration_datasets
from umlipft.workflows.state import WorkflowState
from umlipft.workflows.strategies import ModelInfo, StrategyResult, _pool_stage, universal


def test_new_frames_of_naive_subsets_in_pool_order(tmp_path: Path, aqueous_dir: Path) -> None:
    source = read_frames(aqueous_dir / "single_points" / "Finetuning__Periodic__U__dft.extxyz", index=":9")
    state = WorkflowState(tmp_path / "wf")
    labelled = []
    for j in range(3):  # three "trajectories" of three labelled frames each
        path = write_frames(state.root / f"naive/traj-{j:02d}/label/labelled.extxyz", source[3 * j:3 * j + 3])
        labelled.append(str(path.relative_to(state.root)))
    config = load_workflow_config(profile="quick", overrides={"iterations": 3, "frames_per_segment": 3,
                                                                   "naive_subsets": [3, 6], "seed": 5})
    pool = _pool_stage(state, config, labelled, deps=[])
    models = [universal(config)] + [ModelInfo(f"N-{n}pts", "unused.model", None, (subset,), n, f"naive/ft-{n:03d}")
                                    for n, subset in zip(pool["sizes"], pool["subsets"])]
    its = iteration_datasets(state, StrategyResult("naive", models, [], labelled))
    small, large = (read_frames(state.root / s) for s in pool["subsets"])
    small_ids = {frame_fingerprint(a) for a in small}
    expected = [frame_fingerprint(a) for a in large if frame_fingerprint(a) not in small_ids]
    assert [name for name, _, _ in its] == ["N-3pts", "N-6pts"]
    assert [frame_fingerprint(a) for a in its[1][2]] == expected and len(expected) == 3
    # The case that tail-of-file gets wrong: with this seed the new frames are not the last three.
    assert expected != [frame_fingerprint(a) for a in large[3:]]
    assert [frame_fingerprint(a) for a in its[0][2]] == [frame_fingerprint(a) for a in small]
